"""Time to first token with the prompt cache off and warm, per guard configuration, measured
interleaved in one run. Warm: the slot's last request was a different question, so what is
reused is what requests share (the chat template's system prompt; with the principle placed
before the user text, the principle too).

    .venv/bin/python benchmarks/prompt_cache.py [--model qwen2.5-coder-0.5b] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

from pyguard import models
from pyguard.bench import BENIGN, PROMPT, configs, gguf_path
from pyguard.llama import GuardedLlama
from pyguard.llama.engine import model_shape
from pyguard.methods import CoCA
from serve_batching import cpu

QUESTIONS = [PROMPT, *BENIGN, "What is the capital of Australia?", "Summarize the plot of Hamlet in three sentences.",
             "How many bits are in a byte, and why?", "Give me a recipe for pancakes."]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=models.DEFAULT_MODEL)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    path = gguf_path(a.model)
    n_layer, n_embd = model_shape(path)
    c = configs(n_embd, n_layer, 0.5)
    specs = {"unguarded": {}, "CoCA (principle after the question)": {"coca": CoCA(alpha=1.5)},
             "CoCA (principle before the question)": {"coca": CoCA(alpha=1.5, principle_position="before")},
             "CASA": {"casa": c["CASA"]["casa"]}, "CMRM": {"cmrm": c["CMRM"]["cmrm"]}}
    gs = {(name, cache): GuardedLlama(path, n_ctx=1024, cache_prompt=cache, **kw)
          for name, kw in specs.items() for cache in (False, True)}
    ttft = {k: [] for k in gs}
    try:
        for g in gs.values():
            g.create_chat_completion([{"role": "user", "content": "Hello."}], max_tokens=1)  # warm: the template
        for _ in range(a.rounds):
            for q in QUESTIONS:
                for k, g in gs.items():
                    t0 = time.perf_counter()
                    g.create_chat_completion([{"role": "user", "content": q}], max_tokens=1)
                    ttft[k].append(time.perf_counter() - t0)
    finally:
        for g in gs.values():
            g.close()
    med = {k: statistics.median(v) * 1e3 for k, v in ttft.items()}
    print(f"{path.name}, {len(QUESTIONS)} questions x {a.rounds} rounds, 1-token requests, medians; CPU: {cpu()}\n")
    print("| configuration | TTFT ms, cache off | / unguarded | TTFT ms, cache warm | / unguarded (warm) |")
    print("|---|---|---|---|---|")
    for name in specs:
        off, on = med[(name, False)], med[(name, True)]
        print(f"| {name} | {off:.0f} | {off / med[('unguarded', False)]:.2f} | {on:.0f} | "
              f"{on / med[('unguarded', True)]:.2f} |")


if __name__ == "__main__":
    main()
