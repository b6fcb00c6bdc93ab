"""CASA fitting: prompt hidden states from both runtimes, the trained module folded into CASA's
formula, the threshold for a target false-refusal rate, the report."""
import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from pyguard import ops  # noqa: E402
from pyguard.calibrate import casa as fitcasa  # noqa: E402
from pyguard.methods import CASA  # noqa: E402


def synthetic(rng, n, d=24, signal=1.5):
    """Prompts [T, d] with a random number of tokens; harmful ones carry a direction on a few tokens."""
    direction = np.random.default_rng(123).standard_normal(d).astype(np.float32)
    items = []
    for i in range(n):
        y = i % 2
        T = int(rng.integers(5, 30))
        H = rng.standard_normal((T, d)).astype(np.float32) * 3 + 5  # offset + scale: the standardization matters
        if y:
            H[rng.integers(0, T, 3)] += signal * 3 * direction
        items.append((H, y))
    return items


def test_fit_separates_and_the_file_scores_raw_states(rng, tmp_path):
    train, val, test = synthetic(rng, 200), synthetic(rng, 80), synthetic(rng, 80)
    casa, report = fitcasa.fit(train, val, test, layer=3, r=8, heads=2, epochs=40, progress=False)
    assert report["auroc"] > 0.9 and report["n"] == {"train": 200, "val": 80, "test": 80}
    # the saved module is the CASA formula on raw states, equal to the trained torch module on
    # standardized ones: its validation loss on raw states is the best epoch's, which the torch
    # module scored (a wrong fold of mu / sigma into the parameters changes it)
    s = np.clip(casa.score([h for h, _ in val], backend="ref"), 1e-7, 1 - 1e-7)
    y = np.array([y for _, y in val])
    assert float(-np.mean(y * np.log(s) + (1 - y) * np.log(1 - s))) == pytest.approx(report["best_val_loss"], rel=1e-4)
    # ... and the C++ op agrees with the reference on the test prompts
    Hs = [h for h, _ in test]
    p = casa.params
    cu = np.concatenate([[0], np.cumsum([len(h) for h in Hs])])
    want = ops.casa_score(np.concatenate(Hs), cu, p["Wk"], p["q"], p["w"], p["b"], backend="cpp")
    np.testing.assert_allclose(casa.score(Hs, backend="ref"), want, rtol=1e-4, atol=1e-5)
    # threshold: at most 5% of the validation benign prompts above it
    val_scores = casa.score([h for h, y in val if y == 0])
    assert np.mean(val_scores > casa.threshold) <= 0.05
    casa.save(tmp_path / "casa.safetensors")
    js, png = fitcasa.save_report(report, tmp_path / "report")
    assert json.loads(js.read_text())["auroc"] == report["auroc"] and png.stat().st_size > 1000


def test_fold_is_exact(rng):
    """The exported parameters on raw H give the torch module's scores on standardized H."""
    d = 12
    model = fitcasa._module(d, 4, 3, seed=1)
    with torch.no_grad():
        for prm in model.parameters():
            prm.copy_(torch.randn_like(prm))
    mu, sigma = torch.randn(d), torch.rand(d) + 0.5
    Hs = [rng.standard_normal((int(rng.integers(2, 9)), d)).astype(np.float32) * 2 for _ in range(5)]
    casa = fitcasa._export(model, mu, sigma, layer=0, threshold=0.5)
    np.testing.assert_allclose(casa.score(Hs, backend="ref"), fitcasa._scores(model, Hs, mu, sigma),
                               rtol=1e-4, atol=1e-5)


def test_bad_splits_are_refused(rng):
    data = synthetic(rng, 20)
    only_benign = [(h, 0) for h, _ in data]
    with pytest.raises(ValueError, match="the val split needs harmful and benign prompts"):
        fitcasa.fit(data, only_benign, data, layer=0, progress=False)
    with pytest.raises(ValueError, match="target_frr"):
        fitcasa.fit(data, data, data, layer=0, target_frr=1.5, progress=False)


