"""The pyguard command as a user runs it."""
import subprocess
import sys

import pytest


def pyguard(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "pyguard.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_help_has_examples():
    r = pyguard("--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "pyguard demo" in r.stdout


@pytest.mark.parametrize("args", [(), ("fly",), ("models",), ("models", "delete")])
def test_usage_errors_exit_2(args):
    r = pyguard(*args)
    assert r.returncode == 2 and "usage:" in r.stderr


def test_failure_is_one_line_exit_1():
    r = pyguard("models", "path", "gpt-9")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["pyguard: error: unknown model 'gpt-9'; known: smollm2-135m, qwen2.5-coder-0.5b"]
    r = pyguard("--debug", "models", "path", "gpt-9")
    assert r.returncode == 1 and "Traceback" in r.stderr


def test_models_list():
    r = pyguard("models", "list")
    assert r.returncode == 0
    assert [line.split()[0] for line in r.stdout.splitlines()] == ["smollm2-135m", "qwen2.5-coder-0.5b"]


def test_ops_demo_runs_every_backend_and_agrees():
    r = pyguard("demo", "--ops")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all backends agree with the reference" in r.stdout
    for label in ("reference (numpy)", "C++ generic", "Triton"):
        assert r.stdout.count(label) == 3, label


def test_chat_demo_runs_guarded_beside_unguarded():
    from pyguard import models

    if not models.model_path("smollm2-135m").exists():
        pytest.skip("SmolLM2 not fetched")
    r = pyguard("demo", "--model", "smollm2-135m", "--max-tokens", "6")
    assert r.returncode == 0, r.stderr
    lines = [line.strip() for line in r.stdout.splitlines()]
    assert sum(x.startswith("unguarded:") for x in lines) == sum(x.startswith("guarded:") for x in lines) == 5
    assert "CoCA: " in r.stdout and "tok/s" in r.stdout


@pytest.mark.parametrize("args", [("fit",), ("fit", "casa"), ("fit", "casa", "--layer", "x", "--out", "o"),
                                  ("calibrate", "cmrm"), ("calibrate", "tga", "--model", "m", "--out", "o"),
                                  ("calibrate", "cmrm", "--model", "m", "--out", "o", "--counterpart", "grey")])
def test_calibration_usage_errors_exit_2(args):
    r = pyguard(*args)
    assert r.returncode == 2 and "usage:" in r.stderr


def test_calibration_bad_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "anchors.jsonl"
    bad.write_text('{"image": "nope.png", "text": "hi"}\n')
    r = pyguard("calibrate", "cmrm", "--model", str(tmp_path / "m.gguf"), "--anchors", str(bad), "--out",
                str(tmp_path / "v.gguf"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "anchors.jsonl:1" in r.stderr and "nope.png" in r.stderr
    r = pyguard("calibrate", "cmrm", "--model", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "v.gguf"))
    assert r.returncode == 1 and "no such model file" in r.stderr and "m.gguf" in r.stderr
    harmful = tmp_path / "harmful.jsonl"
    harmful.write_text('{"text": "a"}\n{"text": ""}\n')
    r = pyguard("fit", "casa", "--model", str(tmp_path / "m.gguf"), "--layer", "3", "--harmful", str(harmful),
                "--out", str(tmp_path / "c.safetensors"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "harmful.jsonl:2" in r.stderr
