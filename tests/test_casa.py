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


def last_weights(rng, d):
    return (rng.standard_normal(d) * 0.5 / np.sqrt(d)).astype(np.float32)


EXTRAS = {"attention": (False, False), "with-last": (True, False), "with-last-max": (True, True)}


def extra_weights(rng, d, extra):
    """(w_last, w_max) for the EXTRAS variant ``extra``: each [d] or None (w_max smaller: the rows'
    maximum is far from zero in every dimension, and a saturated score would compare nothing)."""
    last, mx = EXTRAS[extra]
    return (last_weights(rng, d) if last else None), (last_weights(rng, d) * np.float32(0.2) if mx else None)


@pytest.mark.parametrize("extra", EXTRAS)
@pytest.mark.parametrize("case", range(len(CASES)), ids=lambda i: "B{}-d{}-r{}-h{}".format(len(CASES[i][0]), *CASES[i][1:]))
def test_matches_reference(impl, rng, case, extra):
    lengths, d, r, heads = CASES[case]
    if impl == "triton" and sum(lengths) * d > TRITON_MAX:
        pytest.skip("the Triton interpreter is slow: small shapes only")
    H, cu = packed(rng, lengths, d)
    Wk, q, w, b = params(rng, d, r, heads)
    w_last, w_max = extra_weights(rng, d, extra)
    want = ops.casa_score(H, cu, Wk, q, w, b, w_last, w_max, backend="ref")
    got = ops.casa_score(H, cu, Wk, q, w, b, w_last, w_max, backend=impl)
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


def test_last_row_weights_are_the_mean_plus_last_probe(rng):
    """With Wk = 0 (equal attention) and w_last, the score is a logistic regression on the
    sequence's mean row and last row side by side; moving the last row elsewhere changes it."""
    d = 24
    H, cu = packed(rng, [6, 1, 11], d)
    w, w_last = last_weights(rng, d), last_weights(rng, d)
    got = ops.casa_score(H, cu, np.zeros((d, 1), np.float32), np.ones((1, 1), np.float32), w, 0.3, w_last,
                         backend="ref")
    for i in range(3):
        x = H[cu[i]:cu[i + 1]].astype(np.float64)
        np.testing.assert_allclose(got[i], 1 / (1 + np.exp(-(w @ x.mean(0) + w_last @ x[-1] + 0.3))), rtol=1e-6)
    moved = H.copy()
    moved[[4, 5]] = moved[[5, 4]]  # the first sequence's last two rows swapped: same mean, other last row
    again = ops.casa_score(moved, cu, np.zeros((d, 1), np.float32), np.ones((1, 1), np.float32), w, 0.3, w_last,
                           backend="ref")
    assert again[0] != got[0] and (again[1:] == got[1:]).all()


def test_max_weights_read_the_rows_maximum(rng):
    """With Wk = 0, w_last and w_max, the score is a logistic regression on the mean, the last
    row and the per-dimension maximum over the sequence's rows; raising one entry past every other
    row's moves only that sequence's score, by w_max at that dimension times the rise."""
    d = 24
    H, cu = packed(rng, [6, 1, 11], d)
    w, w_last, w_max = (last_weights(rng, d) for _ in range(3))
    Wk, q = np.zeros((d, 1), np.float32), np.ones((1, 1), np.float32)
    got = ops.casa_score(H, cu, Wk, q, w, 0.3, w_last, w_max, backend="ref")
    for i in range(3):
        x = H[cu[i]:cu[i + 1]].astype(np.float64)
        logit = w @ x.mean(0) + w_last @ x[-1] + w_max @ x.max(0) + 0.3
        np.testing.assert_allclose(got[i], 1 / (1 + np.exp(-logit)), rtol=1e-6)
    up = H.copy()
    up[8, 5] = H[7:18, 5].max() + 4  # a middle row of the third sequence
    again = ops.casa_score(up, cu, Wk, q, w, 0.3, w_last, w_max, backend="ref")
    assert (again[:2] == got[:2]).all()
    x = up[7:18].astype(np.float64)
    logit = w @ x.mean(0) + w_last @ x[-1] + w_max @ x.max(0) + 0.3
    np.testing.assert_allclose(again[2], 1 / (1 + np.exp(-logit)), rtol=1e-6)
    assert again[2] != got[2]


@pytest.mark.parametrize("extra", EXTRAS)
def test_sequence_order_and_packing_independent(impl, rng, extra):
    d, r, heads = 64, 8, 2
    Wk, q, w, b = params(rng, d, r, heads)
    w_last, w_max = extra_weights(rng, d, extra)
    H, cu = packed(rng, [7, 30, 2], d)
    together = ops.casa_score(H, cu, Wk, q, w, b, w_last, w_max, backend=impl)
    alone = [ops.casa_score(H[cu[i]:cu[i + 1]], np.array([0, cu[i + 1] - cu[i]]), Wk, q, w, b, w_last, w_max,
                            backend=impl)[0] for i in range(3)]
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


@pytest.mark.parametrize("extra", EXTRAS)
def test_non_finite_hidden_states_give_nan(impl, rng, extra):
    H, cu = packed(rng, [5, 6, 7, 3], 64)
    H[2, 10] = np.nan  # a middle row: the maximum over rows would skip it
    H[12, 0] = np.inf
    H[20, 63] = np.nan  # the last row of the fourth sequence, the row w_last reads
    got = ops.casa_score(H, cu, *params(rng, 64, 8, 2), *extra_weights(rng, 64, extra), backend=impl)
    assert np.isnan(got[[0, 2, 3]]).all() and np.isfinite(got[1])


def test_torch_tensors(rng):
    torch = pytest.importorskip("torch")
    H, cu = packed(rng, [3, 20], 64)
    p = params(rng, 64, 8, 2)
    w_last, w_max = last_weights(rng, 64), last_weights(rng, 64)
    want = ops.casa_score(H, cu, *p, w_last, w_max, backend="ref")
    tp = [torch.from_numpy(x) for x in p[:3]]
    for backend in ("ref", "cpp", "triton"):
        got = ops.casa_score(torch.from_numpy(H), torch.from_numpy(cu), *tp, p[3], torch.from_numpy(w_last),
                             torch.from_numpy(w_max), backend=backend)
        assert isinstance(got, torch.Tensor)
        np.testing.assert_allclose(got.numpy(), want, rtol=2e-5, atol=2e-6)
