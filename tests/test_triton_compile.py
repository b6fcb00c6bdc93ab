"""The Triton kernels compile for real GPUs (sm_80, sm_90) down to cubin: catches what the
interpreter tolerates (types, layouts, tl.dot shapes). Runs tests/triton_compile.py in a child
process, since this one runs Triton's interpreter."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).parent))
from triton_compile import CASES  # noqa: E402


@pytest.fixture(scope="module")
def compiled():
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("triton_compile.py"))],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return {d["case"]: d for d in map(json.loads, r.stdout.splitlines())}


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_kernel_compiles_to_cubin(compiled, case):
    res = compiled[case]
    assert res["ok"], res["error"]
    if case.startswith("casa"):
        assert res["mma"], "tl.dot should lower to tensor-core mma (tf32x3)"
