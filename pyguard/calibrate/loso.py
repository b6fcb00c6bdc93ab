"""Leave-one-source-out validation of CASA: how a probe does on a source of prompts it never saw.

A held-out split of the fitting data shares every source with the training split, so it
overstates what a user sees on new sources. Here each harmful source in turn is left out: the
module is fitted on the train split of the others (early stopping and threshold on their
validation split) and scored on every train and validation item of the left-out source, against
the validation benign prompts. Each benign category is left out the same way: its items' flagged
rate at the fold's threshold, and its AUROC against the validation harmful prompts. A harmful
source and a benign category with the same name (a style both have, such as multi-turn chats) are
left out together, and each is scored against the other's items too: the fit then never saw the
style in either class, where leaving one out alone lets the probe learn the style as the other
class. The held-out (test) split is never read. ``in_distribution`` gives the reference: one fit on all sources, its
validation split scored per source.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .. import extras

FOLD_FIELDS = {"harmful": "source", "benign": "category"}
REFERENCE = ("*", "in-distribution")


def folds(items: list[dict]) -> list[tuple[str, str]]:
    """(label, name) of every fold: each harmful ``source``, then each benign ``category``."""
    return sorted({_fold(it) for it in items}, key=lambda f: (f[0] != "harmful", f[1]))


def _fold(it: dict) -> tuple[str, str]:
    return it["label"], it.get(FOLD_FIELDS[it["label"]]) or "?"


def group(spec: str) -> tuple[str, list[str]]:
    """``NAME=A,B`` -> (NAME, [A, B]): harmful sources and benign categories to leave out together
    as one fold NAME (an argparse ``type``: a bad spec is refused before any work)."""
    name, eq, members = spec.partition("=")
    parts = [m for m in members.split(",") if m]
    if not eq or not name or not parts:
        raise ValueError(f"a group is NAME=SOURCE[,SOURCE...], not {spec!r}")
    return name, parts


def regroup(items: list[dict], groups: list[tuple[str, list[str]]]) -> list[dict]:
    """Rename folds in place: each (NAME, [A, B]) of :func:`group` makes the harmful sources and
    benign categories A and B one fold NAME (a harmful source and a benign category named alike: a
    style left out of both classes). Returns ``items``."""
    rename = {m: name for name, parts in groups for m in parts}
    for it in items:
        field = FOLD_FIELDS[it["label"]]
        it[field] = rename.get(it.get(field), it.get(field))
    return items


def fitting_items(model: str, layer: int, harmful=None, benign=None, cache=None, jailbreaks: int | None = None,
                  seed: int = 0, progress: bool = True, also=(), rows: str = "prompt") -> tuple[list[dict], str]:
    """The train and validation items of CASA's fitting split (``casa.prompt_sets``, split as
    ``casa.run`` splits them), each with its ``split`` and its hidden ``states`` at ``layer`` (the
    ``rows`` CASA reads); and the model's cache key. ``also``: more layers cached in the same pass
    (``casa.hidden_states``)."""
    from .. import datasets
    from .casa import hidden_states, prompt_sets

    items = prompt_sets(harmful, benign, datasets.FIT_JAILBREAKS if jailbreaks is None else jailbreaks)
    train, val, _ = datasets.split(items, datasets.FIT_FRACTIONS, seed)
    items = [dict(it, split="train") for it in train] + [dict(it, split="val") for it in val]
    H, key, _ = hidden_states(model, layer, items, cache, progress, also=also, rows=rows)
    for it, h in zip(items, H):
        it["states"] = h
    return items, key


def _unlinked(out: list[dict]):
    """A predicate: the item shares nothing with ``out`` (the left-out fold): not in it, not in
    the group of one of its items (a jailbreak-wrapped goal and its plain goal), not its text."""
    from ..datasets import conversation_key

    groups = {it.get("group") or it["id"] for it in out} | {it["id"] for it in out}
    texts = {conversation_key(it) for it in out}
    return lambda it: (it.get("group") or it["id"]) not in groups and it["id"] not in groups \
        and conversation_key(it) not in texts


def _pairs(items):
    return [(it["states"], int(it["label"] == "harmful")) for it in items]


def run(items: list[dict], layer: int, target_frr: float = 0.05, seed: int = 0, progress: bool = True,
        only=None, work=None, model_key: str = "", pooling: str = "attention", fit=None, **fit_kw) -> dict:
    """Leave-one-out folds over ``items``: dicts with ``id``, ``states`` [T, d], ``label``,
    ``source``, ``category`` and ``split`` ("train" or "val"; "test" items are refused). ``only``:
    the fold names to run (default all). ``work``: a folder keeping each finished fold, so a
    stopped run resumes (kept under a hash of the items, ``model_key`` (whose states they are) and
    the settings). ``pooling``: "attention" fits CASA's module (``casa.fit``, keywords
    ``fit_kw``), "mean", "last" or "mean+last" a pooled probe (``pooled.fit``); ``fit``, a callable
    with ``casa.fit``'s contract, replaces either (``pooling`` then only names it). Returns
    {"folds": [row per fold], "in_distribution": {fold: row}}; a row holds n, auroc, detection
    (harmful folds) or flagged (benign folds) at the fold's threshold, and the threshold."""
    tqdm = extras.tqdm("calibrate")

    from . import pooled
    from .casa import evaluate
    from .casa import fit as casa_fit

    named = [] if fit is None else [pooling]  # a caller's fit: its name keys the kept folds
    if fit is None and pooling == "attention":
        fit = casa_fit
    elif fit is None:
        fit, fit_kw = pooled.fit, dict(fit_kw, pooling=pooling)

    if any(it["split"] not in ("train", "val") for it in items):
        raise ValueError("leave-one-source-out reads the train and validation splits only; drop the test split")
    names = [f for f in folds(items) if only is None or f[1] in only]
    done = _Done(work, items, [model_key, layer, target_frr, seed, sorted(fit_kw.items())] + named)
    train = lambda keep: _pairs(it for it in items if it["split"] == "train" and keep(it))  # noqa: E731
    val = [it for it in items if it["split"] == "val"]
    ref, rows = {}, []
    for fold in tqdm(([REFERENCE] if only is None else []) + names, desc="leave-one-out folds", disable=not progress):
        if fold in done:
            row = done[fold]
        elif fold == REFERENCE:  # one fit on every source, its validation split scored per fold
            casa, _ = fit(train(lambda it: True), _pairs(val), _pairs(val), layer, target_frr=target_frr, seed=seed,
                          progress=False, **fit_kw)
            row = done.keep(fold, {f"{label}/{name}": _row(label, name, [it for it in val if _fold(it) == (label, name)],
                                                           [it for it in val if it["label"] != label], casa, evaluate)
                                   for label, name in names if any(_fold(it) == (label, name) for it in val)})
        else:
            left = [it for it in items if _fold(it)[1] == fold[1]]  # a name both labels share: out together
            out = [it for it in left if it["label"] == fold[0]]
            unseen = _unlinked(left)
            other = "benign" if fold[0] == "harmful" else "harmful"
            against = [it for it in left if it["label"] == other] + [it for it in val if it["label"] == other
                                                                      and unseen(it)]
            if not any(it["label"] == fold[0] and unseen(it) for it in items):
                raise ValueError(f"leaving out {fold[0]} {fold[1]!r} leaves no {fold[0]} prompts to fit on")
            casa, _ = fit(train(unseen), _pairs(it for it in val if unseen(it)), _pairs(out + against), layer,
                          target_frr=target_frr, seed=seed, progress=False, **fit_kw)
            row = done.keep(fold, _row(*fold, out, against, casa, evaluate))
        if fold == REFERENCE:
            ref = row
        else:
            rows.append(row)
    return {"folds": rows, "in_distribution": ref, "target_frr": target_frr, "layer": layer, "pooling": pooling,
            "settings": fit_kw}


