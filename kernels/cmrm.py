"""cmrm_shift_ in Triton: one launch per layer, grid (rows, column blocks)."""
import torch
import triton
import triton.language as tl


@triton.jit
def _cmrm_shift_kernel(h_ptr, v_ptr, mask_ptr, alpha, d, HAS_MASK: tl.constexpr,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = cols < d
    if HAS_MASK:
        keep = keep & ((tl.load(mask_ptr + row).to(tl.int32) + tl.zeros_like(cols)) != 0)
    h = tl.load(h_ptr + row * d + cols, mask=keep, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + cols, mask=keep, other=0.0).to(tl.float32)
    tl.store(h_ptr + row * d + cols, (h - alpha * v).to(h_ptr.dtype.element_ty), mask=keep)


def cmrm_shift_(h, v, alpha, row_mask=None):
    """In place h[n] -= alpha * v on masked rows. h: [N, d]; v: [d]; row_mask: bool/uint8 [N]."""
    N, d = h.shape
    if N == 0:
        return h
    block = min(triton.next_power_of_2(d), 1024)
    mask = row_mask.view(torch.uint8) if row_mask is not None and row_mask.dtype == torch.bool else row_mask
    _cmrm_shift_kernel[(N, triton.cdiv(d, block))](
        h, v, mask if mask is not None else h, float(alpha), d,
        HAS_MASK=row_mask is not None, BLOCK=block,
    )
    return h
