"""benchmarks/torch_report.py still runs: a tiny LLaVA smoke run, in process (a few seconds)."""
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import torch_report  # noqa: E402

ROWS = ["unguarded", "unguarded via pyguard", "naive CoCA", "pyguard CoCA", "CMRM", "CASA", "all three",
        "bare forward, batch of two vs one", "bare forward, batch of two vs one, linears transposed"]


def test_tiny_llava_report(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy machine makes 2-thread steps of a tiny model erratic; timing is not checked
    try:
        torch_report.main(["--model", "tiny-llava", "--tokens", "4", "--rounds", "1", "--png", str(tmp_path / "x.png")])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert all(f"| {row} |" in out for row in ROWS)
    assert (tmp_path / "x.png").stat().st_size > 0
