"""Residual-stream capture during ``llama_decode`` (CASA's hidden states, CMRM's calibration).

llama.cpp calls the context's eval callback (``llama_context_params.cb_eval``) for every node of
the compute graph of every ubatch (936 nodes for SmolLM2-135M's 30 layers): first with
``ask=True`` ("do you want this tensor?"), then, for the wanted ones, with ``ask=False`` once its
data is ready. :class:`LayerCapture` (``pyguard._C``) does this in C++ and copies the rows of one
named tensor, e.g. ``l_out-12``, the output of decoder layer 12 (after the control vector, if one
is set); it costs about 0.1 ms per ubatch. :class:`PyCapture` is the same callback in pure Python
through ctypes (about 1 ms per ubatch, 0.35 ms even when disabled): an independent oracle for
tests.

Usage with the low-level API::

    cap = capture.LayerCapture(capture.libggml_base_path(), "l_out-12")
    cp = llama_cpp.llama_context_default_params()
    capture.install(cp, cap)
    ctx = llama_cpp.llama_init_from_model(model, cp)
    ... llama_decode(ctx, batch) ...
    H = cap.take()          # float32 [n_tokens, n_embd], rows of all ubatches in order
    llama_cpp.llama_free(ctx)  # before cap goes away

Rules:

- The capture object must outlive every context it was installed in: llama.cpp keeps raw
  addresses. Free the context first.
- Rows accumulate over ubatches and decodes until ``take()``/``clear()``. Set ``enabled = False``
  during generation: the callback then declines every tensor at almost no cost.
- Rows come in the order llama.cpp computes them: ubatch after ubatch, and inside a ubatch in
  batch order for a single sequence (or ``kv_unified=True``). With ``kv_unified=False`` and several
  sequences in one batch, llama.cpp regroups each ubatch by sequence: ``Engine.decode`` returns
  the order (``engine.ubatches``).
- The same object shifts rows (CMRM per request): ``set_shift(vectors, alpha, first, last)``, then
  per decode ``plan_shift`` with each ubatch's row mask, and ``end_shift()``; ``Engine.decode(items,
  shift=...)`` does the planning.
- The last layer's ``l_out`` is computed only for the rows whose output (logits) was requested
  in the batch; earlier layers hold every token of the batch.
"""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import numpy as np

try:
    from llama_cpp import llama_cpp as L
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"pyguard.llama needs llama-cpp-python: pip install 'pyguard[llama]' ({e})") from e

__all__ = ["LayerCapture", "PyCapture", "eval_callback", "install", "layer_name", "libggml_base_path"]

_LIB_NAMES = {
    "darwin": ("libggml-base.dylib", "libggml-base.so"),
    "win32": ("ggml-base.dll", "libggml-base.dll"),
}.get(sys.platform, ("libggml-base.so.0", "libggml-base.so"))  # the SONAME first


def layer_name(layer: int) -> str:
    """llama.cpp's name of decoder layer ``layer``'s residual-stream output."""
    return f"l_out-{int(layer)}"


def _mapped_libs(stem: str) -> list[str]:
    """Paths of the shared libraries whose file name starts with ``stem`` mapped into this
    process (Linux; empty elsewhere)."""
    found = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and os.path.basename(parts[5].strip()).startswith(stem):
                    path = parts[5].strip()
                    if path not in found and os.path.exists(path):
                        found.append(path)
    except OSError:
        pass
    return found


def libggml_base_path() -> str:
    """Path of the libggml-base shared library llama-cpp-python's libllama actually loaded.

    This matters: the llama-cpp-python wheel holds *copies* (not symlinks) of libggml-base.so,
    .so.0 and .so.0.x.y, and libllama loads .so.0 (its SONAME); opening another of the files
    would load a second copy of ggml. So: the copy mapped into this process from libllama's folder
    (Linux), else the SONAME file next to libllama (``LLAMA_CPP_LIB_PATH`` or the package's
    ``lib/``), else the plain name."""
    dirs = []
    lib_name = getattr(getattr(L, "_lib", None), "_name", None)
    if lib_name:
        dirs += [Path(lib_name).parent, Path(lib_name).resolve().parent]
    base = getattr(L, "_base_path", None)
    if base is not None:
        dirs.append(Path(base))
    mapped = _mapped_libs("libggml-base")
    for m in mapped:  # the one loaded next to libllama first
        if any(Path(m).resolve().parent == d.resolve() for d in dirs):
            return m
    if mapped:
        return mapped[0]
    for d in dirs:
        for n in _LIB_NAMES:
            p = d / n
            if p.exists():
                return str(p)
    raise FileNotFoundError(f"libggml-base not found next to llama-cpp-python's libllama (looked in {dirs})")


def _callback_ptr(capture) -> L.ggml_backend_sched_eval_callback:
    cb = capture.callback
    if isinstance(cb, L.ggml_backend_sched_eval_callback):
        return cb
    return L.ggml_backend_sched_eval_callback(int(cb))