class _Done:
    """Finished folds in ``work/<hash of items and settings>/``, one JSON file each (or nothing
    kept, ``work`` None)."""

    def __init__(self, work, items, settings):
        self.folder = None
        if work is not None:
            key = json.dumps([sorted((it["id"], it["text"], it["label"], it["split"], _fold(it)[1],
                                      list(it["states"].shape)) for it in items), settings])
            self.folder = Path(work) / hashlib.sha256(key.encode()).hexdigest()[:16]
            self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, fold) -> Path:
        return self.folder / f"{fold[0]}-{hashlib.sha256(fold[1].encode()).hexdigest()[:12]}.json"

    def __contains__(self, fold) -> bool:
        return self.folder is not None and self._path(fold).is_file()

    def __getitem__(self, fold):
        return json.loads(self._path(fold).read_text())

    def keep(self, fold, row):
        if self.folder is not None:
            tmp = self._path(fold).with_suffix(".tmp")
            tmp.write_text(json.dumps(row))
            tmp.replace(self._path(fold))
        return row


def _row(label, name, out, against, casa, evaluate) -> dict:
    """One fold's figures: ``out`` (the left-out items) scored against ``against``."""
    s_out = np.asarray(casa.score([it["states"] for it in out]))
    s_ag = np.asarray(casa.score([it["states"] for it in against]))
    harmful = label == "harmful"
    labels = np.r_[np.full(len(out), harmful), np.full(len(against), not harmful)].astype(int)
    r = evaluate(labels, np.r_[s_out, s_ag], casa.threshold)
    key = "detection" if harmful else "flagged"
    return {"label": label, "fold": name, "n": len(out), "auroc": r["auroc"],
            key: float(np.mean(s_out > casa.threshold)), "threshold": float(casa.threshold)}


