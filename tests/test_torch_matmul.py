"""The transposed layout of few-row linears gives F.linear's values, and the modules come back."""
import pytest

torch = pytest.importorskip("torch")

from pyguard.torch.matmul import linear_t, plain_linears, transposed  # noqa: E402


@pytest.mark.parametrize("shape", [(1, 37), (2, 37), (3, 1, 37), (2, 4, 37), (9, 37), (37,)])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_linear(shape, bias):
    g = torch.Generator().manual_seed(sum(shape) + bias)
    x = torch.randn(shape, generator=g)
    lin = torch.nn.Linear(37, 53, bias=bias)
    want = lin(x)
    torch.testing.assert_close(linear_t(x, lin.weight, lin.bias), want, rtol=1e-5, atol=1e-5)
    with transposed([lin]):
        got = lin(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert "forward" not in lin.__dict__


def test_takes_the_transposed_path_for_a_few_float32_rows_only(monkeypatch):
    calls = []
    real = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: calls.append(tuple(b.shape)) or real(a, b))
    w = torch.randn(5, 3)
    for x in (torch.randn(1, 3), torch.randn(2, 3), torch.randn(9, 3), torch.randn(2, 3, dtype=torch.float64)):
        linear_t(x, w if x.dtype == torch.float32 else w.double())
    assert calls == [(3, 2)]


def test_only_plain_linears_are_switched_and_restored_after_errors():
    class Sub(torch.nn.Linear):
        pass

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), Sub(4, 4), torch.nn.ReLU())
    assert plain_linears(model) == [model[0]]
    with pytest.raises(RuntimeError):
        with transposed(plain_linears(model)):
            assert "forward" in model[0].__dict__
            raise RuntimeError
    assert "forward" not in model[0].__dict__
