"""The three fused ops behind one dispatcher.

``backend="auto"`` picks Triton for CUDA tensors, C++ (``pyguard._C``) for float32 host memory
(numpy arrays or CPU tensors) and the reference otherwise; ``"ref"``, ``"cpp"`` or ``"triton"``
force one. Inputs are numpy arrays or torch tensors; outputs come back in the same kind, on the
same device. Every argument is validated here first; bad input raises ``ValueError`` naming the
argument and the numbers. The runtimes' decode loops call ``_coca_step`` and ``_cmrm_shift_``:
the same dispatch with no validation, so no host reads (their configuration was checked once,
when the method, the guard and the request were built).

Non-finite inputs, identically in every backend: calibrated logits follow IEEE arithmetic of
``(1 - alpha) * base + alpha * safe``; a NaN in a calibrated row makes its token the first NaN's
index; ``kl`` is NaN for a row with any NaN or +-inf logit; ``casa_score`` is NaN for a sequence
whose hidden states hold NaN or +-inf; ``cmrm_shift_`` follows IEEE arithmetic.
"""
from __future__ import annotations

import math
import numbers
import os

import numpy as np

from . import reference
from .reference import is_torch

BACKENDS = ("auto", "ref", "cpp", "triton")
MIN_TEMPERATURE = 1e-5  # coca_step's floor; requests below it are greedy (vLLM's rule)
_FLOATS = ("float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------- backends
def native():
    """pyguard._C, or an ImportError that says how to get it."""
    try:
        from . import _C
    except ImportError as e:
        raise ImportError(
            "pyguard._C (the C++ kernels) is not built: reinstall pyguard from source with "
            "`pip install .` (needs a C++17 compiler and CMake); backend='ref' works without it"
        ) from e
    return _C


def triton_kernels():
    """pyguard.kernels, or an ImportError that says how to get it."""
    try:
        from . import kernels
    except ImportError as e:
        raise ImportError(
            f"the Triton kernels need torch and triton: pip install 'pyguard[triton]' ({e})"
        ) from e
    return kernels


def _dtype(x) -> str:
    return str(x.dtype).replace("torch.", "")


def _on_cuda(x) -> bool:
    return is_torch(x) and x.device.type == "cuda"


def _pick(backend: str, x) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if _on_cuda(x):
            try:
                triton_kernels()
                return "triton"
            except ImportError:
                return "ref"
        if _dtype(x) == "float32":
            try:
                native()
                return "cpp"
            except ImportError:
                return "ref"
        return "ref"
    if backend == "cpp":
        if _on_cuda(x) or _dtype(x) != "float32":
            where = "a CUDA tensor" if _on_cuda(x) else f"dtype {_dtype(x)}"
            raise ValueError(f"backend 'cpp' takes float32 host memory, got {where}")
        native()
    if backend == "triton":
        if not _on_cuda(x) and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend 'triton' takes CUDA tensors (or runs under TRITON_INTERPRET=1), got "
                             + ("a CPU tensor" if is_torch(x) else "a numpy array"))
        triton_kernels()
    return backend


def _host(x):
    """numpy view of a host array or CPU tensor (no copy)."""
    return x.detach().numpy() if is_torch(x) else x


def _torch(x):
    import torch

    return x if x is None or is_torch(x) else torch.from_numpy(np.asarray(x))


def _like(result, x):
    """Result (numpy or torch) converted to the kind of x."""
    if is_torch(x) and not is_torch(result):
        import torch

        return torch.from_numpy(result).to(x.device)
    if not is_torch(x) and is_torch(result):
        return result.cpu().numpy()
    return result


# ----------------------------------------------------------------------------- validation
def _shape(x) -> tuple:
    return tuple(x.shape)


def _array(x, name: str, ndim: int, dtypes=_FLOATS, shape=None, writeable=False):
    if not (isinstance(x, np.ndarray) or is_torch(x)):
        raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if _dtype(x) not in dtypes:
        raise ValueError(f"{name} must have dtype {' or '.join(dtypes)}, got {_dtype(x)}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {_shape(x)}")
    if shape is not None:
        for i, (got, want) in enumerate(zip(x.shape, shape)):
            if want is not None and got != want:
                raise ValueError(f"{name} has shape {_shape(x)}, expected dim {i} = {want}")
    contiguous = x.is_contiguous() if is_torch(x) else x.flags.c_contiguous
    if not contiguous:
        raise ValueError(f"{name} must be contiguous")
    if writeable and not is_torch(x) and not x.flags.writeable:
        raise ValueError(f"{name} must be writeable")
    return x


def _same_place(x, like, name: str, like_name: str):
    if is_torch(x) != is_torch(like) or (is_torch(x) and x.device != like.device):
        where = lambda a: f"torch tensor on {a.device}" if is_torch(a) else "numpy array"
        raise ValueError(f"{name} is a {where(x)} but {like_name} is a {where(like)}")


