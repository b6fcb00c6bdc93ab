"""Triton kernels (GPU path), installed as ``pyguard.kernels``. One file per op: kernel + launcher.

Launchers take validated torch tensors (``pyguard.ops`` checks them). Under ``TRITON_INTERPRET=1``
they also run on CPU tensors (that is how the tests check them here).
"""
from .casa import casa_score
from .cmrm import cmrm_shift_
from .coca import coca_step

__all__ = ["coca_step", "cmrm_shift_", "casa_score"]
