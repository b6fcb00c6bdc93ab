"""A grafted second modality (issue #8): the closest honest stand-in for a vision-language model
when no VLM weights can be had. It follows the papers' recipe — a frozen encoder of another
modality, a trainable projector to soft tokens in the language model's embedding space, the
language model frozen — with a sentence encoder (all-MiniLM-L6-v2, ``tga.SentenceEncoder``)
playing the image encoder. It is a grafted modality, not a vision model: its "image" is a
content string the language model never sees as text.

A prompt carries the content's place as ``MARKER`` in a user message; the prompt's tokens before
and after it are embedded by the model, the content's soft tokens go between: one per encoder
token, as LLaVA feeds one per image patch, so the model reads the request, not a summary of it.

- ``Projector``: encoder token states [n, d_in] -> soft tokens [n, d_out] (a linear map plus
  LLaVA's two-layer MLP), saved as safetensors with its shape and the model it was trained for.
- ``alignment`` / ``initial_projector``: the linear map fitted in seconds by ridge regression of
  each encoder token state onto the model's input embeddings of the text tokens it covers
  (character offsets align the two tokenizations), before any training through the model.
- ``Graft``: a projector file with its encoder, for the guarded runtimes, which take grafted
  content as a message part ``{"type": "graft", "text": ...}``: llama.cpp decodes the soft tokens
  as embeddings in the batch (``Engine.decode_embd``), PyTorch feeds them through ``inputs_embeds``.
- ``hf_embeds``: training's route, ``inputs_embeds`` [1, T, d] for ``model(inputs_embeds=)``.
- ``train``: the projector trained on (content, instruction, target) examples with the language
  modelling loss on the target (and optionally ``TGA``'s loss), everything else frozen,
  checkpointed and resumable; the data (``training_examples``) is benign only: the model's own
  text answers to benign requests, distilled (``distill_answers``), and restatements.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from . import datasets, extras
from .datasets import ANSWER, text_prompt

MARKER = "<content>"


class Projector(torch.nn.Module):
    """Encoder token states [..., d_in] -> soft tokens [..., d_out], one soft token per encoder
    token (LLaVA's patch-token recipe): a linear map plus a two-layer MLP (Linear, GELU, Linear)
    whose last layer starts at zero, so a new projector is its linear map, which ``fit_linear``
    sets by ridge regression (``alignment``) before any training through the model."""

    def __init__(self, d_in: int, d_out: int, hidden: int = 512):
        super().__init__()
        for name, v in (("d_in", d_in), ("d_out", d_out), ("hidden", hidden)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.d_in, self.d_out, self.hidden = d_in, d_out, hidden
        self.linear = torch.nn.Linear(d_in, d_out)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, d_out))
        torch.nn.init.zeros_(self.mlp[-1].weight)
        torch.nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.d_in:
            raise ValueError(f"the projector takes [..., {self.d_in}] token states, got {list(x.shape)}")
        return self.linear(x) + self.mlp(x)

    @torch.no_grad()
    def fit_linear(self, x: torch.Tensor, y: torch.Tensor, ridge: float = 1.0) -> float:
        """Set the linear map to the ridge regression of targets ``y`` [N, d_out] on token states
        ``x`` [N, d_in] (bias unpenalised); returns the fit's R^2 on ``x``."""
        if x.dim() != 2 or y.dim() != 2 or len(x) != len(y) or x.shape[1] != self.d_in or y.shape[1] != self.d_out:
            raise ValueError(f"fit_linear wants x [N, {self.d_in}] and y [N, {self.d_out}], got {list(x.shape)}, "
                             f"{list(y.shape)}")
        x, y = x.double(), y.double()
        mx, my = x.mean(0), y.mean(0)
        xc, yc = x - mx, y - my
        w = torch.linalg.solve(xc.T @ xc + ridge * torch.eye(self.d_in, dtype=x.dtype), xc.T @ yc)  # [d_in, d_out]
        self.linear.weight.copy_(w.T)
        self.linear.bias.copy_(my - mx @ w)
        return float(1 - ((xc @ w - yc) ** 2).sum() / (yc ** 2).sum())

    def config(self) -> dict:
        return {"d_in": self.d_in, "d_out": self.d_out, "hidden": self.hidden}

    def save(self, path, half: bool = False, **meta) -> None:
        """Write ``path`` (.safetensors): the weights (float16 with ``half``: half the size), the
        shape and ``meta`` (e.g. model_hint)."""
        from safetensors.torch import save_file

        info = {k: str(v) for k, v in self.config().items()} | {k: str(v) for k, v in meta.items()}
        dtype = torch.float16 if half else torch.float32
        save_file({k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()}, os.fspath(path),
                  metadata=info)

    @classmethod
    def load(cls, path) -> tuple["Projector", dict]:
        """(projector, metadata) from a file written by :meth:`save`; errors name the file."""
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such projector file: {path!r}")
        try:
            with safe_open(path, framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            p = cls(**{k: int(meta[k]) for k in ("d_in", "d_out", "hidden")})
            p.load_state_dict({k: v.float() for k, v in tensors.items()})
            if not all(torch.isfinite(v).all() for v in p.state_dict().values()):
                raise ValueError("weights hold NaN or inf")
        except Exception as e:  # a bad header, missing keys, wrong shapes, the old pooled layout
            raise ValueError(f"{path!r} is not a valid projector file: {e}") from e
        return p.eval(), meta


class Graft:
    """A trained projector with its frozen encoder, for the guarded runtimes: content strings ->
    soft tokens [n, k, d]. ``model_hint`` (from the file) names the model it was trained for."""

    def __init__(self, projector: Projector, meta: dict | None = None, encoder=None, source: str | None = None):
        from .methods import _from
        from .tga import SentenceEncoder

        self.projector, self.meta, self.source = projector.eval(), dict(meta or {}), source
        self.model_hint = self.meta.get("model_hint", "")
        self.encoder = encoder or SentenceEncoder()
        if self.encoder.dim != projector.d_in:
            raise ValueError(f"the projector{_from(self)} takes {projector.d_in}-d embeddings, the encoder gives "
                             f"{self.encoder.dim}")

    @classmethod
    def load(cls, path, encoder=None) -> "Graft":
        projector, meta = Projector.load(path)
        return cls(projector, meta, encoder, os.fspath(path))

    @classmethod
    def of(cls, graft) -> "Graft":
        """``graft`` itself when it is a Graft, else the Graft of a projector file."""
        return graft if isinstance(graft, cls) else cls.load(graft)

    def check_model(self, n_embd: int, n_layer: int | None = None, arch: str | None = None,
                    n_vocab: int | None = None) -> None:
        """ValueError naming the file when the soft tokens do not fit the model's embeddings or the
        file's model_hint names another model."""
        from .methods import _check_hint, _from

        if self.projector.d_out != n_embd:
            raise ValueError(f"the projector{_from(self)} makes {self.projector.d_out}-d soft tokens, the model's "
                             f"embeddings are {n_embd}-d")
        _check_hint(self, "the projector weights", {"arch": arch, "n_layer": n_layer, "n_embd": n_embd, "n_vocab": n_vocab})

    def fingerprint(self) -> str:
        """12 hex digits of the sha256 of the projector's weights: a cache key."""
        import hashlib

        h = hashlib.sha256()
        for k, v in sorted(self.projector.state_dict().items()):
            h.update(k.encode() + v.detach().float().numpy().tobytes())
        return h.hexdigest()[:12]

    @torch.no_grad()
    def soft(self, contents: list[str]) -> list[torch.Tensor]:
        """Soft tokens of each content string: [n_i, d] (float32), one per encoder token."""
        return [self.projector(states).float() for states, _ in self.encoder.tokens(list(contents))]


def alignment(encoder, tokenizer, embeddings: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Regression data for ``Projector.fit_linear``, no forward pass: every encoder token state
    [N, d_in] of ``texts`` and, as its target [N, d], the mean of the model's input
    ``embeddings`` [V, d] over the model's tokens (``tokenizer``, a fast one) whose characters
    overlap the encoder token's. Encoder tokens no model token overlaps are left out."""
    xs, ys = [], []
    for text, (states, spans) in zip(texts, encoder.tokens(list(texts))):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offs = torch.tensor(enc["input_ids"]), torch.tensor(enc["offset_mapping"]).reshape(-1, 2)
        for h, (a, b) in zip(states, spans.tolist()):
            over = (offs[:, 0] < b) & (offs[:, 1] > a)
            if over.any():
                xs.append(h)
                ys.append(embeddings[ids[over]].float().mean(0))
    if not xs:
        raise ValueError("no encoder token overlaps a model token: empty texts?")
    return torch.stack(xs), torch.stack(ys)


def split(text: str) -> tuple[str, str]:
    """A rendered prompt cut at its one ``MARKER``; ValueError unless it holds exactly one."""
    n = text.count(MARKER)
    if n != 1:
        raise ValueError(f"the prompt must hold the content marker {MARKER!r} exactly once, found {n}")
    before, after = text.split(MARKER)
    return before, after


def hf_embeds(model, before: list[int], soft: torch.Tensor, after: list[int]) -> torch.Tensor:
    """``inputs_embeds`` [1, len(before) + n + len(after), d]: the model's embeddings of the token
    ids ``before`` and ``after`` around the soft tokens ``soft`` [n, d]."""
    emb = model.get_input_embeddings()
    dev, dtype = emb.weight.device, emb.weight.dtype
    if soft.dim() != 2 or soft.shape[1] != emb.weight.shape[1]:
        raise ValueError(f"soft tokens must be [n, {emb.weight.shape[1]}], got {list(soft.shape)}")
    parts = [emb(torch.tensor(ids, device=dev)) for ids in (before, after)]
    return torch.cat([parts[0], soft.to(dev, dtype), parts[1]])[None]


# ----------------------------------------------------------------------------- training
@dataclass
class Example:
    """One training example: the content (the grafted input), the text instruction after it and
    the target answer."""

    content: str
    instruction: str
    target: str
    eos: bool = True  # the target is a whole answer (not cut at a token limit): end it with eos


def prompt_ids(tokenizer, instruction: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat prompt before and after the content's place, for a user message
    ``MARKER`` + newline + ``instruction`` (with the generation prompt)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": f"{MARKER}\n{instruction}"}],
                                         add_generation_prompt=True, tokenize=False)
    before, after = split(text)
    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    return enc(before), enc(after)


def batch(model, tokenizer, examples: list[Example], soft: list[torch.Tensor], max_target: int | None = None):
    """Right-padded ``(inputs_embeds [B, T, d], attention_mask [B, T], labels [B, T])`` for
    examples and their soft tokens (B tensors [n_b, d]); labels (-100 elsewhere) on the target and eos
    (targets cut to their first ``max_target`` tokens, without eos)."""
    emb = model.get_input_embeddings()
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    rows = []
    for ex, s in zip(examples, soft):
        before, after = prompt_ids(tokenizer, ex.instruction)
        target = tokenizer(ex.target, add_special_tokens=False)["input_ids"]
        cut = max_target is not None and len(target) > max_target
        target = target[:max_target] if cut else target + (eos if ex.eos else [])
        rows.append((hf_embeds(model, before, s, after + target)[0], len(before) + len(s) + len(after), target))
    T, d = max(len(e) for e, _, _ in rows), emb.weight.shape[1]
    x = torch.zeros(len(rows), T, d, dtype=emb.weight.dtype)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for b, (e, n_prompt, target) in enumerate(rows):
        x[b, :len(e)], mask[b, :len(e)] = e, 1
        labels[b, n_prompt:len(e)] = torch.tensor(target)
    return x, mask, labels


def target_loss(model, x: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The language-modelling loss on the labelled positions (as ``model(labels=)`` computes it),
    with logits only from the first labelled position on: the vocabulary projection of the
    prompt positions (151,936 columns for Qwen) is skipped."""
    rows = (labels != -100).any(0).nonzero()
    if rows.numel() == 0:
        raise ValueError("no labelled positions")
    idx = torch.arange(int(rows[0]) - 1, labels.shape[1] - 1, device=x.device)  # positions predicting a label
    logits = model(inputs_embeds=x, attention_mask=mask, logits_to_keep=idx).logits
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                             labels[:, idx + 1].reshape(-1), ignore_index=-100)


@dataclass
class TGA:
    """Text-guided alignment of the soft tokens (``pyguard.tga``, the paper's loss): at decoder
    ``layers``, the mean hidden state of the soft tokens moves towards that of the content as
    text (``h_cap``) and away from its nearest other content (``h_ret``); content -> [L, d]."""

    layers: list[int]
    h_cap: dict
    h_ret: dict
    schedule: str = "linear"

    @classmethod
    def build(cls, model, tokenizer, contents: list[str], encoder, layers=(7, 13), batch_size: int = 16,
              schedule: str = "linear") -> "TGA":
        """Caption and retrieved-text states of every content (text-only passes, no grad);
        retrieval among ``contents`` themselves with the frozen ``encoder``."""
        from . import tga

        idx = tga._layers(model, layers)
        contents = sorted(set(contents))
        ret = tga.Retriever(contents, encoder=encoder).nearest(contents)
        cap = tga._text_states(model, tokenizer, contents, idx, batch_size)  # [L, N, d]
        rs = tga._text_states(model, tokenizer, ret, idx, batch_size)
        return cls(idx, {c: cap[:, i] for i, c in enumerate(contents)}, {c: rs[:, i] for i, c in enumerate(contents)},
                   schedule)


def train(model, tokenizer, encoder, projector: Projector, examples: list[Example], steps: int = 100,
          batch_size: int = 4, lr: float = 3e-5, seed: int = 0, progress: bool = True,
          deadline: float | None = None, tga: TGA | None = None, max_target: int | None = 32,
          checkpoint=None, every: int = 25, on_checkpoint=None) -> list[float]:
    """Train ``projector`` (everything else frozen) with the language-modelling loss on each
    example's target (plus, with ``tga``, the TGA loss on the soft tokens' hidden states);
    ``encoder``: the frozen encoder (``.tokens(texts)``), run once per content. Examples are drawn
    in seeded random order. Targets are cut to ``max_target`` tokens (the start of an answer says
    what it is; the vocabulary projection of every target position is most of a step's cost).

    With ``checkpoint`` (a path), the projector, optimiser, draw and losses are written there
    every ``every`` steps and at the end (then ``on_checkpoint(losses)`` is called), and a run
    resumes from it. Stops after ``steps`` or at ``deadline`` (``time.monotonic()``). Returns the
    language-modelling loss of every step, the resumed ones included."""
    import contextlib
    import time
    from pathlib import Path

    tqdm = extras.tqdm("graft")

    from .tga import layer_weights, tga_loss
    from .torch.layers import capture

    if not examples:
        raise ValueError("no training examples")
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(projector.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    if checkpoint is not None and Path(checkpoint).is_file():
        state = torch.load(checkpoint, weights_only=False)
        projector.load_state_dict(state["projector"])
        opt.load_state_dict(state["optimizer"])
        g.set_state(state["generator"])
        losses = list(state["losses"])

    def save():
        tmp = Path(f"{checkpoint}.tmp")
        torch.save({"projector": projector.state_dict(), "optimizer": opt.state_dict(), "generator": g.get_state(),
                    "losses": losses}, tmp)
        os.replace(tmp, checkpoint)
        if on_checkpoint is not None:
            on_checkpoint(losses)

    contents = sorted({ex.content for ex in examples})
    states = {c: h for c, (h, _) in zip(contents, encoder.tokens(contents))}  # the encoder is frozen
    projector.train()
    bar = tqdm(range(len(losses), steps), desc="projector", unit="step", disable=not progress, initial=len(losses),
               total=steps)
    for _ in bar:
        pick = [examples[int(i)] for i in torch.randint(len(examples), (batch_size,), generator=g)]
        soft = [projector(states[ex.content]) for ex in pick]
        with capture(model, tga.layers, detach=False) if tga else contextlib.nullcontext() as store:
            loss = target_loss(model, *batch(model, tokenizer, pick, soft, max_target))
        if tga is not None:  # the soft tokens' mean state per row; they start after the prompt's head
            at = [len(prompt_ids(tokenizer, ex.instruction)[0]) for ex in pick]
            h_img = torch.stack([torch.stack([store[il][b, a:a + len(s)].mean(0) for b, (a, s) in enumerate(zip(at, soft))])
                                 for il in tga.layers])  # [L, B, d]
            h_cap = torch.stack([tga.h_cap[ex.content] for ex in pick], 1)
            h_ret = torch.stack([tga.h_ret[ex.content] for ex in pick], 1)
            extra, _ = tga_loss(h_img, h_cap, h_ret, layer_weights(tga.layers, len(losses), steps, tga.schedule))
        opt.zero_grad()
        (loss if tga is None else loss + extra).backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if checkpoint is not None and len(losses) % every == 0:
            save()
        if deadline is not None and time.monotonic() > deadline:
            break
    if checkpoint is not None and len(losses) % every:
        save()
    projector.eval()
    return losses


# ----------------------------------------------------------------------------- data and the command
SUBJECTS = ("The old lighthouse", "A small red fox", "My neighbour's garden", "The city library", "A cup of green tea",
            "The morning train", "Our chemistry teacher", "A wooden sailboat", "The bakery on the corner",
            "A curious toddler", "The mountain trail", "An orange cat", "The school orchestra", "A rainy afternoon",
            "The new bicycle", "A quiet museum", "The farmers' market", "A paper kite", "The village bridge",
            "A jar of honey")
PREDICATES = ("stands at the edge of the harbour", "sleeps under the apple tree", "is full of sunflowers in July",
              "opens at nine every morning", "tastes slightly bitter and fresh", "arrives ten minutes late",
              "explains the periodic table with songs", "drifts slowly across the lake", "sells warm bread at dawn",
              "asks why the sky is blue", "winds between tall pine trees", "watches birds from the window",
              "rehearses for the spring concert", "makes everyone stay indoors", "has a bright yellow frame")
INSTRUCTIONS = ("Repeat the content above word for word.", "Restate the content above.",
                "What does the content above say? Repeat it exactly.")


TASKS = ("Explain in simple words how {} works.", "Give three practical tips about {}.",
         "Write a short poem about {}.", "Tell me a few fun facts about {}.", "What should a beginner know about {}?")
TOPICS = ("rainbows", "photosynthesis", "bicycles", "the moon", "bread baking", "volcanoes", "honey bees",
          "compound interest", "the water cycle", "chess openings", "solar panels", "houseplants", "sourdough starters",
          "the Roman aqueducts", "jazz music", "vaccines", "knitting", "black holes", "recycling", "sleep",
          "electric cars", "tea ceremonies", "origami", "coral reefs", "the printing press", "marathon training",
          "bird migration", "public libraries", "lighthouses", "composting", "the internet", "saving money",
          "learning a language", "camping", "watercolour painting", "earthquakes", "the human heart", "chocolate",
          "trains", "clouds", "spreadsheets", "podcasts", "gardening in pots", "the Olympic games", "fossils",
          "wind turbines", "time zones", "penguins", "board games", "first aid for small cuts", "making pizza",
          "recursion in programming", "the violin", "snowflakes", "maps", "museums", "bridges", "tides",
          "yoga", "street food")


def _benign_train(seed: int) -> list[str]:
    """The training split of the shipped benign prompts (never its held-out parts)."""
    return [it["text"] for it in datasets.split(datasets.benign(), datasets.FIT_FRACTIONS, seed)[0]]


def benign_requests(seed: int = 0) -> list[str]:
    """Benign requests for the answer objective: the training split of the shipped benign prompts
    and 300 generated requests (5 tasks x 60 topics)."""
    return _benign_train(seed) + [t.format(topic) for t in TASKS for topic in TOPICS]


def distill_answers(model, requests: list[str], out, max_tokens: int = 64, progress: bool = True) -> list[dict]:
    """The model's own greedy answers to each request as text (``text_prompt(request, ANSWER)``),
    appended to the JSONL ``out`` as ``{"content", "answer", "finish"}`` rows; rows already there
    are kept (resumable). Returns every row, in ``requests`` order."""
    from pathlib import Path

    tqdm = extras.tqdm("graft")

    from .runtime import Runtime

    out = Path(out)
    done = {r["content"]: r for r in (datasets.read_jsonl(out, required=("content",)) if out.exists() else [])}
    todo = [r for r in dict.fromkeys(requests) if r not in done]
    if todo:
        with Runtime(model, n_ctx=512).open() as llm:
            for req in tqdm(todo, desc="answers", unit="request", disable=not progress):
                r = llm.create_chat_completion([{"role": "user", "content": text_prompt(req, ANSWER)}],
                                               max_tokens=max_tokens)
                ch = r["choices"][0]
                done[req] = row = {"content": req, "answer": ch["message"]["content"], "finish": ch["finish_reason"]}
                datasets.append_jsonl(out, row)
    return [done[r] for r in requests]


def benign_contents(seed: int = 0) -> list[str]:
    """Benign content strings for training the projector: the training split of the shipped
    benign prompts and 300 generated descriptive sentences."""
    return _benign_train(seed) + [f"{s} {p}." for s in SUBJECTS for p in PREDICATES]


def restate_examples(contents: list[str], seed: int = 0) -> list[Example]:
    """Each content with one restating instruction (a seeded draw); the target is the content."""
    pick = np.random.default_rng(seed).integers(len(INSTRUCTIONS), size=len(contents))
    return [Example(c, INSTRUCTIONS[i], c) for c, i in zip(contents, pick)]


def answers_path(model: str) -> "Path":
    """The shipped distilled answers of a default model (``python -m pyguard.graft answers``)."""
    from .models import SHIPPED

    return SHIPPED / f"graft-answers-{model}.jsonl"


def answer_examples(rows: list[dict]) -> list[Example]:
    """Distillation: the grafted request with the answer instruction; the target is the model's
    own answer to the request as text (``distill_answers`` rows), ended by eos when it was whole.
    Answers that refuse are left out: like a VLM's projector data, the graft's holds no safety
    behaviour to learn."""
    from .judges import is_refusal

    return [Example(r["content"], ANSWER, r["answer"], eos=r["finish"] == "stop") for r in rows
            if r["answer"].strip() and not is_refusal(r["answer"])]


def training_examples(model: str, seed: int = 0) -> list[Example]:
    """The projector's benign training set: the answer objective on ``benign_requests`` (their
    distilled answers) and the restate objective on those requests and ``benign_contents``."""
    path = answers_path(model)
    if not path.is_file():
        raise FileNotFoundError(f"no distilled answers for {model!r} at {path}: run python -m pyguard.graft answers "
                                f"--model {model} --out {path}")
    rows = datasets.read_jsonl(path, required=("content", "answer", "finish"))
    return answer_examples(rows) + restate_examples(list(dict.fromkeys(benign_requests(seed) + benign_contents(seed))), seed)


def initial_projector(model, tokenizer, encoder, contents: list[str], hidden: int = 512,
                      ridge: float = 1.0) -> tuple[Projector, float]:
    """A projector whose linear map is the ridge regression of ``contents``' encoder token states
    onto the model's input embeddings of the text they cover (``alignment``): seconds, no forward
    pass. Returns (projector, R^2 of the fit)."""
    emb = model.get_input_embeddings().weight.detach()
    x, y = alignment(encoder, tokenizer, emb, contents)
    proj = Projector(encoder.dim, emb.shape[1], hidden)
    return proj, proj.fit_linear(x, y, ridge)


def main(argv=None) -> int:
    """``python -m pyguard.graft train``: a projector for a default model, initialised by ridge
    regression on the benign training contents, then trained on benign examples
    (``training_examples``; with ``--tga`` the TGA loss too) for ``--steps`` steps (0: the
    regression alone), resumably (``--work``: checkpoint and a projector file every ``--every``
    steps, for curves), and saved. ``answers``: distil the answers it trains on."""
    import argparse
    import json
    import time
    from pathlib import Path

    from . import models
    from .methods import describe_model
    from .tga import SentenceEncoder
    from .torch import convert

    ap = argparse.ArgumentParser(prog="python -m pyguard.graft", description=__doc__.split("\n")[0])
    ap.add_argument("action", choices=["train", "answers"],
                    help="train: a projector; answers: distil the model's text answers to the benign requests")
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--out", required=True)
    ap.add_argument("--hidden", type=int, default=512, help="the projector MLP's width")
    ap.add_argument("--ridge", type=float, default=1.0, help="the initial regression's penalty")
    ap.add_argument("--steps", type=int, default=400, help="training steps after the regression (TGA's weights decay "
                    "over them); 0: the regression alone")
    ap.add_argument("--tga", action="store_true", help="add the TGA loss (retrieval among the training contents)")
    ap.add_argument("--minutes", type=float, default=90.0, help="stop after this long and save what is trained")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--work", type=Path, help="folder for the checkpoint (resumed from) and a projector file every "
                    "--every steps (step-N.safetensors) and the losses (losses.json)")
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.action == "answers":
        rows = distill_answers(models.model_path(a.model), benign_requests(a.seed), a.out)
        print(f"{len(rows)} answers in {a.out}")
        return 0
    if a.steps < 0 or a.every < 1:
        ap.error("--steps must be >= 0 and --every >= 1")
    torch.manual_seed(a.seed)
    model, tok = convert.load(a.model)
    t0 = time.monotonic()
    enc = SentenceEncoder()
    examples = training_examples(a.model, a.seed)
    contents = sorted({e.content for e in examples})
    proj, r2 = initial_projector(model, tok, enc, contents, a.hidden, a.ridge)
    print(f"ridge initialisation on {len(contents)} contents: R^2 {r2:.3f} ({time.monotonic() - t0:.0f} s)")
    cfg = model.config
    meta = dict(model_hint=describe_model(cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size),
                encoder="all-MiniLM-L6-v2", objective="ridge+answer+restate" + ("+tga" if a.tga else ""), seed=a.seed,
                examples=len(examples))
    losses: list[float] = []
    if a.work is not None:
        a.work.mkdir(parents=True, exist_ok=True)
        if not (a.work / "checkpoint.pt").exists():
            proj.save(a.work / "step-0.safetensors", half=True, steps=0, **meta)

    def snapshot(done: list[float]):
        proj.save(a.work / f"step-{len(done)}.safetensors", half=True, steps=len(done), **meta)
        (a.work / "losses.json").write_text(json.dumps(done), encoding="utf-8")

    if a.steps:
        tga = TGA.build(model, tok, contents, enc) if a.tga else None
        losses = train(model, tok, enc, proj, examples, a.steps, a.batch_size, a.lr, a.seed,
                       deadline=t0 + a.minutes * 60, tga=tga, checkpoint=a.work and a.work / "checkpoint.pt",
                       every=a.every, on_checkpoint=a.work and snapshot)
    proj.save(a.out, half=True, steps=len(losses), **meta)
    n = max(1, len(losses) // 10)
    curve = f"; loss {sum(losses[:n]) / n:.3f} (first {n}) -> {sum(losses[-n:]) / n:.3f} (last {n})" if losses else ""
    print(f"{len(losses)} steps in {(time.monotonic() - t0) / 60:.1f} min{curve}; wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
