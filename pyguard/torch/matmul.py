"""A layout choice for CPU decode steps of a few rows: ``y = (W @ x.T).T`` instead of
``x @ W.T``. On the machines measured (MKL in the torch CPU wheel, AMD EPYC), ``F.linear`` with
2-8 rows costs 2-3x one row, while the transposed product of 2-4 rows costs about as much as one
row (benchmarks/RESULTS.md). CoCA's batch-of-two decode steps use it."""
from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F

MAX_ROWS = 8


def linear_t(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, b)`` (x [..., i], w [o, i]), computed as ``(w @ x.T).T`` for float32 CPU
    inputs of 2..MAX_ROWS rows; F.linear itself otherwise."""
    rows = x.numel() // x.shape[-1] if x.ndim and x.shape[-1] else 0
    if not (2 <= rows <= MAX_ROWS and x.device.type == "cpu" and x.dtype == w.dtype == torch.float32):
        return F.linear(x, w, b)
    y = (w @ x.reshape(rows, x.shape[-1]).T).T
    if b is not None:
        y = y + b
    return y.reshape(*x.shape[:-1], w.shape[0])


def _forward(self, x):
    return linear_t(x, self.weight, self.bias)


def plain_linears(model: torch.nn.Module) -> list:
    """The model's ``torch.nn.Linear`` modules (exactly that class: quantized subclasses are left alone)."""
    return [m for m in model.modules() if type(m) is torch.nn.Linear]


@contextlib.contextmanager
def transposed(linears: list):
    """Within the block, these Linear modules compute through :func:`linear_t`; their own
    ``forward`` is back on exit."""
    for m in linears:
        m.forward = types.MethodType(_forward, m)
    try:
        yield
    finally:
        for m in linears:
            m.__dict__.pop("forward", None)
