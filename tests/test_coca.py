import numpy as np
import pytest
from poison import nan_like

from pyguard import ops, reference

SHAPES = [(1, 1), (3, 17), (9, 17), (2, 5000), (2, 49152), (1, 151936), (5, 151936)]
TRITON_MAX = 100_000  # B x V under the interpreter


def logits(rng, B, V):
    base = (rng.standard_normal((B, V)) * 3).astype(np.float32)
    safe = (base + rng.standard_normal((B, V))).astype(np.float32)
    return base, safe


def oracle(base, safe, alpha, temperature, force=None):
    B = base.shape[0]
    out = nan_like(base)
    a = np.broadcast_to(np.float32(alpha), (B,)).astype(np.float32)
    t = np.broadcast_to(np.float32(temperature), (B,)).astype(np.float32)
    tok, kl = reference.coca_step(base, safe, a, t, force, out)
    return out, tok, kl


def check_calibrated(out, want, base, safe, alpha, temperature):
    """|out - want| within a few float32 roundings of the terms (1 - alpha) base and alpha safe,
    which may cancel."""
    a = np.broadcast_to(np.asarray(alpha, np.float64), (base.shape[0],))[:, None]
    t = np.broadcast_to(np.asarray(temperature, np.float64), (base.shape[0],))[:, None]
    scale = (np.abs((1 - a) * base) + np.abs(a * safe)) / t
    err = np.abs(out.astype(np.float64) - want)
    ok = (out == want) | (err <= 4 * np.finfo(np.float32).eps * scale + 1e-30) | (np.isnan(out) & np.isnan(want))
    bad = ~ok
    assert not bad.any(), f"{bad.sum()} calibrated logits off, first at {np.argwhere(bad)[0]}"


def check_tokens(tok, want, out):
    """Equal argmax, allowing a different index only for a tie within rounding."""
    for b, (t, w) in enumerate(zip(tok, want)):
        if t != w:
            assert abs(out[b, t] - out[b, w]) <= 1e-6 * max(1.0, abs(out[b, w])), (b, t, w)


@pytest.mark.parametrize("B,V", SHAPES, ids=lambda x: str(x))
def test_matches_reference(impl, rng, B, V):
    if impl == "triton" and B * V > TRITON_MAX:
        pytest.skip("the Triton interpreter is slow: small shapes only")
    base, safe = logits(rng, B, V)
    alpha = (rng.random(B) * 3).astype(np.float32)
    temperature = (0.5 + rng.random(B)).astype(np.float32)
    want_out, want_tok, want_kl = oracle(base, safe, alpha, temperature)
    out = nan_like(base)
    tok, kl = ops.coca_step(base, safe, alpha, temperature, out=out, backend=impl)
    assert tok.dtype == np.int64 and kl.dtype == np.float32 and tok.shape == kl.shape == (B,)
    check_calibrated(out, want_out, base, safe, alpha, temperature)
    check_tokens(tok, want_tok, want_out)
    np.testing.assert_allclose(kl, want_kl, rtol=1e-4, atol=2e-5)


def test_kl_is_kl(rng):
    """The oracle's kl against a direct float64 computation from probabilities."""
    base, safe = logits(rng, 4, 300)
    _, _, kl = oracle(base, safe, 1.0, 1.0)
    p = np.exp(safe.astype(np.float64)); p /= p.sum(1, keepdims=True)
    q = np.exp(base.astype(np.float64)); q /= q.sum(1, keepdims=True)
    np.testing.assert_allclose(kl, (p * np.log(p / q)).sum(1), rtol=1e-5)
    assert (kl > 0).all()


@pytest.mark.parametrize("alpha,which", [(0.0, 0), (1.0, 1)])
def test_alpha_endpoints_exact(impl, rng, alpha, which):
    base, safe = logits(rng, 3, 1000)
    out = nan_like(base)
    ops.coca_step(base, safe, alpha, out=out, backend=impl)
    np.testing.assert_array_equal(out, (base, safe)[which])


def test_out_may_alias_base(impl, rng):
    base, safe = logits(rng, 2, 70000 if impl != "triton" else 3000)
    want_out, want_tok, want_kl = oracle(base, safe, 2.0, 1.0)
    keep = base.copy()
    tok, kl = ops.coca_step(base, safe, 2.0, out=base, backend=impl)
    check_calibrated(base, want_out, keep, safe, 2.0, 1.0)
    check_tokens(tok, want_tok, want_out)
    np.testing.assert_allclose(kl, want_kl, rtol=1e-4, atol=2e-5)


