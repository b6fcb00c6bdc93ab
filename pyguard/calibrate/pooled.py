"""Pooled probes: the alternatives CASA's attention module is compared with (``pyguard fit casa
--loso --pooling ...``). A prompt's hidden states [T, d] are pooled to one vector (the mean over
the prompt, the last token, both side by side, or with the per-dimension maximum over the
prompt's rows as well) and scored by logistic regression on the
standardized vectors (scikit-learn; ``C`` the inverse regularization strength), with the
threshold chosen on validation benign prompts as ``casa.fit`` chooses it.

Each is CASA's formula with ``Wk = 0`` (every softmax weight equal; the mean), the last row's
weights ``w_last`` and the maximum's ``w_max``, so it exports to a :class:`pyguard.methods.CASA` file that the fused
``casa_score`` path runs as is.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import extras

POOLINGS = ("mean", "last", "mean+last", "mean+last+max")
# each part of a pooling: the CASA weights it exports to and how it pools H [T, d] -> [d]
_PARTS = {"mean": ("w", lambda H: H.mean(0)), "last": ("w_last", lambda H: H[-1]),
          "max": ("w_max", lambda H: H.max(0))}


def pool(H: np.ndarray, how: str) -> np.ndarray:
    """[T, d] -> its parts side by side: [d] (mean, last), [2d] (mean+last) or [3d] (mean+last+max:
    the third the rows' maximum)."""
    if how not in POOLINGS:
        raise ValueError(f"unknown pooling {how!r}; known: {', '.join(POOLINGS)}")
    return np.concatenate([_PARTS[p][1](H) for p in how.split("+")])


@dataclass
class Probe:
    """Logistic regression on pooled, standardized states: score = sigmoid(((pool(H) - mu) / sigma) . coef + intercept)."""

    pooling: str
    mu: np.ndarray
    sigma: np.ndarray
    coef: np.ndarray
    intercept: float
    threshold: float = 0.5

    def score(self, states: list[np.ndarray]) -> np.ndarray:
        """Scores [B] for B prompts' states [T_i, d]."""
        X = (np.stack([pool(h, self.pooling) for h in states]) - self.mu) / self.sigma
        return 1.0 / (1.0 + np.exp(-np.clip(X @ self.coef + self.intercept, -60, 60)))

    def to_casa(self, layer: int, **casa_kw):
        """The same score as a CASA file: Wk = 0 (the mean) with the mean's weights in w, the last
        row's in w_last and the maximum's in w_max, the standardization folded into them and b."""
        from ..methods import CASA

        scaled = (self.coef / self.sigma).astype(np.float32)
        parts = [_PARTS[p][0] for p in self.pooling.split("+")]
        d = len(scaled) // len(parts)
        params = {"Wk": np.zeros((d, 1), np.float32), "q": np.ones((1, 1), np.float32),
                  "b": float(self.intercept - np.sum(self.coef * self.mu / self.sigma))}
        params["w"] = np.zeros(d, np.float32)  # a last-row-only probe gives the mean no weight
        params.update({k: scaled[j * d:(j + 1) * d] for j, k in enumerate(parts)})
        return CASA(params, layer=layer, threshold=self.threshold, **casa_kw)


def fit(train, val, test, layer: int, pooling: str = "mean", C: float = 0.1, target_frr: float = 0.05,
        seed: int = 0, progress: bool = False, threshold_on=None, **_):
    """``casa.fit``'s contract for a pooled probe: (states [T, d], label) lists in; the probe
    (class-balanced logistic regression on ``train``, threshold from ``val``, or ``threshold_on``
    when given) and its report on ``test`` out."""
    LogisticRegression = extras.need("sklearn.linear_model", "calibrate").LogisticRegression

    from .casa import choose_threshold, evaluate

    if not C > 0:
        raise ValueError(f"C must be > 0, got {C}")
    X = np.stack([pool(h, pooling) for h, _ in train]).astype(np.float64)
    y = np.array([label for _, label in train])
    mu, sigma = X.mean(0), X.std(0) + 1e-3
    lr = LogisticRegression(C=C, class_weight="balanced", max_iter=2000, random_state=seed).fit((X - mu) / sigma, y)
    probe = Probe(pooling, mu, sigma, lr.coef_[0], float(lr.intercept_[0]))
    th = val if threshold_on is None else threshold_on
    probe.threshold = choose_threshold(probe.score([h for h, _ in th]), np.array([label for _, label in th]),
                                       target_frr)
    report = evaluate(np.array([label for _, label in test]), probe.score([h for h, _ in test]), probe.threshold)
    report.update(layer=layer, threshold=probe.threshold, target_frr=target_frr, pooling=pooling, C=C)
    return probe, report
