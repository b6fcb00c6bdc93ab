"""Leave-one-source-out beyond the linear probe the fused ``casa_score`` runs (issue #16, part 3):
do other estimators or poolings of the same hidden states transfer better to a left-out source?
Folds as ``pyguard fit casa --loso`` makes them (``loso.run``, train + validation splits only;
styles both classes share left out of both with ``--group``, as ``casa_variants.py``); a kind is
``pooling/estimator``:

- pooling: ``mean+last`` (what ships), ``content+last`` (the mean over the user's text without
  the chat template's closing rows, then the last row), ``content+last+max`` (and the rows'
  elementwise max over the text);
- estimator: ``logistic:C`` (what ships), ``lda`` (shrinkage LDA), ``diffmeans`` (the
  difference of the class means), ``mlp:H`` (three seeds of a one-hidden-layer MLP, H units).

    .venv/bin/python benchmarks/casa_probe_kinds.py --kinds mean+last/logistic:1 mean+last/lda \
        mean+last/diffmeans mean+last/mlp:64 content+last/logistic:1 content+last+max/logistic:1 \
        --group multiturn=pyguard-multiturn,multi-turn --group casual=pyguard-casual,casual \
        --group question=pyguard-question,questions --group plain=pyguard-plain,plain

Reads the per-prompt states cache (layer 12, the last user turn); writes kinds.md and kinds.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from pyguard import models
from pyguard.calibrate import loso, pooled
from pyguard.calibrate.casa import choose_threshold, evaluate

TAIL = 5  # rows of Qwen's "<|im_end|>\n<|im_start|>assistant\n" after the user's text


def pool(H: np.ndarray, how: str) -> np.ndarray:
    """[T, d] -> the pooled vector ``how`` names: ``content`` (the mean over the user's text) and
    ``max`` (its elementwise max) here, ``mean`` and ``last`` as ``pooled.pool`` makes them."""
    text = H[:-TAIL] if len(H) > TAIL else H
    own = {"content": text.mean, "max": text.max}
    return np.concatenate([own[p](0) if p in own else pooled.pool(H, p) for p in how.split("+")])


def estimator(spec: str):
    """``spec`` -> fn(X [N, D] standardized, y [N]) -> score fn(X) -> [N]."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    name, _, v = spec.partition(":")
    if name == "logistic":
        return lambda X, y: LogisticRegression(C=float(v), class_weight="balanced", max_iter=3000).fit(X, y) \
            .decision_function
    if name == "lda":
        return lambda X, y: LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(X, y).decision_function
    if name == "diffmeans":
        return lambda X, y: (lambda w: lambda Z: Z @ w)(X[y == 1].mean(0) - X[y == 0].mean(0))
    if name == "mlp":
        def fit(X, y):
            ms = [MLPClassifier((int(v),), alpha=1.0, max_iter=300, early_stopping=True, random_state=s).fit(X, y)
                  for s in range(3)]
            return lambda Z: np.mean([m.predict_proba(Z)[:, 1] for m in ms], 0)
        return fit
    raise ValueError(f"unknown estimator {spec!r}")


class Kind:
    """A fitted pooling + estimator with ``score`` and ``threshold``, as ``loso.run`` reads them."""

    def __init__(self, how, est, train):
        X = np.stack([pool(h, how) for h, _ in train])
        self.how, self.mu, self.sd = how, X.mean(0), X.std(0) + 1e-3
        self.fn = est((X - self.mu) / self.sd, np.array([label for _, label in train]))
        self.threshold = 0.0

    def score(self, states) -> np.ndarray:
        return self.fn((np.stack([pool(h, self.how) for h in states]) - self.mu) / self.sd)


def fitter(kind: str):
    """``casa.fit``'s contract for ``pooling/estimator``."""
    how, _, spec = kind.partition("/")
    est = estimator(spec)

    def fit(train, val, test, layer, target_frr=0.05, **_):
        k = Kind(how, est, train)
        k.threshold = choose_threshold(k.score([h for h, _ in val]), np.array([y for _, y in val]), target_frr)
        return k, evaluate(np.array([y for _, y in test]), k.score([h for h, _ in test]), k.threshold)
    return fit


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--kinds", nargs="+", default=["mean+last/logistic:1"])
    ap.add_argument("--group", action="append", default=[], type=loso.group, metavar="NAME=SOURCE,SOURCE",
                    help="leave these harmful sources and benign categories out together (as casa_variants.py)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/casa_probe_kinds"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    items, _ = loso.fitting_items(a.model, 12, rows="last-turn")
    loso.regroup(items, a.group)
    done = {k: loso.run(items, 12, pooling=k, fit=fitter(k), progress=False)["folds"] for k in a.kinds}
    (a.out / "kinds.json").write_text(json.dumps(done, indent=1))
    sources = sorted({r["fold"] for f in done.values() for r in f if r["label"] == "harmful"})
    lines = ["| kind | " + " | ".join(sources) + " | worst | mean | benign flagged, mean |",
             "|---" * (len(sources) + 4) + "|"]
    for k, f in done.items():
        auc = [next(r["auroc"] for r in f if r["fold"] == s and r["label"] == "harmful") for s in sources]
        flagged = np.mean([r["flagged"] for r in f if r["label"] == "benign"])
        lines.append(f"| {k} | " + " | ".join(f"{x:.3f}" for x in auc) +
                     f" | **{min(auc):.3f}** | {np.mean(auc):.3f} | {flagged:.1%} |")
    (a.out / "kinds.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
