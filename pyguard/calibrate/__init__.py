"""Calibration and fitting: CASA (casa.py), CMRM vectors (cmrm.py). Shared here: the per-item
on-disk cache that makes long runs resumable (models are opened by ``pyguard.runtime``)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np


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
