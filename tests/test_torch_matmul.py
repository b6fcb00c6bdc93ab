"""SmallBatchLinear: the transposed layout gives F.linear's values for every input shape."""
import pytest

torch = pytest.importorskip("torch")

from pyguard.torch.matmul import SmallBatchLinear  # noqa: E402


@pytest.mark.parametrize("shape", [(1, 37), (2, 37), (3, 1, 37), (2, 4, 37), (9, 37), (37,)])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_linear(shape, bias):
    g = torch.Generator().manual_seed(sum(shape) + bias)
    x = torch.randn(shape, generator=g)
    w, b = torch.randn(53, 37, generator=g), torch.randn(53, generator=g) if bias else None
    want = torch.nn.functional.linear(x, w, b)
    with SmallBatchLinear():
        got = torch.nn.functional.linear(x, w, b)
        by_module = torch.nn.Linear(37, 53, bias=bias)
        with torch.no_grad():
            by_module.weight.copy_(w)
            by_module.bias is not None and by_module.bias.copy_(b)
            got_module = by_module(x)
    assert got.shape == want.shape == got_module.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_module, want, rtol=1e-5, atol=1e-5)


def test_takes_the_transposed_path_for_a_few_float32_rows_only(monkeypatch):
    calls = []
    real = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: calls.append(tuple(b.shape)) or real(a, b))
    w = torch.randn(5, 3)
    with SmallBatchLinear():
        for x in (torch.randn(1, 3), torch.randn(2, 3), torch.randn(9, 3), torch.randn(2, 3, dtype=torch.float64)):
            torch.nn.functional.linear(x, w if x.dtype == torch.float32 else w.double())
    assert calls == [(3, 2)]
