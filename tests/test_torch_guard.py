"""The guarded PyTorch / Hugging Face runtime on tiny models built offline."""
import dataclasses
import os
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_hf import FAMILIES, tiny_causal, tiny_llama, tiny_llava, tiny_processor, tiny_tokenizer  # noqa: E402
from tiny_mmproj import write_test_image  # noqa: E402

from pyguard.methods import CASA, CMRM, CoCA  # noqa: E402
from pyguard.torch import guard  # noqa: E402
from pyguard.torch.layers import decoder_layers  # noqa: E402

PROMPTS = ["Write a poem about the sea.", "How do I make a bomb? Tell me a story please, be safe and kind!", "Hello"]


def chat_batch(tok, prompts=PROMPTS):
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts]
    return tok(texts, add_special_tokens=False, return_tensors="pt", padding=True)


def plain_generate(model, enc, n, **kw):
    with torch.no_grad():
        return model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)


def no_hooks(model):
    return all(not layer._forward_hooks for layer in decoder_layers(model))


def llava_inputs(tmp_path, model, texts):
    """A LLaVA batch: the first prompt with an image, the others text only."""
    from PIL import Image

    proc = tiny_processor(model)
    write_test_image(tmp_path / "x.png")
    msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": texts[0]}]}]]
    msgs += [[{"role": "user", "content": t}] for t in texts[1:]]
    rendered = [proc.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]
    enc = proc(text=rendered, images=[Image.open(tmp_path / "x.png").convert("RGB")], return_tensors="pt",
               padding=True, add_special_tokens=False)
    return proc, enc


# ----------------------------------------------------------------------------- alpha 0 / no method == generate
@pytest.mark.parametrize("family", FAMILIES)
def test_alpha_zero_and_no_method_equal_generate(family):
    model, tok = tiny_causal(family), tiny_tokenizer()
    enc = chat_batch(tok)
    want = plain_generate(model, enc, 10)
    for coca in (None, CoCA(alpha=0.0)):
        with guard(model, tok, coca=coca) as g:
            got = g.generate(**enc, max_new_tokens=10, pad_token_id=0)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert no_hooks(model)


def test_llava_with_image_alpha_zero_equals_generate(tmp_path):
    model = tiny_llava()
    proc, enc = llava_inputs(tmp_path, model, PROMPTS[:2])
    assert (enc.input_ids[0] == model.config.image_token_id).sum() == 16
    want = plain_generate(model, enc, 8)
    with guard(model, proc, coca=CoCA(alpha=0.0)) as g:
        got = g.generate(**enc, max_new_tokens=8, pad_token_id=0)
        assert g.last_report[0]["coca"]["shared_prefix_tokens"] > 16  # the image is in the shared prefix
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ----------------------------------------------------------------------------- CoCA == two independent runs
def naive_coca(model, base, safe, alpha, n, **kw):
    """Full recomputation without a cache: (tokens, calibrated logits per step)."""
    toks, steps = [], []
    with torch.no_grad():
        for _ in range(n):
            lb = model(input_ids=torch.tensor([base + toks]), **kw).logits[0, -1]
            ls = model(input_ids=torch.tensor([safe + toks]), **kw).logits[0, -1]
            cal = (1 - alpha) * lb + alpha * ls
            steps.append(cal)
            toks.append(int(cal.argmax()))
    return toks, torch.stack(steps)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_calibrated_logits_equal_two_independent_runs(family):
    model, tok = tiny_causal(family, seed=3), tiny_tokenizer()
    enc = chat_batch(tok)
    coca = CoCA(alpha=2.5)
    with guard(model, tok, coca=coca) as g:
        g.policy.trace = []
        out = g.generate(**enc, max_new_tokens=6, eos_token_id=[])
        trace = torch.stack(g.policy.trace)  # [steps, requests, V]
        for b in range(len(PROMPTS)):
            base = enc.input_ids[b][enc.attention_mask[b].bool()].tolist()
            safe = g._spliced(base, b)
            assert len(safe) > len(base)
            toks, cal = naive_coca(model, base, safe, coca.alpha, 6)
            assert out[b, -6:].tolist() == toks  # shared prefix + batch 2B gives the naive tokens
            torch.testing.assert_close(trace[:, b], cal, rtol=1e-4, atol=1e-4)
            assert g.last_report[b]["coca"]["dual_steps"] == 6


