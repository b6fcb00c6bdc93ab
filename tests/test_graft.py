"""The grafted modality's pieces (issue #8): the projector, the prompt split, and the two feeding
routes (Hugging Face inputs_embeds, llama.cpp embeddings in the batch) giving the same logits."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fetched import fetched  # noqa: E402
from pyguard import graft, models  # noqa: E402


def test_projector_shapes_and_errors():
    p = graft.Projector(384, 64, k=3, hidden=32)
    assert p(torch.randn(5, 384)).shape == (5, 3, 64)
    with pytest.raises(ValueError, match=r"the projector takes \[B, 384\] embeddings, got \[5, 383\]"):
        p(torch.randn(5, 383))
    for kw, msg in (({"k": 0}, "k must be a positive int"), ({"hidden": 2.5}, "hidden must be a positive int")):
        with pytest.raises(ValueError, match=msg):
            graft.Projector(384, 64, **kw)


def test_projector_save_load(tmp_path):
    p = graft.Projector(384, 64, k=3, hidden=32)
    p.save(tmp_path / "p.safetensors", model_hint="llama n_layer=30 n_embd=576 n_vocab=49152")
    q, meta = graft.Projector.load(tmp_path / "p.safetensors")
    x = torch.randn(2, 384)
    torch.testing.assert_close(q(x), p(x), rtol=0, atol=0)
    assert meta["model_hint"].startswith("llama") and q.config() == p.config()
    p.save(tmp_path / "h.safetensors", half=True)
    h, _ = graft.Projector.load(tmp_path / "h.safetensors")
    assert (tmp_path / "h.safetensors").stat().st_size < 0.6 * (tmp_path / "p.safetensors").stat().st_size
    torch.testing.assert_close(h(x), p(x), rtol=1e-2, atol=1e-3)  # float16 weights, float32 compute
    with pytest.raises(FileNotFoundError, match="no such projector file"):
        graft.Projector.load(tmp_path / "none.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(ValueError, match="bad.safetensors' is not a valid projector file"):
        graft.Projector.load(tmp_path / "bad.safetensors")


def test_split():
    assert graft.split(f"a{graft.MARKER}b") == ("a", "b")
    for text in ("no marker", f"{graft.MARKER}{graft.MARKER}"):
        with pytest.raises(ValueError, match="exactly once"):
            graft.split(text)


class HashEncoder:
    """A stand-in for the frozen sentence encoder: a unit vector seeded by the text."""

    dim = 384

    def encode(self, texts):
        import zlib

        rows = [torch.randn(384, generator=torch.Generator().manual_seed(zlib.crc32(t.encode()))) for t in texts]
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def smol_graft(model, seed=0):
    """A random projector for SmolLM2 whose soft tokens have its token embeddings' scale."""
    torch.manual_seed(seed)
    emb = model.get_input_embeddings().weight.detach()
    p = graft.Projector(384, emb.shape[1], k=4, hidden=64)
    p.match_scale(emb.pow(2).mean().sqrt().item(), HashEncoder().encode(["a", "b", "c", "d"]))
    return graft.Graft(p, {"model_hint": "llama n_layer=30 n_embd=576 n_vocab=49152"}, HashEncoder())


def graft_messages(content, text="Restate the content above in one sentence."):
    return [{"role": "user", "content": [{"type": "graft", "text": content}, {"type": "text", "text": "\n" + text}]}]


@pytest.fixture(scope="module")
def smol():
    pytest.importorskip("llama_cpp")
    pytest.importorskip("transformers")
    from pyguard.torch import convert

    gguf = fetched(models.model_path("smollm2-135m"), "smollm2-135m")
    model, tok = convert.load("smollm2-135m")
    return gguf, model, tok, smol_graft(model)


