"""Speed of guards on benign traffic: the held-out benign prompts answered by the unguarded model
and by each guard, interleaved prompt by prompt (the order alternates), so the shared machine's
noise hits all alike. Reports decode tokens/s and end-to-end tokens/s (prefill included) as
ratios to unguarded, and each guard's routes.

    .venv/bin/python benchmarks/cascade_speed.py [--model qwen2.5-coder-0.5b] [--tokens 64] [--limit N]
"""
from __future__ import annotations

import argparse
import os
import platform
import time

from pyguard import datasets, models
from pyguard.demo_chat import shipped_casa
from pyguard.llama import GuardedLlama
from pyguard.methods import CASA, Cascade, CoCA


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=models.DEFAULT_MODEL)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--limit", type=int, default=None)
    a = p.parse_args(argv)
    path = models.model_path(a.model)
    casa = CASA.load(shipped_casa(a.model))
    items = datasets.held_out(datasets.benign())[: a.limit]
    configs = {"unguarded": {}, "cascade": {"cascade": Cascade(casa, CoCA())}, "coca+casa": {"coca": CoCA(), "casa": casa}}
    gs = {name: GuardedLlama(path, n_ctx=2048, **kw) for name, kw in configs.items()}
    acc = {name: {"tokens": 0, "dec_tokens": 0, "decode_s": 0.0, "wall_s": 0.0, "routes": {}} for name in gs}
    try:
        for k, it in enumerate(items):
            order = list(gs) if k % 2 == 0 else list(gs)[::-1]
            for name in order:
                t0 = time.perf_counter()
                r = gs[name].create_chat_completion([{"role": "user", "content": it["text"]}], max_tokens=a.tokens)
                wall = time.perf_counter() - t0
                rep, n = r["pyguard"], r["usage"]["completion_tokens"]
                t = rep["timings"]
                s = acc[name]
                s["tokens"] += n
                s["wall_s"] += wall
                if t.get("decode_ms_per_token") and n > 1:  # a refusal at prefill decodes nothing
                    s["decode_s"] += t["decode_ms_per_token"] * n / 1e3
                    s["dec_tokens"] += n
                route = (rep.get("cascade") or {}).get("branch") or ("refuse" if (rep.get("casa") or {}).get("unsafe")
                                                                      else "coca" if rep.get("coca") else "none")
                s["routes"][route] = s["routes"].get(route, 0) + 1
    finally:
        for g in gs.values():
            g.close()
    base = acc["unguarded"]
    print(f"model {a.model}, {os.cpu_count()} cores ({platform.machine()}), {len(items)} held-out benign prompts, "
          f"greedy, up to {a.tokens} new tokens, interleaved")
    print("\n| configuration | decode tok/s | ÷ unguarded | end-to-end tok/s | ÷ unguarded | routes |")
    print("|---|---|---|---|---|---|")
    for name, s in acc.items():
        dec, e2e = s["dec_tokens"] / s["decode_s"], s["tokens"] / s["wall_s"]
        routes = ", ".join(f"{k} {v}" for k, v in sorted(s["routes"].items()))
        print(f"| {name} | {dec:.1f} | {dec / (base['dec_tokens'] / base['decode_s']):.2f} | {e2e:.1f} | "
              f"{e2e / (base['tokens'] / base['wall_s']):.2f} | {routes} |")


if __name__ == "__main__":
    main()
