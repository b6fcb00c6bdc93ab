"""Reference implementations of the three ops: the oracle the C++ and Triton kernels are tested
against, and the fallback for inputs no kernel takes (e.g. bf16 on the CPU).

Written once for numpy arrays and torch tensors alike (both accept the same ``amax``, ``sum``,
``where``... calls); math in float64, outputs as documented in :mod:`pyguard.ops`.
Arguments are assumed validated (``pyguard.ops`` does that).
"""
from __future__ import annotations

import math

import numpy as np


def is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _xp(x):
    if is_torch(x):
        import torch

        return torch
    return np


def _cast(x, dtype: str):
    """x as float64 / float32 / int64 (``dtype`` names the numpy and torch dtype alike)."""
    if is_torch(x):
        import torch

        return x.to(getattr(torch, dtype))
    return np.asarray(x).astype(dtype, copy=False)


def _logsumexp(xp, x):
    m = xp.amax(x, axis=-1, keepdims=True)
    m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
    return m + xp.log(xp.sum(xp.exp(x - m), axis=-1, keepdims=True))


def coca_step(base, safe, alpha, temperature, force_token=None, out=None):
    """base, safe: [B, V]; alpha, temperature: [B]; force_token: int64 [B] or None; out: [B, V].

    Calibrated logits ``c = ((1 - alpha) * base + alpha * safe) / temperature`` (exact at alpha 0
    and 1) go to ``out``. Returns ``token`` (int64 [B]: ``force_token`` where >= 0, else argmax of
    the float32 ``c``, the first NaN if there is one) and ``kl`` (float32 [B]:
    ``KL(softmax(safe) || softmax(base))``, NaN for a row with a non-finite logit).
    """
    xp = _xp(base)
    b, s = _cast(base, "float64"), _cast(safe, "float64")
    a = _cast(alpha, "float64")[:, None]
    t = _cast(temperature, "float64")[:, None]
    c = _cast(((1 - a) * b + a * s) / t, "float32")
    if out is not None:
        out[...] = c.to(out.dtype) if is_torch(c) else c
    token = xp.argmax(c, axis=-1)
    if force_token is not None:
        f = _cast(force_token, "int64")
        token = xp.where(f >= 0, f, token)
    with np.errstate(invalid="ignore"):  # non-finite rows: NaN is the documented answer
        ls, lb = s - _logsumexp(xp, s), b - _logsumexp(xp, b)
        kl = xp.sum(xp.exp(ls) * (ls - lb), axis=-1)
    finite = xp.all(xp.isfinite(s) & xp.isfinite(b), axis=-1)
    kl = xp.where(finite, kl, kl * math.nan)
    return _cast(token, "int64"), _cast(kl, "float32")


def cmrm_shift_(h, v, alpha, row_mask=None):
    """In place ``h[n] -= alpha * v`` for rows with ``row_mask[n]`` (all if None), in float32.

    h: [N, d]; v: [d]; row_mask: bool [N] or None. Returns h.
    """
    xp = _xp(h)
    hf = _cast(h, "float32")
    av = _cast(v, "float32") * (float(alpha) if is_torch(v) else np.float32(alpha))
    new = hf - av
    if row_mask is not None:
        new = xp.where(row_mask[:, None], new, hf)
    h[...] = new.to(h.dtype) if is_torch(h) else new.astype(h.dtype, copy=False)
    return h


def casa_score(H, cu_seqlens, Wk, q, w, b, w_last=None, w_max=None):
    """Safety-attention score per sequence, the literal formula.

    H: [T, d] prompt hidden states of B sequences packed by ``cu_seqlens`` ([B + 1]);
    Wk: [d, r]; q: [heads, r]; w: [d]; b: float; w_last, w_max: [d] or None (zeros). For each
    sequence and head, ``a = softmax_t(H_t Wk . q_h / sqrt(r))``, ``z = mean_h sum_t a_t H_t``,
    ``s = sigmoid(w . z + w_last . H_last + w_max . max_t H_t + b)`` with H_last the sequence's
    last row and max_t H_t its rows' maximum per dimension. Returns float32 [B]; NaN for a
    sequence with non-finite H.
    """
    xp = _xp(H)
    Hd, Wkd, qd, wd = (_cast(x, "float64") for x in (H, Wk, q, w))
    wl = None if w_last is None else _cast(w_last, "float64")
    wm = None if w_max is None else _cast(w_max, "float64")
    cu = [int(c) for c in cu_seqlens]
    r = Wkd.shape[1]
    scores = []
    for i in range(len(cu) - 1):
        x = Hd[cu[i] : cu[i + 1]]
        if not bool(xp.all(xp.isfinite(x))):
            scores.append(math.nan)
            continue
        logits = (x @ Wkd) @ qd.T / math.sqrt(r)  # [t, heads]
        logits = logits - xp.amax(logits, axis=0, keepdims=True)
        a = xp.exp(logits)
        a = a / xp.sum(a, axis=0, keepdims=True)
        z = xp.sum(a.T @ x, axis=0) / qd.shape[0]  # [d]
        logit = float(xp.sum(wd * z)) + float(b)
        if wl is not None:
            logit += float(xp.sum(wl * x[-1]))
        if wm is not None:
            logit += float(xp.sum(wm * xp.amax(x, axis=0)))
        e = math.exp(-abs(logit))  # a sigmoid that never overflows
        scores.append(1.0 / (1.0 + e) if logit >= 0 else e / (1.0 + e))
    if is_torch(H):
        import torch

        return torch.tensor(scores, dtype=torch.float32, device=H.device)
    return np.asarray(scores, dtype=np.float32)