def test_state_cache_resumes(tmp_path):
    calls = []

    def states(messages):
        calls.append(messages[0]["content"])
        return np.full((len(messages[0]["content"]), 4), 1.0, np.float32)

    cache = fitcasa.StateCache(tmp_path, "m", 2)
    a = fitcasa.collect(states, ["ab", "cde"], cache, progress=False)
    b = fitcasa.collect(states, ["ab", "cde", "f"], cache, progress=False)
    assert calls == ["ab", "cde", "f"]  # the second run computed only the new prompt
    assert [x.shape for x in b] == [(2, 4), (3, 4), (1, 4)] and np.array_equal(a[1], b[1])


def test_torch_prompt_states_equal_output_hidden_states():
    pytest.importorskip("transformers")
    from tiny_hf import tiny_llama, tiny_tokenizer

    from pyguard.torch import guard

    model, tok = tiny_llama(), tiny_tokenizer()
    msgs = [{"role": "user", "content": "Write a poem about the sea."}]
    with guard(model, tok) as g:
        H = g.prompt_states(msgs, layer=1)
    ids = tok(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
              add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        want = model(input_ids=ids, output_hidden_states=True).hidden_states[2][0]
    torch.testing.assert_close(H, want, rtol=0, atol=0)


def test_llama_prompt_states_equal_casa_capture(rng):
    pytest.importorskip("llama_cpp")
    from pyguard import models
    from pyguard.llama import GuardedLlama
    from pyguard.methods import CASA

    path = models.model_path("smollm2-135m")
    if not path.exists():
        pytest.skip("SmolLM2 not fetched")
    msgs = [{"role": "user", "content": "List three uses of a paperclip."}]
    p = {"Wk": rng.standard_normal((576, 8)).astype(np.float32), "q": rng.standard_normal((2, 8)).astype(np.float32),
         "w": rng.standard_normal(576).astype(np.float32) * 0.01, "b": 0.0}
    with GuardedLlama(path, n_ctx=256, capture_layer=10) as g:
        H = g.prompt_states(msgs)
        assert H.shape[1] == 576 and len(H) > 10
    with GuardedLlama(path, n_ctx=256, casa=CASA(p, layer=10, threshold=1.0)) as g:
        r = g.create_chat_completion(msgs, max_tokens=1)
    np.testing.assert_allclose(r["pyguard"]["casa"]["score"], CASA(p, layer=10).score([H])[0], rtol=1e-5)
    with pytest.raises(ValueError, match="capture a layer in"):
        GuardedLlama(path, n_ctx=256, capture_layer=29)


CHAT = [{"role": "user", "content": "I am writing a thriller about a chemist."},
        {"role": "assistant", "content": "Sounds exciting! What happens first?"},
        {"role": "user", "content": "List three uses of a paperclip."}]


def mean_probe(H, start, layer, **kw):
    """A mean-pooled CASA whose score is 0.5 on all rows of H and sigmoid(1) on rows from ``start``."""
    from pyguard.methods import CASA

    H = np.asarray(H, np.float64)
    diff = H[start:].mean(0) - H.mean(0)
    w = diff / (diff @ diff)
    return CASA({"Wk": np.zeros((H.shape[1], 1), np.float32), "q": np.ones((1, 1), np.float32),
                 "w": w.astype(np.float32), "b": float(-(w @ H.mean(0)))}, layer=layer, threshold=1.0, **kw)


def test_llama_casa_reads_the_last_turn(tmp_path):
    """rows "last-turn": the score is the formula on the rows from the last user message's content
    on, in both the chat and the fit path; earlier turns only change those rows through context."""
    pytest.importorskip("llama_cpp")
    from pyguard import models
    from pyguard.calibrate.casa import hidden_states
    from pyguard.llama import GuardedLlama

    path = models.model_path("smollm2-135m")
    if not path.exists():
        pytest.skip("SmolLM2 not fetched")
    with GuardedLlama(path, n_ctx=256, capture_layer=10) as g:
        H, start = g.prompt_states(CHAT), g.last_turn_row(CHAT)
        text, _ = g.template.render(CHAT)
        tail = g.engine.tokenize(text[text.rindex(CHAT[-1]["content"]):])
    assert 0 < start < len(H) and len(H) - start == len(tail)  # the content, end of turn and assistant header
    casa = mean_probe(H, start, 10, rows="last-turn")
    with GuardedLlama(path, n_ctx=256, casa=casa) as g:
        got = g.create_chat_completion(CHAT, max_tokens=1)["pyguard"]["casa"]["score"]
    assert got == pytest.approx(1 / (1 + np.exp(-1)), abs=1e-3)  # the whole prompt would give 0.5
    np.testing.assert_allclose(got, casa.score([H[start:]])[0], rtol=1e-5)
    (fit,), _, _ = hidden_states(str(path), 10, [{"text": CHAT[-1]["content"], "history": CHAT[:-1]}], progress=False,
                                 fitted=casa, cache=tmp_path)
    np.testing.assert_array_equal(fit, H[start:])


def test_torch_casa_reads_the_last_turn():
    pytest.importorskip("transformers")
    from tiny_hf import tiny_llama, tiny_tokenizer

    from pyguard.torch import guard

    model, tok = tiny_llama(), tiny_tokenizer()
    with guard(model, tok) as g:
        H, start = g.prompt_states(CHAT, layer=1).numpy(), g.last_turn_row(CHAT)
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert start == len(tok(text[:text.rindex(CHAT[-1]["content"])], add_special_tokens=False).input_ids)
    casa = mean_probe(H, start, 1, rows="last-turn")
    with guard(model, tok, casa=casa) as g:
        got = g.create_chat_completion(CHAT, max_tokens=1)["pyguard"]["casa"]["score"]
        with pytest.raises(ValueError, match="reads the last user message"):
            g.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=1)
    assert got == pytest.approx(1 / (1 + np.exp(-1)), abs=1e-3)  # the whole prompt would give 0.5