def test_both_runtimes_read_the_graft_alike(smol):
    """The llama.cpp route (soft tokens as embeddings in the batch) and the HF route (inputs_embeds)
    give the same logits within the runtimes' usual gap on real tokens, and the same first token."""
    from pyguard.llama import GuardedLlama
    from pyguard.torch import guard

    gguf, model, tok, g = smol
    msgs = graft_messages("A green parrot sings near the old harbour.")
    with GuardedLlama(gguf, n_ctx=256, graft=g) as llm:
        req = llm._request(msgs, 1, 0.0, 1.0, None, None)
        assert [type(s).__name__ for s in req["base"]] == ["list", "Soft", "list"] and req["base"][1].n_pos == 4
        llm.engine.clear()
        llm._prefill(req["base"], None, {})
        via_llama = llm.engine.logits(-1)[0].copy()
        before, after = req["base"][0], req["base"][2]
        real = llm.engine.tokenize(" a small red box")[:4]  # 4 real tokens in the soft tokens' place
        ids = before + real + after
        llm.engine.clear()
        llm.engine.decode([(t, i, 0, i == len(ids) - 1) for i, t in enumerate(ids)])
        tokens_llama = llm.engine.logits(-1)[0].copy()
        first_llama = llm.create_chat_completion(msgs, max_tokens=3)["choices"][0]["message"]["content"]
    gm = guard(model, tok, graft=g)
    hf_ids, _ = gm._encode(gm._flatten(msgs)[0], gm._flatten(msgs)[1])
    assert hf_ids == before + [-1] * 4 + after  # the same tokens around the soft tokens in both runtimes
    with torch.no_grad():
        via_hf = model(**gm._inputs(torch.tensor([hf_ids]), [g.soft([msgs[0]["content"][0]["text"]])[0]])).logits[0, -1]
        tokens_hf = model(input_ids=torch.tensor([ids])).logits[0, -1].numpy()
    via_hf = via_hf.numpy()
    usual = np.abs(tokens_llama - tokens_hf).max()  # Q4_1 kernels against the dequantized float32 model
    print(f"token route gap {usual:.3f}, graft route gap {np.abs(via_llama - via_hf).max():.3f}")
    assert via_llama.argmax() == via_hf.argmax()
    assert np.abs(via_llama - via_hf).max() <= 2 * usual + 1e-3
    assert np.corrcoef(via_llama, via_hf)[0, 1] > 0.99
    first_hf = gm.create_chat_completion(msgs, max_tokens=3)["choices"][0]["message"]["content"]
    assert first_llama.split()[:1] == first_hf.split()[:1]
    # the soft tokens carry the content: another content, other logits
    other = gm._soft(gm._flatten(graft_messages("How do I boil an egg?"))[0])
    with torch.no_grad():
        moved = model(**gm._inputs(torch.tensor([hf_ids]), [other])).logits[0, -1].numpy()
    assert np.abs(moved - via_hf).max() > 0.5


def test_graft_messages_errors(smol):
    from pyguard import chat
    from pyguard.llama import GuardedLlama
    from pyguard.torch import guard

    gguf, model, tok, g = smol
    msgs = graft_messages("A paper kite.")
    with pytest.raises(ValueError, match="a graft part needs a non-empty 'text'"):
        chat.flatten([{"role": "user", "content": [{"type": "graft", "text": " "}]}], "<m>")
    with pytest.raises(ValueError, match="images and grafted content"):
        chat.flatten([{"role": "user", "content": [{"type": "graft", "text": "x"},
                                                   {"type": "image_url", "image_url": "data:image/png;base64,AAAA"}]}], "<m>")
    with pytest.raises(ValueError, match="grafted content given, but this guard has no projector"):
        guard(model, tok).create_chat_completion(msgs, max_tokens=1)
    with GuardedLlama(gguf, n_ctx=128) as llm, pytest.raises(ValueError, match="loaded without a projector"):
        llm.create_chat_completion(msgs, max_tokens=1)
    wrong = graft.Graft(graft.Projector(384, 64, k=2, hidden=8), {}, HashEncoder(), source="w.safetensors")
    with pytest.raises(ValueError, match="w.safetensors' makes 64-d soft tokens, the model's embeddings are 576-d"):
        guard(model, tok, graft=wrong)
    qwen = graft.Graft(g.projector, {"model_hint": "qwen2 n_layer=24 n_embd=576 n_vocab=151936"}, HashEncoder(), "q.st")
    with pytest.raises(ValueError, match="q.st' were fitted on another model"):
        GuardedLlama(gguf, n_ctx=128, graft=qwen)


