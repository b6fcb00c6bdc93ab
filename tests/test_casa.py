import numpy as np
import pytest

from pyguard import ops

# (lengths of the B sequences, d, r, heads)
CASES = [
    ([1], 64, 16, 1),
    ([300], 896, 64, 4),
    ([5, 1, 77, 300, 2, 19, 130, 64, 9], 576, 32, 3),
    ([12, 40], 896, 8, 16),
    ([3, 8, 1], 64, 5, 20),
    ([5, 1, 37], 96, 8, 3),
    ([20, 3], 70, 5, 17),
]
TRITON_MAX = 5000  # tokens x d under the interpreter


def params(rng, d, r, heads):
    Wk = (rng.standard_normal((d, r)) / np.sqrt(d)).astype(np.float32)
    q = rng.standard_normal((heads, r)).astype(np.float32)
    w = (rng.standard_normal(d) * 0.5 / np.sqrt(d)).astype(np.float32)
    return Wk, q, w, float(rng.normal() * 0.5)


def packed(rng, lengths, d):
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    H = (rng.standard_normal((cu[-1], d)) * 2).astype(np.float32)
    return H, cu


@pytest.mark.parametrize("case", range(len(CASES)), ids=lambda i: "B{}-d{}-r{}-h{}".format(len(CASES[i][0]), *CASES[i][1:]))
def test_matches_reference(impl, rng, case):
    lengths, d, r, heads = CASES[case]
    if impl == "triton" and sum(lengths) * d > TRITON_MAX:
        pytest.skip("the Triton interpreter is slow: small shapes only")
    H, cu = packed(rng, lengths, d)
    Wk, q, w, b = params(rng, d, r, heads)
    want = ops.casa_score(H, cu, Wk, q, w, b, backend="ref")
    got = ops.casa_score(H, cu, Wk, q, w, b, backend=impl)
    assert got.dtype == np.float32 and got.shape == (len(lengths),)
    assert ((want > 1e-3) & (want < 1 - 1e-3)).all()  # not saturated: the comparison means something
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_reference_is_the_formula(rng):
    """The reference against a direct per-head loop written from the paper's definition."""
    lengths, d, r, heads = [4, 9], 32, 8, 2
    H, cu = packed(rng, lengths, d)
    Wk, q, w, b = params(rng, d, r, heads)
    got = ops.casa_score(H, cu, Wk, q, w, b, backend="ref")
    for i in range(2):
        x = H[cu[i]:cu[i + 1]].astype(np.float64)
        zs = []
        for h in range(heads):
            e = np.exp((x @ Wk) @ q[h] / np.sqrt(r))
            zs.append((e / e.sum()) @ x)
        s = 1 / (1 + np.exp(-(w @ np.mean(zs, axis=0) + b)))
        np.testing.assert_allclose(got[i], s, rtol=1e-6)


def test_sequence_order_and_packing_independent(impl, rng):
    d, r, heads = 64, 8, 2
    Wk, q, w, b = params(rng, d, r, heads)
    H, cu = packed(rng, [7, 30, 2], d)
    together = ops.casa_score(H, cu, Wk, q, w, b, backend=impl)
    alone = [ops.casa_score(H[cu[i]:cu[i + 1]], np.array([0, cu[i + 1] - cu[i]]), Wk, q, w, b, backend=impl)[0]
             for i in range(3)]
    np.testing.assert_allclose(together, alone, rtol=1e-6, atol=1e-7)


def test_saturated_scores_agree(impl, rng):
    """Logits far past the sigmoid's range give exactly 0 or 1 in every backend (the reference
    raised OverflowError at b = -1000)."""
    H, cu = packed(rng, [5, 6, 3], 32)
    Wk, q, w, b = params(rng, 32, 8, 2)
    assert (ops.casa_score(H, cu, Wk, q, w, -1000.0, backend=impl) == 0).all()
    assert (ops.casa_score(H, cu, Wk, q, w, 1000.0, backend=impl) == 1).all()
    big = ops.casa_score(H * np.float32(1e20), cu, Wk, q, w, b, backend=impl)
    np.testing.assert_array_equal(big, ops.casa_score(H * np.float32(1e20), cu, Wk, q, w, b, backend="ref"))
    assert set(big.tolist()) <= {0.0, 1.0}


def test_non_finite_hidden_states_give_nan(impl, rng):
    H, cu = packed(rng, [5, 6, 7], 64)
    H[2, 10] = np.nan
    H[12, 0] = np.inf
    got = ops.casa_score(H, cu, *params(rng, 64, 8, 2), backend=impl)
    assert np.isnan(got[0]) and np.isnan(got[2]) and np.isfinite(got[1])


def test_torch_tensors(rng):
    torch = pytest.importorskip("torch")
    H, cu = packed(rng, [3, 20], 64)
    p = params(rng, 64, 8, 2)
    want = ops.casa_score(H, cu, *p, backend="ref")
    tp = [torch.from_numpy(x) for x in p[:3]]
    for backend in ("ref", "cpp", "triton"):
        got = ops.casa_score(torch.from_numpy(H), torch.from_numpy(cu), *tp, p[3], backend=backend)
        assert isinstance(got, torch.Tensor)
        np.testing.assert_allclose(got.numpy(), want, rtol=2e-5, atol=2e-6)
