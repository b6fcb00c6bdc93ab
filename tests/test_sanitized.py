"""Under scripts/sanitize.sh, proves the sanitized extension is the one being tested."""
import os

import pytest


@pytest.mark.skipif(not os.environ.get("PYGUARD_EXT_DIR"), reason="only under scripts/sanitize.sh")
def test_the_sanitized_build_is_loaded():
    from pyguard import _C

    assert _C.__file__.startswith(os.environ["PYGUARD_EXT_DIR"]), _C.__file__
