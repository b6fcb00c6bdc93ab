"""The PyTorch / Hugging Face runtime (needs torch and transformers: pip install 'pyguard[hf]')."""
from .guard import GuardedModel, guard

__all__ = ["GuardedModel", "guard"]
