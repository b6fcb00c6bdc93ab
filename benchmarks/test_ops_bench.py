"""pytest-benchmark suites: each op's C++ kernel beside numpy and torch eager compositions.

    .venv/bin/python -m pytest benchmarks --benchmark-enable --benchmark-group-by=param:case

Without --benchmark-enable (as in CI) each body runs once and checks that the implementations
agree, so the suite stays correct.
"""
import numpy as np
import pytest

import baselines as bl
from pyguard import _C

torch = pytest.importorskip("torch")

COCA = [(1, 49152), (8, 49152), (32, 49152), (1, 151936), (8, 151936), (32, 151936)]
CMRM = [(N, d, False) for d in (896, 4096) for N in (1, 512, 4096)] + [(4096, d, True) for d in (896, 4096)]
CASA = [(1, 512, 896), (8, 512, 896)]
IMPLS = ["cpp", "numpy", "torch"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", COCA, ids=lambda c: f"B{c[0]}-V{c[1]}")
def test_coca_step(benchmark, case, impl):
    base, safe, a, t, out = bl.coca_data(*case)
    benchmark.group = f"coca_step B={case[0]} V={case[1]}"
    if impl == "cpp":
        tok, kl = benchmark(_C.coca_step, base, safe, a, t, None, out)
    elif impl == "numpy":
        tok, kl = benchmark(bl.coca_numpy, base, safe, a, t, out)
    else:
        args = [torch.from_numpy(x) for x in (base, safe, a, t, out)]
        tok, kl = (x.numpy() for x in benchmark(bl.coca_torch, *args))
    want_tok, want_kl = bl.coca_numpy(base, safe, a, t, np.empty_like(base))
    np.testing.assert_array_equal(tok, want_tok)
    np.testing.assert_allclose(kl, want_kl, rtol=1e-3, atol=1e-4)


def cmrm_impl(impl, mask):
    if impl == "cpp":
        return lambda h, v, alpha: _C.cmrm_shift_(h, v, alpha, -1, mask)
    if impl == "numpy":
        return lambda h, v, alpha: bl.cmrm_numpy(h, v, alpha, mask)
    tm = None if mask is None else torch.from_numpy(mask)
    return lambda h, v, alpha: bl.cmrm_torch(torch.from_numpy(h), torch.from_numpy(v), alpha, tm)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CMRM, ids=lambda c: f"N{c[0]}-d{c[1]}" + ("-mask" if c[2] else ""))
def test_cmrm_shift(benchmark, case, impl):
    N, d, masked = case
    h, v = bl.cmrm_data(N, d)
    mask = bl.cmrm_mask(N) if masked else None
    fn = cmrm_impl(impl, mask)
    got = h.copy()
    fn(got, v, 0.7)
    want = h - np.float32(0.7) * v
    np.testing.assert_allclose(got, want if mask is None else np.where(mask[:, None], want, h), rtol=1e-6, atol=1e-6)
    benchmark.group = f"cmrm_shift_ N={N} d={d}" + (" masked" if masked else "")
    benchmark(fn, h, v, 1e-3)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASA, ids=lambda c: f"B{c[0]}-T{c[1]}-d{c[2]}")
def test_casa_score(benchmark, case, impl):
    args = bl.casa_data(*case)
    benchmark.group = f"casa_score B={case[0]} T={case[1]} d={case[2]}"
    if impl == "cpp":
        s = benchmark(_C.casa_score, *args)
    elif impl == "numpy":
        s = benchmark(bl.casa_numpy, *args)
    else:
        s = benchmark(bl.casa_torch, *[torch.from_numpy(x) for x in args[:5]], args[5]).numpy()
    np.testing.assert_allclose(s, bl.casa_numpy(*args), rtol=1e-4, atol=1e-5)
