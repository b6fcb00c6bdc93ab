"""Decoder layers of a Hugging Face model, found through the model's own accessors, and a
reusable capture of their outputs (the residual stream) by forward hooks. Shared by CASA, CMRM
and calibration."""
from __future__ import annotations

import contextlib

import torch


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a causal LM or a LLaVA-style VLM (``get_decoder()``, followed until a
    module with ``layers``). TypeError naming the class when there is none."""
    seen, m = set(), model
    while id(m) not in seen:
        seen.add(id(m))
        layers = getattr(m, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return layers
        get = getattr(m, "get_decoder", None)
        if get is None:
            break
        m = get()
    raise TypeError(f"pyguard cannot find the decoder layers of {type(model).__name__}: it supports models "
                    "whose get_decoder() leads to a module with .layers (llama, qwen2, mistral, gemma, llava)")


def layer_output(output) -> torch.Tensor:
    """A decoder layer's hidden states [B, T, d] from its forward output (tensor or tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def capture(model: torch.nn.Module, layers: list[int], detach: bool = True):
    """Within the block, ``store[il]`` holds the output [B, T, d] of decoder layer il from the most
    recent forward (detached, or with its graph for training when ``detach=False``). The hooks are
    removed on exit."""
    blocks = decoder_layers(model)
    bad = [il for il in layers if not 0 <= il < len(blocks)]
    if bad:
        raise ValueError(f"layers {bad} are outside the model's {len(blocks)} decoder layers")
    store: dict[int, torch.Tensor] = {}

    def hook(il):
        def fn(_module, _args, output):
            h = layer_output(output)
            store[il] = h.detach() if detach else h
        return fn

    handles = [blocks[il].register_forward_hook(hook(il)) for il in layers]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()
