"""Side-by-side timing: candidates run in alternating blocks, round after round, so a noisy
machine slows them alike and their ratios stay meaningful.

Known bias: worker threads of a previous candidate's library (OpenBLAS after a numpy matmul) spin
idle for up to ~0.1 s and slow the next block; ``settle`` pauses before each block to let them
sleep, but on a VM a pause also lets the cores cool, which slows multi-threaded candidates more.
The default is no pause."""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable


def interleaved(fns: dict[str, Callable[[], object]], min_time: float = 0.3, block_time: float = 0.02,
                max_rounds: int = 50, settle: float = 0.0) -> dict[str, float]:
    """Median seconds per call of each function.

    Each function is first calibrated to a block of calls lasting about ``block_time``; then rounds
    run every block once, in order, until ``min_time`` seconds have passed (3 to ``max_rounds``
    rounds). The result is the median over rounds of block time / calls.
    """
    reps = {}
    for name, fn in fns.items():
        fn()  # warm-up
        t0 = time.perf_counter()
        fn()
        reps[name] = max(1, int(block_time / max(time.perf_counter() - t0, 1e-7)))
    per_call: dict[str, list[float]] = {k: [] for k in fns}
    spent, rounds = 0.0, 0
    while rounds < 3 or (spent < min_time and rounds < max_rounds):
        for name, fn in fns.items():
            n = reps[name]
            time.sleep(settle)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            dt = time.perf_counter() - t0
            spent += dt
            per_call[name].append(dt / n)
        rounds += 1
    return {k: statistics.median(v) for k, v in per_call.items()}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), to print beside every figure."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