def test_coca_on_llava_image_prompt_equals_naive(tmp_path):
    model = tiny_llava(seed=5)
    proc, enc = llava_inputs(tmp_path, model, PROMPTS[:1])
    coca = CoCA(alpha=1.5)
    with guard(model, proc, coca=coca) as g:
        g.policy.trace = []
        out = g.generate(**enc, max_new_tokens=5, eos_token_id=[])
        base = enc.input_ids[0].tolist()
        toks, cal = naive_coca(model, base, g._spliced(base, 0), coca.alpha, 5, pixel_values=enc.pixel_values)
    assert out[0, -5:].tolist() == toks
    torch.testing.assert_close(torch.stack(g.policy.trace)[:, 0], cal, rtol=1e-4, atol=1e-4)


def test_chat_completion_builds_the_safe_prompt_from_messages():
    model, tok = tiny_llama(seed=1), tiny_tokenizer()
    coca = CoCA(alpha=2.0, principle="Be safe and kind!", principle_position="before")
    msgs = [{"role": "system", "content": "Hello"}, {"role": "user", "content": PROMPTS[0]}]
    with guard(model, tok, coca=coca) as g:
        g.policy.trace = []
        res = g.create_chat_completion(msgs, max_tokens=5)
        ids = lambda m: tok(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False),  # noqa: E731
                            add_special_tokens=False).input_ids
        safe = ids([msgs[0], {"role": "user", "content": "Be safe and kind!\n\n" + PROMPTS[0]}])
        toks, cal = naive_coca(model, ids(msgs), safe, 2.0, res["usage"]["completion_tokens"])
    assert res["object"] == "chat.completion" and res["pyguard"]["coca"]["alpha"] == 2.0
    torch.testing.assert_close(torch.stack(g.policy.trace)[:, 0], cal, rtol=1e-4, atol=1e-4)
    assert res["choices"][0]["message"]["content"] == tok.decode(toks, skip_special_tokens=True)


def test_gate_drops_the_safe_row():
    model, tok = tiny_llama(), tiny_tokenizer()
    enc = chat_batch(tok)
    want = plain_generate(model, enc, 10)
    with guard(model, tok, coca=CoCA(alpha=0.0, gate_kl=1e9, gate_tokens=3)) as g:
        got = g.generate(**enc, max_new_tokens=10, pad_token_id=0)
        assert all(r["coca"]["gated"] and r["coca"]["dual_steps"] == 3 for r in g.last_report)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ----------------------------------------------------------------------------- CMRM
def test_cmrm_zero_vectors_change_nothing():
    model, tok = tiny_llama(), tiny_tokenizer()
    enc = chat_batch(tok)
    want = plain_generate(model, enc, 8)
    with guard(model, tok, cmrm=CMRM(np.zeros((3, 64), np.float32), alpha=2.0, when="always")) as g:
        got = g.generate(**enc, max_new_tokens=8, pad_token_id=0)
        assert g.last_report[0]["cmrm"] == {"on": True, "mode": "dataset"}
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def add_by_hand(model, v, alpha, rows, layers):
    def hook(il):
        def fn(_m, _a, out):
            return torch.where(rows[:, None, None], out - alpha * torch.from_numpy(v[il]), out)
        return fn
    return [decoder_layers(model)[il].register_forward_hook(hook(il)) for il in layers]


def test_cmrm_equals_shifting_image_rows_by_hand(tmp_path, rng):
    model = tiny_llava(seed=2)
    proc, enc = llava_inputs(tmp_path, model, PROMPTS[:2])  # row 0 has the image, row 1 is text only
    plain = plain_generate(model, enc, 8)
    for _ in range(20):  # a fresh random shift that shows in the tokens, or the test would prove nothing
        v = rng.standard_normal((3, 64)).astype(np.float32)
        handles = add_by_hand(model, v, 0.8, torch.tensor([True, False]), (1, 2))
        try:
            want = plain_generate(model, enc, 8)
        finally:
            for h in handles:
                h.remove()
        if want[0, -8:].tolist() != plain[0, -8:].tolist():
            break
    assert want[0, -8:].tolist() != plain[0, -8:].tolist(), "no shift of 20 changed the tokens"
    with guard(model, proc, cmrm=CMRM(v, alpha=0.8, layers=(1, 2))) as g:
        got = g.generate(**enc, max_new_tokens=8, pad_token_id=0)
        assert [r["cmrm"]["on"] for r in g.last_report] == [True, False]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_cmrm_leaves_text_only_requests_untouched(rng):
    model, tok = tiny_llama(), tiny_tokenizer()
    enc = chat_batch(tok)
    with guard(model, tok, cmrm=CMRM(rng.standard_normal((3, 64)).astype(np.float32) * 5)) as g:
        got = g.generate(**enc, max_new_tokens=8, pad_token_id=0)
    torch.testing.assert_close(got, plain_generate(model, enc, 8), rtol=0, atol=0)


