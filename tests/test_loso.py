"""Leave-one-source-out validation (pyguard.calibrate.loso) on a synthetic set whose sources are
known: a harmful source that differs from all others scores far lower left out than in
distribution, sources that share a direction do not."""
import json

import numpy as np
import pytest

pytest.importorskip("torch")

from pyguard.calibrate import loso  # noqa: E402

D, T = 8, 4


def synthetic(seed=0, n=60):
    """Benign noise in two categories; harmful sources s1, s2 shifted along dimension 0, s3 only
    along dimension 1 (nothing else in the set moves there)."""
    rng = np.random.default_rng(seed)
    items = []
    for k in range(n * 5):
        kind = ["benign-a", "benign-b", "s1", "s2", "s3"][k % 5]
        h = rng.standard_normal((T, D)).astype(np.float32)
        if kind in ("s1", "s2"):
            h[:, 0] += 2.5
        elif kind == "s3":
            h[:, 1] += 2.5
        label = "benign" if kind.startswith("benign") else "harmful"
        items.append({"id": f"x{k}", "text": f"prompt {k}", "label": label, "source": "mine" if label == "benign" else kind,
                      "category": kind.split("-")[-1] if label == "benign" else "goal", "states": h,
                      "split": "val" if k % 3 == 0 else "train"})
    return items


FIT = {"r": 4, "heads": 2, "epochs": 25, "patience": 5}


def test_an_unseen_source_scores_lower_than_in_distribution(tmp_path):
    res = loso.run(synthetic(), layer=3, progress=False, **FIT)
    rows = {r["fold"]: r for r in res["folds"]}
    assert set(rows) == {"s1", "s2", "s3", "a", "b"}
    ref = res["in_distribution"]
    # s3's direction is learnt only from s3: left out, the probe cannot see it
    assert ref["harmful/s3"]["auroc"] > 0.95 and rows["s3"]["auroc"] < 0.75
    assert rows["s3"]["detection"] < 0.3
    # s1 and s2 teach each other: left out, each is still found
    for s in ("s1", "s2"):
        assert rows[s]["auroc"] > 0.9 and rows[s]["detection"] > 0.6
    # benign categories are alike: left out, few flagged
    for c in ("a", "b"):
        assert rows[c]["flagged"] < 0.25 and rows[c]["n"] == 60
    js, md, png = loso.save(res, tmp_path / "out")
    assert json.loads(js.read_text())["folds"][0]["fold"] == res["folds"][0]["fold"]
    assert "| s3 | harmful | 60 |" in md.read_text() and png.stat().st_size > 1000


def test_items_linked_to_the_left_out_source_leave_with_it():
    """Copies of s3's prompts in another source (a jailbreak wrapping a goal: same group, or the
    same text) do not teach the fold what it left out."""
    items = synthetic()
    wrapped = [dict(it, id=f"w{i}", text=f"wrapper {i}", source="wrapped", group=it["id"]) for i, it in enumerate(items)
               if it["source"] == "s3"]
    echoed = [dict(it, id=f"e{i}", source="echo") for i, it in enumerate(items) if it["source"] == "s3"]
    res = loso.run(items + wrapped + echoed, layer=3, progress=False, only={"s3"}, **FIT)
    assert res["folds"][0]["auroc"] < 0.75


