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
    list of bools (host), ``rows`` the same as a bool [B] tensor on the model's device (None: all
    rows). ``per_row``: None (the CMRM's vectors for every row) or [B, n_layer, d] on the model's
    device and dtype, each row's own."""

    on: list | None = None
    rows: torch.Tensor | None = None
    per_row: torch.Tensor | None = None

    def set(self, on: list, device) -> None:
        """The rows to shift (one copy to the device: call it when they change, not per layer)."""
        self.on, self.rows = list(on), torch.tensor(on, dtype=torch.bool, device=device)


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
                for b in range(B):
                    if select.on is None or select.on[b]:
                        ops._cmrm_shift_(h[b], select.per_row[b, il], alpha)
                return
            rows = None if select.rows is None else select.rows[:, None].expand(B, T).contiguous().view(B * T)
            ops._cmrm_shift_(h.view(B * T, d), table[key][il], alpha, rows)
        return fn

    handles = [blocks[il].register_forward_hook(hook(il)) for il in range(start, end + 1)]
    try:
        yield select
    finally:
        for h in handles:
            h.remove()
