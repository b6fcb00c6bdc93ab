"""Aggregate decode throughput of GuardedLlama with continuous batching (``parallel=N``) beside
the same requests one at a time (``parallel=1``), measured in one run, interleaved.

    .venv/bin/python benchmarks/serve_batching.py --model qwen2.5-coder-0.5b --clients 8 --tokens 32
"""
from __future__ import annotations

import argparse
import threading
import time

from pyguard import models
from pyguard.llama import GuardedLlama
from pyguard.methods import CoCA
from pyguard.timing import cpu_model

TOPICS = ["cats", "the sea", "Paris", "bread", "rain", "chess", "music", "trees", "gold", "snow", "ice", "wind",
          "salt", "glass", "fire", "sand"]


def run(g, clients: int, tokens: int) -> tuple[float, int]:
    """(seconds, completion tokens) for ``clients`` concurrent requests."""
    out = []

    def one(i):
        r = g.create_chat_completion([{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}."}],
                                     max_tokens=tokens)
        out.append(r["usage"]["completion_tokens"])
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, sum(out)



def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    path = models.model_path(a.model)
    print(f"{a.model}, {a.clients} concurrent clients x {a.tokens} tokens, {a.rounds} rounds; CPU: {cpu_model()}")
    print("| guard | parallel | tokens/s (aggregate) | ratio to parallel=1 |\n|---|---|---|---|")
    for name, kw in (("none", {}), ("CoCA", {"coca": CoCA(alpha=1.5)})):
        rates = {}
        for par in (1, a.clients):
            with GuardedLlama(path, n_ctx=512, parallel=par, **kw) as g:
                run(g, 2, 4)  # warm up
                best = max(n / s for s, n in (run(g, a.clients, a.tokens) for _ in range(a.rounds)))
            rates[par] = best
        for par, r in rates.items():
            print(f"| {name} | {par} | {r:.1f} | {r / rates[1]:.2f}x |")


if __name__ == "__main__":
    main()