def test_a_stopped_run_resumes_from_its_finished_folds(tmp_path, monkeypatch):
    from pyguard.calibrate import casa

    items = synthetic(n=30)
    first = loso.run(items, layer=3, progress=False, only={"s3", "a"}, work=tmp_path, **FIT)
    calls = []
    real = casa.fit
    monkeypatch.setattr(casa, "fit", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = loso.run(items, layer=3, progress=False, only={"s3", "a"}, work=tmp_path, **FIT)
    assert again == first and calls == []  # both folds read back, none refitted
    other = loso.run(items, layer=3, progress=False, only={"s3"}, work=tmp_path, **dict(FIT, epochs=24))
    assert len(calls) == 1 and other["folds"][0]["fold"] == "s3"  # other settings: fitted anew


def test_only_runs_the_named_folds_and_the_test_split_is_refused():
    items = synthetic(n=30)
    res = loso.run(items, layer=3, progress=False, only={"s3"}, **FIT)
    assert [r["fold"] for r in res["folds"]] == ["s3"] and res["in_distribution"] == {}
    items[0]["split"] = "test"
    with pytest.raises(ValueError, match="drop the test split"):
        loso.run(items, layer=3, progress=False, **FIT)


@pytest.mark.parametrize("pooling", ["mean", "last", "mean+last"])
def test_pooled_probes_run_the_same_folds(pooling):
    """A pooled probe sees what the attention module sees here: s3 left out is missed, s1 found."""
    pytest.importorskip("sklearn")
    res = loso.run(synthetic(), layer=3, progress=False, pooling=pooling, C=1.0)
    rows = {r["fold"]: r for r in res["folds"]}
    assert rows["s3"]["auroc"] < 0.75 < 0.9 < rows["s1"]["auroc"]
    assert res["in_distribution"]["harmful/s3"]["auroc"] > rows["s3"]["auroc"] + 0.1 and res["pooling"] == pooling


def test_a_style_both_classes_share_leaves_out_of_both():
    """A style (dimension 2) in a harmful source and a benign category: left out alone, the fit
    sees the style only in benign prompts and learns it as benign, so the harmful source scores
    low; named alike, both are left out, the fit never sees the style, and the harmful items are
    scored against the benign ones of their style too."""
    rng = np.random.default_rng(1)
    items = synthetic(n=60)
    for k in range(120):
        label = "harmful" if k % 2 else "benign"
        h = rng.standard_normal((T, D)).astype(np.float32)
        h[:, 2] += 3.0
        if label == "harmful":
            h[:, 0] += 2.5
        items.append({"id": f"st{k}", "text": f"styled {k}", "label": label, "source": "style" if label == "harmful"
                      else "mine", "category": "chat", "states": h, "split": "val" if k % 3 == 0 else "train"})
    alone = loso.run(items, layer=3, progress=False, only={"style"}, **FIT)["folds"][0]
    loso.regroup(items, [loso.group("style=chat")])
    both = {r["label"]: r for r in loso.run(items, layer=3, progress=False, only={"style"}, **FIT)["folds"]}
    assert set(both) == {"harmful", "benign"} and both["harmful"]["n"] == 60 and both["benign"]["n"] == 60
    assert alone["detection"] < 0.5 < 0.8 < both["harmful"]["detection"]
    assert both["harmful"]["auroc"] > alone["auroc"] + 0.05


def test_regroup_joins_sources_and_categories_into_one_fold_and_refuses_a_bad_spec():
    items = loso.regroup(synthetic(n=5), [loso.group("ab=a,b"), loso.group("s=s1,s2")])
    assert loso.folds(items) == [("harmful", "s"), ("harmful", "s3"), ("benign", "ab")]
    assert sum(it["source"] == "s" for it in items) == 10  # the sources' items, not the benign 'mine'
    for bad in ["nogroup", "=a,b", "name=", "name=,"]:
        with pytest.raises(ValueError, match="NAME=SOURCE"):
            loso.group(bad)


def test_a_callers_fit_runs_the_folds_and_keys_its_own_kept_folds(tmp_path):
    """``fit=`` replaces the fitter: a probe reading dimension 1 only finds s3 in every fold
    (AUROC near 1 left out) and s1 not at all; its kept folds are kept under its name."""
    from pyguard.calibrate.casa import evaluate

    class Dim1:
        threshold = 1.25

        def score(self, states):
            return np.array([h[:, 1].mean() for h in states])

    def fit(train, val, test, layer, **_):
        p = Dim1()
        return p, evaluate(np.array([y for _, y in test]), p.score([h for h, _ in test]), p.threshold)

    items = synthetic(n=30)
    res = loso.run(items, layer=3, progress=False, only={"s1", "s3"}, pooling="dim1", fit=fit, work=tmp_path)
    rows = {r["fold"]: r for r in res["folds"]}
    assert rows["s3"]["auroc"] > 0.95 and rows["s3"]["detection"] > 0.6 and rows["s1"]["auroc"] < 0.7
    calls = []
    counted = lambda *a, **k: calls.append(1) or fit(*a, **k)  # noqa: E731
    again = loso.run(items, layer=3, progress=False, only={"s1", "s3"}, pooling="dim1", fit=counted, work=tmp_path)
    assert again == res and calls == []  # read back under its name
    loso.run(items, layer=3, progress=False, only={"s3"}, pooling="other", fit=counted, work=tmp_path)
    assert len(calls) == 1  # another name: fitted anew