def test_without_out(impl, rng):
    base, safe = logits(rng, 3, 2000)
    keep = base.copy(), safe.copy()
    _, want_tok, want_kl = oracle(base, safe, 1.5, 0.8)
    tok, kl = ops.coca_step(base, safe, 1.5, 0.8, backend=impl)
    np.testing.assert_array_equal(tok, want_tok)
    np.testing.assert_allclose(kl, want_kl, rtol=1e-4, atol=2e-5)
    np.testing.assert_array_equal(base, keep[0])
    np.testing.assert_array_equal(safe, keep[1])


def test_force_token_overrides(impl, rng):
    base, safe = logits(rng, 4, 333)
    force = np.array([-1, 5, -1, 332], dtype=np.int64)
    _, free, _ = oracle(base, safe, 1.3, 1.0)
    tok, _ = ops.coca_step(base, safe, 1.3, force_token=force, backend=impl)
    np.testing.assert_array_equal(tok, np.where(force >= 0, force, free))


def test_argmax_picks_first_of_ties(impl, rng):
    base, safe = logits(rng, 2, 5000)
    base[:, [100, 4000]] = safe[:, [100, 4000]] = 50.0
    tok, _ = ops.coca_step(base, safe, 1.7, backend=impl)
    np.testing.assert_array_equal(tok, [100, 100])


def test_non_finite_inputs(impl, rng):
    """NaN / inf behave the same in every implementation (documented in pyguard.ops)."""
    base, safe = logits(rng, 4, 3000)
    base[0, 2500] = np.nan          # row 0: NaN -> token is the first NaN, kl NaN
    base[0, 2700] = np.nan
    safe[1, 10] = np.inf            # row 1: +inf in safe -> token 10, kl NaN
    base[2, 7] = -np.inf            # row 2: -inf in base only -> kl NaN, token from finite part
    want_out, want_tok, want_kl = oracle(base, safe, 0.6, 1.0)
    out = nan_like(base)
    tok, kl = ops.coca_step(base, safe, 0.6, out=out, backend=impl)
    with np.errstate(invalid="ignore"):
        check_calibrated(out, want_out, base, safe, 0.6, 1.0)
    np.testing.assert_array_equal(tok, want_tok)
    assert tok[0] == 2500 and tok[1] == 10
    assert np.isnan(kl[:3]).all() and np.isfinite(kl[3])
    np.testing.assert_allclose(kl[3], want_kl[3], rtol=1e-4)


def test_torch_tensors_and_half_precision(rng):
    torch = pytest.importorskip("torch")
    base, safe = logits(rng, 3, 4000)
    want_out, want_tok, want_kl = oracle(base, safe, 1.5, 1.0)
    tb, ts = torch.from_numpy(base), torch.from_numpy(safe)
    for backend in ("ref", "cpp", "triton"):
        out = torch.full_like(tb, float("nan"))
        tok, kl = ops.coca_step(tb, ts, 1.5, out=out, backend=backend)
        assert isinstance(tok, torch.Tensor) and tok.dtype == torch.int64
        np.testing.assert_allclose(out.numpy(), want_out, rtol=2e-6, atol=2e-6)
        np.testing.assert_allclose(kl.numpy(), want_kl, rtol=1e-4, atol=2e-5)
    for dtype in (torch.bfloat16, torch.float16):
        hb, hs = tb.to(dtype), ts.to(dtype)
        want = ops.coca_step(hb, hs, 1.5, out=(ref_out := torch.full_like(hb, float("nan"))), backend="ref")
        out = torch.full_like(hb, float("nan"))
        tok, kl = ops.coca_step(hb, hs, 1.5, out=out, backend="triton")
        assert out.dtype == dtype
        torch.testing.assert_close(out, ref_out)  # one rounding apart: default bf16/fp16 tolerances
        torch.testing.assert_close(kl, want[1], rtol=1e-4, atol=2e-5)
        assert torch.equal(tok, want[0])
        assert ops._pick("auto", hb) == "ref"


@pytest.mark.parametrize("pattern", ["jump-up", "low-first", "huge-range"])
def test_wide_logit_ranges(impl, rng, pattern):
    """Logits whose maximum jumps far above everything before it (kernels rescale their
    running sums; the C++ kernel sweeps such a block again)."""
    base, safe = logits(rng, 2, 40000 if impl != "triton" else 5000)
    if pattern == "jump-up":
        safe[:, 3000:] += 150.0
        base[:, 1200] = 400.0
    elif pattern == "low-first":
        safe[:, 0] = base[:, 0] = -300.0
    else:
        safe[0, ::7] = -1e4
        base[1, 5::11] = 5e3
    want_out, want_tok, want_kl = oracle(base, safe, 1.4, 1.0)
    out = nan_like(base)
    tok, kl = ops.coca_step(base, safe, 1.4, out=out, backend=impl)
    check_calibrated(out, want_out, base, safe, 1.4, 1.0)
    check_tokens(tok, want_tok, want_out)
    np.testing.assert_allclose(kl, want_kl, rtol=1e-4, atol=2e-5)
