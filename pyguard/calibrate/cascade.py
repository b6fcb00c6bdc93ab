"""Cascade thresholds (``pyguard fit cascade``): ``low`` and ``high`` for a fitted CASA module,
chosen on the validation split of the CASA fitting (never its held-out prompts), saved into the
CASA file.

``high`` (refuse at or above) is the CASA module's own threshold, chosen on the same validation
split for its false-refusal target. ``low`` (below it: no guard at all) is as low as the benign
target allows, counting every benign prompt routed to CoCA as refused (the worst case: CoCA may
answer it after all) and as slowed down: at most ``target_frr`` of the validation benign prompts
fall in the CoCA band [low, high). Of the interval of such thresholds, the middle is taken, as
``casa.choose_threshold`` does.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..datasets import FIT_JAILBREAKS
from ..methods import CASA, Cascade, CoCA


def choose_low(benign: np.ndarray, high: float, target_frr: float) -> float:
    """The ``low`` threshold: at most ``target_frr`` of the ``benign`` scores fall in [low, high),
    and it lies midway between the benign scores around that cut (never above ``high``)."""
    if not 0 <= target_frr < 1:
        raise ValueError(f"target_frr must be in [0, 1), got {target_frr}")
    if benign.size == 0:
        raise ValueError("no benign validation prompts to choose low from")
    desc = np.sort(benign)[::-1]
    # benign prompts that may score >= low: those refused anyway (>= high) and the band's share
    allowed = int(np.sum(~(desc < high))) + int(np.floor(target_frr * desc.size + 1e-9))
    if allowed >= desc.size:
        return 0.0
    below = desc[allowed]  # the largest benign score that must stay under low
    above = min(desc[allowed - 1], high) if allowed else high
    return float(min(max((below + max(above, below)) / 2, 0.0), high))


def branches(scores: np.ndarray, low: float, high: float) -> dict:
    """Fractions of ``scores`` routed to each branch."""
    if scores.size == 0:
        return {"none": float("nan"), "coca": float("nan"), "refuse": float("nan")}
    return {"none": float(np.mean(scores < low)), "coca": float(np.mean((scores >= low) & (scores < high))),
            "refuse": float(np.mean(~(scores < high)))}


def run(casa_path, out, model: str | None = None, target_frr: float = 0.02, harmful=None, benign=None,
        cache=None, jailbreaks: int = FIT_JAILBREAKS, seed: int = 0, progress: bool = True,
        graft=None, mmproj=None, fit_on=("text",), frr_on=None):
    """Score the validation split with the CASA module (hidden states from the cache, computed when
    missing), choose (low, high), save the CASA file with them at ``out``. Returns (Cascade, report).
    ``fit_on``: the modalities whose validation copies are scored (``casa.copies``: text, graft
    through the projector ``graft``, image through ``mmproj``), as ``pyguard fit casa`` took them;
    ``frr_on``: the benign sources whose share in the band ``target_frr`` bounds (default: all)."""
    from .. import datasets, models
    from . import casa as casa_fit

    casa = CASA.load(casa_path)
    model = model or models.DEFAULT_MODEL
    casa_fit.collected(fit_on, graft, mmproj)
    items = casa_fit.prompt_sets(harmful, benign, jailbreaks)
    folder = Path(cache) if cache else models.cache_dir() / "states"
    val = casa_fit.copies(datasets.split(items, datasets.FIT_FRACTIONS, seed)[1], fit_on, folder / "typographic")
    if frr_on is not None:
        val = casa_fit.counted(val, frr_on)
    H, _, _ = casa_fit.hidden_states(model, casa.layer, val, cache, progress, "validation states", fitted=casa,
                                     graft=graft, mmproj=mmproj)
    scores = np.asarray(casa.score(H), dtype=np.float64)
    labels = np.array([it["label"] == "harmful" for it in val])
    high = casa.threshold
    low = choose_low(scores[~labels], high, target_frr)
    cascade = Cascade(casa, CoCA(), low=low, high=high)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    cascade.save(out)
    report = {"low": low, "high": high, "target_frr": target_frr, "frr_on": frr_on and sorted(frr_on),
              "model": str(model), "fit_on": list(fit_on),
              "n_val": {"benign": int((~labels).sum()), "harmful": int(labels.sum())},
              "val_benign": branches(scores[~labels], low, high), "val_harmful": branches(scores[labels], low, high)}
    return cascade, report
