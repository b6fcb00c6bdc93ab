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


def test_both_routes_give_the_same_logits():
    pytest.importorskip("llama_cpp")
    pytest.importorskip("transformers")
    from pyguard.llama import GuardedLlama
    from pyguard.torch import convert

    gguf = fetched(models.model_path("smollm2-135m"), "smollm2-135m")
    model, _ = convert.load("smollm2-135m")
    torch.manual_seed(0)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        soft = graft.Projector(384, emb.shape[1], k=4, hidden=64)(torch.nn.functional.normalize(torch.randn(1, 384)))[0]
        soft = soft / soft.norm(dim=-1, keepdim=True) * emb.norm(dim=-1).mean()  # token-sized soft tokens
    msgs = [{"role": "user", "content": f"{graft.MARKER}\nRestate the content above in one sentence."}]
    with GuardedLlama(gguf, n_ctx=256) as g:
        text, add_bos = g.template.render(msgs)
        b, a = graft.split(text)
        before, after = g.engine.tokenize(b, add_bos=add_bos), g.engine.tokenize(a)
        g.engine.clear()
        assert graft.llama_prefill(g.engine, before, soft.numpy(), after) == len(before) + 4 + len(after)
        via_llama = g.engine.logits(-1)[0].copy()
        # the same prompt with 4 real tokens in the soft tokens' place: the two runtimes' usual gap
        real = g.engine.tokenize(" a small red box")[:4]
        g.engine.clear()
        ids = before + real + after
        g.engine.decode([(t, i, 0, i == len(ids) - 1) for i, t in enumerate(ids)])
        tokens_llama = g.engine.logits(-1)[0].copy()
    with torch.no_grad():
        via_hf = model(inputs_embeds=graft.hf_embeds(model, before, soft, after)).logits[0, -1].numpy()
        tokens_hf = model(input_ids=torch.tensor([ids])).logits[0, -1].numpy()
    usual = np.abs(tokens_llama - tokens_hf).max()  # Q4_1 kernels against the dequantized float32 model
    print(f"token route gap {usual:.3f}, graft route gap {np.abs(via_llama - via_hf).max():.3f}")
    assert via_llama.argmax() == via_hf.argmax()
    assert np.abs(via_llama - via_hf).max() <= 2 * usual + 1e-3
    assert np.corrcoef(via_llama, via_hf)[0, 1] > 0.99
    with pytest.raises(ValueError, match=r"soft tokens must be \[k, 576\]"):
        graft.hf_embeds(model, before, soft[:, :10], after)


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
