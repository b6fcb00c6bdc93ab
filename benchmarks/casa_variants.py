"""Compare CASA probe variants by leave-one-source-out on the fitting data's train and validation
splits (issue #16, part 3): layer (or several layers side by side), pooling (the attention module,
mean, last token, mean + last) and regularization. The held-out (test) split is never read.

    .venv/bin/python benchmarks/casa_variants.py --layers 8 12 16 20 12+16 --variants mean:0.1 mean:1 \
        last:0.1 mean+last:0.1 --out benchmarks/casa_variants

A variant is ``pooling:C`` (pooled probes, ``pyguard.calibrate.pooled``; C the inverse L2
strength) or ``attention`` / ``attention:WD`` (CASA's module as ``pyguard fit casa`` fits it, or
with weight decay WD). ``--skip-prefix`` also runs every
variant on the positions after the chat template's constant prefix (the rows every prompt
shares); ``--last-turn`` on the positions of the last user message only (its content onward:
a chat's earlier turns and the system prompt left out). ``--group informal=pyguard-conversational,pyguard-story`` leaves sources out together,
as one (a style is then absent from fitting in every source that has it); naming a benign
category too (``--group multiturn=pyguard-multiturn,multi-turn``) leaves the style out of both
classes. Hidden states come from the per-prompt cache (``pyguard fit casa --loso``'s); a layer
not yet cached is computed. Writes variants.json, variants.md (one row per variant: AUROC per
harmful source left out, the worst, benign flagged) and variants.png (the same as a heat map).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from pyguard import models
from pyguard.calibrate import loso


def states_for(model: str, layers: list[int], skip: int):
    """Fitting items with ``states`` the layers' hidden states side by side [T - skip, len(layers) * d]."""
    per = {}
    for k, il in enumerate(layers):  # the first call fills every layer's cache in one model pass
        per[il], key = loso.fitting_items(model, il, progress=True, also=layers[1:] if k == 0 else ())
    items = per[layers[0]]
    for j, it in enumerate(items):
        it["states"] = np.concatenate([per[il][j]["states"] for il in layers], axis=1)[skip:]
    return items, key


def last_turn_rows(model: str, items) -> list[int]:
    """The row where each item's last user message starts (what CASA with rows "last-turn" reads from)."""
    from pyguard.evaluate import messages
    from pyguard.runtime import Runtime

    return Runtime(model).last_turn_rows([messages(it) for it in items])


def last_turn_items(model: str, groups) -> list[dict]:
    """Fitting items with ``states`` their last user turn's rows at layer 12 [T', d] (as the
    shipped CASA reads them), folds regrouped by ``groups`` (``loso.group`` specs)."""
    items, _ = states_for(model, [12], 0)
    loso.regroup(items, groups)
    for it, start in zip(items, last_turn_rows(model, items)):
        it["states"] = it["states"][start:]
    return items


