"""Pooled CASA probes compared where over-refusal happens, on the validation split only (issue
#16): each pooling of the last user turn's rows (or the whole prompt's) fitted on the train split,
then, at the threshold that flags ``--frr`` of the risky-looking validation benign prompts, the
share of validation harmful prompts detected, overall and per source. In distribution (every
source is in training): leave-one-source-out is ``casa_variants.py``.

    .venv/bin/python benchmarks/casa_pooling_val.py --layer 12 --variants mean:last-turn mean+last:last-turn \
        mean:prompt --out benchmarks/casa_pooling_val.md
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from casa_variants import last_turn_rows
from pyguard import models
from pyguard.calibrate import loso, pooled

RISKY = "pyguard-benign-risky"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--variants", nargs="+", default=["mean:last-turn", "mean+last:last-turn"],
                    help="pooling:rows, rows one of prompt, last-turn")
    ap.add_argument("--C", type=float, default=1.0)
    ap.add_argument("--frr", type=float, default=0.03, help="share of risky-looking validation benign flagged")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/casa_pooling_val.md"))
    a = ap.parse_args()
    items, _ = loso.fitting_items(a.model, a.layer, progress=True)
    starts = last_turn_rows(a.model, items)
    val = [it for it in items if it["split"] == "val"]
    harmful = np.array([it["label"] == "harmful" for it in val])
    risky = np.array([it.get("source") == RISKY for it in val])
    sources = sorted({it["source"] for it in val if it["label"] == "harmful"})
    lines = [f"| variant | AUROC | detected at {a.frr:.0%} risky flagged | "
             + " | ".join(s.removeprefix("pyguard-") for s in sources) + " |",
             "|---" * (3 + len(sources)) + "|"]
    for v in a.variants:
        pooling, _, rows = v.partition(":")
        if rows not in ("prompt", "last-turn"):
            raise SystemExit(f"variant {v!r}: rows must be prompt or last-turn")
        pairs = {s: [(it["states"][start if rows == "last-turn" else 0:], int(it["label"] == "harmful"))
                     for it, start in zip(items, starts) if it["split"] == s] for s in ("train", "val")}
        probe, _ = pooled.fit(pairs["train"], pairs["val"], pairs["val"], a.layer, pooling, C=a.C)
        s = np.asarray(probe.score([h for h, _ in pairs["val"]]), dtype=np.float64)
        t = np.quantile(s[risky & ~harmful], 1 - a.frr)
        per = [np.mean(s[harmful & np.array([it["source"] == src for it in val])] > t) for src in sources]
        lines.append(f"| {v} | {roc_auc_score(harmful, s):.4f} | {np.mean(s[harmful] > t):.3f} | "
                     + " | ".join(f"{p:.2f}" for p in per) + " |")
        print(lines[-1], flush=True)
    a.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
