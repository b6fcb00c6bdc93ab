"""pyguard: inference-time safety for multimodal LLMs (CoCA, CMRM, CASA, TGA).

``import pyguard`` needs numpy only; the C++ kernels (``pyguard._C``), the Triton kernels
(``pyguard.kernels``) and the runtimes load lazily and say what to install when missing.
"""
__version__ = "0.1.0"

from .ops import casa_score, cmrm_shift_, coca_step

__all__ = ["coca_step", "cmrm_shift_", "casa_score", "__version__"]
