"""Bad input raises ValueError naming the problem and the numbers, through pyguard.ops on every
backend and through pyguard._C directly (which must never read out of bounds)."""
import re

import numpy as np
import pytest

from pyguard import ops

BACKENDS = ["ref", "cpp", "triton"]


def f32(*shape, rng=np.random.default_rng(1)):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "triton":
        pytest.importorskip("triton")
    return request.param


COCA_CASES = [
    (dict(safe=f32(2, 11)), "safe has shape (2, 11), expected dim 1 = 10"),
    (dict(safe=f32(3, 10)), "safe has shape (3, 10), expected dim 0 = 2"),
    (dict(base=f32(2, 10).astype(np.float64)), "base must have dtype float32 or bfloat16 or float16, got float64"),
    (dict(base=f32(20)), "base must be 2-D, got shape (20,)"),
    (dict(base=f32(2, 20)[:, ::2]), "base must be contiguous"),
    (dict(alpha=float("nan")), "alpha[0] = nan is not finite"),
    (dict(alpha=np.array([1.0, np.inf], np.float32)), "alpha[1] = inf is not finite"),
    (dict(alpha=np.ones(3, np.float32)), "alpha must be a scalar or have shape (2,)"),
    (dict(temperature=0.0), "temperature[0] = 0.0 must be >= 1e-05"),
    (dict(temperature=np.array([1.0, -2.0], np.float32)), "temperature[1] = -2.0 must be >= 1e-05"),
    (dict(temperature=1e-39), "must be >= 1e-05 (logits / T overflow below"),  # ref and C++ disagreed
    (dict(force_token=np.array([0, 10])), "force_token[1] = 10 is outside [-1, 10)"),
    (dict(force_token=np.array([-2, 0])), "force_token[0] = -2 is outside [-1, 10)"),
    (dict(force_token=np.array([0.0, 1.0])), "force_token must have dtype int64 or int32, got float64"),
    (dict(out=f32(2, 9)), "out has shape (2, 9), expected dim 1 = 10"),
    (dict(base=f32(2, 0), safe=f32(2, 0)), "base has shape (2, 0): the vocabulary is empty"),
]


@pytest.mark.parametrize("kw,msg", COCA_CASES, ids=[m for _, m in COCA_CASES])
def test_coca_errors(backend, kw, msg):
    args = dict(base=f32(2, 10), safe=f32(2, 10), alpha=1.5, temperature=1.0, force_token=None, out=None)
    args.update(kw)
    with pytest.raises(ValueError, match=re.escape(msg)):
        ops.coca_step(**args, backend=backend)


@pytest.mark.parametrize("layer", [1.5, True, "1"])
def test_cmrm_layer_must_be_an_integer(backend, layer):
    if backend == "triton":
        pytest.skip("checked before any backend runs")
    with pytest.raises(ValueError, match=re.escape(f"layer must be an integer row of the vector table, got {layer!r}")):
        ops.cmrm_shift_(f32(3, 4), f32(2, 4), 1.0, layer=layer, backend=backend)


def test_triton_says_it_takes_cuda_tensors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend 'triton' takes CUDA tensors .* got a numpy array"):
        ops.coca_step(f32(2, 10), f32(2, 10), 1.5, backend="triton")
    H = f32(6, 8)
    with pytest.raises(ValueError, match="backend 'triton' takes CUDA tensors .* got a numpy array"):
        ops.casa_score(H, np.array([0, 6]), f32(8, 4), f32(2, 4), f32(8), 0.0, backend="triton")


def test_read_only_out():
    out = f32(2, 10)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable"):
        ops.coca_step(f32(2, 10), f32(2, 10), 1.0, out=out)


