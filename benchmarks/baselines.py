"""Unfused baselines: the same math as each op, composed from numpy and from torch eager ops,
and the data each benchmark case uses. Shared by the pytest-benchmark suite and ops_report.py."""
from __future__ import annotations

import numpy as np


def coca_numpy(base, safe, alpha, temperature, out):
    """coca_step composed in float32 numpy: calibrate, argmax, two log-softmaxes, KL."""
    a, t = alpha[:, None], temperature[:, None]
    np.multiply(1 - a, base, out=out)
    out += a * safe
    out /= t
    token = out.argmax(1)
    ls = safe - safe.max(1, keepdims=True)
    ls -= np.log(np.exp(ls).sum(1, keepdims=True))
    lb = base - base.max(1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(1, keepdims=True))
    kl = (np.exp(ls) * (ls - lb)).sum(1)
    return token, kl


def coca_torch(base, safe, alpha, temperature, out):
    """coca_step composed from torch eager ops."""
    import torch

    a, t = alpha[:, None], temperature[:, None]
    torch.add(base * (1 - a), safe * a, out=out)
    out /= t
    token = out.argmax(1)
    ls, lb = torch.log_softmax(safe, 1), torch.log_softmax(base, 1)
    kl = (ls.exp() * (ls - lb)).sum(1)
    return token, kl


def cmrm_numpy(h, v, alpha, row_mask=None):
    if row_mask is None:
        h -= np.float32(alpha) * v
    else:
        h[row_mask] -= np.float32(alpha) * v


def cmrm_torch(h, v, alpha, row_mask=None):
    if row_mask is None:
        h.sub_(v, alpha=alpha)
    else:
        h[row_mask] -= alpha * v


def casa_numpy(H, cu, Wk, q, w, b):
    """casa_score composed in float32 numpy, sequence by sequence."""
    r = Wk.shape[1]
    out = np.empty(len(cu) - 1, np.float32)
    for i in range(len(cu) - 1):
        x = H[cu[i]:cu[i + 1]]
        logits = (x @ Wk) @ q.T / np.sqrt(r)
        a = np.exp(logits - logits.max(0))
        a /= a.sum(0)
        z = (a.T @ x).mean(0)
        out[i] = 1 / (1 + np.exp(-(w @ z + b)))
    return out


def casa_torch(H, cu, Wk, q, w, b):
    import torch

    r = Wk.shape[1]
    out = []
    for i in range(len(cu) - 1):
        x = H[int(cu[i]):int(cu[i + 1])]
        a = torch.softmax((x @ Wk) @ q.T / r**0.5, 0)
        out.append(torch.sigmoid(w @ (a.T @ x).mean(0) + b))
    return torch.stack(out)


def coca_data(B, V, seed=0):
    rng = np.random.default_rng(seed)
    base = (rng.standard_normal((B, V)) * 3).astype(np.float32)
    safe = (base + rng.standard_normal((B, V))).astype(np.float32)
    return base, safe, np.full(B, 1.5, np.float32), np.ones(B, np.float32), np.empty_like(base)


def cmrm_data(N, d, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N, d)).astype(np.float32), rng.standard_normal(d).astype(np.float32)


def cmrm_mask(N, seed=0):
    """Rows of image-conditioned requests: half the rows, in runs (a batch mixing requests)."""
    rng = np.random.default_rng(seed)
    return np.repeat(rng.random(max(N // 64, 1)) < 0.5, 64)[:N] if N >= 64 else np.ones(N, bool)


def casa_data(B, T, d, r=64, heads=4, seed=0):
    rng = np.random.default_rng(seed)
    H = rng.standard_normal((B * T, d)).astype(np.float32)
    cu = (np.arange(B + 1) * T).astype(np.int64)
    Wk = (rng.standard_normal((d, r)) / np.sqrt(d)).astype(np.float32)
    q = rng.standard_normal((heads, r)).astype(np.float32)
    w = (rng.standard_normal(d) / np.sqrt(d)).astype(np.float32)
    return H, cu, Wk, q, w, 0.1
