"""The package's optional imports: each third-party module a feature loads on first use, and the
extra that installs it (pyproject.toml's ``[project.optional-dependencies]``)."""
from __future__ import annotations

import importlib

PACKAGES = {"sklearn": "scikit-learn", "PIL": "Pillow"}  # pip names that differ from the module's


def need(module: str, extra: str):
    """``module`` imported (e.g. "tqdm.auto"), or ImportError with the pip command of ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise ImportError(f"this needs {PACKAGES.get(top, top)}: pip install 'pyguard[{extra}]' ({e})") from e


def tqdm(extra: str):
    """tqdm's auto progress bar class."""
    return need("tqdm.auto", extra).tqdm


def pyplot(extra: str):
    """matplotlib.pyplot on the file-only Agg backend."""
    need("matplotlib", extra).use("Agg")
    return need("matplotlib.pyplot", extra)
