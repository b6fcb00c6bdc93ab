"""Next-token choice from one row of logits: one algorithm for numpy rows (llama.cpp) and torch
rows (PyTorch, on their device), drawing from the same numpy Generator, so the two runtimes
sample the same token from the same logits and seed."""
from __future__ import annotations

import numpy as np

from .reference import is_torch


def sample(logits, top_p: float, rng: np.random.Generator) -> int:
    """Draw a token from softmax(logits) restricted to the smallest set of top tokens whose
    probability reaches ``top_p``. logits: float32 [V] (numpy, or torch on any device), already
    divided by the temperature. One ``rng.random()`` per draw: the inverse of the cumulative
    probabilities (vocabulary order; with top-p, descending probability, ties by token id)."""
    if is_torch(logits):
        return _sample_torch(logits, top_p, rng.random())
    p = np.exp(logits - logits.max(), dtype=np.float64)  # unnormalized: the draw scales u instead
    order = None
    if top_p < 1.0:
        p /= p.sum()
        k = min(p.size, 1024)
        top = np.argpartition(-p, k - 1)[:k] if k < p.size else np.arange(p.size)
        if p[top].sum() < top_p:  # a flat distribution: rank all of it
            top = np.arange(p.size)
        top = top[np.argsort(-p[top], kind="stable")]
        order = top[: int(np.searchsorted(np.cumsum(p[top]), top_p)) + 1]
        p = p[order]
    cdf = np.cumsum(p)
    i = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), p.size - 1)
    return int(i if order is None else order[i])


def _sample_torch(logits, top_p: float, u: float) -> int:
    """The same draw on the row's device; one host read (the token)."""
    import torch

    p = torch.exp((logits - logits.max()).double())
    order = None
    if top_p < 1.0:
        p, order = torch.sort(p / p.sum(), descending=True, stable=True)
        n = torch.searchsorted(torch.cumsum(p, 0), torch.full((1,), top_p, dtype=p.dtype, device=p.device)) + 1
        p = torch.where(torch.arange(p.numel(), device=p.device) < n, p, 0.0)
    cdf = torch.cumsum(p, 0)
    i = torch.searchsorted(cdf, u * cdf[-1:], right=True)
    i = i.clamp_(max=p.numel() - 1)
    return int((i if order is None else order[i]).item())
