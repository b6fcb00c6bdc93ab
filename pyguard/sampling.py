"""Next-token choice from one row of logits, numpy only (the edge path)."""
from __future__ import annotations

import numpy as np


def sample(logits: np.ndarray, top_p: float, rng: np.random.Generator) -> int:
    """Draw a token from softmax(logits) restricted to the smallest set of top tokens whose
    probability reaches ``top_p``. logits: float32 [V], already divided by the temperature."""
    p = np.exp(logits - logits.max(), dtype=np.float64)
    p /= p.sum()
    if top_p < 1.0:
        k = min(p.size, 1024)
        top = np.argpartition(-p, k - 1)[:k] if k < p.size else np.arange(p.size)
        if p[top].sum() < top_p:  # a flat distribution: rank all of it
            top = np.arange(p.size)
        top = top[np.argsort(-p[top], kind="stable")]
        keep = top[: int(np.searchsorted(np.cumsum(p[top]), top_p)) + 1]
        q = p[keep] / p[keep].sum()
        return int(keep[rng.choice(q.size, p=q)])
    return int(rng.choice(p.size, p=p))
