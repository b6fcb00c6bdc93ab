"""Where a cascade sends the validation prompts (issue #16): for each CASA file with cascade
thresholds, the share of each validation benign source and of the harmful prompts that goes
unguarded, to the CoCA band, or is refused, from the fit's cached layer states. Validation only.

    .venv/bin/python benchmarks/cascade_routes.py pyguard/data/casa-qwen2.5-coder-0.5b.safetensors other.safetensors
"""
from __future__ import annotations

import argparse

import numpy as np

from casa_variants import last_turn_rows
from pyguard import models
from pyguard.calibrate import loso
from pyguard.methods import CASA


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("casa", nargs="+", help="CASA files fitted by `pyguard fit cascade`")
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    a = ap.parse_args()
    files = [CASA.load(f) for f in a.casa]
    layers = {c.layer for c in files}
    if len(layers) != 1 or any(c.cascade is None for c in files):
        raise SystemExit("give CASA files of one layer, each with cascade thresholds")
    items, _ = loso.fitting_items(a.model, layers.pop(), progress=True)
    starts = last_turn_rows(a.model, items)
    val = [(it, s) for it, s in zip(items, starts) if it["split"] == "val"]
    groups = {src: np.array([it["label"] != "harmful" and it["source"] == src for it, _ in val])
              for src in sorted({it["source"] for it, _ in val if it["label"] != "harmful"})}
    groups["harmful"] = np.array([it["label"] == "harmful" for it, _ in val])
    print("| file | prompts | n | unguarded | CoCA band | refused |\n|---|---|---|---|---|---|")
    for path, c in zip(a.casa, files):
        s = np.asarray(c.score([it["states"][start if c.rows == "last-turn" else 0:] for it, start in val]))
        low, high = c.cascade
        for name, m in groups.items():
            x = s[m]
            print(f"| {path} | {name} | {m.sum()} | {np.mean(x < low):.1%} | {np.mean((x >= low) & (x < high)):.1%} "
                  f"| {np.mean(~(x < high)):.1%} |")


if __name__ == "__main__":
    main()