def parser(doc: str, out: str, variants: list[str]) -> argparse.ArgumentParser:
    """The options every one-row-per-prompt LOSO script shares (``doc``: its docstring)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--variants", nargs="+", default=variants)
    ap.add_argument("--group", action="append", default=[], type=loso.group, metavar="NAME=SOURCE,SOURCE")
    ap.add_argument("--out", type=Path, default=Path(out))
    return ap


def feature_folds(items: list[dict], row, C: float) -> list[dict]:
    """LOSO folds of one class-balanced logistic regression (C the inverse L2 strength) on one
    feature vector per item, ``row(item)`` [F]: a "last" pooling of that one row."""
    run = [dict(it, states=row(it)[None, :]) for it in items]
    return loso.run(run, 12, pooling="last", C=C, progress=False)["folds"]


def record(out: Path, variants: list[str], folds_of) -> None:
    """``folds_of(variant)`` (LOSO fold rows) for each variant not yet in ``out/variants.json``,
    each kept as it finishes (a stopped run resumes); then variants.md and variants.png."""
    out.mkdir(parents=True, exist_ok=True)
    js = out / "variants.json"
    done = json.loads(js.read_text()) if js.exists() else {}
    for v in variants:
        if v in done:
            continue
        done[v] = {"folds": folds_of(v)}
        js.write_text(json.dumps(done, indent=1))
        print(v, summary(done[v]["folds"]), flush=True)
    write(done, out)


def common_prefix(items) -> int:
    """Rows most prompts share bit for bit (the chat template before the user's text; a few prompts
    differ there in the last bits, computed in other batch shapes)."""
    n = min(len(it["states"]) for it in items)
    ref = items[0]["states"][:n]
    same = np.median([np.all(it["states"][:n] == ref, axis=1) for it in items], axis=0) == 1
    return int(np.argmin(same)) if not same.all() else n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--layers", nargs="+", default=["12"], help="a layer, or layers joined by + (side by side)")
    ap.add_argument("--variants", nargs="+", default=["mean:0.1"])
    ap.add_argument("--skip-prefix", action="store_true")
    ap.add_argument("--last-turn", action="store_true", help="also pool the last user message's rows only")
    ap.add_argument("--group", action="append", default=[], type=loso.group, metavar="NAME=SOURCE,SOURCE",
                    help="leave these harmful sources and benign categories out together, as one fold NAME "
                         "(repeatable; a harmful source and a benign category: a style left out of both classes)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/casa_variants"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    js = a.out / "variants.json"
    done = json.loads(js.read_text()) if js.exists() else {}
    for spec in a.layers:
        layers = [int(x) for x in spec.split("+")]
        items, key = states_for(a.model, layers, 0)
        loso.regroup(items, a.group)
        prefix = common_prefix(items)
        starts = last_turn_rows(a.model, items) if a.last_turn else None
        for skip in [0] + ([prefix] if a.skip_prefix else []) + (["last-turn"] if a.last_turn else []):
            for v in a.variants:
                name = f"L{spec} {v}" + {0: "", "last-turn": " last-turn"}.get(skip, f" skip{skip}")
                if name in done:
                    continue
                pooling, _, value = v.partition(":")
                kw = {} if not value else {"weight_decay" if pooling == "attention" else "C": float(value)}
                run = [dict(it, states=it["states"][(starts[j] if skip == "last-turn" else skip):])
                       for j, it in enumerate(items)]
                # one layer, every row: the folds `pyguard fit casa --loso` keeps (a rerun reads them back)
                res = loso.run(run, layers[0], pooling=pooling, work=models.cache_dir() / "loso",
                               model_key=key if spec == str(layers[0]) and not skip else f"{key}|L{spec}|skip{skip}",
                               **kw)
                done[name] = {"folds": res["folds"], "prefix": prefix}
                js.write_text(json.dumps(done, indent=1))
                print(name, summary(res["folds"]), flush=True)
    write(done, a.out)


def summary(folds) -> str:
    h = [r for r in folds if r["label"] == "harmful"]
    b = [r for r in folds if r["label"] == "benign"]
    return (f"worst harmful AUROC {min(r['auroc'] for r in h):.3f}, mean {np.mean([r['auroc'] for r in h]):.3f}; "
            f"benign flagged mean {np.mean([r['flagged'] for r in b]):.1%}, worst {max(r['flagged'] for r in b):.1%}")


def write(done: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(done)
    sources = sorted({r["fold"] for v in done.values() for r in v["folds"] if r["label"] == "harmful"})
    auc = np.array([[next((r["auroc"] for r in done[n]["folds"] if r["fold"] == s and r["label"] == "harmful"), np.nan)
                     for s in sources] for n in names])
    flagged = [[r["flagged"] for r in done[n]["folds"] if r["label"] == "benign"] for n in names]
    lines = ["| variant | " + " | ".join(sources) + " | worst | benign flagged, mean (worst category) |",
             "|---" * (len(sources) + 3) + "|"]
    for n, row, fl in zip(names, auc, flagged):
        lines.append(f"| {n} | " + " | ".join(f"{x:.3f}" for x in row) + f" | **{np.nanmin(row):.3f}** | "
                     f"{np.mean(fl):.1%} ({max(fl):.1%}) |")
    (out / "variants.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(1.0 * len(sources) + 3, 0.35 * len(names) + 1.5))
    im = ax.imshow(auc, vmin=0.8, vmax=1.0, cmap="viridis", aspect="auto")
    for i in range(len(names)):
        for j in range(len(sources)):
            ax.text(j, i, f"{auc[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="w" if auc[i, j] < 0.9 else "k")
    ax.set_xticks(range(len(sources)), [s.replace("pyguard-", "") for s in sources], rotation=30, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_title("CASA variants: AUROC on the harmful source left out", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(out / "variants.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