def eval_callback(capture):
    """``(cb_eval, cb_eval_user_data)`` for ``capture``, ready for ``llama_context_params`` (or
    ``Engine(cb_eval=..., cb_eval_user_data=...)``). Keep ``capture`` alive as long as the context."""
    ud = capture.user_data
    return _callback_ptr(capture), (ctypes.c_void_p(int(ud)) if ud else None)


def install(cparams, capture) -> None:
    """Point ``cparams.cb_eval`` / ``cb_eval_user_data`` (a ``llama_context_params``) at ``capture``
    (a :class:`LayerCapture` or :class:`PyCapture`). Call before ``llama_init_from_model``; keep
    ``capture`` alive until the context is freed."""
    cparams.cb_eval, cparams.cb_eval_user_data = eval_callback(capture)


def __getattr__(name):  # LayerCapture lazily, so that importing this module needs no extension
    if name == "LayerCapture":
        from pyguard import _C

        return _C.LayerCapture
    raise AttributeError(name)


class PyCapture:
    """The same capture as :class:`LayerCapture`, in pure Python (ctypes): the test oracle, and
    the capture of several tensors at once (``name`` a list: calibration reads every layer).

    Same interface: ``callback``, ``user_data`` (None), ``enabled``, ``rows``, ``n_embd``,
    ``take()`` (the first name's rows), ``clear()``; and ``take_all()`` -> {name: rows}."""

    def __init__(self, lib_path: str | os.PathLike, name: str | list[str]):
        self.lib_path = str(lib_path)
        self.names = [name] if isinstance(name, str) else list(name)
        self.name = self.names[0]
        self._names_b = {n.encode(): n for n in self.names}
        lib = ctypes.CDLL(self.lib_path)
        self._get_name = lib.ggml_get_name
        self._get_name.argtypes, self._get_name.restype = [ctypes.c_void_p], ctypes.c_char_p
        self._nelements = lib.ggml_nelements
        self._nelements.argtypes, self._nelements.restype = [ctypes.c_void_p], ctypes.c_int64
        self._nrows = lib.ggml_nrows
        self._nrows.argtypes, self._nrows.restype = [ctypes.c_void_p], ctypes.c_int64
        self._nbytes = lib.ggml_nbytes
        self._nbytes.argtypes, self._nbytes.restype = [ctypes.c_void_p], ctypes.c_size_t
        self._get = lib.ggml_backend_tensor_get
        self._get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        self._get.restype = None
        self._lib = lib
        self.enabled = True
        self.asks = 0
        self._cb = L.ggml_backend_sched_eval_callback(self._eval)  # kept alive with the object
        self.clear()

    @property
    def callback(self):
        return self._cb

    @property
    def user_data(self):
        return None

    @property
    def rows(self) -> int:
        return sum(len(c) for c in self._chunks[self.name])

    def _eval(self, t, ask, _user_data):
        try:
            if not self.enabled:
                return not ask
            if ask:
                self.asks += 1
                return self._get_name(t) in self._names_b
            name = self._names_b.get(self._get_name(t))
            if name is not None and self._error is None:
                ne, nr, nb = self._nelements(t), self._nrows(t), self._nbytes(t)
                if ne == 0 and len(self.names) > 1:
                    return True  # a layer computed for no row in this batch (the last one, without logits)
                if ne <= 0 or nr <= 0 or ne % nr or nb != ne * 4:
                    self._error = f"tensor '{name}' is not a contiguous float32 matrix: {ne} elements in {nr} rows, {nb} bytes"
                    return True
                d = ne // nr
                if self.n_embd == 0:
                    self.n_embd = d
                elif d != self.n_embd:
                    self._error = f"tensor '{name}' has rows of {d} values, earlier ones had {self.n_embd}"
                    return True
                a = np.empty((nr, d), dtype=np.float32)
                self._get(t, a.ctypes.data, 0, nb)
                self._chunks[name].append(a)
            return True
        except Exception as e:  # an exception cannot cross into C: record it
            self._error = f"{type(e).__name__}: {e}"
            return not ask

    def take(self) -> np.ndarray:
        return self.take_all()[self.name]

    def take_all(self) -> dict[str, np.ndarray]:
        """{name: rows [N, n_embd]} captured since the last take / clear; then clears."""
        chunks, err, d = self._chunks, self._error, self.n_embd
        self._chunks, self._error = {n: [] for n in self.names}, None
        if err is not None:
            raise RuntimeError(f"PyCapture: {err}")
        return {n: np.concatenate(c, axis=0) if c else np.zeros((0, d), np.float32) for n, c in chunks.items()}

    def clear(self) -> None:
        self._chunks: dict[str, list[np.ndarray]] = {n: [] for n in self.names}
        self._error: str | None = None
        self.n_embd = 0
