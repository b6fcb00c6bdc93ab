"""Shared fixtures. Triton runs under its interpreter here (no GPU): TRITON_INTERPRET must be set
before triton is imported."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import secrets

import numpy as np
import pytest

if os.environ.get("PYGUARD_EXT_DIR"):  # scripts/sanitize.sh: test a separately built pyguard._C
    import pyguard

    pyguard.__path__.insert(0, os.environ["PYGUARD_EXT_DIR"])


def pytest_runtest_setup(item):
    """``@pytest.mark.needs_file(path, what)``: skip when ``path`` is absent, or fail under
    PYGUARD_REQUIRE_MODELS (``fetched.fetched``), before any fixture opens it."""
    from fetched import fetched

    for m in item.iter_markers("needs_file"):
        fetched(*m.args)


@pytest.fixture
def rng(request):
    """A fresh generator per test; the seed is printed so a failure can be replayed."""
    seed = int(os.environ.get("PYGUARD_TEST_SEED") or secrets.randbits(32))
    print(f"PYGUARD_TEST_SEED={seed}")
    return np.random.default_rng(seed)


def _isas():
    try:
        from pyguard import _C
    except ImportError:
        return []
    return [i for i in _C.ISAS if _C.isa_supported(i)]


ISAS = _isas()
# Every implementation of an op: the reference, C++ on each ISA this CPU runs, Triton.
IMPLS = ["ref"] + [f"cpp-{i}" for i in ISAS] + ["triton"]


@pytest.fixture(params=IMPLS)
def impl(request):
    """Yields the backend name for pyguard.ops, with the C++ ISA forced for cpp-* params."""
    name = request.param
    if name.startswith("cpp"):
        from pyguard import _C

        before = _C.isa()
        _C.set_isa(name.split("-", 1)[1])
        yield "cpp"
        _C.set_isa(before)
    else:
        if name == "triton":
            pytest.importorskip("triton")
        yield name
