"""The package as a user meets it: the edge path with numpy alone, lazy failures with install
hints, run-time ISA choice, and the default models from their PyPI packages."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pyguard import models

from fetched import fetched

ROOT = Path(__file__).parent.parent


def run_py(code, **env):
    e = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=120)


def test_edge_path_needs_numpy_only():
    code = """
import sys
sys.modules['torch'] = None; sys.modules['triton'] = None   # make them unimportable
import numpy as np, pyguard
from pyguard import ops
b = np.random.default_rng(0).standard_normal((2, 50)).astype(np.float32)
assert ops._pick('auto', b) == 'cpp'
tok, kl = pyguard.coca_step(b, b + 1, 2.0)
assert (tok == b.argmax(1)).all() and abs(kl).max() < 1e-5, (tok, kl)
try:
    ops.coca_step(b, b, 1.0, backend='triton')
except ImportError as e:
    print('IMPORT-ERROR', e)
"""
    r = run_py(code)
    assert r.returncode == 0, r.stderr
    assert "pip install 'pyguard[triton]'" in r.stdout


def test_missing_extension_fails_lazily_with_a_hint():
    code = """
import sys
sys.modules['pyguard._C'] = None
import numpy as np, pyguard
from pyguard import ops
b = np.ones((1, 4), np.float32)
assert ops._pick('auto', b) == 'ref'
print(pyguard.coca_step(b, b, 1.0)[0])
ops.coca_step(b, b, 1.0, backend='cpp')
"""
    r = run_py(code)
    assert r.returncode == 1
    assert "[0]" in r.stdout
    assert "pyguard._C (the C++ kernels) is not built" in r.stderr and "pip install ." in r.stderr


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_isa_forced_by_env(isa):
    from pyguard import _C

    if not _C.isa_supported(isa):
        pytest.skip(f"this CPU has no {isa}")
    r = run_py("from pyguard import _C, ops; import numpy as np;"
               "b = np.arange(12, dtype=np.float32).reshape(2, 6);"
               "print(_C.isa(), ops.coca_step(b, b, 1.0, backend='cpp')[0])", PYGUARD_ISA=isa)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [isa, "[5", "5]"]


def test_bad_isa_env_is_a_clear_error():
    r = run_py("from pyguard import _C; _C.isa()", PYGUARD_ISA="sse9")
    assert r.returncode == 1
    assert "PYGUARD_ISA=sse9 is not an instruction set this CPU supports" in r.stderr


def test_set_isa_rejects_unknown_names():
    from pyguard import _C

    with pytest.raises(ValueError, match="unknown instruction set 'neon9'"):
        _C.set_isa("neon9")
    assert _C.isa() in _C.ISAS


def test_models_registry_and_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'gpt-9'"):
        models.model_path("gpt-9")
    p = models.model_path("smollm2-135m", tmp_path)
    assert p.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and not p.exists()


@pytest.mark.parametrize("name", list(models.MODELS))
def test_default_models_fetched_and_verified(name):
    """scripts/setup.sh fetched them; their sha256 is the published one."""
    path = fetched(models.model_path(name), name)
    assert models.sha256_file(path) == models.MODELS[name].sha256
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_a_missing_extra_fails_at_first_use_with_its_pip_command(tmp_path):
    """Each optional import names the package and the extra that installs it, at the feature that
    needs it (here with the packages made unimportable)."""
    code = f"""
import sys
for m in ('sklearn', 'PIL', 'tqdm', 'matplotlib', 'safetensors'):
    sys.modules[m] = None
import numpy as np
from pyguard import datasets, methods, models
from pyguard.calibrate import casa, pooled
uses = {{
    "scikit-learn: pip install 'pyguard[calibrate]'": lambda: pooled.fit([], [], [], 1),
    "Pillow: pip install 'pyguard[images]'": lambda: datasets.render_text("hi", r"{tmp_path}/x.png"),
    "tqdm: pip install 'pyguard[calibrate]'": lambda: casa.collect(lambda m: np.zeros((1, 2)), ["a"], None),
    "matplotlib: pip install 'pyguard[calibrate]'": lambda: casa.save_report({{}}, r"{tmp_path}"),
    "safetensors: pip install 'pyguard[llama]'": lambda: methods.CASA.load(models.shipped_casa("qwen2.5-coder-0.5b")),
}}
for says, use in uses.items():
    try:
        use()
    except ImportError as e:
        assert says in str(e), (says, str(e))
    else:
        raise AssertionError("no ImportError: " + says)