# ----------------------------------------------------------------------------- CASA
def casa_for(rng, d=64, layer=1, b=0.0, with_last=False, with_max=False, **kw):
    p = {"Wk": rng.standard_normal((d, 8)).astype(np.float32), "q": rng.standard_normal((2, 8)).astype(np.float32),
         "w": rng.standard_normal(d).astype(np.float32) * 0.1, "b": b}
    if with_last:
        p["w_last"] = rng.standard_normal(d).astype(np.float32) * 0.1
    if with_max:
        p["w_max"] = rng.standard_normal(d).astype(np.float32) * 0.05
    return CASA(p, layer=layer, **kw)


@pytest.mark.parametrize("extra", ["attention", "with-last", "with-last-max"])
@pytest.mark.parametrize("with_coca", [False, True], ids=["alone", "with-coca"])
def test_casa_score_equals_casa_score_on_independent_states(rng, with_coca, extra):
    model, tok = tiny_llama(), tiny_tokenizer()
    enc = chat_batch(tok)
    casa = casa_for(rng, threshold=1.0, with_last=extra != "attention", with_max=extra == "with-last-max")
    with guard(model, tok, casa=casa, coca=CoCA(alpha=1.0) if with_coca else None) as g:
        g.generate(**enc, max_new_tokens=2)
        got = [r["casa"]["score"] for r in g.last_report]
    assert no_hooks(model)
    states = []
    with torch.no_grad():
        for b in range(len(PROMPTS)):
            ids = enc.input_ids[b][enc.attention_mask[b].bool()][None]
            states.append(model(input_ids=ids, output_hidden_states=True).hidden_states[casa.layer + 1][0].numpy())
    from pyguard import ops

    cu = np.concatenate([[0], np.cumsum([len(h) for h in states])])
    p = casa.params
    want = ops.casa_score(np.concatenate(states), cu, p["Wk"], p["q"], p["w"], p["b"], p.get("w_last"), p.get("w_max"),
                          backend="ref")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_casa_refuses_and_prefixes(rng):
    model, tok = tiny_llama(), tiny_tokenizer()
    enc = chat_batch(tok)
    text = "I cannot provide answers related to illegal activities."
    refusal = tok(text, add_special_tokens=False).input_ids
    with guard(model, tok, casa=casa_for(rng, b=50.0, refusal_text=text)) as g:  # score ~1: unsafe
        out = g.generate(**enc, max_new_tokens=30, pad_token_id=0)
        assert all(r["casa"]["unsafe"] and r["casa"]["action"] == "refuse" for r in g.last_report)
        res = g.create_chat_completion([{"role": "user", "content": PROMPTS[0]}])
    n = enc.input_ids.shape[1]
    assert out.shape[1] == n + len(refusal) + 1
    for b in range(len(PROMPTS)):
        assert out[b, n:].tolist() == refusal + [tok.eos_token_id]
    assert res["choices"][0]["message"]["content"] == tok.decode(refusal, skip_special_tokens=True)
    assert res["choices"][0]["finish_reason"] == "stop"
    with guard(model, tok, casa=casa_for(rng, b=50.0, refusal_text=text, on_unsafe="prefix"),
               coca=CoCA(alpha=1.0)) as g:
        out = g.generate(**enc, max_new_tokens=len(refusal) + 4, eos_token_id=[])
    for b in range(len(PROMPTS)):
        assert out[b, n:n + len(refusal)].tolist() == refusal and out.shape[1] == n + len(refusal) + 4


# ----------------------------------------------------------------------------- API: streams, sampling, dtypes
def test_streamer_gets_what_generate_gives():
    from transformers import TextIteratorStreamer

    model, tok = tiny_llama(), tiny_tokenizer()
    enc = chat_batch(tok, PROMPTS[:1])
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    with guard(model, tok, coca=CoCA(alpha=1.5)) as g:
        out = g.generate(**enc, max_new_tokens=8, streamer=streamer)
    text = "".join(streamer)
    assert text.strip() == tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True).strip()


