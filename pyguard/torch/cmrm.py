"""CMRM on Hugging Face models: forward hooks that shift decoder-layer outputs in place with
``pyguard.ops.cmrm_shift_`` (C++ on the CPU, Triton on CUDA) on the rows of image-conditioned
requests."""
from __future__ import annotations

import contextlib

import torch

from .. import ops
from .layers import decoder_layers, layer_output


class RowSelector:
    """Which batch rows are shifted, given with :meth:`set` when the batch's rows change: ``on`` a
    list of bools (None: all rows) and ``per_row``, None (the CMRM's vectors for every row) or
    [B, n_layer, d], each row's own. The hooks read them through :meth:`rows` and
    :meth:`vectors`, copied once to each device the layers run on (a model split across devices
    has several)."""

    def __init__(self):
        self.set(None)

    def set(self, on: list | None, per_row: torch.Tensor | None = None) -> None:
        self.on, self.per_row, self._copies = None if on is None else list(on), per_row, {}

    def _copy(self, what: str, device, dtype=None):
        key = (what, device, dtype)
        if key not in self._copies:
            self._copies[key] = (torch.tensor(self.on, dtype=torch.bool, device=device) if what == "rows"
                                 else self.per_row.to(device, dtype))
        return self._copies[key]

    def rows(self, device) -> torch.Tensor | None:
        """``on`` as a bool [B] on ``device`` (None: all rows)."""
        return None if self.on is None else self._copy("rows", device)

    def vectors(self, device, dtype) -> torch.Tensor:
        """``per_row`` on ``device`` in ``dtype``."""
        return self._copy("vectors", device, dtype)


def check_vectors(model: torch.nn.Module, cmrm) -> torch.nn.ModuleList:
    """The model's decoder layers; ValueError unless the CMRM vectors are [n_layer, hidden size]."""
    blocks = decoder_layers(model)
    cmrm.check_model(model.config.get_text_config().hidden_size, len(blocks))
    return blocks


@contextlib.contextmanager
def shift_layers(model: torch.nn.Module, cmrm, select: RowSelector | None = None):
    """Within the block, the output of every decoder layer il in the CMRM layer range becomes
    ``h - alpha * vectors[il]`` on the selected batch rows (every position). The vectors must
    match the model (n_layer, hidden size): ValueError otherwise. Hooks are removed on exit.
    In-place: for inference (torch.no_grad), not for training."""
    blocks = check_vectors(model, cmrm)
    d = cmrm.n_embd
    start, end = cmrm.layers or (0, len(blocks) - 1)
    select = select or RowSelector()
    alpha = float(cmrm.alpha)  # finite: checked when the CMRM was built
    table = {}

    def hook(il):
        def fn(_module, _args, output):  # no validation, no host reads: one launch per layer
            h = layer_output(output)
            key = (h.device, h.dtype)
            if key not in table:
                table[key] = torch.tensor(cmrm.vectors, device=h.device, dtype=h.dtype)
            B, T, _ = h.shape
            if select.per_row is not None:  # sample-level CMRM: each row its own vectors
                per_row = select.vectors(h.device, h.dtype)
                for b in range(B):
                    if select.on is None or select.on[b]:
                        ops._cmrm_shift_(h[b], per_row[b, il], alpha)
                return
            rows = select.rows(h.device)
            rows = None if rows is None else rows[:, None].expand(B, T).contiguous().view(B * T)
            ops._cmrm_shift_(h.view(B * T, d), table[key][il], alpha, rows)
        return fn

    handles = [blocks[il].register_forward_hook(hook(il)) for il in range(start, end + 1)]
    try:
        yield select
    finally:
        for h in handles:
            h.remove()
