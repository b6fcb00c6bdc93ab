"""Every op's Triton kernel on a CUDA device against the reference, at real sizes, with
NaN-poisoned outputs and non-finite inputs (run by scripts/gpu_check.sh; skipped without CUDA)."""
import numpy as np
import pytest
from test_casa import EXTRAS, extra_weights, packed, params
from test_cmrm import expected
from test_coca import check_calibrated, check_tokens, logits, oracle

from pyguard import ops

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def cuda(x):
    return torch.from_numpy(np.ascontiguousarray(x)).cuda()


def nan_cuda(shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


@pytest.mark.parametrize("B,V", [(1, 1), (3, 17), (1, 151936), (8, 151936), (5, 32000), (2, 262144)])
def test_coca_step(rng, B, V):
    base, safe = logits(rng, B, V)
    alpha = (rng.random(B) * 3).astype(np.float32)
    temperature = (0.5 + rng.random(B)).astype(np.float32)
    force = np.full(B, -1, np.int64)
    force[B // 2] = V - 1
    want_out, want_tok, want_kl = oracle(base, safe, alpha, temperature, force)
    out = nan_cuda((B, V))
    tok, kl = ops.coca_step(cuda(base), cuda(safe), cuda(alpha), cuda(temperature), cuda(force), out=out,
                            backend="triton")
    assert tok.is_cuda and kl.is_cuda and tok.dtype == torch.int64 and kl.dtype == torch.float32
    check_calibrated(out.cpu().numpy(), want_out, base, safe, alpha, temperature)
    check_tokens(tok.cpu().numpy(), want_tok, want_out)
    np.testing.assert_allclose(kl.cpu().numpy(), want_kl, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_coca_step_half_precision(rng, dtype):
    base, safe = logits(rng, 4, 151936)
    hb, hs = (torch.from_numpy(x).to(getattr(torch, dtype)) for x in (base, safe))
    ref_out = torch.full_like(hb, float("nan"))
    want_tok, want_kl = ops.coca_step(hb, hs, 1.5, out=ref_out, backend="ref")
    out = nan_cuda(hb.shape, hb.dtype)
    tok, kl = ops.coca_step(hb.cuda(), hs.cuda(), 1.5, out=out, backend="triton")
    torch.testing.assert_close(out.cpu(), ref_out)  # one rounding apart: default bf16 / fp16 tolerances
    torch.testing.assert_close(kl.cpu(), want_kl, rtol=1e-4, atol=2e-5)
    check_tokens(tok.cpu().numpy(), want_tok.numpy(), ref_out.float().numpy())


def test_coca_step_non_finite_rows(rng):
    base, safe = logits(rng, 3, 151936)
    base[1, 70000] = np.nan
    safe[2, 5] = np.inf
    want_out, want_tok, want_kl = oracle(base, safe, np.full(3, 1.5, np.float32), np.ones(3, np.float32))
    out = nan_cuda(base.shape)
    tok, kl = ops.coca_step(cuda(base), cuda(safe), 1.5, out=out, backend="triton")
    tok, kl = tok.cpu().numpy(), kl.cpu().numpy()
    assert tok[1] == want_tok[1] == 70000 and np.isnan(kl[1]) and np.isnan(kl[2]) and np.isfinite(kl[0])
    assert tok[2] == want_tok[2] and tok[0] == want_tok[0]


@pytest.mark.parametrize("N,d,masked", [(1, 7, False), (1, 896, False), (4096, 896, True), (333, 4096, True)])
def test_cmrm_shift(rng, N, d, masked):
    h = rng.standard_normal((N, d)).astype(np.float32)
    h[0, 0] = np.nan
    v = rng.standard_normal(d).astype(np.float32)
    mask = rng.random(N) < 0.6 if masked else None
    want, got = expected(h, v, 0.7, mask), cuda(h)
    ops.cmrm_shift_(got, cuda(v), 0.7, row_mask=None if mask is None else cuda(mask), backend="triton")
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cmrm_shift_half_precision(rng, dtype):
    h = torch.from_numpy(rng.standard_normal((2048, 896)).astype(np.float32)).to(getattr(torch, dtype))
    v = torch.from_numpy(rng.standard_normal(896).astype(np.float32)).to(h.dtype)
    mask = torch.from_numpy(rng.random(2048) < 0.5)
    want = h.clone()
    ops.cmrm_shift_(want, v, 0.9, row_mask=mask, backend="ref")
    got = h.cuda()
    ops.cmrm_shift_(got, v.cuda(), 0.9, row_mask=mask.cuda(), backend="triton")
    torch.testing.assert_close(got.cpu(), want)
    assert torch.equal(got.cpu()[~mask], h[~mask])


@pytest.mark.parametrize("lengths,d,r,heads", [([1], 896, 64, 4), ([2048, 1500], 896, 64, 8),
                                              ([5, 1, 77, 300, 2, 19, 130, 64, 9], 576, 32, 3),
                                              ([4000], 3584, 64, 4)])
@pytest.mark.parametrize("extra", EXTRAS)
def test_casa_score(rng, lengths, d, r, heads, extra):
    H, cu = packed(rng, lengths, d)
    Wk, q, w, b = params(rng, d, r, heads)
    w_last, w_max = extra_weights(rng, d, extra)
    want = ops.casa_score(H, cu, Wk, q, w, b, w_last, w_max, backend="ref")
    got = ops.casa_score(cuda(H), cuda(cu), cuda(Wk), cuda(q), cuda(w), b, *(None if x is None else cuda(x)
                                                                            for x in (w_last, w_max)),
                         backend="triton")
    assert got.is_cuda and got.shape == (len(lengths),)
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-4, atol=1e-5)


def test_casa_score_non_finite_states(rng):
    H, cu = packed(rng, [50, 60, 70], 896)
    H[2, 10], H[150, 0] = np.nan, -np.inf
    w_max = cuda(extra_weights(rng, 896, "with-last-max")[1])
    got = ops.casa_score(cuda(H), cuda(cu), *(cuda(x) for x in params(rng, 896, 64, 4)[:3]), 0.0, None, w_max,
                          backend="triton").cpu().numpy()
    assert np.isnan(got[0]) and np.isnan(got[2]) and np.isfinite(got[1])
