"""A layout choice for CPU decode steps of a few rows: ``y = (W @ x.T).T`` instead of
``x @ W.T``. On the machines measured (MKL in the torch CPU wheel, AMD EPYC), ``F.linear`` with
2-8 rows is 2-3x slower than one row, while the transposed product of 2-4 rows costs about as
much as one row (benchmarks/RESULTS.md). CoCA's batch-of-two decode steps use it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

MAX_ROWS = 8


class SmallBatchLinear(TorchFunctionMode):
    """Within the block (this thread only), ``F.linear`` on float32 CPU inputs with 2..MAX_ROWS
    rows is computed as ``(W @ x.T).T``; everything else is untouched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            rows = x.numel() // x.shape[-1] if x.ndim and x.shape[-1] else 0
            if 2 <= rows <= MAX_ROWS and x.device.type == "cpu" and x.dtype == w.dtype == torch.float32:
                y = (w @ x.reshape(rows, x.shape[-1]).T).T
                if b is not None:
                    y = y + b
                return y.reshape(*x.shape[:-1], w.shape[0])
        return func(*args, **kwargs)
