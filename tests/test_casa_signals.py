"""benchmarks/casa_signals.py: the zero-shot judge runs the leave-one-out folds with nothing fitted
(its AUROC per fold is its fixed score's), and a bad feature spec is refused by name."""
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import casa_signals  # noqa: E402
from pyguard.calibrate import loso  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402


def test_the_judge_scores_each_fold_by_its_fixed_score_and_picks_only_a_threshold():
    rng = np.random.default_rng(1)
    items = []
    for k in range(240):
        kind = ["benign-a", "benign-b", "s1", "s2"][k % 4]
        label = "benign" if kind.startswith("benign") else "harmful"
        z = rng.standard_normal() + (1.5 if kind == "s1" else 0.0)  # the judge sees s1, not s2
        items.append({"id": f"x{k}", "text": f"prompt {k}", "label": label, "source": kind if label == "harmful" else "mine",
                      "category": kind if label == "benign" else "goal", "states": np.array([[z]]),
                      "split": "val" if k % 3 == 0 else "train"})
    res = loso.run(items, 12, pooling="judge", fit=casa_signals.fit_judge, progress=False)
    rows = {r["fold"]: r for r in res["folds"] if r["label"] == "harmful"}
    assert rows["s1"]["auroc"] > 0.8 and 0.3 < rows["s2"]["auroc"] < 0.7
    # a harmful fold is scored against validation benign prompts: the fixed score's own AUROC
    ben = [it["states"][0, 0] for it in items if it["label"] == "benign" and it["split"] == "val"]
    s1 = [it["states"][0, 0] for it in items if it["source"] == "s1"]
    assert rows["s1"]["auroc"] == pytest.approx(roc_auc_score([1] * len(s1) + [0] * len(ben), s1 + ben))


@pytest.mark.parametrize("spec", ["emb+mean", "max", "mean+last+emb+emb", "", "meanemb"])
def test_a_bad_feature_spec_names_the_accepted_forms(spec):
    it = {"label": "harmful", "id": "x", "states": np.zeros((3, 4), np.float32)}
    with pytest.raises(ValueError, match="POOLING\\+emb"):
        casa_signals.features(it, {"harmful|x": np.zeros(2)}, spec)


def test_features_put_the_pooling_before_the_embedding():
    it = {"label": "harmful", "id": "x", "states": np.arange(12, dtype=np.float32).reshape(3, 4)}
    f = casa_signals.features(it, {"harmful|x": np.full(2, -1.0)}, "mean+emb")
    np.testing.assert_array_equal(f, [4, 5, 6, 7, -1, -1])
