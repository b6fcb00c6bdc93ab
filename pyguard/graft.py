"""A grafted second modality (issue #8): the closest honest stand-in for a vision-language model
when no VLM weights can be had. It follows the papers' recipe — a frozen encoder of another
modality, a trainable projector to soft tokens in the language model's embedding space, the
language model frozen — with a sentence encoder (all-MiniLM-L6-v2, ``tga.SentenceEncoder``)
playing the image encoder. It is a grafted modality, not a vision model: its "image" is a
content string the language model never sees as text.

A prompt carries the content's place as ``MARKER`` in a user message; the prompt's tokens before
and after it are embedded by the model, the ``k`` soft tokens go between.

- ``Projector``: sentence embedding [B, d_in] -> soft tokens [B, k, d_out] (LLaVA's two-layer
  MLP), saved as safetensors with its shape and the model it was trained for.
- ``Graft``: a projector file with its encoder, for the guarded runtimes, which take grafted
  content as a message part ``{"type": "graft", "text": ...}``: llama.cpp decodes the soft tokens
  as embeddings in the batch (``Engine.decode_embd``), PyTorch feeds them through ``inputs_embeds``.
- ``hf_embeds``: training's route, ``inputs_embeds`` [1, T, d] for ``model(inputs_embeds=)``.
- ``train``: the projector trained on (content, instruction, target) examples with the language
  modelling loss on the target (and optionally ``TGA``'s loss), everything else frozen; the data
  (``training_examples``) is benign only: the model's own text answers to benign requests,
  distilled (``distill_answers``), and restatements.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

MARKER = "<content>"


class Projector(torch.nn.Module):
    """Sentence embeddings [B, d_in] -> soft tokens [B, k, d_out]: Linear, GELU, Linear."""

    def __init__(self, d_in: int, d_out: int, k: int = 4, hidden: int = 1024):
        super().__init__()
        for name, v in (("d_in", d_in), ("d_out", d_out), ("k", k), ("hidden", hidden)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.d_in, self.d_out, self.k, self.hidden = d_in, d_out, k, hidden
        self.net = torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, k * d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"the projector takes [B, {self.d_in}] embeddings, got {list(x.shape)}")
        return self.net(x).view(x.shape[0], self.k, self.d_out)

    @torch.no_grad()
    def match_scale(self, target_rms: float, x: torch.Tensor) -> None:
        """Scale the last layer so soft tokens of inputs ``x`` [B, d_in] have root-mean-square
        ``target_rms`` (e.g. that of the model's token embeddings): a start the model can read."""
        rms = self(x).pow(2).mean().sqrt()
        self.net[-1].weight.mul_(target_rms / rms)
        self.net[-1].bias.mul_(target_rms / rms)

    def config(self) -> dict:
        return {"d_in": self.d_in, "d_out": self.d_out, "k": self.k, "hidden": self.hidden}

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
            p = cls(**{k: int(meta[k]) for k in ("d_in", "d_out", "k", "hidden")})
            p.load_state_dict({k: v.float() for k, v in tensors.items()})
        except Exception as e:  # a bad header, missing keys, wrong shapes
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

    @property
    def k(self) -> int:
        return self.projector.k

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
    def soft(self, contents: list[str]) -> torch.Tensor:
        """Soft tokens [n, k, d] (float32) of the content strings."""
        if not contents:
            return torch.zeros(0, self.k, self.projector.d_out)
        return self.projector(self.encoder.encode(list(contents))).float()


def split(text: str) -> tuple[str, str]:
    """A rendered prompt cut at its one ``MARKER``; ValueError unless it holds exactly one."""
    n = text.count(MARKER)
    if n != 1:
        raise ValueError(f"the prompt must hold the content marker {MARKER!r} exactly once, found {n}")
    before, after = text.split(MARKER)
    return before, after


def hf_embeds(model, before: list[int], soft: torch.Tensor, after: list[int]) -> torch.Tensor:
    """``inputs_embeds`` [1, len(before) + k + len(after), d]: the model's embeddings of the token
    ids ``before`` and ``after`` around the soft tokens ``soft`` [k, d]."""
    emb = model.get_input_embeddings()
    dev, dtype = emb.weight.device, emb.weight.dtype
    if soft.dim() != 2 or soft.shape[1] != emb.weight.shape[1]:
        raise ValueError(f"soft tokens must be [k, {emb.weight.shape[1]}], got {list(soft.shape)}")
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


def batch(model, tokenizer, examples: list[Example], soft: torch.Tensor, max_target: int | None = None):
    """Right-padded ``(inputs_embeds [B, T, d], attention_mask [B, T], labels [B, T])`` for
    examples and their soft tokens [B, k, d]; labels (-100 elsewhere) on the target and eos
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


def train(model, tokenizer, encode, projector: Projector, examples: list[Example], steps: int = 100,
          batch_size: int = 4, lr: float = 1e-3, seed: int = 0, progress: bool = True,
          deadline: float | None = None, tga: TGA | None = None, max_target: int | None = 32) -> list[float]:
    """Train ``projector`` (everything else frozen) with the language-modelling loss on each
    example's target (plus, with ``tga``, the TGA loss on the soft tokens' hidden states);
    ``encode(texts) -> [N, d_in]`` is the frozen encoder. Examples are drawn in seeded random
    order. Stops after ``steps`` or at ``deadline`` (``time.monotonic()``). Targets are cut to
    ``max_target`` tokens (the start of an answer says what it is; the vocabulary projection of
    every target position is most of a step's cost). Returns the language-modelling loss of every
    step."""
    import contextlib
    import time

    from tqdm.auto import tqdm

    from .tga import layer_weights, tga_loss
    from .torch.layers import capture

    if not examples:
        raise ValueError("no training examples")
    for p in model.parameters():
        p.requires_grad_(False)
    projector.train()
    opt = torch.optim.AdamW(projector.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    contents = sorted({ex.content for ex in examples})
    cache = dict(zip(contents, encode(contents)))  # the encoder is frozen: encode each content once
    losses = []
    bar = tqdm(range(steps), desc="projector", unit="step", disable=not progress)
    for _ in bar:
        pick = [examples[int(i)] for i in torch.randint(len(examples), (batch_size,), generator=g)]
        soft = projector(torch.stack([cache[ex.content] for ex in pick]))
        with capture(model, tga.layers, detach=False) if tga else contextlib.nullcontext() as store:
            loss = target_loss(model, *batch(model, tokenizer, pick, soft, max_target))
        if tga is not None:
            at = len(prompt_ids(tokenizer, pick[0].instruction)[0])  # the soft tokens' first position
            h_img = torch.stack([store[il][:, at:at + projector.k].mean(1) for il in tga.layers])  # [L, B, d]
            h_cap = torch.stack([tga.h_cap[ex.content] for ex in pick], 1)
            h_ret = torch.stack([tga.h_ret[ex.content] for ex in pick], 1)
            extra, _ = tga_loss(h_img, h_cap, h_ret, layer_weights(tga.layers, len(losses), steps, tga.schedule))
        opt.zero_grad()
        (loss if tga is None else loss + extra).backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if deadline is not None and time.monotonic() > deadline:
            break
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
ANSWER = "Answer the request above."


def _benign_train(seed: int) -> list[str]:
    """The training split of the shipped benign prompts (never its held-out parts)."""
    from . import datasets

    return [it["text"] for it in datasets.split(datasets.benign(), datasets.FIT_FRACTIONS, seed)[0]]


def benign_requests(seed: int = 0) -> list[str]:
    """Benign requests for the answer objective: the training split of the shipped benign prompts
    and 300 generated requests (5 tasks x 60 topics)."""
    return _benign_train(seed) + [t.format(topic) for t in TASKS for topic in TOPICS]


def text_prompt(content: str, instruction: str) -> str:
    """The text-only counterpart of a grafted prompt: the content inlined where the graft goes."""
    return f"{content}\n{instruction}"


def distill_answers(model, requests: list[str], out, max_tokens: int = 64, progress: bool = True) -> list[dict]:
    """The model's own greedy answers to each request as text (``text_prompt(request, ANSWER)``),
    appended to the JSONL ``out`` as ``{"content", "answer", "finish"}`` rows; rows already there
    are kept (resumable). Returns every row, in ``requests`` order."""
    from pathlib import Path

    from tqdm.auto import tqdm

    from . import datasets
    from .llama.guarded import GuardedLlama

    out = Path(out)
    done = {r["content"]: r for r in (datasets.read_jsonl(out, required=("content",)) if out.exists() else [])}
    todo = [r for r in dict.fromkeys(requests) if r not in done]
    if todo:
        with GuardedLlama(model, n_ctx=512) as llm:
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
    from . import datasets

    path = answers_path(model)
    if not path.is_file():
        raise FileNotFoundError(f"no distilled answers for {model!r} at {path}: run python -m pyguard.graft answers "
                                f"--model {model} --out {path}")
    rows = datasets.read_jsonl(path, required=("content", "answer", "finish"))
    return answer_examples(rows) + restate_examples(list(dict.fromkeys(benign_requests(seed) + benign_contents(seed))), seed)


def main(argv=None) -> int:
    """``python -m pyguard.graft train``: train a projector for a default model on benign content
    (``training_examples``) within a time budget, with ``--tga`` the TGA loss too, and save it.
    Prints the loss curve's start and end. ``answers``: distil the answers it trains on."""
    import argparse
    import time

    from . import models
    from .methods import describe_model
    from .tga import SentenceEncoder
    from .torch import convert

    ap = argparse.ArgumentParser(prog="python -m pyguard.graft", description=__doc__.split("\n")[0])
    ap.add_argument("action", choices=["train", "answers"],
                    help="train: a projector; answers: distil the model's text answers to the benign requests")
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--out", required=True)
    ap.add_argument("--k", type=int, default=8, help="soft tokens per content")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--steps", type=int, default=300, help="at most this many steps (TGA's weights decay over them)")
    ap.add_argument("--tga", action="store_true", help="add the TGA loss (retrieval among the training contents)")
    ap.add_argument("--minutes", type=float, default=25.0, help="stop after this long and save what is trained")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.action == "answers":
        rows = distill_answers(models.model_path(a.model), benign_requests(a.seed), a.out)
        print(f"{len(rows)} answers in {a.out}")
        return 0
    torch.manual_seed(a.seed)
    model, tok = convert.load(a.model)
    t0 = time.monotonic()
    enc = SentenceEncoder()
    examples = training_examples(a.model, a.seed)
    contents = sorted({e.content for e in examples})
    emb = model.get_input_embeddings().weight.detach()
    proj = Projector(enc.dim, emb.shape[1], k=a.k, hidden=a.hidden)
    proj.match_scale(emb.pow(2).mean().sqrt().item(), enc.encode(contents[:64]))
    tga = TGA.build(model, tok, contents, enc) if a.tga else None
    losses = train(model, tok, enc.encode, proj, examples, a.steps, a.batch_size, a.lr, a.seed,
                   deadline=t0 + a.minutes * 60, tga=tga)
    cfg = model.config
    proj.save(a.out, half=True, model_hint=describe_model(cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size),
              encoder="all-MiniLM-L6-v2", objective="answer+restate" + ("+tga" if a.tga else ""), steps=len(losses),
              seed=a.seed, examples=len(examples))
    n = max(1, len(losses) // 10)
    print(f"{len(losses)} steps in {(time.monotonic() - t0) / 60:.1f} min; loss {sum(losses[:n]) / n:.3f} (first "
          f"{n}) -> {sum(losses[-n:]) / n:.3f} (last {n}); wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
