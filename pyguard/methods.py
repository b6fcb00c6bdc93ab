"""Plain config objects for the three inference-time methods (CoCA, CMRM, CASA) and their files.

Shared by the llama.cpp and PyTorch runtimes. Needs numpy only: ``gguf`` and ``safetensors`` are
imported when a file of that kind is read or written. Invalid values raise ``ValueError`` naming
the field and the value; reading a missing file raises ``FileNotFoundError``, an unreadable one
``ValueError`` naming the path.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np

from . import extras, ops
from .reference import is_torch

__all__ = ["CoCA", "CMRM", "CASA", "Cascade", "DEFAULT_PRINCIPLE", "DEFAULT_REFUSAL"]

DEFAULT_PRINCIPLE = (
    "The assistant should answer in a harmless, ethical and inoffensive manner. "
    "The assistant cannot provide answers related to illegal activities."
)
DEFAULT_REFUSAL = "I'm sorry, but I can't help with that."


# ----------------------------------------------------------------------------- helpers
def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _finite(name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number, got {x!r}")
    return float(x)


def _int(name: str, x, lo: int) -> int:
    if not _is_int(x) or x < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {x!r}")
    return int(x)


def _choice(name: str, x, options: tuple) -> str:
    if x not in options:
        raise ValueError(f"{name} must be one of {options}, got {x!r}")
    return x


def _text(name: str, x, empty_ok: bool = True) -> str:
    if not isinstance(x, str) or (not empty_ok and not x):
        raise ValueError(f"{name} must be a {'' if empty_ok else 'non-empty '}string, got {x!r}")
    return x


def _matrix(name: str, x, ndim: int) -> np.ndarray:
    """x as a read-only, C-contiguous float32 copy with ndim dims, all >= 1, all finite."""
    try:
        a = np.array(x, dtype=np.float32, order="C")
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a float32 array, got {type(x).__name__} ({e})") from e
    if a.ndim != ndim or 0 in a.shape:
        raise ValueError(f"{name} must be a non-empty {ndim}-D array, got shape {a.shape}")
    bad = np.argwhere(~np.isfinite(a))
    if bad.size:
        i = tuple(bad[0].tolist())
        raise ValueError(f"{name}[{', '.join(map(str, i))}] = {a[i]} is not finite")
    a.setflags(write=False)
    return a


def _same(a, b) -> bool:
    """Equality that compares arrays by value (also inside dicts)."""
    if isinstance(a, dict) or isinstance(b, dict):
        return (isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys()
                and all(_same(a[k], b[k]) for k in a))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(a, b)
    return a == b


class _ValueEq:
    """== on all dataclass fields, arrays by value."""

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return all(_same(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self) if f.compare)

    __hash__ = None


def _extension(path, kinds: tuple, what: str) -> str:
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in kinds:
        raise ValueError(f"{what} files end in {' or '.join(kinds)}, got {os.fspath(path)!r}")
    return ext


def _load(path, what: str, parse):
    """parse(path) -> object, with a missing file as FileNotFoundError and any other failure as
    ValueError naming the path."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such {what} file: {path!r}")
    try:
        return parse(path)
    except ImportError:
        raise
    except Exception as e:
        raise ValueError(f"{path!r} is not a valid {what} file: {e}") from e


# A model's identity as pyguard writes it into ``model_hint``: llama.cpp's convention (the
# architecture, as cvector-generator writes it) followed by the shape, e.g.
# "qwen2 n_layer=24 n_embd=896 n_vocab=151936". Hugging Face model types that llama.cpp converts to
# another architecture are mapped to it, so one file serves both runtimes.
_ARCH_ALIAS = {"mistral": "llama"}
_HINT_KEYS = ("n_layer", "n_embd", "n_vocab")


def describe_model(arch: str, n_layer: int, n_embd: int, n_vocab: int) -> str:
    """The ``model_hint`` for a model: ``"<arch> n_layer=.. n_embd=.. n_vocab=.."``."""
    return f"{_ARCH_ALIAS.get(arch, arch)} n_layer={n_layer} n_embd={n_embd} n_vocab={n_vocab}"


def _parse_hint(hint: str) -> dict:
    """The fields a hint states: its first word as ``arch`` when it looks like an architecture name
    (lower-case letters, digits, underscores), and ``key=int`` words. Free text states nothing."""
    words = hint.split()
    out = {}
    if words and re.fullmatch(r"[a-z][a-z0-9_]*", words[0]):
        out["arch"] = words[0]
    for w in words[1:]:
        k, eq, v = w.partition("=")
        if eq and k in _HINT_KEYS and v.isdecimal():
            out[k] = int(v)
    return out


