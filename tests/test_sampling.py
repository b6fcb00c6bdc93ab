"""pyguard.sampling.sample: the nucleus (top-p) cut-off against a hand computation."""
import numpy as np
import pytest

from pyguard.sampling import sample


def nucleus(p: np.ndarray, top_p: float) -> set:
    """By hand: the smallest set of most probable tokens whose probability reaches top_p."""
    order = np.argsort(-p, kind="stable")
    k = int(np.argmax(np.cumsum(p[order]) >= top_p)) + 1
    return set(order[:k].tolist())


@pytest.mark.parametrize("top_p, kept", [(0.3, {1}), (0.65, {1, 3}), (0.75, {1, 3, 4}), (0.97, {0, 1, 2, 3, 4})])
def test_nucleus_cut_and_renormalized_frequencies(top_p, kept):
    p = np.array([0.05, 0.4, 0.1, 0.3, 0.15])
    assert nucleus(p, top_p) == kept
    rng = np.random.default_rng(0)
    draws = np.array([sample(np.log(p).astype(np.float32), top_p, rng) for _ in range(4000)])
    assert set(draws.tolist()) == kept
    for t in kept:  # each kept token at its renormalized probability (4000 draws: sd <= 0.008)
        assert abs(np.mean(draws == t) - p[t] / p[list(kept)].sum()) < 0.035


def test_nucleus_wider_than_the_partial_sort():
    """A flat distribution whose nucleus holds more than the 1,024 tokens sorted first."""
    V = 5000
    logits = np.linspace(0.0, 0.5, V).astype(np.float32)[np.random.default_rng(1).permutation(V)]
    p = np.exp(logits - logits.max(), dtype=np.float64)
    p /= p.sum()
    kept = nucleus(p, 0.5)
    assert len(kept) > 1024
    rng = np.random.default_rng(2)
    draws = {sample(logits, 0.5, rng) for _ in range(3000)}
    assert draws <= kept and len(draws) > 1024


@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.5])
@pytest.mark.parametrize("V", [7, 4099])
def test_numpy_and_torch_rows_draw_the_same_tokens_from_the_same_seed(top_p, V):
    """The llama.cpp runtime samples numpy rows, the PyTorch runtime torch rows: same logits and
    seed, same tokens (#17: sampler parity between runtimes)."""
    torch = pytest.importorskip("torch")
    logits = np.random.default_rng(V).standard_normal((40, V)).astype(np.float32) * 3
    a, b = np.random.default_rng(7), np.random.default_rng(7)
    got_np = [sample(row, top_p, a) for row in logits]
    got_torch = [sample(torch.from_numpy(row), top_p, b) for row in logits]
    assert got_np == got_torch
    assert len(set(got_np)) > 3  # draws, not a constant