def _values(x) -> np.ndarray:
    """Small array or tensor as numpy (for range checks); half floats widened to float32."""
    if is_torch(x):
        x = x.detach().cpu()
        return (x.float() if x.is_floating_point() else x).numpy()
    return np.asarray(x)


def _per_row(x, B: int, name: str, like):
    """Scalar or [B] -> float32 [B] of like's kind (and device); must be finite."""
    if isinstance(x, numbers.Real) or (hasattr(x, "ndim") and x.ndim == 0):
        vals = np.full(B, float(x), dtype=np.float32)
    else:
        if not (isinstance(x, np.ndarray) or is_torch(x)) or x.ndim != 1 or x.shape[0] != B:
            raise ValueError(f"{name} must be a scalar or have shape ({B},), got {getattr(x, 'shape', type(x).__name__)}")
        vals = _values(x).astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(vals))
    if bad.size:
        raise ValueError(f"{name}[{bad[0]}] = {vals[bad[0]]} is not finite")
    return _like(vals, like)


def _check_coca(base, safe, alpha, temperature, force_token, out):
    _array(base, "base", 2)
    B, V = base.shape
    if V < 1:
        raise ValueError(f"base has shape {_shape(base)}: the vocabulary is empty")
    _array(safe, "safe", 2, (_dtype(base),), (B, V))
    _same_place(safe, base, "safe", "base")
    alpha = _per_row(alpha, B, "alpha", base)
    temperature = _per_row(temperature, B, "temperature", base)
    tv = _values(temperature)
    if (tv < MIN_TEMPERATURE).any():
        i = int(np.flatnonzero(tv < MIN_TEMPERATURE)[0])
        raise ValueError(f"temperature[{i}] = {tv[i]} must be >= {MIN_TEMPERATURE} (logits / T overflow below; "
                         "a greedy row passes 1)")
    if force_token is not None:
        _array(force_token, "force_token", 1, ("int64", "int32"), (B,))
        fv = _values(force_token)
        bad = np.flatnonzero((fv < -1) | (fv >= V))
        if bad.size:
            raise ValueError(f"force_token[{bad[0]}] = {fv[bad[0]]} is outside [-1, {V})")
        force_token = _like(fv.astype(np.int64), base)
    if out is not None:
        _array(out, "out", 2, _FLOATS, (B, V), writeable=True)
        _same_place(out, base, "out", "base")
    return alpha, temperature, force_token


# ----------------------------------------------------------------------------- ops
def coca_step(base, safe, alpha, temperature=1.0, force_token=None, out=None, backend="auto"):
    """One CoCA decode step for B rows.

    base, safe: [B, V] logits without / with the safety principle (float32; bf16 / fp16 on the
    ref and triton backends); alpha, temperature: scalar or [B]; force_token: int [B] with -1 for
    none, or None; out: [B, V] or None (may be ``base`` itself).
    Writes ``((1 - alpha) * base + alpha * safe) / temperature`` to out. Returns
    ``(token int64 [B], kl float32 [B])``: token is force_token where >= 0, else the argmax of the
    calibrated row; kl = KL(softmax(safe) || softmax(base)).
    """
    alpha, temperature, force_token = _check_coca(base, safe, alpha, temperature, force_token, out)
    return _coca_step(base, safe, alpha, temperature, force_token, out, backend)


def _coca_step(base, safe, alpha, temperature, force_token, out, backend="auto"):
    """coca_step without validation and without host reads, for the runtimes' decode loops:
    alpha, temperature float32 [B] and force_token int64 [B] (or None) of base's kind and device,
    each already checked (when the method, the request and the guard were built)."""
    which = _pick(backend, base)
    if which == "cpp":
        f = None if force_token is None else _host(force_token)
        tok, kl = native().coca_step(_host(base), _host(safe), _host(alpha), _host(temperature), f,
                                     None if out is None else _host(out))
        return _like(tok, base), _like(kl, base)
    if which == "triton":
        args = [_torch(x) for x in (base, safe, alpha, temperature, force_token, out)]
        tok, kl = triton_kernels().coca_step(*args)
        return _like(tok, base), _like(kl, base)
    return reference.coca_step(base, safe, alpha, temperature, force_token, out)


