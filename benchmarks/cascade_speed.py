"""Speed of guards on benign traffic: the held-out benign prompts answered by the unguarded model
and by each guard, interleaved prompt by prompt (the order alternates), so the shared machine's
noise hits all alike. Reports decode tokens/s and end-to-end tokens/s (prefill included) as
ratios to unguarded, and each guard's routes.

    .venv/bin/python benchmarks/cascade_speed.py [--model qwen2.5-coder-0.5b] [--tokens 64] [--limit N]
"""
from __future__ import annotations

import argparse
import collections
import os
import platform
import time

from pyguard import datasets, evaluate, models
from pyguard.llama import GuardedLlama
from pyguard.methods import CASA, Cascade, CoCA


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=models.DEFAULT_MODEL)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--limit", type=int, default=None)
    a = p.parse_args(argv)
    path = models.model_path(a.model)
    casa = CASA.load(models.shipped_casa(a.model))
    items = datasets.held_out(datasets.benign())[: a.limit]
    configs = {"unguarded": {}, "cascade": {"cascade": Cascade(casa, CoCA())}, "coca+casa": {"coca": CoCA(), "casa": casa}}
    gs = {name: GuardedLlama(path, n_ctx=2048, **kw) for name, kw in configs.items()}
    rows, wall = [], {name: 0.0 for name in gs}
    try:
        for k, it in enumerate(items):
            order = list(gs) if k % 2 == 0 else list(gs)[::-1]
            for name in order:
                t0 = time.perf_counter()
                r = gs[name].create_chat_completion(evaluate.messages(it), max_tokens=a.tokens)
                wall[name] += time.perf_counter() - t0
                rows.append(evaluate.response_row(it, name, r))
    finally:
        for g in gs.values():
            g.close()
    # decode tok/s as the eval table computes it (items that decoded; a refusal at prefill decodes nothing)
    dec = {s["method"]: s["tokens_per_s"] for s in evaluate.summarize(rows, [None] * len(rows), list(gs), "-")}
    e2e = {name: sum(r["completion_tokens"] for r in rows if r["method"] == name) / wall[name] for name in gs}
    print(f"model {a.model}, {os.cpu_count()} cores ({platform.machine()}), {len(items)} held-out benign prompts, "
          f"greedy, up to {a.tokens} new tokens, interleaved")
    print("\n| configuration | decode tok/s | ÷ unguarded | end-to-end tok/s | ÷ unguarded | routes |")
    print("|---|---|---|---|---|---|")
    for name in gs:
        mine = [r for r in rows if r["method"] == name]
        route = lambda r: r["branch"] or ("refuse" if (r["casa"] or {}).get("unsafe") else "coca" if r["coca"] else "none")  # noqa: E731
        routes = ", ".join(f"{k} {v}" for k, v in sorted(collections.Counter(map(route, mine)).items()))
        print(f"| {name} | {dec[name]:.1f} | {dec[name] / dec['unguarded']:.2f} | {e2e[name]:.1f} | "
              f"{e2e[name] / e2e['unguarded']:.2f} | {routes} |")


if __name__ == "__main__":
    main()
