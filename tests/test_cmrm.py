import numpy as np
import pytest
from poison import nan_like

from pyguard import ops

SHAPES = [(1, 64), (7, 576), (300, 896), (4096, 896), (3, 65)]


def expected(h, v, alpha, mask=None):
    want = h - np.float32(alpha) * v
    return want if mask is None else np.where(mask[:, None], want, h)


@pytest.mark.parametrize("N,d", SHAPES, ids=lambda x: str(x))
@pytest.mark.parametrize("masked", [False, True], ids=["all", "mask"])
def test_matches_reference(impl, rng, N, d, masked):
    if impl == "triton":
        N = min(N, 9)
    h = rng.standard_normal((N, d)).astype(np.float32)
    v = rng.standard_normal(d).astype(np.float32)
    mask = rng.random(N) < 0.6 if masked else None
    alpha = float(rng.uniform(-2, 2))
    want = expected(h, v, alpha, mask)
    got = h.copy()
    assert ops.cmrm_shift_(got, v, alpha, row_mask=mask, backend=impl) is got
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    if mask is not None:
        np.testing.assert_array_equal(got[~mask], h[~mask])


def test_vector_table_with_layer(impl, rng):
    L, N, d = 5, 6, 96
    h = rng.standard_normal((N, d)).astype(np.float32)
    table = rng.standard_normal((L, d)).astype(np.float32)
    got = h.copy()
    ops.cmrm_shift_(got, table, 0.7, layer=3, backend=impl)
    np.testing.assert_allclose(got, expected(h, table[3], 0.7), rtol=1e-6, atol=1e-6)


def test_zero_alpha_is_identity(impl, rng):
    h = rng.standard_normal((11, 130)).astype(np.float32)
    got = h.copy()
    ops.cmrm_shift_(got, rng.standard_normal(130).astype(np.float32), 0.0, backend=impl)
    np.testing.assert_array_equal(got, h)


def test_cpp_is_bitwise_reference(rng):
    """h - float32(alpha * v): no fused multiply-add, so C++ equals the reference exactly."""
    h = rng.standard_normal((33, 577)).astype(np.float32)
    v = rng.standard_normal(577).astype(np.float32)
    a, b = h.copy(), h.copy()
    ops.cmrm_shift_(a, v, 1.3, backend="ref")
    ops.cmrm_shift_(b, v, 1.3, backend="cpp")
    np.testing.assert_array_equal(a, b)


def test_non_finite_rows_follow_ieee(impl, rng):
    h = rng.standard_normal((4, 40)).astype(np.float32)
    h[1, 3], h[2, 5] = np.nan, np.inf
    v = rng.standard_normal(40).astype(np.float32)
    got = h.copy()
    ops.cmrm_shift_(got, v, 0.5, backend=impl)
    np.testing.assert_allclose(got, expected(h, v, 0.5), rtol=1e-6, atol=1e-6, equal_nan=True)


def test_torch_half_precision(rng):
    torch = pytest.importorskip("torch")
    h = torch.from_numpy(rng.standard_normal((6, 200)).astype(np.float32))
    v = torch.from_numpy(rng.standard_normal(200).astype(np.float32))
    mask = torch.tensor([True, False, True, True, False, True])
    for dtype in (torch.bfloat16, torch.float16):
        a, b = h.to(dtype), h.to(dtype)
        ops.cmrm_shift_(a, v.to(dtype), 0.9, row_mask=mask, backend="ref")
        ops.cmrm_shift_(b, v.to(dtype), 0.9, row_mask=mask, backend="triton")
        assert b.dtype == dtype
        torch.testing.assert_close(a, b)
        assert torch.equal(b[~mask], h.to(dtype)[~mask])
        assert not torch.equal(b[mask], h.to(dtype)[mask])
