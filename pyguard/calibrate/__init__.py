"""Calibration and fitting: CASA (casa.py), CMRM vectors (cmrm.py). Shared here: where a model
comes from (a default model name, a .gguf file or a Hugging Face folder) and the per-item on-disk
cache that makes long runs resumable."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np


def locate(model) -> tuple[str, Path]:
    """("gguf", file) for a default model name or a .gguf path, ("hf", folder) for a Hugging Face
    folder; FileNotFoundError naming the model otherwise."""
    from .. import models

    if model in models.MODELS or str(model).endswith(".gguf"):
        path = models.model_path(model) if model in models.MODELS else Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"no such model file: {path}")
        return "gguf", path
    folder = Path(model)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{model}: not a default model name, a .gguf file or a Hugging Face folder")
    return "hf", folder


def model_key(kind: str, path: Path) -> str:
    """A cache key for a located model: file name and size (GGUF) or folder name (HF)."""
    return f"gguf-{path.name}-{path.stat().st_size}" if kind == "gguf" else f"hf-{path.resolve().name}"


def hf_model(folder: Path):
    """(model, processor or tokenizer) of a Hugging Face folder: a LLaVA-style model with its
    processor when the config has a vision tower, else a causal LM with its tokenizer."""
    import transformers

    vision = getattr(transformers.AutoConfig.from_pretrained(folder), "vision_config", None) is not None
    cls = transformers.AutoModelForImageTextToText if vision else transformers.AutoModelForCausalLM
    proc = (transformers.AutoProcessor if vision else transformers.AutoTokenizer).from_pretrained(folder)
    return cls.from_pretrained(folder).eval(), proc


def hf_guard(folder: Path, **methods):
    """A GuardedModel of a Hugging Face folder (``hf_model``) with ``methods`` (coca=, cmrm=, casa=)."""
    from ..torch import guard

    return guard(*hf_model(folder), **methods)


class NpyCache:
    """One ``.npy`` per item under ``folder``, named by the sha256 of the item's key: a run that
    stops is resumed without recomputing finished items."""

    def __init__(self, folder):
        self.dir = Path(folder)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.dir / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".npy")

    def get(self, key: str):
        p = self.path(key)
        return np.load(p) if p.exists() else None

    def put(self, key: str, a: np.ndarray) -> None:
        p = self.path(key)
        tmp = p.with_suffix(".tmp.npy")
        np.save(tmp, np.ascontiguousarray(a, dtype=np.float32))
        os.replace(tmp, p)  # a killed run never leaves a half file under the final name