CMRM_CASES = [
    (dict(v=f32(65)), "v has shape (65,), expected dim 0 = 64"),
    (dict(v=f32(4, 64), layer=4), "layer = 4 is outside the vector table's [0, 4)"),
    (dict(v=f32(4, 64), layer=-1), "layer = -1 is outside the vector table's [0, 4)"),
    (dict(v=f32(4, 64)), "layer = None is outside the vector table's [0, 4)"),
    (dict(layer=2), "layer = 2 given, but v is a single vector of shape (64,)"),
    (dict(v=f32(4, 63), layer=1), "v has shape (4, 63), expected dim 1 = 64"),
    (dict(alpha=float("inf")), "alpha must be a finite number, got inf"),
    (dict(h=f32(5, 128)[:, ::2]), "h must be contiguous"),
    (dict(h=f32(5, 64).astype(np.float64)), "h must have dtype float32 or bfloat16 or float16, got float64"),
    (dict(row_mask=np.ones(4, bool)), "row_mask has shape (4,), expected dim 0 = 5"),
    (dict(row_mask=np.ones(5, np.float32)), "row_mask must have dtype bool or uint8, got float32"),
    (dict(v=np.full(64, np.nan, np.float32)), "v[0] is not finite"),
]


@pytest.mark.parametrize("kw,msg", CMRM_CASES, ids=[m for _, m in CMRM_CASES])
def test_cmrm_errors(backend, kw, msg):
    args = dict(h=f32(5, 64), v=f32(64), alpha=1.0, layer=None, row_mask=None)
    args.update(kw)
    before = args["h"].copy()
    with pytest.raises(ValueError, match=re.escape(msg)):
        ops.cmrm_shift_(**args, backend=backend)
    np.testing.assert_array_equal(args["h"], before)  # nothing written


CASA_CASES = [
    (dict(cu_seqlens=np.array([0, 5, 5, 12])), "cu_seqlens is not strictly increasing at 2: 5 then 5"),
    (dict(cu_seqlens=np.array([0, 7, 3, 12])), "cu_seqlens is not strictly increasing at 2: 7 then 3"),
    (dict(cu_seqlens=np.array([0, 5, 13])), "cu_seqlens[-1] = 13 does not match H's 12 rows"),
    (dict(cu_seqlens=np.array([1, 5, 12])), "cu_seqlens must start at 0, got [1]"),
    (dict(cu_seqlens=np.array([], np.int64)), "cu_seqlens must start at 0, got []"),
    (dict(cu_seqlens=np.array([0.0, 12.0])), "cu_seqlens must have dtype int64 or int32, got float64"),
    (dict(Wk=f32(31, 8)), "Wk has shape (31, 8), expected dim 0 = 32"),
    (dict(q=f32(3, 7)), "q has shape (3, 7), expected dim 1 = 8"),
    (dict(w=f32(33)), "w has shape (33,), expected dim 0 = 32"),
    (dict(b=float("nan")), "b must be a finite number, got nan"),
    (dict(H=f32(12, 32).astype(np.float16)), "H must have dtype float32, got float16"),
    (dict(w=np.full(32, np.inf, np.float32)), "w has non-finite values"),
    (dict(w_last=f32(31)), "w_last has shape (31,), expected dim 0 = 32"),
    (dict(w_last=np.full(32, np.nan, np.float32)), "w_last has non-finite values"),
    (dict(w_max=f32(33)), "w_max has shape (33,), expected dim 0 = 32"),
    (dict(w_max=np.full(32, -np.inf, np.float32)), "w_max has non-finite values"),
]


@pytest.mark.parametrize("kw,msg", CASA_CASES, ids=[m for _, m in CASA_CASES])
def test_casa_errors(backend, kw, msg):
    args = dict(H=f32(12, 32), cu_seqlens=np.array([0, 5, 12]), Wk=f32(32, 8), q=f32(3, 8), w=f32(32), b=0.1)
    args.update(kw)
    with pytest.raises(ValueError, match=re.escape(msg)):
        ops.casa_score(**args, backend=backend)


def test_unknown_backend_and_cpp_dtype():
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.coca_step(f32(1, 3), f32(1, 3), 1.0, backend="cuda")
    torch = pytest.importorskip("torch")
    b = torch.zeros(1, 3, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="backend 'cpp' takes float32 host memory, got dtype bfloat16"):
        ops.coca_step(b, b, 1.0, backend="cpp")


