"""The PyTorch / Hugging Face runtime (needs torch: pip install 'pyguard[hf]')."""