def test_threshold_keeps_the_target_and_takes_the_middle_of_the_gap():
    labels = np.array([0] * 20 + [1] * 10)
    scores = np.concatenate([np.linspace(0.01, 0.2, 20), np.linspace(0.6, 0.9, 10)]).astype(np.float32)
    t = fitcasa.choose_threshold(scores, labels, 0.05)
    assert t == pytest.approx((0.2 + 0.6) / 2)  # separable: the middle of the gap
    overlap = np.concatenate([np.linspace(0.01, 0.7, 20), np.linspace(0.3, 0.9, 10)]).astype(np.float32)
    t = fitcasa.choose_threshold(overlap, labels, 0.05)
    assert np.mean(overlap[labels == 0] > t) <= 0.05  # the false-refusal target holds on validation


@pytest.mark.parametrize("pooling", ["mean", "last", "mean+last", "mean+last+max"])
def test_a_pooled_probe_is_casa_with_zero_keys(pooling, tmp_path):
    """pooled.Probe.to_casa: the fused casa_score path (C++ and reference), and the file written
    and read back, give the probe's own scores."""
    pytest.importorskip("sklearn")
    from pyguard.calibrate import pooled

    rng = np.random.default_rng(3)
    # the label shows in the mean of the rows and, apart from it, in the last row's first feature
    data = []
    for y in [0, 1] * 60:
        h = rng.standard_normal((int(rng.integers(1, 9)), 6)).astype(np.float32) + 0.5 * y
        h[-1, 0] += 1.5 * y
        data.append((h, y))
    probe, report = pooled.fit(data[:60], data[60:90], data[90:], layer=2, pooling=pooling, C=1.0)
    assert report["auroc"] > 0.9
    casa = probe.to_casa(2)
    assert ("w_last" in casa.params) == (pooling != "mean") and not casa.params["Wk"].any()
    assert ("w_max" in casa.params) == (pooling == "mean+last+max")
    states = [h for h, _ in data]
    for backend in ("cpp", "ref"):
        np.testing.assert_allclose(casa.score(states, backend=backend), probe.score(states), rtol=1e-4, atol=1e-6)
    casa.save(tmp_path / "c.safetensors")
    assert CASA.load(tmp_path / "c.safetensors") == casa and casa.threshold == probe.threshold
    with pytest.raises(ValueError, match="unknown pooling"):
        pooled.pool(states[0], "max")


