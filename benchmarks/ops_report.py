"""Speed of the C++ kernels beside the same math in numpy and torch eager, and beside a memcpy of
the same traffic, all measured interleaved in one run. Prints a Markdown table, writes a PNG.

    .venv/bin/python benchmarks/ops_report.py [--quick] [--passes 3] [--png benchmarks/ops_report.png]

Effective GB/s = bytes the op must move (reads + writes) / time. memcpy copies half that many
bytes (so it moves the same traffic) with numpy's copyto, single-threaded.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baselines as bl  # noqa: E402

from pyguard import _C  # noqa: E402
from pyguard.timing import cpu_model, interleaved  # noqa: E402

try:
    import torch
except ImportError:  # the report works without torch; its column is left out
    torch = None


def memcpy_fn(nbytes):
    src = np.ones(max(nbytes // 8, 1), np.float32)
    dst = np.empty_like(src)
    return lambda: np.copyto(dst, src)


def coca_case(B, V):
    base, safe, a, t, out = bl.coca_data(B, V)
    fns = {"cpp": lambda: _C.coca_step(base, safe, a, t, None, out),
           "numpy": lambda: bl.coca_numpy(base, safe, a, t, out)}
    if torch is not None:
        tb = [torch.from_numpy(x) for x in (base, safe, a, t, out.copy())]
        fns["torch"] = lambda: bl.coca_torch(*tb)
    return f"coca_step B={B} V={V}", 3 * base.nbytes, fns


def cmrm_case(N, d, masked=False):
    h, v = bl.cmrm_data(N, d)
    m = bl.cmrm_mask(N) if masked else None
    alpha = 1e-4
    fns = {"cpp": lambda: _C.cmrm_shift_(h, v, alpha, -1, m), "numpy": lambda: bl.cmrm_numpy(h, v, alpha, m)}
    if torch is not None:
        th, tv = torch.from_numpy(h.copy()), torch.from_numpy(v)
        tm = None if m is None else torch.from_numpy(m)
        fns["torch"] = lambda: bl.cmrm_torch(th, tv, alpha, tm)
    rows = N if m is None else int(m.sum())
    return f"cmrm_shift_ N={N} d={d}" + (f" mask {rows}/{N}" if masked else ""), 2 * rows * d * 4, fns


def casa_case(B, T, d):
    args = bl.casa_data(B, T, d)
    fns = {"cpp": lambda: _C.casa_score(*args), "numpy": lambda: bl.casa_numpy(*args)}
    if torch is not None:
        targs = [torch.from_numpy(x) for x in args[:5]] + [args[5]]
        fns["torch"] = lambda: bl.casa_torch(*targs)
    return f"casa_score B={B} T={T} d={d}", args[0].nbytes, fns


def cases(quick: bool):
    if quick:
        return [coca_case(8, 49152), cmrm_case(512, 896), casa_case(1, 512, 896)]
    return ([coca_case(B, V) for V in (49152, 151936) for B in (1, 8, 32)]
            + [cmrm_case(N, d) for d in (896, 4096) for N in (1, 512, 4096)]
            + [cmrm_case(4096, d, masked=True) for d in (896, 4096)]
            + [casa_case(B, 512, 896) for B in (1, 8)])


def run(quick=False, min_time=0.3, passes=3):
    """Every case measured in each of ``passes`` passes over all cases; per candidate, the median
    over passes (a disturbance of a few seconds on this shared machine then hits one pass, not
    every round of a case)."""
    built = [(name, nbytes, {**fns, "memcpy": memcpy_fn(nbytes)}) for name, nbytes, fns in cases(quick)]
    per_pass = [[interleaved(fns, min_time=min_time, block_time=0.05) for _, _, fns in built]
                for _ in range(passes)]
    rows = []
    for i, (name, nbytes, fns) in enumerate(built):
        t = {k: statistics.median(p[i][k] for p in per_pass) for k in fns}
        rows.append(dict(case=name, MB=nbytes / 1e6, times=t, gbs={k: nbytes / v / 1e9 for k, v in t.items()}))
    return rows


def table(rows) -> str:
    has_torch = any("torch" in r["times"] for r in rows)
    head = ["case", "MB moved", "C++ µs", "numpy µs"] + (["torch µs"] if has_torch else []) + [
        "C++ GB/s", "memcpy GB/s", "C++ / memcpy", "× numpy"] + (["× torch"] if has_torch else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        t, g = r["times"], r["gbs"]
        cells = [r["case"], f"{r['MB']:.2f}", f"{t['cpp'] * 1e6:.1f}", f"{t['numpy'] * 1e6:.1f}"]
        if has_torch:
            cells.append(f"{t['torch'] * 1e6:.1f}")
        cells += [f"{g['cpp']:.1f}", f"{g['memcpy']:.1f}", f"{g['cpp'] / g['memcpy']:.2f}",
                  f"{t['numpy'] / t['cpp']:.1f}"]
        if has_torch:
            cells.append(f"{t['torch'] / t['cpp']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows, path: Path):
    """One panel per op: effective GB/s of each implementation and of memcpy, per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = [k for k in ("cpp", "numpy", "torch", "memcpy") if k in rows[0]["gbs"]]
    labels = {"cpp": "pyguard C++"}
    groups = {}
    for r in rows:
        op, case = r["case"].split(" ", 1)
        groups.setdefault(op, []).append((case, r))
    fig, axes = plt.subplots(1, len(groups), figsize=(3 + 1.0 * len(rows), 4.8),
                             gridspec_kw={"width_ratios": [len(g) for g in groups.values()]})
    axes = np.atleast_1d(axes)
    width = 0.8 / len(impls)
    for ax, (op, items) in zip(axes, groups.items()):
        x = np.arange(len(items))
        for i, k in enumerate(impls):
            ax.bar(x + i * width, [r["gbs"][k] for _, r in items], width, label=labels.get(k, k))
        ax.set_xticks(x + width * (len(impls) - 1) / 2)
        ax.set_xticklabels([c.replace(" mask", "\nmask") for c, _ in items], fontsize=7, rotation=30, ha="right")
        ax.set_title(op)
    axes[0].set_ylabel("effective GB/s (higher is better)")
    axes[-1].legend(fontsize=8)
    fig.suptitle(f"pyguard ops on {cpu_model()}, {os.cpu_count()} cores, ISA {_C.isa()}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="three small cases (seconds)")
    p.add_argument("--png", type=Path, default=Path(__file__).with_name("ops_report.png"))
    p.add_argument("--min-time", type=float, default=0.3, help="seconds per case and pass")
    p.add_argument("--passes", type=int, default=3, help="passes over all cases (median taken)")
    a = p.parse_args(argv)
    rows = run(a.quick, a.min_time, a.passes)
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, "
          f"ISA {_C.isa()}, numpy {np.__version__}" + (f", torch {torch.__version__}" if torch else ""))
    print(table(rows))
    plot(rows, a.png)
    print(f"plot: {a.png}")


if __name__ == "__main__":
    main()
