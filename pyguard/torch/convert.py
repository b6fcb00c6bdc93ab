"""Registry GGUF model -> Hugging Face folder, converted once and reused.

transformers dequantizes a GGUF and rebuilds its tokenizer in 1-1.5 min on 2 cores; the result is saved with
``save_pretrained`` under ``<cache>/hf/<name>-<sha16>-tf<transformers version>/``, keyed by the GGUF's
sha256 and the transformers version, and later loads read that folder (works with HF_HUB_OFFLINE=1).
``cache`` is the pyguard cache root (default ``models.cache_dir()``; GGUFs are in ``<cache>/models``).
Command line: ``python -m pyguard.torch.convert [NAME]`` prints the folder.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from .. import models
from ..models import DEFAULT_MODEL


def hf_folder(name: str = DEFAULT_MODEL, cache: Path | None = None) -> Path:
    """Returns the HF folder of model ``name`` (float32 weights + tokenizer), converting it first if absent."""
    cache = Path(cache) if cache is not None else models.cache_dir()
    gguf = models.model_path(name, cache / "models")
    out = cache / "hf" / f"{name}-{models.MODELS[name].sha256[:16]}-tf{transformers.__version__}"
    if out.is_dir():
        return out
    if not gguf.exists():
        raise FileNotFoundError(f"{name}: GGUF not found at {gguf}; run `pyguard models fetch {name}`")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        kw = dict(gguf_file=gguf.name)
        # dequantize=True: a plain dense model (a model kept in GGUF blocks cannot be saved)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True), **kw)
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, **kw).save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        os.replace(tmp, out)  # atomic: ``out`` only ever exists complete
    except OSError:
        if not out.is_dir():  # a concurrent conversion that finished first is fine; anything else is not
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, cache: Path | None = None):
    """Returns ``(model, tokenizer)`` of model ``name`` from its HF folder, the model in eval mode."""
    folder = hf_folder(name, cache)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(folder)


if __name__ == "__main__":
    print(hf_folder(*sys.argv[1:2]))
