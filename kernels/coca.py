"""coca_step in Triton: one program per row, one pass over V with online log-sum-exp."""
import torch
import triton
import triton.language as tl

from ._alloc import outputs


@triton.jit
def _coca_step_kernel(base_ptr, safe_ptr, out_ptr, alpha_ptr, temp_ptr, force_ptr, token_ptr,
                      kl_ptr, V, HAS_OUT: tl.constexpr, HAS_FORCE: tl.constexpr,
                      BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    a = tl.load(alpha_ptr + row)
    it = 1.0 / tl.load(temp_ptr + row)
    ninf = float("-inf")
    m_s = tl.full([], ninf, tl.float32)
    m_b = tl.full([], ninf, tl.float32)
    S_s = tl.zeros([], tl.float32)
    S_b = tl.zeros([], tl.float32)
    A = tl.zeros([], tl.float32)
    bad = tl.zeros([], tl.float32)
    best = tl.full([], ninf, tl.float32)
    best_idx = tl.zeros([], tl.int32)
    nan_idx = tl.full([], V, tl.int32)
    for start in range(0, V, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < V
        b = tl.load(base_ptr + row * V + idx, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(safe_ptr + row * V + idx, mask=mask, other=0.0).to(tl.float32)
        c = ((1.0 - a) * b + a * s) * it
        if HAS_OUT:
            tl.store(out_ptr + row * V + idx, c.to(out_ptr.dtype.element_ty), mask=mask)
        bad += tl.sum(tl.where(mask, s * 0.0 + b * 0.0, 0.0))
        # Online log-sum-exp of safe and base (NaN lanes ignored here; `bad` makes kl NaN).
        new_ms = tl.maximum(m_s, tl.max(tl.where(mask & (s == s), s, ninf)))
        new_mb = tl.maximum(m_b, tl.max(tl.where(mask & (b == b), b, ninf)))
        f_s = tl.where(m_s == ninf, 0.0, tl.exp(m_s - new_ms))
        f_b = tl.where(m_b == ninf, 0.0, tl.exp(m_b - new_mb))
        es = tl.where(mask, tl.exp(s - new_ms), 0.0)
        S_s = S_s * f_s + tl.sum(es)
        A = A * f_s + tl.sum(tl.where(mask, es * (s - b), 0.0))
        S_b = S_b * f_b + tl.sum(tl.where(mask, tl.exp(b - new_mb), 0.0))
        m_s = new_ms
        m_b = new_mb
        # Argmax: the first NaN wins, else the first maximum.
        nan_idx = tl.minimum(nan_idx, tl.min(tl.where(mask & (c != c), idx, V)))
        cc = tl.where(mask & (c == c), c, ninf)
        bm = tl.max(cc)
        bidx = tl.min(tl.where(mask & (cc == bm), idx, V))
        take = bm > best
        best_idx = tl.where(take, bidx, best_idx)
        best = tl.where(take, bm, best)
    kl = A / S_s - (m_s + tl.log(S_s)) + (m_b + tl.log(S_b)) + bad
    tok = tl.where(nan_idx < V, nan_idx, best_idx).to(tl.int64)
    if HAS_FORCE:
        f = tl.load(force_ptr + row)
        tok = tl.where(f >= 0, f, tok)
    tl.store(token_ptr + row, tok)
    tl.store(kl_ptr + row, kl)


def coca_step(base, safe, alpha, temperature, force_token=None, out=None):
    """base, safe: [B, V] (fp32 / bf16 / fp16); alpha, temperature: fp32 [B]; force_token: int64
    [B] or None; out: [B, V] or None. Returns (token int64 [B], kl float32 [B])."""
    B, V = base.shape
    token = outputs(B, torch.int64, base.device)
    kl = outputs(B, torch.float32, base.device)
    block = min(triton.next_power_of_2(V), 4096)
    _coca_step_kernel[(B,)](
        base, safe, out if out is not None else base, alpha, temperature,
        force_token if force_token is not None else token, token, kl, V,
        HAS_OUT=out is not None, HAS_FORCE=force_token is not None, BLOCK=block,
    )
    return token, kl