def test_guards_run_through_the_graft(smol):
    """CoCA, sample-level CMRM and the cascade on grafted requests, in both runtimes: CMRM is on
    for them (they carry a modality), CoCA's safe sequence shares the graft, and the runtimes
    agree on the first token."""
    from pyguard.llama import GuardedLlama
    from pyguard.methods import CMRM, CoCA
    from pyguard.torch import guard

    gguf, model, tok, g = smol
    msgs = graft_messages("Explain in simple words how rainbows work.", "Answer the request above.")
    coca = CoCA(alpha=1.5)
    with GuardedLlama(gguf, n_ctx=512, graft=g, coca=coca, cmrm=CMRM.sample(30, 576)) as llm:
        a = llm.create_chat_completion(msgs, max_tokens=3)
    b = guard(model, tok, graft=g, coca=coca, cmrm=CMRM.sample(30, 576)).create_chat_completion(msgs, max_tokens=3)
    for r in (a, b):
        rep = r["pyguard"]
        assert rep["cmrm"]["on"] and rep["cmrm"]["norm"] > 0 and rep["coca"]["dual_steps"] >= 1
        assert rep["coca"]["shared_prefix_tokens"] > 4  # the graft is in the prefix both sequences share
    assert a["choices"][0]["message"]["content"].split()[:1] == b["choices"][0]["message"]["content"].split()[:1]
    text = [{"role": "user", "content": "Explain in simple words how rainbows work."}]
    with GuardedLlama(gguf, n_ctx=512, graft=g, cmrm=CMRM.sample(30, 576)) as llm:
        assert llm.create_chat_completion(text, max_tokens=1)["pyguard"]["cmrm"]["on"] is False


def test_cmrm_vectors_from_graft_anchors(smol, tmp_path):
    """Dataset-level CMRM vectors from grafted anchors against their inlined text: one vector of
    the model's n_embd per layer, written and read back."""
    from pyguard.calibrate import cmrm
    from pyguard.methods import CMRM

    gguf, model, tok, g = smol
    anchors = [{"graft": c, "text": "Answer the request above."} for c in ("How do bees make honey?", "Name a red fruit.")]
    c = cmrm.run(gguf, anchors, tmp_path / "v.gguf", counterpart="inline", cache=tmp_path / "cache", graft=g,
                 progress=False)
    assert c.vectors.shape == (30, 576) and c.n_layer == 30
    assert np.isfinite(c.vectors).all() and (np.linalg.norm(c.vectors[1:], axis=1) > 0).all()
    back = CMRM.load(tmp_path / "v.gguf")
    np.testing.assert_allclose(back.vectors[1:], c.vectors[1:], rtol=1e-6)
    with pytest.raises(ValueError, match="grafted anchors take counterpart 'inline' or 'remove'"):
        cmrm.messages(anchors[0], "blank")


