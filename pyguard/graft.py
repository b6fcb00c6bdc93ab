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
"""
from __future__ import annotations

import os

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

    def config(self) -> dict:
        return {"d_in": self.d_in, "d_out": self.d_out, "k": self.k, "hidden": self.hidden}

    def save(self, path, **meta) -> None:
        """Write ``path`` (.safetensors): the weights, the shape and ``meta`` (e.g. model_hint)."""
        from safetensors.torch import save_file

        info = {k: str(v) for k, v in self.config().items()} | {k: str(v) for k, v in meta.items()}
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, os.fspath(path), metadata=info)

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
            p.load_state_dict(tensors)
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