def cmrm_shift_(h, v, alpha, layer=None, row_mask=None, backend="auto"):
    """In place ``h[n] -= alpha * v`` on the rows where row_mask is true (all rows if None).

    h: [N, d] (float32; bf16 / fp16 on the ref and triton backends); v: [d], or a table [L, d]
    with ``layer`` selecting the row; alpha: finite scalar; row_mask: bool [N] or None.
    Returns h.
    """
    _array(h, "h", 2, writeable=True)
    N, d = h.shape
    if not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, numbers.Integral)):
        raise ValueError(f"layer must be an integer row of the vector table, got {layer!r}")
    if getattr(v, "ndim", None) == 2:
        _array(v, "v", 2, shape=(None, d))
        if layer is None or not (0 <= layer < v.shape[0]):
            raise ValueError(f"layer = {layer} is outside the vector table's [0, {v.shape[0]})")
    else:
        _array(v, "v", 1, shape=(d,))
        if layer is not None:
            raise ValueError(f"layer = {layer} given, but v is a single vector of shape {_shape(v)}")
    _same_place(v, h, "v", "h")
    vrow = v[layer] if layer is not None else v
    bad = np.flatnonzero(~np.isfinite(_values(vrow).astype(np.float32)))
    if bad.size:
        raise ValueError(f"v[{bad[0]}] is not finite")
    if row_mask is not None:
        _array(row_mask, "row_mask", 1, ("bool", "uint8"), (N,))
        _same_place(row_mask, h, "row_mask", "h")
    return _cmrm_shift_(h, vrow, alpha, row_mask, backend)


def _cmrm_shift_(h, v, alpha: float, row_mask=None, backend="auto"):
    """cmrm_shift_ without validation and without host reads, for the runtimes' per-layer hooks:
    v [d] of h's kind, device and dtype, finite (checked when the CMRM was built); row_mask bool
    [N] or None."""
    which = _pick(backend, h)
    if which == "cpp":
        native().cmrm_shift_(_host(h), _host(v), float(alpha), -1, None if row_mask is None else _host(row_mask))
    elif which == "triton":
        triton_kernels().cmrm_shift_(_torch(h), _torch(v), float(alpha), _torch(row_mask))
    else:
        reference.cmrm_shift_(h, v, alpha, None if row_mask is None else (row_mask != 0))
    return h


def casa_score(H, cu_seqlens, Wk, q, w, b, w_last=None, w_max=None, backend="auto"):
    """CASA safety-attention score for B packed sequences.

    H: float32 [T, d] hidden states; cu_seqlens: int [B + 1] (0, strictly increasing, ends at T);
    Wk: [d, r]; q: [heads, r]; w: [d]; b: float; w_last: [d] or None, weights of each sequence's
    last row added to the logit (a mean+last probe); w_max: [d] or None, weights of its rows'
    maximum per dimension. Returns float32 [B] in (0, 1).
    """
    _array(H, "H", 2, ("float32",))
    T, d = H.shape
    _array(cu_seqlens, "cu_seqlens", 1, ("int64", "int32"))
    cu = _values(cu_seqlens).astype(np.int64)
    if cu.size < 1 or cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[:1].tolist()}")
    steps = np.flatnonzero(np.diff(cu) <= 0)
    if steps.size:
        i = int(steps[0]) + 1
        raise ValueError(f"cu_seqlens is not strictly increasing at {i}: {cu[i - 1]} then {cu[i]}")
    if cu[-1] != T:
        raise ValueError(f"cu_seqlens[-1] = {cu[-1]} does not match H's {T} rows")
    _array(Wk, "Wk", 2, ("float32",), (d, None))
    r = Wk.shape[1]
    _array(q, "q", 2, ("float32",), (None, r))
    _array(w, "w", 1, ("float32",), (d,))
    named = [("Wk", Wk), ("q", q), ("w", w)]
    for name, x in (("w_last", w_last), ("w_max", w_max)):
        if x is not None:
            _array(x, name, 1, ("float32",), (d,))
            named.append((name, x))
    for name, x in named:
        _same_place(x, H, name, "H")
        if not np.isfinite(_values(x)).all():
            raise ValueError(f"{name} has non-finite values")
    if not isinstance(b, numbers.Real) or not math.isfinite(b):
        raise ValueError(f"b must be a finite number, got {b!r}")
    if r < 1 or q.shape[0] < 1:
        raise ValueError(f"Wk {_shape(Wk)} and q {_shape(q)} need r >= 1 and heads >= 1")
    which = _pick(backend, H)
    if which == "cpp":
        wl, wm = (None if x is None else _host(x) for x in (w_last, w_max))
        return _like(native().casa_score(_host(H), cu, _host(Wk), _host(q), _host(w), float(b), wl, wm), H)
    if which == "triton":
        Ht, Wkt, qt, wt = (_torch(x) for x in (H, Wk, q, w))
        wl, wm = (None if x is None else _torch(x) for x in (w_last, w_max))
        s = triton_kernels().casa_score(Ht, _torch(cu).to(Ht.device), Wkt, qt, wt, float(b), wl, wm)
        return _like(s, H)
    return reference.casa_score(H, cu, Wk, q, w, b, w_last, w_max)