def _check_hint(obj, what: str, model: dict) -> None:
    """ValueError naming the file when ``obj.model_hint`` states an architecture or size that
    ``model`` ({"arch", "n_layer", "n_embd", "n_vocab"}; None values unknown) contradicts."""
    stated = _parse_hint(obj.model_hint)
    model = {k: (_ARCH_ALIAS.get(v, v) if k == "arch" else v) for k, v in model.items() if v is not None}
    bad = [k for k in stated if k in model and stated[k] != model[k]]
    if bad:
        mine = describe_model(*(model.get(k, "?") for k in ("arch", *_HINT_KEYS)))
        raise ValueError(f"{what}{_from(obj)} were fitted on another model: its model_hint is "
                         f"{obj.model_hint!r}, the model is {mine!r} ({', '.join(bad)} differ)")


def check_fits(obj, model_hint: str) -> None:
    """``obj.check_model`` against a model described by ``describe_model``'s string (the
    ``model_hint`` of a guarded model): ValueError naming obj's file when it was fitted elsewhere."""
    m = _parse_hint(model_hint)
    obj.check_model(m["n_embd"], m["n_layer"], m.get("arch"), m.get("n_vocab"))


def _from(obj) -> str:
    return f" from {obj.source!r}" if obj.source else ""


def _read_safetensors(path: str):
    """-> (tensors {name: array}, metadata {str: str})."""
    safetensors = extras.need("safetensors", "llama")
    with safetensors.safe_open(path, framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _write_safetensors(path, tensors: dict, meta: dict):
    extras.need("safetensors.numpy", "llama").save_file(tensors, os.fspath(path), metadata=meta)


def _tensor(tensors: dict, name: str, ndim: int) -> np.ndarray:
    if name not in tensors:
        raise ValueError(f"no tensor {name!r} (has {sorted(tensors)})")
    t = np.asarray(tensors[name])
    if t.dtype != np.float32 or t.ndim != ndim:
        raise ValueError(f"tensor {name!r} must be float32 {ndim}-D, got {t.dtype} {t.shape}")
    return t


# ----------------------------------------------------------------------------- CoCA
@dataclass(frozen=True)
class CoCA:
    """Constitutional calibration: decode the prompt with and without a safety principle and use
    ``l = l_base + alpha * (l_safe - l_base)``.

    alpha: 0 is the unguarded model, 1 plain safety prompting, > 1 amplifies. (One public
    re-implementation writes ``l_safe + a * (l_safe - l_base)``: that is our ``alpha = 1 + a``.)
    principle: text added to the safe sequence, always after any image; principle_position:
    ``"before"`` or ``"after"`` the user text. gate_kl: None (never gate), or drop the safe
    sequence when KL(p_safe || p_base) stayed below it for the first ``gate_tokens`` steps.
    """

    alpha: float = 1.5
    principle: str = DEFAULT_PRINCIPLE
    principle_position: str = "after"
    gate_kl: Optional[float] = None
    gate_tokens: int = 8

    def __post_init__(self):
        _finite("alpha", self.alpha)
        _text("principle", self.principle, empty_ok=False)
        _choice("principle_position", self.principle_position, ("before", "after"))
        if self.gate_kl is not None and _finite("gate_kl", self.gate_kl) < 0:
            raise ValueError(f"gate_kl must be None or >= 0, got {self.gate_kl!r}")
        _int("gate_tokens", self.gate_tokens, 1)


# ----------------------------------------------------------------------------- CMRM
# llama.cpp control vectors, read from its source (ggml-org/llama.cpp):
# - src/llama-adapter.cpp, llama_adapter_cvec::init: `tensors[0] = nullptr` ("there's never a
#   tensor for layer 0"), one F32 [n_embd] tensor for each il = 1 .. n_layer-1.
# - llama_adapter_cvec::apply(data, len, n_embd, il_start, il_end): for il = 1 .. n_layer-1 copies
#   `data + n_embd*(il-1)` into tensors[il] when `off + n_embd <= len` (len counts floats; layers
#   past a short buffer keep their old contents). So the buffer of llama_set_adapter_cvec is
#   [n_layer-1, n_embd] row-major, row 0 = layer 1 ("data should point to an n_embd x n_layers
#   buffer starting from layer 1", include/llama.h).
# - tensor_for(il) returns nullptr for il < layer_start or il > layer_end (both inclusive) and for
#   layer 0; apply_to(ctx, cur, il) does `cur = ggml_add(cur, tensors[il])`. Every model graph
#   (src/models/*.cpp) calls `cur = build_cvec(cur, il); cb(cur, "l_out", il);` at the end of
#   block il, so tensors[il] is ADDED to the residual-stream output of 0-based layer il, the
#   tensor llama.cpp names `l_out-<il>`. Layer 0's output can never be shifted.
# - common/common.cpp, common_control_vector_load_one: tensor `direction.<k>` (F32, 1-D, same
#   n_embd for all, k = 0 rejected as invalid) goes to buffer offset n_embd*(k-1), scaled by the
#   strength (`--control-vector-scaled FILE S`); missing k stay zero. Hence direction.k is added
#   to l_out-k: k IS the 0-based layer index il. common_init_from_params uses il_start = 1 and
#   il_end = n_layer by default.
# - tools/cvector-generator/cvector-generator.cpp, export_gguf: general.architecture =
#   "controlvector", controlvector.model_hint = the model's architecture, controlvector.layer_count
#   (i32) = number of tensors (n_layer - 1). Its mean.hpp / pca.hpp name the vector computed from
#   the i-th captured l_out (i = 0 ..) `direction.<i+1>`, so the generator's own vectors act one
#   layer after where they were measured; the loader's rule above is what we follow.
# Here row il of CMRM.vectors is the shift of l_out-<il> and is written as direction.<il>.
_CVEC_ARCH = "controlvector"
_CMRM_META = {"alpha": float, "layers": json.loads, "when": str, "model_hint": str, "mode": str}


@dataclass(frozen=True, eq=False)
class CMRM(_ValueEq):
    """Cross-modal representation manipulation: ``h_il -= alpha * vectors[il]`` on the
    residual-stream output of decoder layer il (llama.cpp's ``l_out-<il>``, HF's decoder-layer
    output).

    vectors: float32 [n_layer, n_embd], row il for 0-based layer il; alpha: finite;
    layers: None (all) or an inclusive (start, end) in [0, n_layer); when: ``"image"`` (only
    requests with an image) or ``"always"``; model_hint: the model it was fitted on
    (``describe_model``; llama.cpp's files hold the architecture only; free text is not checked).
    mode: ``"dataset"`` (these vectors) or ``"sample"``: per request with an image, the vectors are
    that request's own shift, its prompt's last-token layer outputs minus those of the same prompt
    with the image removed (two extra prefills; layer 0 is left unshifted, as llama.cpp must);
    ``vectors`` then only gives the shape and may be zeros (``CMRM.sample(n_layer, n_embd)``).
    """

    vectors: np.ndarray
    alpha: float = 1.0
    layers: Optional[Tuple[int, int]] = None
    when: str = "image"
    model_hint: str = ""
    mode: str = "dataset"
    source: str = field(default="", compare=False, repr=False)  # the file it was loaded from

    @classmethod
    def sample(cls, n_layer: int, n_embd: int, **kw) -> "CMRM":
        """Sample-level CMRM for a model with n_layer layers of n_embd."""
        return cls(np.zeros((_int("n_layer", n_layer, 1), _int("n_embd", n_embd, 1)), np.float32), mode="sample", **kw)

    def for_request(self, mm_last: np.ndarray, text_last: np.ndarray) -> "CMRM":
        """The dataset-mode CMRM of one request: vectors = mm_last - text_last ([n_layer, n_embd]:
        each layer's output at the last prompt token with and without the image), layer 0 zero."""
        v = np.asarray(mm_last, np.float32) - np.asarray(text_last, np.float32)
        if v.shape != self.vectors.shape:
            raise ValueError(f"sample vectors have shape {v.shape}, the CMRM is for {self.vectors.shape}")
        v[0] = 0.0
        return dataclasses.replace(self, vectors=v, mode="dataset")

    def __post_init__(self):
        object.__setattr__(self, "vectors", _matrix("vectors", self.vectors, 2))
        object.__setattr__(self, "alpha", _finite("alpha", self.alpha))
        if self.layers is not None:
            n = self.n_layer
            ok = isinstance(self.layers, (tuple, list)) and len(self.layers) == 2 and all(map(_is_int, self.layers))
            if not ok or not 0 <= self.layers[0] <= self.layers[1] < n:
                raise ValueError(
                    f"layers must be None or (start, end) with 0 <= start <= end < {n}, got {self.layers!r}"
                )
            object.__setattr__(self, "layers", (int(self.layers[0]), int(self.layers[1])))
        _choice("when", self.when, ("image", "always"))
        _text("model_hint", self.model_hint)
        _choice("mode", self.mode, ("dataset", "sample"))

    @property
    def n_layer(self) -> int:
        return self.vectors.shape[0]

    @property
    def n_embd(self) -> int:
        return self.vectors.shape[1]

    def _range(self) -> Tuple[int, int]:
        """The inclusive layer range; ValueError if it holds a nonzero layer-0 vector, which a
        llama.cpp control vector cannot apply."""
        start, end = self.layers or (0, self.n_layer - 1)
        if start == 0 and self.vectors[0].any():
            raise ValueError(
                f"CMRM layers ({start}, {end}) include layer 0 with a nonzero vector, but llama.cpp "
                "cannot shift layer 0 (control vectors start at layer 1): start layers at 1 or zero vectors[0]"
            )
        return start, end

    def check_model(self, n_embd: int, n_layer: int, arch: str | None = None, n_vocab: int | None = None):
        """ValueError naming the file unless the vectors are [n_layer, n_embd] and the model_hint
        agrees with the model's architecture and vocabulary size (when given)."""
        if (n_layer, n_embd) != self.vectors.shape:
            raise ValueError(f"CMRM vectors{_from(self)} are for n_embd={self.n_embd}, n_layer={self.n_layer}; "
                             f"the model has n_embd={n_embd}, n_layer={n_layer}")
        _check_hint(self, "CMRM vectors", {"arch": arch, "n_layer": n_layer, "n_embd": n_embd, "n_vocab": n_vocab})

    def cvec_buffer(self, n_layer: int, n_embd: int):
        """Arguments for ``llama_set_adapter_cvec(ctx, data, len, n_embd, il_start, il_end)``.

        Returns (data, il_start, il_end): data is float32 C-contiguous [(n_layer-1) * n_embd], row
        il-1 = ``-alpha * vectors[il]`` (llama.cpp adds it, so the shift is subtracted), and the
        inclusive layer range, clamped to start at 1.
        """
        self.check_model(n_embd, n_layer)
        start, end = self._range()
        data = np.ascontiguousarray(self.vectors[1:] * np.float32(-self.alpha)).reshape(-1)
        return data, max(start, 1), end

    def row_shift(self, n_layer: int, n_embd: int):
        """Arguments for ``LayerCapture.set_shift(vectors, alpha, first, last)``: the shift of
        :meth:`cvec_buffer` (same layers, same float32 arithmetic) on chosen rows only."""
        self.check_model(n_embd, n_layer)
        start, end = self._range()
        return self.vectors, self.alpha, max(start, 1), end

    # -- files
    @classmethod
    def load(cls, path, **overrides) -> "CMRM":
        """Read a ``.gguf`` (llama.cpp control vector: missing layers and layer 0 are zero rows,
        n_layer = max(controlvector.layer_count, highest direction) + 1) or ``.safetensors`` file;
        overrides replace fields read from it (e.g. ``alpha=0.5``)."""
        ext = _extension(path, (".gguf", ".safetensors"), "CMRM")
        parse = cls._parse_gguf if ext == ".gguf" else cls._parse_safetensors
        return dataclasses.replace(_load(path, "CMRM " + ext, parse), source=os.fspath(path), **overrides)

    def save(self, path):
        """Write ``.gguf`` (``direction.<il>`` for il = 1 .. n_layer-1, plus our alpha, layers and
        when under ``pyguard.cmrm.*``; the format has no layer 0, so a nonzero ``vectors[0]`` is
        an error inside ``layers`` and dropped outside) or ``.safetensors``."""
        if _extension(path, (".gguf", ".safetensors"), "CMRM") == ".gguf":
            self._save_gguf(path)
        else:
            _write_safetensors(path, {"vectors": self.vectors}, self._meta())

    def _meta(self) -> dict:
        return {"alpha": str(self.alpha), "layers": json.dumps(self.layers and list(self.layers)),
                "when": self.when, "model_hint": self.model_hint, "mode": self.mode}

    @classmethod
    def _parse_safetensors(cls, path: str) -> "CMRM":
        tensors, meta = _read_safetensors(path)
        kwargs = {k: conv(meta[k]) for k, conv in _CMRM_META.items() if k in meta}
        return cls(_tensor(tensors, "vectors", 2), **kwargs)

    def _save_gguf(self, path):
        if self.n_layer < 2:
            raise ValueError(f"a control vector needs n_layer >= 2 (layer 0 is never stored), got {self.n_layer}")
        self._range()
        gguf = extras.need("gguf", "llama")
        w = gguf.GGUFWriter(os.fspath(path), arch=_CVEC_ARCH)  # writes general.architecture
        w.add_string(f"{_CVEC_ARCH}.model_hint", self.model_hint)
        w.add_int32(f"{_CVEC_ARCH}.layer_count", self.n_layer - 1)
        # ours, ignored by llama.cpp
        w.add_float64("pyguard.cmrm.alpha", self.alpha)
        w.add_string("pyguard.cmrm.when", self.when)
        w.add_string("pyguard.cmrm.mode", self.mode)
        if self.layers is not None:
            w.add_array("pyguard.cmrm.layers", list(self.layers))
        for il in range(1, self.n_layer):
            w.add_tensor(f"direction.{il}", self.vectors[il])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    @classmethod
    def _parse_gguf(cls, path: str) -> "CMRM":
        gguf = extras.need("gguf", "llama")
        reader = gguf.GGUFReader(path)

        def value(key):
            field = reader.get_field(key)
            return None if field is None else field.contents()

        arch = value("general.architecture")
        if arch != _CVEC_ARCH:
            raise ValueError(f"general.architecture is {arch!r}, expected {_CVEC_ARCH!r}")
        rows = {}
        for t in reader.tensors:
            prefix, _, k = t.name.partition(".")
            if prefix != "direction" or not k.isdecimal() or int(k) == 0:
                raise ValueError(f"tensor {t.name!r} is not direction.<layer> with layer >= 1")
            if t.tensor_type != gguf.GGMLQuantizationType.F32 or int(np.prod(t.shape[1:])) != 1:
                raise ValueError(f"tensor {t.name!r} must be F32 and 1-D, got {t.tensor_type.name} {list(t.shape)}")
            rows[int(k)] = np.array(t.data, dtype=np.float32).reshape(-1)
        if not rows:
            raise ValueError("no direction.<layer> tensors")
        # llama.cpp reads the whole data blob, each tensor padded to the alignment
        a = reader.alignment
        end = max(t.data_offset + -(-t.n_bytes // a) * a for t in reader.tensors)
        if end > os.path.getsize(path):
            raise ValueError(f"truncated: the tensor data ends at byte {end}, the file has {os.path.getsize(path)}")
        n_embd = {len(r) for r in rows.values()}
        if len(n_embd) != 1:
            raise ValueError(f"direction tensors differ in length: {sorted(n_embd)}")
        n_layer = max(max(rows), value(f"{_CVEC_ARCH}.layer_count") or 0) + 1
        vectors = np.zeros((n_layer, n_embd.pop()), dtype=np.float32)
        for il, row in rows.items():
            vectors[il] = row
        layers = value("pyguard.cmrm.layers")
        kwargs = {"alpha": value("pyguard.cmrm.alpha"), "layers": tuple(layers) if layers else None,
                  "when": value("pyguard.cmrm.when"), "model_hint": value(f"{_CVEC_ARCH}.model_hint"),
                  "mode": value("pyguard.cmrm.mode")}
        return cls(vectors, **{k: v for k, v in kwargs.items() if v is not None})


# ----------------------------------------------------------------------------- CASA
_CASA_TENSORS = {"Wk": 2, "q": 2, "w": 1}
_CASA_OPTIONAL = ("w_last", "w_max")  # [d] each: a probe's last-row and row-maximum weights
CASA_ROWS = ("prompt", "last-turn")
_CASA_META = {"layer": int, "threshold": float, "on_unsafe": str, "refusal_text": str, "model_hint": str}


@dataclass(frozen=True, eq=False)
class CASA(_ValueEq):
    """Safety attention on the prompt's hidden states H [T, d] at decoder layer ``layer``:
    ``s = sigmoid(w . mean_h sum_t softmax_t(H_t Wk q_h / sqrt(r)) H_t + w_last . H_{T-1}
    + w_max . max_t H_t + b)``; unsafe if ``s > threshold``.

    params: {"Wk": [d, r], "q": [heads, r], "w": [d], "b": float} and optionally "w_last" and
    "w_max": [d] (a mean+last or mean+last+max probe), the arguments of :func:`pyguard.ops.casa_score` (stored as float32; b
    rounded to float32); on_unsafe:
    ``"refuse"`` (answer ``refusal_text``) or ``"prefix"`` (force ``refusal_text`` as the start of
    the answer and let the model continue); rows: the prompt rows H holds, ``"prompt"`` (all) or
    ``"last-turn"`` (from the last user message's content on, read in the context of what precedes
    it: a chat's earlier turns and the system prompt are not pooled; when an earlier turn holds
    media, all rows).
    """

    params: dict
    layer: int
    threshold: float = 0.5
    on_unsafe: str = "refuse"
    refusal_text: str = DEFAULT_REFUSAL
    model_hint: str = ""
    cascade: Optional[Tuple[float, float]] = None  # (low, high) fitted by `pyguard fit cascade`
    rows: str = "prompt"
    source: str = field(default="", compare=False, repr=False)  # the file it was loaded from

    def __post_init__(self):
        p = self.params
        needed = {*_CASA_TENSORS, "b"}
        if not isinstance(p, dict) or not needed <= set(p) <= {*needed, *_CASA_OPTIONAL}:
            got = sorted(p) if isinstance(p, dict) else type(p).__name__
            raise ValueError(f"params must be a dict with keys ['Wk', 'b', 'q', 'w'] (and optionally 'w_last', "
                             f"'w_max'), got {got}")
        arrays = {k: _matrix(f"params[{k!r}]", p[k], ndim) for k, ndim in _CASA_TENSORS.items()}
        b = p["b"].item() if isinstance(p["b"], np.ndarray) and p["b"].size == 1 else p["b"]
        (d, r), (heads, rq), (dw,) = arrays["Wk"].shape, arrays["q"].shape, arrays["w"].shape
        if rq != r or dw != d:
            raise ValueError(
                f"params shapes do not fit: Wk [d, r] = {[d, r]}, q [heads, r] = {[heads, rq]}, w [d] = {[dw]}"
            )
        for k in _CASA_OPTIONAL:
            if k in p:
                arrays[k] = _matrix(f"params[{k!r}]", p[k], 1)
                if arrays[k].shape != (d,):
                    raise ValueError(f"params shapes do not fit: {k} {list(arrays[k].shape)}, Wk's d = {d}")
        arrays["b"] = float(np.float32(_finite("params['b']", b)))
        object.__setattr__(self, "params", arrays)
        object.__setattr__(self, "layer", _int("layer", self.layer, 0))
        threshold = _finite("threshold", self.threshold)
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold!r}")
        object.__setattr__(self, "threshold", threshold)
        _choice("on_unsafe", self.on_unsafe, ("refuse", "prefix"))
        _choice("rows", self.rows, CASA_ROWS)
        _text("refusal_text", self.refusal_text, empty_ok=False)
        _text("model_hint", self.model_hint)
        if self.cascade is not None:
            object.__setattr__(self, "cascade", _thresholds(self.cascade))

    @property
    def n_embd(self) -> int:
        return self.params["Wk"].shape[0]

    def check_model(self, n_embd: int, n_layer: int, arch: str | None = None, n_vocab: int | None = None):
        """ValueError naming the file unless the model has this n_embd and the layer, and the
        model_hint agrees with the model (architecture, size; each when given)."""
        if n_embd != self.n_embd or self.layer >= n_layer:
            raise ValueError(
                f"CASA parameters{_from(self)} are for n_embd={self.n_embd} (layer {self.layer}), "
                f"the model has n_embd={n_embd}, n_layer={n_layer}"
            )
        _check_hint(self, "CASA parameters", {"arch": arch, "n_layer": n_layer, "n_embd": n_embd, "n_vocab": n_vocab})

    def score(self, H, cu_seqlens=None, backend: str = "auto"):
        """Scores float32 [B] for B prompts: H a list of [T_i, d] arrays, or packed [T, d] with
        cu_seqlens [B + 1]. numpy or torch (any device); ``pyguard.ops.casa_score`` picks the
        backend."""
        if isinstance(H, (list, tuple)):
            if cu_seqlens is not None:
                raise ValueError("cu_seqlens must be None when H is a list of sequences")
            if not H:
                raise ValueError("H is an empty list")
            cu_seqlens = np.concatenate([[0], np.cumsum([len(h) for h in H])]).astype(np.int64)
            if is_torch(H[0]):
                import torch

                H = torch.cat(list(H))
            else:
                H = np.concatenate(H)
        elif cu_seqlens is None:
            raise ValueError("cu_seqlens is required for packed H")
        arrays = [self.params.get(k) for k in (*_CASA_TENSORS, *_CASA_OPTIONAL)]  # Wk, q, w, w_last, w_max
        if is_torch(H):
            import torch

            arrays = [None if x is None else torch.tensor(x, device=H.device) for x in arrays]
        Wk, q, w, w_last, w_max = arrays
        return ops.casa_score(H, cu_seqlens, Wk, q, w, self.params["b"], w_last, w_max, backend=backend)

    def decide(self, scores):
        """Unsafe flags (bool, numpy or torch like scores): score > threshold. A NaN score (from
        non-finite hidden states) counts as unsafe: fail closed."""
        scores = scores if is_torch(scores) else np.asarray(scores)
        return ~(scores <= self.threshold)

    # -- files
    @classmethod
    def load(cls, path, **overrides) -> "CASA":
        """Read a ``.safetensors`` or ``.npz`` file; overrides replace fields read from it."""
        ext = _extension(path, (".safetensors", ".npz"), "CASA")
        read = _read_safetensors if ext == ".safetensors" else _read_npz
        return dataclasses.replace(_load(path, "CASA " + ext, lambda p: cls._from_parts(*read(p))),
                                   source=os.fspath(path), **overrides)

    def save(self, path):
        """Write ``.safetensors`` (tensors Wk, q, w, b [1], and w_last, w_max when set; string metadata)
        or ``.npz`` (the same, the metadata as JSON in ``__metadata__``; needs numpy only)."""
        ext = _extension(path, (".safetensors", ".npz"), "CASA")
        tensors = {k: self.params[k] for k in (*_CASA_TENSORS, *_CASA_OPTIONAL) if k in self.params}
        tensors["b"] = np.array([self.params["b"]], dtype=np.float32)
        meta = {k: str(getattr(self, k)) for k in _CASA_META}
        meta["n_embd"] = str(self.n_embd)
        if self.cascade is not None:
            meta["cascade"] = json.dumps(list(self.cascade))
        if self.rows != "prompt":
            meta["rows"] = self.rows
        (_write_safetensors if ext == ".safetensors" else _write_npz)(path, tensors, meta)

    @classmethod
    def _from_parts(cls, tensors: dict, meta: dict) -> "CASA":
        params = {k: _tensor(tensors, k, ndim) for k, ndim in _CASA_TENSORS.items()}
        params.update({k: _tensor(tensors, k, 1) for k in _CASA_OPTIONAL if k in tensors})
        b = _tensor(tensors, "b", 1)
        if b.size != 1:
            raise ValueError(f"tensor 'b' must hold 1 value, got shape {b.shape}")
        params["b"] = b.item()
        missing = sorted({*_CASA_META, "n_embd"} - set(meta))
        if missing:
            raise ValueError(f"metadata lacks {missing}")
        if int(meta["n_embd"]) != params["Wk"].shape[0]:
            raise ValueError(f"metadata n_embd={meta['n_embd']} but Wk has shape {params['Wk'].shape}")
        cascade = tuple(json.loads(meta["cascade"])) if "cascade" in meta else None
        return cls(params, **{k: conv(meta[k]) for k, conv in _CASA_META.items()}, cascade=cascade,
                   rows=meta.get("rows", "prompt"))


def _thresholds(lh) -> Tuple[float, float]:
    """(low, high) checked: two finite numbers with 0 <= low <= high <= 1."""
    ok = isinstance(lh, (tuple, list)) and len(lh) == 2 and all(
        isinstance(x, numbers.Real) and not isinstance(x, bool) for x in lh)
    if not ok or not all(math.isfinite(x) for x in lh) or not 0 <= lh[0] <= lh[1] <= 1:
        raise ValueError(f"cascade thresholds must be (low, high) with 0 <= low <= high <= 1, got {lh!r}")
    return float(lh[0]), float(lh[1])


# ----------------------------------------------------------------------------- Cascade
@dataclass(frozen=True, eq=False)
class Cascade(_ValueEq):
    """CASA routes each request by its prompt score s (one prefill, shared with what follows):
    s < low: the unguarded model, one sequence; low <= s < high: CoCA, its safe sequence forked
    from the prompt already computed; s >= high (or NaN: fail closed): refuse with the CASA
    module's ``refusal_text``. CASA's own threshold is not used. CMRM, when configured beside it,
    stays on for image requests in every branch.

    casa: the CASA module; coca: CoCA's settings; low, high: 0 <= low <= high <= 1 (default: the
    thresholds stored in the CASA file by ``pyguard fit cascade``).
    """

    casa: CASA
    coca: CoCA = field(default_factory=CoCA)
    low: Optional[float] = None
    high: Optional[float] = None

    def __post_init__(self):
        if not isinstance(self.casa, CASA):
            raise TypeError(f"casa must be a CASA, got {type(self.casa).__name__}")
        if not isinstance(self.coca, CoCA):
            raise TypeError(f"coca must be a CoCA, got {type(self.coca).__name__}")
        low, high = self.low, self.high
        if low is None or high is None:
            if self.casa.cascade is None:
                raise ValueError(f"no cascade thresholds: give low= and high=, or a CASA file{_from(self.casa)} "
                                 "fitted by `pyguard fit cascade`")
            low = self.casa.cascade[0] if low is None else low
            high = self.casa.cascade[1] if high is None else high
        low, high = _thresholds((low, high))
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    def route(self, score: float) -> str:
        """"none", "coca" or "refuse" for a prompt score."""
        if not score < self.high:  # NaN included
            return "refuse"
        return "coca" if score >= self.low else "none"

    def why(self, score: float) -> str:
        """The route's reason, for the report."""
        r = self.route(score)
        if r == "refuse":
            return f"score {score:.3f} >= high {self.high:.3f}" if score == score else "score is NaN (fail closed)"
        if r == "coca":
            return f"low {self.low:.3f} <= score {score:.3f} < high {self.high:.3f}"
        return f"score {score:.3f} < low {self.low:.3f}"

    def report(self, score: float) -> dict:
        """The ``cascade`` entry of a ``pyguard`` report: the branch taken and why."""
        return {"branch": self.route(score), "low": self.low, "high": self.high, "why": self.why(score)}

    @classmethod
    def load(cls, path, coca: CoCA | None = None, **kw) -> "Cascade":
        """The CASA file (with thresholds from ``pyguard fit cascade``, unless low= / high= are given)."""
        return cls(CASA.load(path), coca or CoCA(), **kw)

    def save(self, path):
        """The CASA file with (low, high) stored in its metadata."""
        dataclasses.replace(self.casa, cascade=(self.low, self.high)).save(path)


def _write_npz(path, tensors: dict, meta: dict):
    with open(path, "wb") as f:
        np.savez(f, **tensors, __metadata__=np.array(json.dumps(meta)))


def _read_npz(path: str):
    with np.load(path, allow_pickle=False) as z:
        tensors = {k: z[k] for k in z.files if k != "__metadata__"}
        meta = json.loads(str(z["__metadata__"])) if "__metadata__" in z.files else {}
    return tensors, meta


def casa_report(casa: CASA, cascade: Optional[Cascade], score: float, ms: float) -> dict:
    """The ``casa`` entry of a ``pyguard`` report. Under a cascade, unsafe means its refuse branch."""
    if cascade is None:
        unsafe, threshold = bool(casa.decide(np.float32(score))), casa.threshold
        action = casa.on_unsafe if unsafe else None
    else:
        unsafe, threshold = cascade.route(score) == "refuse", cascade.high
        action = "refuse" if unsafe else None
    return {"score": score, "unsafe": unsafe, "threshold": threshold, "layer": casa.layer, "action": action, "ms": ms}


def coca_report(coca: CoCA, shared: int) -> dict:
    """The ``coca`` entry of a ``pyguard`` report at the start of dual decoding."""
    return {"alpha": coca.alpha, "shared_prefix_tokens": shared, "dual_steps": 0, "gated": False, "kl_max": 0.0}


def unpack_cascade(cascade: Optional[Cascade], coca, casa, cmrm=None) -> tuple:
    """(coca, casa) a guarded model runs: the cascade's own, or those given. TypeError naming the
    argument when one is not its method's object (e.g. ``coca="yes"``); ValueError when a cascade
    comes with coca= or casa= too."""
    for name, obj, cls in (("coca", coca, CoCA), ("casa", casa, CASA), ("cmrm", cmrm, CMRM), ("cascade", cascade, Cascade)):
        if obj is not None and not isinstance(obj, cls):
            raise TypeError(f"{name}= takes a pyguard.methods.{cls.__name__} (or None), got {type(obj).__name__} {obj!r:.60}")
    if cascade is None:
        return coca, casa
    if coca is not None or casa is not None:
        raise ValueError("cascade= brings its own CASA and CoCA: pass them inside the Cascade, not as casa= / coca=")
    return cascade.coca, cascade.casa
