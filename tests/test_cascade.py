"""The cascade guard: CASA routes each request to no guard, CoCA (safe sequence forked from the
computed prefix) or refusal, in both runtimes."""
import math

import numpy as np
import pytest

from pyguard import models
from pyguard.methods import CASA, DEFAULT_REFUSAL, Cascade, CoCA


def casa_const(score: float, d: int, layer: int) -> CASA:
    """A CASA module that scores every prompt ``score`` (w = 0, b = logit(score))."""
    return CASA({"Wk": np.zeros((d, 4), np.float32), "q": np.zeros((1, 4), np.float32),
                 "w": np.zeros(d, np.float32), "b": math.log(score / (1 - score))}, layer=layer)


def casa_random(d: int, layer: int, seed: int = 0) -> CASA:
    rng = np.random.default_rng(seed)
    return CASA({"Wk": rng.standard_normal((d, 8)).astype(np.float32) / np.sqrt(d),
                 "q": rng.standard_normal((2, 8)).astype(np.float32),
                 "w": rng.standard_normal(d).astype(np.float32) * 4 / np.sqrt(d), "b": 0.0}, layer=layer)


# ----------------------------------------------------------------------------- the config
@pytest.mark.parametrize("low, high", [(0.6, 0.4), (-0.1, 0.5), (0.2, 1.01), (float("nan"), 0.5), (0.1, math.inf),
                                       ("0.1", 0.5), (True, 0.5)])
def test_thresholds_out_of_order_or_range_are_refused(low, high):
    with pytest.raises(ValueError, match=r"cascade thresholds must be \(low, high\) with 0 <= low <= high <= 1"):
        Cascade(casa_const(0.5, 8, 1), low=low, high=high)


def test_routes_and_reasons():
    k = Cascade(casa_const(0.5, 8, 1), low=0.25, high=0.75)
    assert [k.route(s) for s in (0.0, 0.2499, 0.25, 0.7499, 0.75, 1.0, float("nan"))] == \
        ["none", "none", "coca", "coca", "refuse", "refuse", "refuse"]
    assert k.report(0.1) == {"branch": "none", "low": 0.25, "high": 0.75, "why": "score 0.100 < low 0.250"}
    assert k.why(float("nan")) == "score is NaN (fail closed)"
    with pytest.raises(TypeError, match="casa must be a CASA"):
        Cascade(None, low=0.1, high=0.2)


def test_thresholds_travel_with_the_casa_file(tmp_path):
    casa = casa_const(0.5, 8, 1)
    with pytest.raises(ValueError, match="no cascade thresholds: give low= and high=, or a CASA file fitted by"):
        Cascade(casa)
    Cascade(casa, CoCA(alpha=2.0), low=0.2, high=0.9).save(tmp_path / "c.safetensors")
    k = Cascade.load(tmp_path / "c.safetensors", CoCA(alpha=2.0))
    assert (k.low, k.high, k.coca.alpha) == (0.2, 0.9, 2.0) and k.casa.cascade == (0.2, 0.9)
    assert Cascade.load(tmp_path / "c.safetensors", high=0.95).high == 0.95  # an override
    assert CASA.load(tmp_path / "c.safetensors").threshold == casa.threshold  # still a plain CASA file


# ----------------------------------------------------------------------------- llama.cpp
MODEL = models.model_path("smollm2-135m")
MSGS = [{"role": "user", "content": "List three uses of a paperclip."}]


def llama_run(**kw):
    from pyguard.llama import GuardedLlama

    with GuardedLlama(MODEL, n_ctx=512, **kw) as g:
        decoded = []
        orig = g.engine.decode

        def counting(items, **kw):
            decoded.append(len(items))
            return orig(items, **kw)
        g.engine.decode = counting
        r = g.create_chat_completion(MSGS, max_tokens=8)
        req = g._request(MSGS, 8, 0.0, 1.0, None, None)
        n_base, n_safe = len(req.base[0]), len(req.safe[0]) if req.safe is not None else 0
        req.base.free()
        req.safe is not None and req.safe.free()
    return r, decoded, n_base, n_safe


@pytest.mark.needs_file(MODEL, "SmolLM2")
def test_llama_each_branch():
    pytest.importorskip("llama_cpp")
    plain, _, _, _ = llama_run()
    coca, _, _, _ = llama_run(coca=CoCA())
    text = lambda r: r["choices"][0]["message"]["content"]  # noqa: E731
    for score, branch in ((0.1, "none"), (0.5, "coca"), (0.9, "refuse")):
        r, decoded, n_base, n_safe = llama_run(cascade=Cascade(casa_const(score, 576, 10), CoCA(), low=0.3, high=0.8))
        rep = r["pyguard"]
        assert rep["cascade"]["branch"] == branch and rep["casa"]["score"] == pytest.approx(score, abs=1e-6)
        if branch == "none":
            assert text(r) == text(plain) and rep["coca"] is None
            prompt = [d for d in decoded if d > 1]  # then one token per step: no safe sequence
            assert sum(prompt) == n_base and decoded == prompt + [1] * (len(decoded) - len(prompt))
        elif branch == "coca":
            assert text(r) == text(coca) and rep["coca"]["dual_steps"] == r["usage"]["completion_tokens"]
            shared = rep["coca"]["shared_prefix_tokens"]
            # the base prompt (CASA reads it), then the safe tail only: nothing recomputed; then pairs
            prompt = [d for d in decoded if d > 2]
            assert sum(prompt) == n_base + n_safe - shared and decoded == prompt + [2] * (len(decoded) - len(prompt))
        else:
            assert text(r) == DEFAULT_REFUSAL and rep["casa"]["unsafe"] and rep["coca"] is None
            assert sum(decoded) == n_base  # nothing after the prompt


