"""Where a guarded model comes from: one place that opens a default model name, a .gguf file
(llama.cpp, ``GuardedLlama``) or a Hugging Face folder (PyTorch, ``GuardedModel``). ``chat``,
``eval``, ``serve``, ``bench``, the judges and calibration all open models through
:class:`Runtime`."""
from __future__ import annotations

import functools
from pathlib import Path


from .methods import CMRM


def locate(model) -> tuple[str, Path]:
    """("gguf", file) for a default model name or a .gguf path, ("hf", folder) for a Hugging Face
    folder; FileNotFoundError naming the model otherwise."""
    from . import models

    if model in models.MODELS or str(model).endswith(".gguf"):
        path = models.model_path(model) if model in models.MODELS else Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"no such model file: {path}")
        return "gguf", path
    folder = Path(model)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{model}: not a default model name, a .gguf file or a Hugging Face folder")
    return "hf", folder


def model_key(kind: str, path: Path) -> str:
    """A cache key for a located model: file name and size (GGUF) or folder name (HF)."""
    return f"gguf-{path.name}-{path.stat().st_size}" if kind == "gguf" else f"hf-{path.resolve().name}"


def hf_model(folder: Path):
    """(model, processor or tokenizer) of a Hugging Face folder: a LLaVA-style model with its
    processor when the config has a vision tower, else a causal LM with its tokenizer."""
    import transformers

    vision = getattr(transformers.AutoConfig.from_pretrained(folder), "vision_config", None) is not None
    cls = transformers.AutoModelForImageTextToText if vision else transformers.AutoModelForCausalLM
    proc = (transformers.AutoProcessor if vision else transformers.AutoTokenizer).from_pretrained(folder)
    return cls.from_pretrained(folder).eval(), proc


class Runtime:
    """A located model, opened with any methods: GuardedLlama for a .gguf (or default model
    name), the PyTorch GuardedModel for a Hugging Face folder (its weights loaded once, shared by
    every guard opened). ``graft``: a projector file or ``pyguard.graft.Graft``."""

    def __init__(self, model, mmproj=None, n_ctx: int = 4096, graft=None):
        self.kind, self.path = locate(model)
        self.mmproj, self.n_ctx = mmproj, n_ctx
        if mmproj is not None and self.kind != "gguf":
            raise ValueError("--mmproj goes with a .gguf model; a Hugging Face folder brings its own vision tower")
        if graft is not None:
            from .graft import Graft

            graft = Graft.of(graft)
        self.graft = graft  # a pyguard.graft.Graft for "graft" items, loaded once
        self._hf = None

    @property
    def key(self) -> str:
        return model_key(self.kind, self.path)

    @functools.cached_property
    def shape(self) -> tuple[int, int]:
        """(n_layer, n_embd) of the model."""
        if self.kind == "gguf":
            from .llama.engine import model_shape

            return model_shape(self.path)
        import transformers

        cfg = transformers.AutoConfig.from_pretrained(self.path).get_text_config()
        return cfg.num_hidden_layers, cfg.hidden_size

    def open(self, parallel: int = 1, max_queue: int = 0, capture_layer=None, **methods):
        """A guarded model with ``methods`` (coca=, cmrm=, casa=, cascade=); cmrm="sample" is
        sized here. ``parallel`` requests batched and ``max_queue`` waiting at most (a .gguf
        model only); ``capture_layer``: the layer(s) :meth:`states` reads (llama.cpp captures
        them while decoding; PyTorch hooks any layer when asked)."""
        if isinstance(methods.get("cmrm"), str):
            methods["cmrm"] = CMRM.sample(*self.shape)
        if self.kind == "gguf":
            from .llama import GuardedLlama

            return GuardedLlama(self.path, mmproj_path=self.mmproj, n_ctx=self.n_ctx, graft=self.graft,
                                parallel=parallel, max_queue=max_queue, capture_layer=capture_layer, **methods)
        if parallel != 1 or max_queue:
            raise ValueError("parallel requests are batched on the llama.cpp runtime: serve a .gguf model")
        from .torch import guard

        if self._hf is None:
            self._hf = hf_model(self.path)
        return guard(*self._hf, graft=self.graft, **methods)

    def last_turn_rows(self, conversations: list) -> list[int]:
        """For each chat (a messages list), the prompt position where its last user message's
        content starts: the first row a CASA module with rows "last-turn" reads."""
        g = self.open()
        try:
            return [g.last_turn_row(m) for m in conversations]
        finally:
            g.close()

    def states(self, layers: list[int]):
        """(``messages -> ({layer: float32 [T, d]}, text mask bool [T])``, the opened guard, to
        close): the prompt hidden states of ``layers`` as CASA and CMRM calibration read them."""
        layers = [int(il) for il in layers]
        g = self.open(capture_layer=layers[0] if len(layers) == 1 else layers)
        if self.kind == "gguf":
            def fn(messages):
                states, mask = g.prompt_states(messages, with_mask=True)
                return (states if isinstance(states, dict) else {layers[0]: states}), mask
        else:
            def fn(messages):
                states, mask = g.prompt_states(messages, layers, with_mask=True)
                return {il: h.float().cpu().numpy() for il, h in states.items()}, mask.numpy().astype(bool)
        return fn, g
