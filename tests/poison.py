"""NaN-poisoned output buffers: an output a kernel fails to write then fails the comparison."""
import numpy as np


def nan_like(a):
    """A fresh buffer of a's shape and dtype filled with NaN."""
    return np.full_like(a, np.nan)