# Direct calls into the extension: its own checks guard the kernels.
C_CASES = [
    ("coca_step", (f32(2, 10), f32(2, 9), np.ones(2, np.float32), np.ones(2, np.float32)), "safe has shape (2, 9), expected dim 1 = 10"),
    ("coca_step", (f32(2, 10), f32(2, 10), np.ones(3, np.float32), np.ones(2, np.float32)), "alpha has shape (3,), expected dim 0 = 2"),
    ("coca_step", (f32(2, 10), f32(2, 10), np.ones(2), np.ones(2, np.float32)), "alpha must have dtype float32, got float64"),
    ("coca_step", (f32(2, 10), f32(2, 10), np.array([1, np.nan], np.float32), np.ones(2, np.float32)), "alpha[1] = nan is not finite"),
    ("coca_step", (f32(2, 10), f32(2, 10), np.ones(2, np.float32), np.zeros(2, np.float32)), "temperature[0] = 0 must be finite and > 0"),
    ("coca_step", (f32(2, 10), f32(2, 10), np.ones(2, np.float32), np.ones(2, np.float32), np.array([3, 10])), "force_token[1] = 10 is outside [-1, 10)"),
    ("coca_step", (f32(2, 20)[:, ::2], f32(2, 10), np.ones(2, np.float32), np.ones(2, np.float32)), "base must be C-contiguous"),
    ("coca_step", ([[1.0]], f32(1, 1), np.ones(1, np.float32), np.ones(1, np.float32)), "base must be a numpy array"),
    ("cmrm_shift_", (f32(4, 8), f32(3, 8), 1.0, 3), "layer = 3 is outside the vector table's [0, 3)"),
    ("cmrm_shift_", (f32(4, 8), f32(8), 1.0, 0), "layer = 0 given, but v is a single vector of shape (8,)"),
    ("cmrm_shift_", (f32(4, 8), f32(9), 1.0), "v has shape (9,), expected dim 0 = 8"),
    ("cmrm_shift_", (f32(4, 8), f32(8), float("nan")), "alpha = nan is not finite"),
    ("cmrm_shift_", (f32(4, 8), f32(8), 1.0, -1, np.ones(5, bool)), "row_mask has shape (5,), expected (4,)"),
    ("casa_score", (f32(12, 8), np.array([0, 4, 4, 12]), f32(8, 2), f32(1, 2), f32(8), 0.0), "cu_seqlens is not strictly increasing at 2: 4 then 4"),
    ("casa_score", (f32(12, 8), np.array([0, 4, 99]), f32(8, 2), f32(1, 2), f32(8), 0.0), "cu_seqlens[-1] = 99 does not match H's 12 rows"),
    ("casa_score", (f32(12, 8), np.array([0, 4, 12]), f32(8, 2), f32(1, 3), f32(8), 0.0), "q has shape (1, 3), expected dim 1 = 2"),
    ("casa_score", (f32(12, 8), np.array([0, 12]), f32(8, 2), f32(1, 2), f32(8), float("inf")), "b = inf is not finite"),
    ("casa_score", (f32(12, 8), np.array([0, 12], np.int32), f32(8, 2), f32(1, 2), f32(8), 0.0), "cu_seqlens must have dtype int64, got int32"),
    ("casa_score", (f32(12, 8), np.array([0, 12]), f32(8, 2), f32(1, 2), f32(8), 0.0, f32(9)), "w_last has shape (9,), expected dim 0 = 8"),
    ("casa_score", (f32(12, 8), np.array([0, 12]), f32(8, 2), f32(1, 2), f32(8), 0.0, np.full(8, np.inf, np.float32)), "w_last[0] = inf is not finite"),
    ("casa_score", (f32(12, 8), np.array([0, 12]), f32(8, 2), f32(1, 2), f32(8), 0.0, None, f32(7)), "w_max has shape (7,), expected dim 0 = 8"),
    ("casa_score", (f32(12, 8), np.array([0, 12]), f32(8, 2), f32(1, 2), f32(8), 0.0, None, np.full(8, np.nan, np.float32)), "w_max[0] = nan is not finite"),
]


@pytest.mark.parametrize("fn,args,msg", C_CASES, ids=[m for *_, m in C_CASES])
def test_extension_errors(fn, args, msg):
    from pyguard import _C

    with pytest.raises(ValueError, match=re.escape(msg)):
        getattr(_C, fn)(*args)