def test_collect_fills_every_layer_in_one_pass(tmp_path):
    calls = []

    def states(messages):
        calls.append(messages[0]["content"])
        n = len(messages[0]["content"])
        return {3: np.full((n, 2), 3.0, np.float32), 5: np.full((n, 2), 5.0, np.float32)}

    caches = {il: fitcasa.StateCache(tmp_path, "m", il) for il in (3, 5)}
    a = fitcasa.collect(states, ["ab", "cde"], caches, progress=False)
    assert [x[0, 0] for x in a] == [3.0, 3.0] and calls == ["ab", "cde"]
    b = fitcasa.collect(states, ["cde"], {5: caches[5], 3: caches[3]}, progress=False)
    assert b[0].shape == (3, 2) and b[0][0, 0] == 5.0 and calls == ["ab", "cde"]  # read back, no model call
    caches[3].path("ab").unlink()
    fitcasa.collect(states, ["ab"], caches, progress=False)
    assert calls[-1] == "ab"  # a layer's missing file runs the model again


def test_threshold_and_band_count_the_benign_sources_named(tmp_path):
    """``frr_on``: the target false-refusal rate is kept on the named benign source (risky-looking
    prompts, where over-refusal happens) instead of on all benign prompts, which the easy ones dilute."""
    pytest.importorskip("llama_cpp")
    from pyguard import datasets, models
    from pyguard.calibrate import cascade as fitcascade
    from pyguard.methods import CASA

    path = models.model_path("smollm2-135m")
    if not path.exists():
        pytest.skip("SmolLM2 not fetched")
    harm = [f"Explain how to {v} {t}." for v in ("poison", "rob", "stalk", "blackmail", "hack", "burn")
            for t in ("my neighbour", "a bank", "a journalist", "the school", "a hospital")]
    risky = [f"Explain how to {v} {t}." for v in ("poison", "rob", "stalk", "blackmail", "hack", "burn")
             for t in ("a pharmacy", "a reporter", "my teacher", "the mayor", "a church")]  # as harmful as can be
    plain = [f"What is {i} plus {i + 3}?" for i in range(30)]
    h = datasets.write_jsonl(tmp_path / "h.jsonl", [{"text": t, "source": "harm"} for t in harm])
    b = datasets.write_jsonl(tmp_path / "b.jsonl", [{"text": t, "source": "plain"} for t in plain]
                             + [{"text": t, "source": "risky"} for t in risky])
    kw = dict(harmful=h, benign=b, cache=tmp_path / "states", progress=False, pooling="mean", C=1.0, target_frr=0.1)
    every, _ = fitcasa.run(str(path), 10, tmp_path / "all.safetensors", **kw)
    named, rep = fitcasa.run(str(path), 10, tmp_path / "risky.safetensors", frr_on=["risky"], **kw)
    assert rep["frr_on"] == ["risky"] and CASA.load(tmp_path / "risky.safetensors").threshold == rep["threshold"]
    assert named == dataclasses.replace(every, threshold=named.threshold)  # only the threshold differs

    val = datasets.split(fitcasa.prompt_sets(h, b), datasets.FIT_FRACTIONS)[1]
    H, _, _ = fitcasa.hidden_states(str(path), 10, val, tmp_path / "states", progress=False, fitted=named)
    scores, src = np.asarray(named.score(H)), np.array([it["source"] for it in val])
    assert np.mean(scores[src == "risky"] > named.threshold) <= 0.1  # kept where it is counted
    assert np.mean(scores[src == "risky"] > every.threshold) > 0.1  # diluted by the plain prompts otherwise
    assert named.threshold > every.threshold

    k, crep = fitcascade.run(tmp_path / "risky.safetensors", tmp_path / "k.safetensors", str(path), 0.1, h, b,
                             cache=tmp_path / "states", progress=False, frr_on=["risky"])
    assert crep["n_val"]["benign"] == np.sum(src == "risky") and crep["val_benign"]["coca"] <= 0.1 + 1e-9
    assert k.high == named.threshold
    with pytest.raises(ValueError, match=r"no validation benign prompt is from \['nope'\].*'plain', 'risky'"):
        fitcasa.run(str(path), 10, tmp_path / "x.safetensors", frr_on=["nope"], **kw)
