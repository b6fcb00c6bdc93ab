"""A llama.cpp model and context through llama-cpp-python's low-level API: several sequences,
batches with explicit positions, zero-copy logit rows, KV-cache copies, control vectors.
No torch."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
from pathlib import Path

import numpy as np

try:
    from llama_cpp import llama_cpp as L
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"pyguard.llama needs llama-cpp-python: pip install 'pyguard[llama]' ({e})") from e


_LOG = logging.getLogger("llama-cpp-python")  # the logger llama-cpp-python prints llama.cpp's log through


def _metadata(model) -> dict[str, str]:
    """The GGUF metadata of a loaded model, every value as a string (llama.cpp's rendering)."""
    def text(fn, i):
        size = 256
        while True:
            buf = ctypes.create_string_buffer(size)
            n = fn(model, i, buf, size)
            if n < size:
                return buf.value.decode("utf-8", "replace") if n >= 0 else ""
            size = n + 1

    return {text(L.llama_model_meta_key_by_index, i): text(L.llama_model_meta_val_str_by_index, i)
            for i in range(L.llama_model_meta_count(model))}


class Engine:
    """One model, one context with ``n_seq`` sequences of ``n_ctx`` tokens each, each sequence in
    a KV stream of its own (``kv_unified = False``): a sequence's attention sees only its own
    cells, at the same places as when it runs alone, so batching changes no result (16 of 16
    concurrent greedy answers equal their lone runs on SmolLM2; benchmarks/RESULTS.md). With a
    unified cache, 8 of 16 differed: the masked cells of other sequences shift the order of the
    attention sums. llama.cpp regroups a batch of several sequences by sequence (split_equal)."""

    def __init__(self, model_path: str | Path, n_ctx: int = 2048, n_seq: int = 2, n_threads: int | None = None,
                 n_batch: int = 512, verbose: bool = False, cb_eval=None, cb_eval_user_data=None,
                 n_ctx_limit: int | None = None):
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        for name, v, lo in (("n_ctx", n_ctx, 8), ("n_seq", n_seq, 1), ("n_batch", n_batch, 1),
                            ("n_threads", 1 if n_threads is None else n_threads, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        # llama-cpp-python prints llama.cpp's log through this logger: errors only, unless verbose; a
        # failed load is reported by the ValueError below, not by the loader's own lines
        _LOG.setLevel(logging.CRITICAL if not verbose else logging.DEBUG)
        try:
            self.model = L.llama_model_load_from_file(str(path).encode(), L.llama_model_default_params())
        finally:
            _LOG.setLevel(logging.ERROR if not verbose else logging.DEBUG)
        if not self.model:
            self.model = None
            raise ValueError(f"cannot load model {path}: not a GGUF model llama.cpp can read")
        self.vocab = L.llama_model_get_vocab(self.model)
        try:
            self._check_memory(n_ctx, n_seq, n_ctx_limit)
        except BaseException:
            self.close()
            raise
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx * n_seq  # llama.cpp splits n_ctx evenly between the streams
        cp.n_batch = cp.n_ubatch = n_batch
        cp.n_seq_max = n_seq
        cp.kv_unified = False
        threads = n_threads or max(1, len(os.sched_getaffinity(0)))
        cp.n_threads = cp.n_threads_batch = self.n_threads = threads
        if cb_eval is not None:
            cp.cb_eval = cb_eval
            cp.cb_eval_user_data = cb_eval_user_data
        self._cparams = cp  # keeps the callback alive
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            self.ctx = None
            self.close()
            raise RuntimeError(f"llama.cpp could not create a context (n_ctx={n_ctx} x {n_seq} sequences)")
        self.mem = L.llama_get_memory(self.ctx)
        self.n_ctx = min(n_ctx, L.llama_n_ctx_seq(self.ctx))  # what was asked (llama.cpp may pad it)
        self.n_batch = n_batch
        self.n_seq = n_seq
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.n_embd = L.llama_model_n_embd(self.model)
        self.n_layer = L.llama_model_n_layer(self.model)
        self.batch = L.llama_batch_init(n_batch, 0, n_seq)
        self.shifter = None  # a LayerCapture with a shift table (CMRM's rows, decode(shift=))
        self._ebatch = None  # an embeddings batch, made on first use (decode_embd)
        self.metadata = _metadata(self.model)
        self.arch = self.metadata.get("general.architecture", "")
        # a KV cache of attention layers: llama.cpp's batch split is then the one ubatches() predicts
        self.kv_only = not (L.llama_model_is_recurrent(self.model) or L.llama_model_is_hybrid(self.model))

    def _check_memory(self, n_ctx: int, n_seq: int, limit: int | None) -> None:
        """ValueError when ``n_ctx`` exceeds ``limit`` (default: the model's trained context), or
        when the KV cache of ``n_seq`` sequences of it (f16 keys and values) would not fit in the
        available memory."""
        m = self.model
        trained = L.llama_model_n_ctx_train(m)
        if limit is None and trained > 0 and n_ctx > trained:
            raise ValueError(f"n_ctx = {n_ctx} exceeds the model's trained context of {trained} tokens "
                             "(n_ctx_limit= overrides it)")
        if limit is not None and n_ctx > limit:
            raise ValueError(f"n_ctx = {n_ctx} exceeds n_ctx_limit = {limit}")
        n_head = max(1, L.llama_model_n_head(m))
        kv = 2 * 2 * L.llama_model_n_layer(m) * L.llama_model_n_head_kv(m) * (L.llama_model_n_embd(m) // n_head)
        need = kv * n_ctx * n_seq
        free = _available_memory()
        if need > free:
            raise ValueError(f"n_ctx = {n_ctx} x {n_seq} sequences needs {need / 2**30:.1f} GiB of KV cache; "
                             f"{free / 2**30:.1f} GiB of memory is available")

    # -- tokens ----------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        raw = text.encode("utf-8")
        n = len(raw) + 2
        while True:  # a token is at least one byte, so len + 2 (BOS) is enough; retried if not
            buf = (L.llama_token * n)()
            got = L.llama_tokenize(self.vocab, raw, len(raw), buf, n, add_bos, True)
            if got >= 0:
                return list(buf[:got])
            if -got <= n:
                raise RuntimeError(f"llama.cpp could not tokenize {len(raw)} bytes of text")
            n = -got

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(L.llama_vocab_is_eog(self.vocab, token))

    @functools.cached_property
    def eog_tokens(self) -> tuple:
        """Every end-of-generation token id of the vocabulary."""
        return tuple(t for t in range(self.n_vocab) if L.llama_vocab_is_eog(self.vocab, t))

    def token_text(self, token: int) -> str:
        return L.llama_vocab_get_text(self.vocab, token).decode("utf-8", "replace") if token >= 0 else ""

    @property
    def bos(self) -> int:
        """The vocabulary's beginning-of-sequence token (-1: none)."""
        return L.llama_vocab_bos(self.vocab)

    @property
    def eos(self) -> int:
        """The vocabulary's end-of-sequence token (-1: none)."""
        return L.llama_vocab_eos(self.vocab)

    # -- evaluation ------------------------------------------------------------------------
    def decode(self, items, shift=None, order: bool = False) -> np.ndarray | None:
        """Decode (token, pos, seq, want_logits) items, in chunks of n_batch. Logit rows of the
        final chunk are then read with ``logits(i)``, i = index within that chunk. ``shift``: per
        item, True for the rows ``shifter`` shifts (CMRM). With ``order``, returns the item indices
        in the order llama.cpp computes their rows (:func:`ubatches`, concatenated): the order an
        eval callback sees them in (predicted only when asked or shifting)."""
        rows = []
        for start in range(0, len(items), self.n_batch):
            part = items[start : start + self.n_batch]
            mask = None if shift is None else np.asarray(shift[start : start + len(part)], bool)
            planned = mask is not None and bool(mask.any())
            if order or planned:
                ubs = ubatches([it[2] for it in part], self.n_batch, self.n_seq)
                rows += [u + start for u in ubs]
            b = self.batch
            b.n_tokens = len(part)
            for i, (tok, pos, seq, want) in enumerate(part):
                b.token[i] = tok
                b.pos[i] = pos
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                b.logits[i] = want
            if planned:
                want = np.array([it[3] for it in part], bool)
                self._shifter().plan_shift([(mask[u], want[u]) for u in ubs])
                self._run(b, planned=True)
            else:
                self._run(b)
        if not order:
            return None
        return np.concatenate(rows) if rows else np.zeros(0, np.int64)

    def _run(self, batch, planned: bool = False) -> None:
        """llama_decode; with ``planned`` the shifter's plan ends (and is checked) after it."""
        rc = -1
        try:
            rc = L.llama_decode(self.ctx, batch)
        finally:
            if planned:
                try:
                    self.shifter.end_shift()
                except RuntimeError:
                    if rc == 0:
                        raise
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")

    def _shifter(self):
        if self.shifter is None:
            raise RuntimeError("rows to shift, but this engine has no shifter (a LayerCapture with set_shift)")
        return self.shifter

    @contextlib.contextmanager
    def shifting(self, on: bool):
        """Every row of the decodes inside (e.g. an image's, by mtmd) shifted when ``on``."""
        if not on:
            yield
            return
        self._shifter().plan_shift(True)
        try:
            yield
        finally:
            self.shifter.end_shift()

    def decode_embd(self, embd: np.ndarray, pos: int, seq: int = 0, want_last: bool = True,
                    shift: bool = False) -> None:
        """Decode input embeddings ``embd`` [n, n_embd] (float32; e.g. soft tokens from a
        projector) at positions pos .. pos+n-1 of sequence ``seq``, in chunks of n_batch; with
        ``want_last`` the last row's logits are read with ``logits(-1)``; ``shift``: every row
        shifted (``decode``)."""
        embd = np.ascontiguousarray(embd, dtype=np.float32)
        if embd.ndim != 2 or embd.shape[1] != self.n_embd or embd.shape[0] == 0:
            raise ValueError(f"embd must be [n, {self.n_embd}] with n >= 1, got {list(embd.shape)}")
        if not np.isfinite(embd).all():
            raise ValueError("embd holds NaN or infinite values")
        if not 0 <= seq < self.n_seq:
            raise ValueError(f"seq must be in [0, {self.n_seq}), got {seq}")
        if self._ebatch is None:
            self._ebatch = L.llama_batch_init(self.n_batch, self.n_embd, self.n_seq)
        b = self._ebatch
        n = len(embd)
        for start in range(0, n, self.n_batch):
            part = embd[start : start + self.n_batch]
            ctypes.memmove(b.embd, part.ctypes.data, part.nbytes)
            b.n_tokens = len(part)
            for i in range(len(part)):
                b.pos[i] = pos + start + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                b.logits[i] = want_last and start + i == n - 1
            with self.shifting(shift):
                self._run(b)

    def logits(self, i: int) -> np.ndarray:
        """Logit row i of the last decode: a float32 [1, V] view (valid until the next decode)."""
        ptr = L.llama_get_logits_ith(self.ctx, i)
        if not ptr:
            raise RuntimeError(f"no logits for batch row {i}")
        return np.ctypeslib.as_array(ptr, shape=(1, self.n_vocab))

    # -- memory ----------------------------------------------------------------------------
    def clear(self) -> None:
        L.llama_memory_clear(self.mem, True)

    def copy_seq(self, src: int, dst: int) -> None:
        """Copy sequence src into dst, whole (across streams llama.cpp copies whole streams; the
        copy is made at the start of the next decode)."""
        L.llama_memory_seq_cp(self.mem, src, dst, -1, -1)

    def drop_seq(self, seq: int, keep: int = 0) -> None:
        """Remove seq's positions from ``keep`` on (all of them by default)."""
        if not L.llama_memory_seq_rm(self.mem, seq, keep if keep > 0 else -1, -1):
            raise RuntimeError(f"llama.cpp could not remove positions {keep}.. of sequence {seq}")

    def set_cvec(self, data: np.ndarray | None, il_start: int = 0, il_end: int = 0) -> None:
        """Apply a control vector (float32, n_embd x (n_layer - 1), from layer 1) or clear it."""
        if data is None:
            rc = L.llama_set_adapter_cvec(self.ctx, None, 0, self.n_embd, 0, 0)
        else:
            self._cvec = np.ascontiguousarray(data, dtype=np.float32)  # llama.cpp copies; keep it anyway
            ptr = self._cvec.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            rc = L.llama_set_adapter_cvec(self.ctx, ptr, self._cvec.size, self.n_embd, il_start, il_end)
        if rc != 0:
            raise RuntimeError(f"llama_set_adapter_cvec failed with code {rc}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for name in ("batch", "_ebatch"):
            if getattr(self, name, None) is not None:
                L.llama_batch_free(getattr(self, name))
                setattr(self, name, None)
        if getattr(self, "ctx", None):
            L.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            L.llama_model_free(self.model)
            self.model = None


def model_shape(model_path) -> tuple[int, int]:
    """(n_layer, n_embd) of a GGUF model (loaded with a minimal context, then freed)."""
    with Engine(model_path, n_ctx=64, n_seq=1) as e:
        return e.n_layer, e.n_embd


def _available_memory() -> int:
    """Bytes of memory available to a new allocation (Linux's MemAvailable; else free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def ubatches(seqs, n_ubatch: int, n_stream: int) -> list[np.ndarray]:
    """How llama.cpp cuts one decode of tokens of sequences ``seqs`` (batch order) into ubatches:
    a list of index arrays, each in the order the ubatch's rows are computed (an eval callback
    sees its tensors' rows in this order).

    One KV stream (``split_simple``): batch order, n_ubatch rows at a time. Several streams
    (``split_equal`` with sequential ids, llama-batch.cpp): the sequences of the first unused token
    and of the following unused tokens whose ids continue a run of consecutive ids; each gives the
    same number of its next tokens while all have some left and the ubatch has room; rows grouped
    by sequence."""
    seqs = np.asarray(seqs, np.int64)
    n = len(seqs)
    if n_stream == 1:
        return [np.arange(s, min(s + n_ubatch, n)) for s in range(0, n, n_ubatch)]
    used = np.zeros(n, bool)
    by_seq = {s: np.flatnonzero(seqs == s) for s in np.unique(seqs)}
    out = []
    while not used.all():
        run = []
        for i in np.flatnonzero(~used):
            s = int(seqs[i])
            if s not in run and (not run or s == run[-1] + 1):
                run.append(s)
                if len(run) > n_ubatch:
                    break
        left = [by_seq[s][~used[by_seq[s]]] for s in run]
        k = min(len(x) for x in left)
        k = max(1, min(k, n_ubatch // len(run)))  # every sequence gives k rows
        rows = np.concatenate([x[:k] for x in left])
        used[rows] = True
        out.append(rows)
    return out
