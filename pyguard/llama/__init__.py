"""The llama.cpp runtime (edge path, no torch): ``GuardedLlama``."""
from .guarded import GuardedLlama

__all__ = ["GuardedLlama"]
