"""Naive CoCA on llama.cpp, the oracle for tests and the baseline for benchmarks: two independent
sequences, each prefilled in full and decoded by its own llama_decode every step; nothing shared.
Greedy; the CoCA op's backend is selectable (the reference by default, C++ for benchmarks)."""
from __future__ import annotations

import numpy as np

from .. import ops
from .engine import Engine


def naive_coca(engine: Engine, base: list[int], safe: list[int], alpha: float, max_tokens: int,
               trace: list | None = None, backend: str = "ref") -> list[int]:
    """Greedy tokens of CoCA from two separately computed sequences (seq 0 and seq 1).
    ``trace`` collects each step's calibrated logits (float32 [V])."""
    e = engine
    e.clear()
    e.decode([(t, i, 0, i == len(base) - 1) for i, t in enumerate(base)])
    lb = e.logits(-1).copy()
    e.decode([(t, i, 1, i == len(safe) - 1) for i, t in enumerate(safe)])
    ls = e.logits(-1).copy()
    out = []
    a = np.full(1, alpha, np.float32)
    for step in range(max_tokens):
        cal = np.empty_like(lb)
        tok, _ = ops.coca_step(lb, ls, a, out=cal, backend=backend)
        tok = int(tok[0])
        if trace is not None:
            trace.append(cal[0])
        out.append(tok)
        if e.is_eog(tok) or step + 1 == max_tokens:
            break
        e.decode([(tok, len(base) + step, 0, True)])
        lb = e.logits(-1).copy()
        e.decode([(tok, len(safe) + step, 1, True)])
        ls = e.logits(-1).copy()
    return out