print("ok")
"""
    r = run_py(code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_every_third_party_import_is_declared_in_an_extra():
    """The modules pyguard imports (top level or on first use) are each in an extra of pyproject.toml."""
    import ast
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    declared = {d.split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower().replace("-", "_")
                for deps in extras.values() for d in deps}
    pip_name = {"sklearn": "scikit_learn", "PIL": "pillow", "llama_cpp": "llama_cpp_python", "yaml": "pyyaml",
                "sse_starlette": "sse_starlette", "prometheus_client": "prometheus_client"}
    stdlib = set(sys.stdlib_module_names) | {"pyguard", "numpy", "__future__"}
    used = set()
    for f in (ROOT / "pyguard").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                used |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                used.add(node.module.split(".")[0])
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "need" and node.args \
                    and isinstance(node.args[0], ast.Constant):
                used.add(node.args[0].value.split(".")[0])
    missing = {m for m in used - stdlib if pip_name.get(m, m).lower() not in declared}
    assert not missing, f"imported but in no extra: {sorted(missing)}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """pyguard's wheel, built once for this module's tests."""
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(out)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    [whl] = out.glob("pyguard-*.whl")
    return whl


def test_the_wheel_ships_the_package_its_data_and_no_results(wheel):
    """The built wheel holds the modules, the extension and the fitted / prompt files a user loads,
    and declares the feature extras; no benchmark results, tests or caches."""
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    data = {f"pyguard/data/{p.relative_to(ROOT / 'pyguard' / 'data').as_posix()}"
            for p in (ROOT / "pyguard" / "data").rglob("*") if p.is_file()}
    modules = {f"pyguard/{p.relative_to(ROOT / 'pyguard').as_posix()}" for p in (ROOT / "pyguard").rglob("*.py")} \
        | {f"pyguard/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}  # setup.py's package_dir
    shipped = {n for n in names if n.startswith("pyguard/") and "/_C." not in n}
    assert shipped == data | modules, (sorted(shipped - data - modules), sorted((data | modules) - shipped))
    assert any(n.startswith("pyguard/_C.") for n in names)
    dist_info = "-".join(wheel.name.split("-")[:2]) + ".dist-info"
    assert {n.split("/")[0] for n in names} == {"pyguard", dist_info}  # no benchmarks, tests or results
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    extras = {line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Provides-Extra:")}
    assert extras >= {"llama", "server", "torch", "hf", "triton", "images", "calibrate", "eval", "graft", "all"}


def test_the_llama_extra_alone_runs_a_guarded_chat_without_torch(tmp_path, wheel):
    """pip install pyguard[llama] into a fresh venv (the cached llama-cpp-python wheel, no torch),
    then a guarded chat completion on SmolLM2 with CoCA and the shipped CASA's formula."""
    llama_wheels = sorted((models.cache_dir() / "wheels").glob("llama-cpp-python-*/llama_cpp_python-*.whl"))
    model = models.model_path("smollm2-135m")
    if not llama_wheels or not model.exists():
        pytest.skip("needs scripts/setup.sh's llama-cpp-python wheel and SmolLM2")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    r = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{wheel}[llama]",
                        str(llama_wheels[-1])], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    code = f"""
import importlib.util, numpy as np
assert importlib.util.find_spec("torch") is None, "torch got installed"
from pyguard.llama import GuardedLlama
from pyguard.methods import CASA, CoCA
rng = np.random.default_rng(0)
casa = CASA({{"Wk": np.zeros((576, 1), np.float32), "q": np.ones((1, 1), np.float32),
             "w": rng.standard_normal(576).astype(np.float32) * 1e-3, "b": 0.0}}, layer=10, threshold=0.99)
with GuardedLlama(r"{model}", n_ctx=512, coca=CoCA(alpha=1.0), casa=casa) as llm:
    r = llm.create_chat_completion([{{"role": "user", "content": "Say hello."}}], max_tokens=8)
print(r["choices"][0]["finish_reason"] in ("stop", "length"), r["pyguard"]["casa"]["unsafe"] is False,
      len(r["choices"][0]["message"]["content"]) > 0)
"""
    r = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.split() == ["True", "True", "True"], (r.stdout, r.stderr[-3000:])


def _tensors_digest(path: Path) -> str | None:
    """sha256 of a .gguf / .safetensors file's tensors (names and data), not of its metadata."""
    import hashlib

    h = hashlib.sha256()
    if path.suffix == ".gguf":
        from gguf import GGUFReader

        for t in GGUFReader(path).tensors:
            h.update(t.name.encode() + np.ascontiguousarray(t.data).tobytes())
    elif path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        for name, a in sorted(load_file(path).items()):
            h.update(name.encode() + np.ascontiguousarray(a).tobytes())
    else:
        return None
    return h.hexdigest()


def test_benchmark_results_hold_no_duplicates():
    """Raw results stay small and regenerable: no two tracked data files under benchmarks/ with the
    same content (above 1 KiB: run.json stubs may agree; plots of equal figures may too), and no
    two weight files whose tensors are the same (copies that differ only in a metadata field)."""
    import hashlib

    files = subprocess.run(["git", "ls-files", "benchmarks"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    seen: dict = {}
    for f in files:
        p = ROOT / f
        if not p.is_file() or p.stat().st_size <= 1024 or p.suffix == ".png":
            continue
        for key in (hashlib.sha256(p.read_bytes()).hexdigest(), _tensors_digest(p)):
            if key is not None:
                assert key not in seen, f"{f} duplicates {seen[key]}"
                seen[key] = f