@pytest.mark.needs_file(MODEL, "SmolLM2")
def test_llama_cascade_excludes_coca_and_casa():
    from pyguard.llama import GuardedLlama

    with pytest.raises(ValueError, match="cascade= brings its own CASA and CoCA"):
        GuardedLlama(MODEL, cascade=Cascade(casa_const(0.5, 576, 10), low=0.1, high=0.9), coca=CoCA())


# ----------------------------------------------------------------------------- PyTorch
def test_torch_mixed_batch_takes_each_branch():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tiny_hf import tiny_llama, tiny_tokenizer

    from pyguard.torch import guard

    model, tok = tiny_llama(), tiny_tokenizer()
    prompts = ["Write a poem about the sea.", "How do I make a bomb? Tell me a story please!", "Hello"]
    enc = [tok(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False),
               add_special_tokens=False, return_tensors="pt") for p in prompts]
    casa = casa_random(64, 1)
    with guard(model, tok, casa=casa) as g:
        scores = [float(casa.score([g.prompt_states([{"role": "user", "content": p}], 1)])[0]) for p in prompts]
    order = np.argsort(scores)
    s = sorted(scores)
    assert s[0] < s[1] < s[2]
    low, high = (s[0] + s[1]) / 2, (s[1] + s[2]) / 2
    want_branch = {int(order[0]): "none", int(order[1]): "coca", int(order[2]): "refuse"}

    def alone(**kw):
        out = []
        with guard(model, tok, **kw) as g:
            for e in enc:
                out.append(g.generate(**e, max_new_tokens=6, pad_token_id=0)[0, e.input_ids.shape[1]:].tolist())
        return out
    plain, coca = alone(), alone(coca=CoCA())
    batch = tok([tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
                 for p in prompts], add_special_tokens=False, return_tensors="pt", padding=True)
    seen = []
    with guard(model, tok, cascade=Cascade(casa, CoCA(), low=low, high=high)) as g:
        forward = g.model.forward

        def counting(*a, **kw):
            seen.append(int(kw["attention_mask"][:, -kw["input_ids"].shape[1]:].sum()))
            return forward(*a, **kw)
        g.model.forward = counting
        got = g.generate(**batch, max_new_tokens=6, pad_token_id=0)
        reports = g.last_report
        g.model.forward = forward
    refusal = tok(DEFAULT_REFUSAL, add_special_tokens=False).input_ids
    for i, rep in enumerate(reports):
        assert rep["cascade"]["branch"] == want_branch[i]
        row = got[i, batch.input_ids.shape[1]:].tolist()
        if want_branch[i] == "none":
            assert row[:len(plain[i])] == plain[i] and rep["coca"] is None
        elif want_branch[i] == "coca":
            assert row[:len(coca[i])] == coca[i] and rep["coca"]["dual_steps"] >= 1
        else:
            assert row[:len(refusal)] == refusal[:6][:len(row)] and rep["casa"]["unsafe"]
    # prompt tokens computed: each prompt once and one safe tail (the CoCA branch's); pads masked
    i = int(order[1])
    with guard(model, tok, coca=CoCA()) as g2:
        safe = g2._spliced(batch.input_ids[i][batch.attention_mask[i].bool()].tolist(), i)
    shared = reports[i]["coca"]["shared_prefix_tokens"]
    assert sum(seen[:3]) == int(batch.attention_mask.sum()) + len(safe) - shared


# ----------------------------------------------------------------------------- pyguard fit cascade
def test_choose_low():
    from pyguard.calibrate.cascade import branches, choose_low

    benign = np.array([0.01, 0.02, 0.03, 0.05, 0.2, 0.4, 0.6, 0.95, 0.97, 0.99])
    # two benign prompts may enter the band [low, high) beside the three refused anyway (>= 0.9)
    low = choose_low(benign, 0.9, 0.2)
    assert low == pytest.approx((0.2 + 0.4) / 2)
    b = branches(benign, low, 0.9)
    assert b == {"none": pytest.approx(0.5), "coca": pytest.approx(0.2), "refuse": pytest.approx(0.3)}
    assert choose_low(benign, 0.9, 0.0) == pytest.approx((0.6 + 0.9) / 2)  # just above the band's benign
    assert choose_low(benign, 0.5, 0.5) <= 0.5  # never above high
    assert choose_low(np.array([0.1, 0.2]), 0.9, 0.99) == pytest.approx(0.15)  # floor(0.99 * 2) = 1 allowed
    assert choose_low(np.array([0.1, 0.2]), 0.15, 0.5) == 0.0  # one refused anyway, one allowed: all
    with pytest.raises(ValueError, match="target_frr must be in"):
        choose_low(benign, 0.9, 1.0)


