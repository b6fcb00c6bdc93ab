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
- ``hf_embeds``: the Hugging Face route, ``inputs_embeds`` [1, T, d] for ``model(inputs_embeds=)``.
- ``llama_prefill``: the llama.cpp route, tokens and soft tokens decoded into one sequence
  (``Engine.decode_embd``).
- ``train``: the projector trained on (content, instruction, target) examples with the language
  modelling loss on the target, everything else frozen.
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


def llama_prefill(engine, before: list[int], soft: np.ndarray, after: list[int], seq: int = 0) -> int:
    """Decode ``before`` tokens, the soft tokens [k, n_embd] and ``after`` tokens into sequence
    ``seq`` from position 0; the last row's logits are then ``engine.logits(-1)``. Returns the
    next position."""
    soft = np.asarray(soft, dtype=np.float32)
    pos = 0
    if before:
        engine.decode([(t, i, seq, False) for i, t in enumerate(before)])
        pos = len(before)
    engine.decode_embd(soft, pos, seq, want_last=not after)
    pos += len(soft)
    if after:
        engine.decode([(t, pos + i, seq, i == len(after) - 1) for i, t in enumerate(after)])
        pos += len(after)
    return pos


# ----------------------------------------------------------------------------- training
@dataclass
class Example:
    """One training example: the content (the grafted input), the text instruction after it and
    the target answer."""

    content: str
    instruction: str
    target: str


def prompt_ids(tokenizer, instruction: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat prompt before and after the content's place, for a user message
    ``MARKER`` + newline + ``instruction`` (with the generation prompt)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": f"{MARKER}\n{instruction}"}],
                                         add_generation_prompt=True, tokenize=False)
    before, after = split(text)
    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    return enc(before), enc(after)


def batch(model, tokenizer, examples: list[Example], soft: torch.Tensor):
    """Right-padded ``(inputs_embeds [B, T, d], attention_mask [B, T], labels [B, T])`` for
    examples and their soft tokens [B, k, d]; labels (-100 elsewhere) on the target and eos."""
    emb = model.get_input_embeddings()
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    rows = []
    for ex, s in zip(examples, soft):
        before, after = prompt_ids(tokenizer, ex.instruction)
        target = tokenizer(ex.target, add_special_tokens=False)["input_ids"] + eos
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


def train(model, tokenizer, encode, projector: Projector, examples: list[Example], steps: int = 100,
          batch_size: int = 4, lr: float = 1e-3, seed: int = 0, progress: bool = True,
          deadline: float | None = None) -> list[float]:
    """Train ``projector`` (everything else frozen) with the language-modelling loss on each
    example's target; ``encode(texts) -> [N, d_in]`` is the frozen encoder. Examples are drawn in
    seeded random order. Stops after ``steps`` or at ``deadline`` (``time.monotonic()``).
    Returns the loss of every step."""
    import time

    from tqdm.auto import tqdm

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
        loss = target_loss(model, *batch(model, tokenizer, pick, soft))
        opt.zero_grad()
        loss.backward()
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


def benign_contents(seed: int = 0) -> list[str]:
    """Benign content strings for training the projector: the training split of the shipped
    benign prompts (never its held-out part) and 300 generated descriptive sentences."""
    from . import datasets

    train = [it["text"] for it in datasets.split(datasets.benign(), datasets.FIT_FRACTIONS, seed)[0]]
    made = [f"{s} {p}." for s in SUBJECTS for p in PREDICATES]
    return train + made


def restate_examples(contents: list[str]) -> list[Example]:
    """Each content with each restating instruction; the target is the content itself."""
    return [Example(c, ins, c) for c in contents for ins in INSTRUCTIONS]


def main(argv=None) -> int:
    """``python -m pyguard.graft train``: train a projector for a default model on benign content
    within a time budget, save it. Prints the loss curve's start and end."""
    import argparse
    import time

    from . import models
    from .methods import describe_model
    from .tga import SentenceEncoder
    from .torch import convert

    ap = argparse.ArgumentParser(prog="python -m pyguard.graft", description=__doc__.split("\n")[0])
    ap.add_argument("action", choices=["train"])
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--out", required=True)
    ap.add_argument("--k", type=int, default=4, help="soft tokens per content")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--minutes", type=float, default=25.0, help="stop after this long and save what is trained")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)
    model, tok = convert.load(a.model)
    enc = SentenceEncoder()
    examples = restate_examples(benign_contents(a.seed))
    emb = model.get_input_embeddings().weight.detach()
    proj = Projector(enc.dim, emb.shape[1], k=a.k, hidden=a.hidden)
    proj.match_scale(emb.pow(2).mean().sqrt().item(), enc.encode(sorted({e.content for e in examples})[:64]))
    t0 = time.monotonic()
    losses = train(model, tok, enc.encode, proj, examples, a.steps, a.batch_size, a.lr, a.seed,
                   deadline=t0 + a.minutes * 60)
    cfg = model.config
    proj.save(a.out, half=True, model_hint=describe_model(cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size),
              encoder="all-MiniLM-L6-v2", objective="restate", steps=len(losses), seed=a.seed)
    n = max(1, len(losses) // 10)
    print(f"{len(losses)} steps in {(time.monotonic() - t0) / 60:.1f} min; loss {sum(losses[:n]) / n:.3f} (first "
          f"{n}) -> {sum(losses[-n:]) / n:.3f} (last {n}); wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
