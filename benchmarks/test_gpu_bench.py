"""gpu_bench.py (scripts/gpu_check.sh's benchmark) runs end to end: here on the CPU, small."""
import math
import re

import pytest

pytest.importorskip("transformers")

import gpu_bench  # noqa: E402


def test_gpu_bench_prints_every_row(tmp_path):
    out = tmp_path / "gpu.md"
    text = gpu_bench.main(["--device", "cpu", "--quick", "--out", str(out)])
    assert out.read_text() == text
    ops = [ln for ln in text.splitlines() if re.match(r"\| (coca_step|cmrm_shift_|casa_score) ", ln)]
    decode = [ln for ln in text.splitlines() if re.match(r"\| (model\.generate|guard\()", ln)]
    assert len(ops) == 6 and len(decode) == 4
    for ln in ops + decode:
        numbers = [float(x) for x in re.findall(r"\| ([0-9.]+) (?=\|)", ln)]
        assert numbers and all(math.isfinite(x) for x in numbers), ln
    assert decode[0].endswith("| 1.00 |")  # the baseline's ratio to itself
