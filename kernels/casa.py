"""casa_score in Triton: one program per sequence, online softmax over its tokens."""
import math

import torch
import triton
import triton.language as tl

from ._alloc import outputs


@triton.jit
def _casa_score_kernel(H_ptr, cu_ptr, Wk_ptr, q_ptr, w_ptr, w_last_ptr, w_max_ptr, s_ptr, b, d, r, heads, scale,
                       HAS_LAST: tl.constexpr, HAS_MAX: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    seq = tl.program_id(0)
    start = tl.load(cu_ptr + seq)
    end = tl.load(cu_ptr + seq + 1)
    low = -1e30  # finite sentinel: masked lanes never make inf - inf
    rr = tl.arange(0, BLOCK_R)
    hh = tl.arange(0, BLOCK_H)
    hmask = hh < heads
    qT = tl.load(q_ptr + hh[None, :] * r + rr[:, None],
                 mask=(rr < r)[:, None] & hmask[None, :], other=0.0)  # [R, H]
    m = tl.full([BLOCK_H], low, tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H], tl.float32)
    bad = tl.zeros([], tl.float32)
    for t0 in range(start, end, BLOCK_T):
        tt = t0 + tl.arange(0, BLOCK_T)
        tmask = tt < end
        K = tl.zeros([BLOCK_T, BLOCK_R], tl.float32)
        u = tl.zeros([BLOCK_T], tl.float32)
        for d0 in range(0, d, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dmask = dd < d
            x = tl.load(H_ptr + tt[:, None].to(tl.int64) * d + dd[None, :],
                        mask=tmask[:, None] & dmask[None, :], other=0.0)  # [T, D]
            wk = tl.load(Wk_ptr + dd[:, None] * r + rr[None, :],
                         mask=dmask[:, None] & (rr < r)[None, :], other=0.0)  # [D, R]
            K += tl.dot(x, wk, input_precision="tf32x3")
            u += tl.sum(x * tl.load(w_ptr + dd, mask=dmask, other=0.0)[None, :], axis=1)
            bad += tl.sum(x * 0.0)
        logits = tl.dot(K, qT, input_precision="tf32x3") * scale  # [T, H]
        logits = tl.where(tmask[:, None] & hmask[None, :], logits, low)
        new_m = tl.maximum(m, tl.max(logits, axis=0))
        f = tl.exp(m - new_m)
        p = tl.where(tmask[:, None] & hmask[None, :], tl.exp(logits - new_m[None, :]), 0.0)
        l = l * f + tl.sum(p, axis=0)
        acc = acc * f + tl.sum(p * u[:, None], axis=0)
        m = new_m
    z = tl.where(hmask, acc / tl.where(hmask, l, 1.0), 0.0)
    logit = tl.sum(z) / heads + b
    if HAS_LAST:  # the last row is the sequence's: its non-finite values are in bad
        for d0 in range(0, d, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dmask = dd < d
            x = tl.load(H_ptr + (end - 1).to(tl.int64) * d + dd, mask=dmask, other=0.0)
            logit += tl.sum(x * tl.load(w_last_ptr + dd, mask=dmask, other=0.0))
    if HAS_MAX:  # the rows' maximum per dimension (their non-finite values are in bad)
        for d0 in range(0, d, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dmask = dd < d
            mx = tl.full([BLOCK_D], float("-inf"), tl.float32)
            for t0 in range(start, end, BLOCK_T):
                tt = t0 + tl.arange(0, BLOCK_T)
                x = tl.load(H_ptr + tt[:, None].to(tl.int64) * d + dd[None, :],
                            mask=(tt < end)[:, None] & dmask[None, :], other=float("-inf"))  # [T, D]
                mx = tl.maximum(mx, tl.max(x, axis=0))
            logit += tl.sum(tl.where(dmask, mx * tl.load(w_max_ptr + dd, mask=dmask, other=0.0), 0.0))
    e = tl.exp(-tl.abs(logit))  # a sigmoid that never overflows, as the reference's
    tl.store(s_ptr + seq, tl.where(logit >= 0, 1.0 / (1.0 + e), e / (1.0 + e)) + bad)


def casa_score(H, cu_seqlens, Wk, q, w, b, w_last=None, w_max=None):
    """H: fp32 [T, d]; cu_seqlens: int [B + 1]; Wk: [d, r]; q: [heads, r]; w: [d]; b: float;
    w_last, w_max: [d] or None. Returns fp32 [B]."""
    d, r = Wk.shape
    heads = q.shape[0]
    B = cu_seqlens.shape[0] - 1
    s = outputs(B, torch.float32, H.device)
    if B == 0:
        return s
    _casa_score_kernel[(B,)](
        H, cu_seqlens, Wk, q, w, w if w_last is None else w_last, w if w_max is None else w_max, s, float(b), d, r,
        heads, 1.0 / math.sqrt(r), HAS_LAST=w_last is not None, HAS_MAX=w_max is not None, BLOCK_T=16, BLOCK_D=64, BLOCK_R=max(16, triton.next_power_of_2(r)),
        BLOCK_H=max(16, triton.next_power_of_2(heads)),
    )
    return s