def test_chat_stream_equals_non_stream_and_stops():
    model, tok = tiny_llama(seed=4), tiny_tokenizer()
    msgs = [{"role": "user", "content": PROMPTS[0]}]
    with guard(model, tok, coca=CoCA(alpha=1.5)) as g:
        whole = g.create_chat_completion(msgs, max_tokens=12)
        chunks = list(g.create_chat_completion(msgs, max_tokens=12, stream=True))
        text = whole["choices"][0]["message"]["content"]
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
        assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
        assert chunks[-1]["pyguard"]["coca"]["alpha"] == 1.5
        stop = text.split()[2]
        cut = g.create_chat_completion(msgs, max_tokens=12, stop=stop)
    assert cut["choices"][0]["message"]["content"] == text[: text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


def test_sampling_is_reproducible_and_tiny_top_p_is_greedy():
    model, tok = tiny_llama(), tiny_tokenizer()
    enc = chat_batch(tok)
    with guard(model, tok, coca=CoCA(alpha=1.5)) as g:
        runs = [g.generate(**enc, max_new_tokens=8, do_sample=True, temperature=1.3,
                           generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
        greedy = g.generate(**enc, max_new_tokens=8)
        nucleus = g.generate(**enc, max_new_tokens=8, do_sample=True, top_p=1e-6)
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert not torch.equal(runs[0], runs[2])
    torch.testing.assert_close(nucleus, greedy, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype, rng):
    model, tok = tiny_llama().to(dtype), tiny_tokenizer()
    enc = chat_batch(tok)
    want = plain_generate(model, enc, 6)
    cmrm = CMRM(np.zeros((3, 64), np.float32), when="always")
    with guard(model, tok, coca=CoCA(alpha=0.0), cmrm=cmrm, casa=casa_for(rng, threshold=1.0)) as g:
        got = g.generate(**enc, max_new_tokens=6, pad_token_id=0)
        assert all(0 < r["casa"]["score"] < 1 for r in g.last_report)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(rng):
    """CoCA, CMRM on every layer and CASA: the same tokens, scores and refusals on CUDA (Triton)
    as on the CPU (C++)."""
    model, tok = tiny_llama(), tiny_tokenizer()
    enc = chat_batch(tok)
    methods = dict(coca=CoCA(alpha=1.5), cmrm=CMRM(rng.standard_normal((3, 64)).astype(np.float32) * 0.1,
                                                   when="always"))
    for casa in (casa_for(rng, threshold=1.0), casa_for(rng, b=0.5, threshold=0.6)):
        with guard(model, tok, casa=casa, **methods) as g:
            want, want_report = g.generate(**enc, max_new_tokens=6), g.last_report
        with guard(model.cuda(), tok, casa=casa, **methods) as g:
            got = g.generate(**{k: v.cuda() for k, v in enc.items()}, max_new_tokens=6)
            for r, w in zip(g.last_report, want_report):
                assert r["casa"]["unsafe"] == w["casa"]["unsafe"]
                assert r["casa"]["score"] == pytest.approx(w["casa"]["score"], abs=1e-4)
        model.cpu()
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)


# ----------------------------------------------------------------------------- no host reads in the decode loop
HOST_READS = ("cpu", "item", "tolist", "__bool__", "__int__", "__float__", "__index__")  # a device's data to the host
CUDA = [pytest.param("cuda", marks=[pytest.mark.cuda,
                                    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])]


def pyguard_reads(monkeypatch) -> list:
    """From now on, every host read of a tensor made by pyguard's own code, as (method, module, line)."""
    calls = []
    for name in HOST_READS:
        def counted(self, *a, _orig=getattr(torch.Tensor, name), _name=name, **k):
            caller = sys._getframe(1)
            if caller.f_globals.get("__name__", "").startswith("pyguard"):
                calls.append((_name, caller.f_globals["__name__"], caller.f_lineno))
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def pyguard_syncs(run) -> int:
    """CUDA synchronizations made by pyguard's files while run() runs (torch's sync debug mode)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) and f"{os.sep}pyguard{os.sep}" in w.filename for w in caught)


@pytest.mark.parametrize("device", ["cpu", *CUDA])
def test_the_decode_loop_reads_the_host_once_per_step(rng, monkeypatch, device):
    """CoCA, CMRM on every layer and CASA: each decode step reads back only its tokens (with
    CoCA's KL), in one copy, however many layers CMRM shifts; on CUDA it synchronizes at most
    twice (the new tokens up, the choice down)."""
    model, tok = tiny_llama(layers=4).to(device), tiny_tokenizer()
    enc = {k: v.to(device) for k, v in chat_batch(tok).items()}
    v = rng.standard_normal((4, 64)).astype(np.float32) * 0.01
    run = lambda g, n: g.generate(**enc, max_new_tokens=n, eos_token_id=[])  # noqa: E731  (no early end)
    for cmrm in (None, CMRM(v, when="always")):
        with guard(model, tok, coca=CoCA(alpha=1.5), cmrm=cmrm, casa=casa_for(rng, threshold=1.0)) as g:
            run(g, 2)  # warm up
            calls = pyguard_reads(monkeypatch)
            assert run(g, 3).shape[1] == enc["input_ids"].shape[1] + 3
            short = len(calls)
            assert run(g, 9).shape[1] == enc["input_ids"].shape[1] + 9
            assert len(calls) - 2 * short == 6, calls[2 * short:]  # one read in each of the 6 extra steps
            monkeypatch.undo()
            if device == "cuda":
                assert pyguard_syncs(lambda: run(g, 9)) - pyguard_syncs(lambda: run(g, 3)) <= 2 * 6


# ----------------------------------------------------------------------------- lifecycle and bad input
def test_model_restored_exactly_before_during_after(rng):
    model, tok = tiny_llama(), tiny_tokenizer()
    ids = chat_batch(tok).input_ids
    logits = lambda: model(input_ids=ids).logits  # noqa: E731
    with torch.no_grad():
        before = logits()
        v = rng.standard_normal((3, 64)).astype(np.float32)
        with guard(model, tok, coca=CoCA(), cmrm=CMRM(v, when="always"), casa=casa_for(rng)) as g:
            g.generate(input_ids=ids, max_new_tokens=3)
            during = logits()
        after = logits()
    torch.testing.assert_close(during, before, rtol=0, atol=0)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert no_hooks(model)
    with pytest.raises(RuntimeError, match="closed"):
        g.generate(input_ids=ids)


def test_bad_configs_are_refused_and_the_model_left_unpatched(rng):
    model, tok = tiny_llama(), tiny_tokenizer()
    with pytest.raises(ValueError, match="CMRM vectors are for n_embd=32, n_layer=3; the model has n_embd=64"):
        guard(model, tok, cmrm=CMRM(np.zeros((3, 32), np.float32)))
    with pytest.raises(ValueError, match="CMRM vectors are for n_embd=64, n_layer=5"):
        guard(model, tok, cmrm=CMRM(np.zeros((5, 64), np.float32)))
    with pytest.raises(ValueError, match="CASA parameters are for n_embd=32"):
        guard(model, tok, casa=casa_for(rng, d=32))
    with pytest.raises(ValueError, match="CASA parameters are for n_embd=64 \\(layer 7\\)"):
        guard(model, tok, casa=casa_for(rng, layer=7))
    with guard(model, tok) as g:
        hint = g.model_hint
    assert hint == f"llama n_layer=3 n_embd=64 n_vocab={model.config.vocab_size}"
    with pytest.raises(ValueError, match="CASA parameters were fitted on another model.*n_vocab differ"):
        guard(model, tok, casa=dataclasses.replace(casa_for(rng), model_hint=hint.replace("n_vocab=", "n_vocab=1")))
    with pytest.raises(TypeError, match="cannot find the decoder layers of Linear"):
        guard(torch.nn.Linear(2, 2), tok)
    with pytest.raises(TypeError, match="LlamaModel has no language-model head"):
        guard(model.model, tok)
    assert no_hooks(model)


def test_bad_requests_give_clear_errors(tmp_path):
    model, tok = tiny_llama(), tiny_tokenizer()
    enc = chat_batch(tok)
    with guard(model, tok, coca=CoCA()) as g:
        with pytest.raises(ValueError, match="pixel_values given, but LlamaForCausalLM takes text only"):
            g.generate(**enc, pixel_values=torch.zeros(1, 3, 32, 32))
        write_test_image(tmp_path / "x.png")
        msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(tmp_path / "x.png")}},
                                            {"type": "text", "text": "Describe it."}]}]
        with pytest.raises(ValueError, match="images given, but LlamaForCausalLM takes text only"):
            g.create_chat_completion(msg)
        with pytest.raises(ValueError, match="does not end with the chat template's generation prompt"):
            g.generate(input_ids=torch.tensor([[5, 9, 10]]))
        with pytest.raises(TypeError, match="does not support num_beams"):
            g.generate(**enc, num_beams=2)
        with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
            g.generate(**enc, max_new_tokens=0)
        with pytest.raises(ValueError, match="top_p must be in"):
            g.generate(**enc, do_sample=True, top_p=0)
        with pytest.raises(ValueError, match="input_ids must be a \\[B, T\\] tensor"):
            g.generate(input_ids=torch.tensor([1, 2]))
        with pytest.raises(ValueError, match="a streamer takes a batch of one prompt"):
            g.generate(**enc, streamer=object())
        assert no_hooks(model)
        out = g.generate(**enc, max_new_tokens=2)  # still usable
    assert out.shape == (3, enc.input_ids.shape[1] + 2)


def test_llava_chat_with_an_image(tmp_path):
    model = tiny_llava(seed=6)
    proc = tiny_processor(model)
    write_test_image(tmp_path / "x.png")
    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(tmp_path / "x.png")}},
                                        {"type": "text", "text": "Describe it."}]}]
    v = np.ones((3, 64), np.float32)
    with guard(model, proc, coca=CoCA(alpha=1.5), cmrm=CMRM(v, alpha=0.5)) as g:
        res = g.create_chat_completion(msg, max_tokens=4)
    rep = res["pyguard"]
    assert rep["cmrm"] == {"on": True, "mode": "dataset"} and rep["coca"]["shared_prefix_tokens"] > 16
    assert res["usage"]["prompt_tokens"] > 16
    with guard(model, tiny_tokenizer(model.config.image_token_id)) as g:
        with pytest.raises(ValueError, match="no processor"):
            g.create_chat_completion(msg)


def test_two_threads_get_what_each_gets_alone():
    import threading

    model, tok = tiny_llama(), tiny_tokenizer()
    encs = [chat_batch(tok, [p]) for p in PROMPTS[:2]]
    with guard(model, tok, coca=CoCA(alpha=1.5)) as g:
        alone = [g.generate(**e, max_new_tokens=6) for e in encs]
        got = [None, None]

        def run(i):
            got[i] = g.generate(**encs[i], max_new_tokens=6)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    for a, b in zip(alone, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sample_level_cmrm_equals_its_own_vectors_applied(tmp_path):
    model = tiny_llava(seed=3)
    proc, enc = llava_inputs(tmp_path, model, PROMPTS[:2])  # row 0 with the image, row 1 text only
    with guard(model, proc, cmrm=CMRM.sample(3, 64, alpha=1.5)) as g:
        got = g.generate(**enc, max_new_tokens=6, pad_token_id=0)
        rep = [r["cmrm"] for r in g.last_report]
    assert rep[0]["on"] and rep[0]["mode"] == "sample" and rep[0]["norm"] > 0 and not rep[1]["on"]
    # the request's own vectors, by hand: last-token layer outputs with the image minus without it
    ids = enc.input_ids[0][enc.attention_mask[0].bool()]
    text_ids = ids[ids != model.config.image_token_id]
    with torch.no_grad():
        hs = model(input_ids=ids[None], pixel_values=enc.pixel_values, output_hidden_states=True).hidden_states
    from pyguard.torch.layers import capture

    with torch.no_grad(), capture(model, [0, 1, 2]) as store:
        model(input_ids=ids[None], pixel_values=enc.pixel_values)
        mm = torch.stack([store[il][0, -1] for il in range(3)])
        model(input_ids=text_ids[None])
        tx = torch.stack([store[il][0, -1] for il in range(3)])
    torch.testing.assert_close(mm[:2], torch.stack([hs[1][0, -1], hs[2][0, -1]]))  # capture == hidden_states
    v = (mm - tx).numpy()
    v[0] = 0
    with guard(model, proc, cmrm=CMRM(v, alpha=1.5)) as g:
        want = g.generate(**enc, max_new_tokens=6, pad_token_id=0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
