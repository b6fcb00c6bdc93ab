"""Tests that need a fetched model or data file: skip when it is absent, fail instead under
PYGUARD_REQUIRE_MODELS (scripts/test.sh sets it, so CI never skips them silently)."""
import os

import pytest


def fetched(path, what: str, how: str = "run scripts/setup.sh"):
    """``path`` if it exists; otherwise skip (or fail under PYGUARD_REQUIRE_MODELS) naming ``what``."""
    if not path.exists():
        if os.environ.get("PYGUARD_REQUIRE_MODELS"):
            pytest.fail(f"{what} is not fetched: run scripts/setup.sh")
        pytest.skip(f"{what} not fetched ({how})")
    return path
