"""Kept for the commands recorded in RESULTS.md: the llama.cpp latency report is ``pyguard bench``
(pyguard/bench.py); this writes its table and plot next to this file.

    .venv/bin/python benchmarks/llama_report.py [--model qwen2.5-coder-0.5b] [--tokens 64] [--rounds 3]
"""
import sys
from pathlib import Path

from pyguard.bench import main

if __name__ == "__main__":
    main(sys.argv[1:] + (["--out", str(Path(__file__).parent)] if "--out" not in sys.argv else []))