@pytest.mark.needs_file(MODEL, "SmolLM2")
def test_fit_cascade_writes_thresholds_into_the_casa_file(tmp_path):
    pytest.importorskip("llama_cpp")
    from pyguard import datasets
    from pyguard.calibrate import cascade as fit

    harmful = datasets.write_jsonl(tmp_path / "h.jsonl", [{"text": f"How do I hurt person number {i}?"} for i in range(30)])
    benign = datasets.write_jsonl(tmp_path / "b.jsonl", [{"text": f"What is {i} plus {i}?"} for i in range(30)])
    casa = casa_random(576, 10)
    casa.save(tmp_path / "casa.safetensors")
    k, rep = fit.run(tmp_path / "casa.safetensors", tmp_path / "out.safetensors", str(MODEL), 0.1, harmful, benign,
                     cache=tmp_path / "states", progress=False)
    assert 0 <= k.low <= k.high == casa.threshold
    loaded = Cascade.load(tmp_path / "out.safetensors")
    assert (loaded.low, loaded.high) == (k.low, k.high)
    for label in ("benign", "harmful"):
        assert sum(rep[f"val_{label}"].values()) == pytest.approx(1.0)
    assert rep["val_benign"]["coca"] <= 0.1 + 1e-9
    wrong = casa_random(896, 10)
    wrong = CASA(wrong.params, layer=10, model_hint="qwen2 n_layer=24 n_embd=896 n_vocab=151936")
    wrong.save(tmp_path / "qwen.safetensors")
    with pytest.raises(ValueError, match=r"CASA parameters from '.*qwen.safetensors' are for n_embd=896"):
        fit.run(tmp_path / "qwen.safetensors", tmp_path / "x.safetensors", str(MODEL), 0.1, harmful, benign,
                cache=tmp_path / "states", progress=False)


@pytest.mark.needs_file(MODEL, "SmolLM2")
def test_cmrm_stays_on_for_images_in_every_branch(tmp_path):
    pytest.importorskip("llama_cpp")
    from tiny_mmproj import write_test_image, write_tiny_mmproj

    from pyguard.llama import GuardedLlama
    from pyguard.methods import CMRM

    mmproj = write_tiny_mmproj(tmp_path / "mmproj.gguf", n_embd_text=576)
    img = write_test_image(tmp_path / "x.png")
    image_msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(img)}},
                                               {"type": "text", "text": "What is in this picture?"}]}]
    v = np.zeros((30, 576), np.float32)
    v[1:] = 0.01
    for score, branch in ((0.1, "none"), (0.5, "coca"), (0.9, "refuse")):
        k = Cascade(casa_const(score, 576, 10), CoCA(), low=0.3, high=0.8)
        with GuardedLlama(MODEL, mmproj_path=mmproj, n_ctx=1024, cascade=k, cmrm=CMRM(v)) as g:
            r = g.create_chat_completion(image_msgs, max_tokens=3)
            assert r["pyguard"]["cascade"]["branch"] == branch and r["pyguard"]["cmrm"]["on"]
            r = g.create_chat_completion(MSGS, max_tokens=3)  # text only: CMRM (when="image") stays off
            assert r["pyguard"]["cascade"]["branch"] == branch and not r["pyguard"]["cmrm"]["on"]


def test_torch_image_batch_with_cmrm_matches_each_branch_alone(tmp_path, rng):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from test_torch_guard import llava_inputs
    from tiny_hf import tiny_llava

    from pyguard.methods import CMRM
    from pyguard.torch import guard

    model = tiny_llava(seed=2)
    proc, enc = llava_inputs(tmp_path, model, ["What is in the picture?", "Hello there"])  # row 0: the image
    cmrm = CMRM(rng.standard_normal((3, 64)).astype(np.float32), alpha=0.8, layers=(1, 2))
    for score, alone in ((0.1, {}), (0.5, {"coca": CoCA()})):
        with guard(model, proc, cmrm=cmrm, **alone) as g:
            want = g.generate(**enc, max_new_tokens=6, pad_token_id=0)
        k = Cascade(casa_const(score, 64, 1), CoCA(), low=0.3, high=0.8)
        with guard(model, proc, cmrm=cmrm, cascade=k) as g:
            got = g.generate(**enc, max_new_tokens=6, pad_token_id=0)
            assert [r["cmrm"]["on"] for r in g.last_report] == [True, False]
            assert {r["cascade"]["branch"] for r in g.last_report} == {"none" if score < 0.3 else "coca"}
        torch.testing.assert_close(got, want, rtol=0, atol=0)