def table(result: dict) -> str:
    """A markdown table of ``run``'s folds, with the in-distribution AUROC beside each."""
    ref = result["in_distribution"]
    lines = ["| left out | kind | n | AUROC left out | AUROC in-distribution | detected / flagged at the fold's "
             "threshold |", "|---|---|---|---|---|---|"]
    for r in result["folds"]:
        ind = ref.get(f"{r['label']}/{r['fold']}", {}).get("auroc")
        rate = r.get("detection", r.get("flagged"))
        lines.append(f"| {r['fold']} | {r['label']} | {r['n']} | {r['auroc']:.3f} | "
                     f"{'-' if ind is None else f'{ind:.3f}'} | {rate:.1%} |")
    return "\n".join(lines)


def save(result: dict, folder) -> tuple[Path, Path, Path]:
    """loso.json, loso.md and loso.png (AUROC per fold, left out beside in-distribution) in ``folder``."""
    plt = extras.pyplot("calibrate")

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    js, md, png = folder / "loso.json", folder / "loso.md", folder / "loso.png"
    js.write_text(json.dumps(result, indent=1))
    md.write_text(table(result) + "\n")
    rows = result["folds"]
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(rows) + 1.2))
    ax.barh(y + 0.2, [r["auroc"] for r in rows], 0.4, label="left out")
    ax.barh(y - 0.2, [result["in_distribution"].get(f"{r['label']}/{r['fold']}", {}).get("auroc", np.nan)
                      for r in rows], 0.4,
            label="in-distribution (validation)")
    ax.set_yticks(y, [f"{r['fold']} ({r['label']})" for r in rows])
    ax.set_xlim(0.5, 1.0)
    ax.axvline(0.95, color="k", lw=0.8, ls="--")
    ax.set_xlabel("AUROC")
    ax.set_title(f"CASA leave-one-source-out, layer {result['layer']}", pad=28)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return js, md, png