def test_training_lowers_the_loss_and_reaches_only_the_projector():
    pytest.importorskip("transformers")
    from tiny_hf import CORPUS, tiny_llama, tiny_tokenizer

    model, tok = tiny_llama(), tiny_tokenizer()
    words = CORPUS.split()
    contents = [" ".join(words[i:i + 4]) for i in range(0, 16, 4)]
    examples = [graft.Example(c, "harmless", c.split()[0]) for c in contents]  # say the content's first word
    table = torch.nn.functional.normalize(torch.randn(len(contents), 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    encode = lambda texts: table[[contents.index(t) for t in texts]]  # noqa: E731  a fake frozen encoder
    torch.manual_seed(0)
    proj = graft.Projector(16, 64, k=2, hidden=32)
    proj.match_scale(model.get_input_embeddings().weight.detach().pow(2).mean().sqrt().item(), table)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def loss_on_all():  # one fixed batch of every example
        with torch.no_grad():
            x, mask, labels = graft.batch(model, tok, examples, proj(encode(contents)))
            return float(model(inputs_embeds=x, attention_mask=mask, labels=labels).loss)
    start = loss_on_all()
    losses = graft.train(model, tok, encode, proj, examples, steps=80, batch_size=4, lr=1e-2, progress=False)
    # a random 3-layer model barely reads other positions, so the gain is small, but it is there
    assert loss_on_all() < start - 0.05 and len(losses) == 80
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model stays frozen
    x, mask, labels = graft.batch(model, tok, examples[:2], proj(encode(contents[:2])))
    assert x.shape[:2] == mask.shape == labels.shape and (labels[mask == 0] == -100).all()
    n_target = [len(tok(ex.target, add_special_tokens=False)["input_ids"]) + 1 for ex in examples[:2]]
    assert [(labels[b] != -100).sum().item() for b in range(2)] == n_target


def test_target_loss_equals_the_models_own():
    pytest.importorskip("transformers")
    from tiny_hf import tiny_llama, tiny_tokenizer

    model, tok = tiny_llama(), tiny_tokenizer()
    examples = [graft.Example("a", "harmless", "The assistant should answer"), graft.Example("b", "ethical", "kind")]
    soft = torch.randn(2, 3, 64) * 0.02
    x, mask, labels = graft.batch(model, tok, examples, soft)
    with torch.no_grad():
        want = model(inputs_embeds=x, attention_mask=mask, labels=labels).loss
        torch.testing.assert_close(graft.target_loss(model, x, mask, labels), want, rtol=1e-5, atol=1e-6)


def test_tga_term_pulls_the_soft_tokens_towards_their_text():
    """With the TGA term the soft tokens' hidden states end closer (cosine) to their content's
    text states than with the language-modelling loss alone, from the same start."""
    pytest.importorskip("transformers")
    from tiny_hf import CORPUS, tiny_llama, tiny_tokenizer

    model, tok = tiny_llama(), tiny_tokenizer()
    words = CORPUS.split()
    contents = [" ".join(words[i:i + 4]) for i in range(0, 24, 4)]
    examples = [graft.Example(c, "harmless", c.split()[0]) for c in contents]
    enc = HashEncoder()
    t = graft.TGA.build(model, tok, contents, enc, layers=(0, 2), batch_size=4, schedule="const")
    assert t.layers == [0, 1, 2] and t.h_cap[contents[0]].shape == (3, 64)
    assert all(t.h_ret[c] is not t.h_cap[c] and not torch.equal(t.h_ret[c], t.h_cap[c]) for c in contents)

    def cos_after(tga):
        torch.manual_seed(0)
        proj = graft.Projector(384, 64, k=2, hidden=32)
        graft.train(model, tok, enc.encode, proj, examples, steps=30, batch_size=3, lr=1e-2, progress=False, tga=tga)
        with torch.no_grad():
            x, mask, _ = graft.batch(model, tok, examples, proj(enc.encode(contents)))
            from pyguard.torch.layers import capture
            with capture(model, t.layers) as store:
                model(inputs_embeds=x, attention_mask=mask)
        at = len(graft.prompt_ids(tok, "harmless")[0])
        h = torch.stack([store[il][:, at:at + 2].mean(1) for il in t.layers])
        cap = torch.stack([t.h_cap[c] for c in contents], 1)
        return torch.nn.functional.cosine_similarity(h, cap, dim=-1).mean().item()
    plain, aligned = cos_after(None), cos_after(t)
    print(f"cos(h_I, h_C): LM only {plain:.3f}, with TGA {aligned:.3f}")
    assert aligned > plain + 0.05


def test_grafted_sets_and_eval(smol, tmp_path):
    """The grafted data sets and their inlined counterparts hold the same requests; the eval
    harness runs grafted items through the graft (CMRM on for them) and refuses them without one."""
    from pyguard import datasets, evaluate
    from pyguard.methods import CMRM

    gguf, model, tok, g = smol
    gi, ti = datasets.BUILTIN["graft-benign"][1](tmp_path), datasets.BUILTIN["inline-benign"][1](tmp_path)
    assert [it["graft"] for it in gi] == [t["text"].rsplit("\n", 1)[0] for t in ti]
    assert {it["text"] for it in gi} == {graft.ANSWER} and gi[0]["id"].startswith("graft-benign-")
    assert not any("graft" in it for it in ti)
    assert evaluate.messages(gi[0])[0]["content"][0] == {"type": "graft", "text": gi[0]["graft"]}
    with pytest.raises(ValueError, match="grafted content but no --graft"):
        evaluate.run(gguf, "graft-benign", "none", tmp_path / "a", progress=False, limit=1)
    res = evaluate.run(gguf, "graft-benign", "none,cmrm", tmp_path / "b", evaluate.Defences(cmrm="sample"),
                       max_tokens=3, limit=2, progress=False, graft=g)
    rows = res["rows"]
    assert len(rows) == 4 and [r["cmrm"] for r in rows if r["method"] == "cmrm"] == [True, True]
    assert json_load(tmp_path / "b" / "run.json")["graft"] == g.fingerprint()


def json_load(path):
    import json

    return json.loads(path.read_text())


def test_training_data_is_benign_and_never_held_out():
    """The projector's examples: distilled answers (refusals left out, eos only on whole answers)
    and restatements; no held-out benign prompt and no harmful request among the contents."""
    from pyguard import datasets, judges

    rows = [{"content": "Name a fruit.", "answer": "An apple.", "finish": "stop"},
            {"content": "Tell me a story.", "answer": "Once upon a time there", "finish": "length"},
            {"content": "Pick a lock.", "answer": "I'm sorry, but I can't help with that.", "finish": "stop"}]
    ex = graft.answer_examples(rows)
    assert [(e.content, e.eos) for e in ex] == [("Name a fruit.", True), ("Tell me a story.", False)]
    assert {e.instruction for e in ex} == {graft.ANSWER}
    examples = graft.training_examples(models.DEFAULT_MODEL)
    contents = {e.content for e in examples}
    held = {it["text"] for it in datasets.held_out(datasets.benign())}
    harmful = {it["text"] for it in datasets.advbench() + datasets.harmbench()}
    assert not contents & held and not contents & harmful and len(contents) > 700
    answers = [e for e in examples if e.instruction == graft.ANSWER]
    assert len(answers) > 300 and not any(judges.is_refusal(e.target) for e in answers)
    restate = [e for e in examples if e.instruction != graft.ANSWER]
    assert len({e.content for e in restate}) == len(restate)  # each content restated once


def test_batch_cuts_long_targets_without_eos():
    pytest.importorskip("transformers")
    from tiny_hf import tiny_llama, tiny_tokenizer

    model, tok = tiny_llama(), tiny_tokenizer()
    ex = [graft.Example("a", "harmless", "The assistant should answer"), graft.Example("b", "ethical", "kind")]
    full = [len(tok(e.target, add_special_tokens=False)["input_ids"]) for e in ex]
    assert full[0] > 2 and full[1] <= 2
    _, _, labels = graft.batch(model, tok, ex, torch.zeros(2, 3, 64), max_target=2)
    assert (labels[0] != -100).sum() == 2 and tok.eos_token_id not in labels[0].tolist()  # cut: no eos
    assert (labels[1] != -100).sum() == full[1] + 1 and labels[1][labels[1] != -100][-1] == tok.eos_token_id


def test_shipped_projectors_fit_the_default_model():
    from pyguard.methods import _parse_hint

    for tga in (False, True):
        path = models.shipped_graft(models.DEFAULT_MODEL, tga=tga)
        assert path is not None and path.stat().st_size < 5e6
        p, meta = graft.Projector.load(path)
        assert _parse_hint(meta["model_hint"]) == {"arch": "qwen2", "n_layer": 24, "n_embd": 896, "n_vocab": 151936}
        assert p.d_in == 384 and p.d_out == 896 and ("tga" in meta["objective"]) == tga
    assert models.shipped_graft("smollm2-135m") is None
