"""Does a request that takes no guard get exactly the unguarded model's answer? Greedy answers of
held-out benign prompts, one request at a time, compared token for token with the unguarded
model's: CoCA at alpha 0, CoCA switched off per request, the cascade's unguarded branch, and
(``--concurrent``) unguarded requests sent together to a few slots.

    .venv/bin/python benchmarks/unguarded.py [--model qwen2.5-coder-0.5b] [--n 16] [--tokens 64]
"""
from __future__ import annotations

import argparse
import threading

from pyguard import datasets, models
from pyguard.llama import GuardedLlama
from pyguard.methods import CASA, Cascade, CoCA


def answer(g, prompt: str, tokens: int, **kw):
    """(token ids, the pyguard report) of one greedy request."""
    job = g.submit([{"role": "user", "content": prompt}], tokens, **kw)
    events = list(g.events(job))
    return list(job.out), events[-1][3]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=models.DEFAULT_MODEL)
    p.add_argument("--n", type=int, default=16, help="held-out benign prompts")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--concurrent", type=int, default=0, help="also send them together to this many slots")
    a = p.parse_args()
    path = models.model_path(a.model)
    prompts = [it["text"] for it in datasets.held_out(datasets.benign())[: a.n]]
    runs = {}
    with GuardedLlama(path, n_ctx=512) as g:
        plain = [answer(g, q, a.tokens)[0] for q in prompts]
    with GuardedLlama(path, n_ctx=512, coca=CoCA(alpha=0.0)) as g:
        runs["CoCA at alpha 0"] = [answer(g, q, a.tokens)[0] for q in prompts]
        runs["CoCA switched off per request"] = [answer(g, q, a.tokens, guards={"coca": False})[0] for q in prompts]
    shipped = models.shipped_casa(a.model)
    if shipped is not None and CASA.load(shipped).cascade is not None:
        with GuardedLlama(path, n_ctx=512, cascade=Cascade(CASA.load(shipped), CoCA())) as g:
            got = [answer(g, q, a.tokens) for q in prompts]
        runs["the cascade's unguarded branch"] = [t if r["cascade"]["branch"] == "none" else None for t, r in got]
    if a.concurrent:
        out = [None] * len(prompts)
        with GuardedLlama(path, n_ctx=512, parallel=a.concurrent) as g:
            threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, answer(g, prompts[i], a.tokens)[0]))
                       for i in range(len(prompts))]
            [t.start() for t in threads]
            [t.join() for t in threads]
        runs[f"{len(prompts)} concurrent on {a.concurrent} slots"] = out
    print(f"{a.model}, {len(prompts)} held-out benign prompts, {a.tokens} greedy tokens\n")
    print("| configuration | identical to the unguarded answer |\n|---|---|")
    for name, toks in runs.items():
        pairs = [(t, u) for t, u in zip(toks, plain) if t is not None]
        print(f"| {name} | {sum(t == u for t, u in pairs)} / {len(pairs)} |")


if __name__ == "__main__":
    main()
