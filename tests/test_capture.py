"""Hidden-state capture during llama_decode (pyguard._C.LayerCapture) on SmolLM2-135M, checked
against an independent pure-Python ctypes callback (PyCapture) and against a control vector whose
effect on layer 5's output is known exactly."""
import ctypes
import glob
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from llama_cpp import _logger  # noqa: E402
from llama_cpp import llama_cpp as L  # noqa: E402

from pyguard import models  # noqa: E402
from pyguard.llama import capture  # noqa: E402

MODEL = models.model_path("smollm2-135m")
pytestmark = pytest.mark.needs_file(MODEL, "SmolLM2")

LAYER = 5
NAME = capture.layer_name(LAYER)
N_EMBD = 576
THREADS = max(1, min(2, len(os.sched_getaffinity(0))))
PROMPT = ("The committee reviewed the proposal for the new library on Tuesday, and after a long "
          "discussion about the budget, the architects agreed to revise the plans by next month, "
          "keeping the old reading room and garden.")


@pytest.fixture(scope="module")
def model():
    _logger.set_verbose(False)
    L.llama_backend_init()
    m = L.llama_model_load_from_file(str(MODEL).encode(), L.llama_model_default_params())
    assert m, "model did not load"
    yield m
    L.llama_model_free(m)


@pytest.fixture(scope="module")
def tokens(model):
    vocab = L.llama_model_get_vocab(model)
    text = PROMPT.encode()
    buf = (L.llama_token * 256)()
    n = L.llama_tokenize(vocab, text, len(text), buf, len(buf), True, False)
    assert 30 <= n <= 64, n
    return list(buf[:n])


@pytest.fixture(scope="module")
def lib():
    return capture.libggml_base_path()


class Ctx:
    """A low-level llama.cpp context (one sequence) with an optional capture installed."""

    def __init__(self, model, cap=None, n_batch=64, n_ubatch=64, n_ctx=256, threads=THREADS):
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_batch, n_ubatch
        cp.n_threads = cp.n_threads_batch = threads
        if cap is not None:
            capture.install(cp, cap)
        self.cap = cap  # the capture must outlive the context
        self.model = model
        self.ctx = L.llama_init_from_model(model, cp)
        assert self.ctx, "context creation failed"
        self.n_batch = n_batch
        self.batch = L.llama_batch_init(n_batch, 0, 1)

    def decode(self, toks, start=0, all_logits=False):
        for s in range(0, len(toks), self.n_batch):
            part = toks[s : s + self.n_batch]
            b = self.batch
            b.n_tokens = len(part)
            for i, t in enumerate(part):
                b.token[i], b.pos[i], b.n_seq_id[i] = t, start + s + i, 1
                b.seq_id[i][0] = 0
                b.logits[i] = all_logits or (s + i == len(toks) - 1)
            assert L.llama_decode(self.ctx, b) == 0

    def reset(self):
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)

    def set_cvec(self, data, il_start, il_end):
        if data is None:
            rc = L.llama_set_adapter_cvec(self.ctx, None, 0, N_EMBD, 0, 0)
        else:
            self._cvec = np.ascontiguousarray(data, dtype=np.float32)
            ptr = self._cvec.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            rc = L.llama_set_adapter_cvec(self.ctx, ptr, self._cvec.size, N_EMBD, il_start, il_end)
        assert rc == 0

    def close(self):
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def captured(model, toks, cap, **kw):
    with Ctx(model, cap, **kw) as c:
        c.decode(toks)
    return cap.take()


@pytest.mark.parametrize("n_batch,n_ubatch", [(64, 64), (64, 16), (16, 16)],
                         ids=["one-ubatch", "3-ubatches", "3-decodes"])
def test_cpp_equals_python_oracle(model, tokens, lib, n_batch, n_ubatch):
    cap = capture.LayerCapture(lib, NAME)
    got = captured(model, tokens, cap, n_batch=n_batch, n_ubatch=n_ubatch)
    want = captured(model, tokens, capture.PyCapture(lib, NAME), n_batch=n_batch, n_ubatch=n_ubatch)
    assert got.shape == (len(tokens), N_EMBD) and got.dtype == np.float32
    assert np.isfinite(got).all() and np.abs(got).max() > 0
    np.testing.assert_array_equal(got, want)
    assert cap.captures == -(-len(tokens) // n_ubatch)  # one tensor per ubatch
    assert cap.rows == 0 and cap.n_embd == N_EMBD


def test_ubatch_split_keeps_row_order(model, tokens, lib):
    """Rows of several ubatches are appended in token order: the same hidden states as one ubatch
    (up to the rounding of a differently blocked matmul)."""
    one = captured(model, tokens, capture.LayerCapture(lib, NAME))
    split = captured(model, tokens, capture.LayerCapture(lib, NAME), n_ubatch=16)
    np.testing.assert_allclose(split, one, rtol=1e-3, atol=1e-3)
    # and not merely close on average: each row is closest to its own counterpart
    d = ((split[:, None, :] - one[None, :, :]) ** 2).sum(-1)
    assert (d.argmin(axis=1) == np.arange(len(tokens))).all()


def test_capture_does_not_change_the_logits(model, tokens, lib):
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))

    def last_logits(cap):
        with Ctx(model, cap, n_ubatch=16) as c:
            c.decode(tokens)
            return np.ctypeslib.as_array(L.llama_get_logits_ith(c.ctx, -1), shape=(n_vocab,)).copy()

    want = last_logits(None)
    np.testing.assert_array_equal(last_logits(capture.LayerCapture(lib, NAME)), want)
    off = capture.LayerCapture(lib, NAME)
    off.enabled = False
    np.testing.assert_array_equal(last_logits(off), want)


def test_disabled_captures_nothing(model, tokens, lib):
    cap = capture.LayerCapture(lib, NAME)
    cap.enabled = False
    assert cap.enabled is False
    with Ctx(model, cap) as c:
        c.decode(tokens)
        assert cap.rows == 0 and cap.asks == 0 and cap.captures == 0
        assert cap.take().shape == (0, 0)
        cap.enabled = True  # and it can be switched on for the next decode
        c.reset()
        c.decode(tokens)
        assert cap.rows == len(tokens) and cap.asks > 500
    assert cap.take().shape == (len(tokens), N_EMBD)


def test_unknown_name_captures_nothing(model, tokens, lib):
    cap = capture.LayerCapture(lib, "l_out-999")
    assert captured(model, tokens, cap).shape == (0, 0)
    assert cap.asks > 500 and cap.captures == 0  # it was asked about every node


def test_take_clears_and_rows_accumulate(model, tokens, lib):
    cap = capture.LayerCapture(lib, NAME)
    with Ctx(model, cap) as c:
        c.decode(tokens)
        c.decode(tokens[:7], start=len(tokens))  # a second decode appends
        assert cap.rows == len(tokens) + 7
        first = cap.take()
        assert first.shape == (len(tokens) + 7, N_EMBD)
        assert cap.rows == 0 and cap.take().shape == (0, N_EMBD)  # n_embd is kept after take()
        c.reset()
        c.decode(tokens)
        again = cap.take()
        cap.clear()
        assert cap.rows == 0 and cap.n_embd == 0 and cap.take().shape == (0, 0)
    np.testing.assert_array_equal(again, first[: len(tokens)])  # deterministic, same KV state


def test_bad_library_is_a_clear_error(lib):
    with pytest.raises(OSError, match="cannot load the ggml library '/nonexistent/libggml-base.so'"):
        capture.LayerCapture("/nonexistent/libggml-base.so", NAME)
    with pytest.raises(RuntimeError, match="symbol 'ggml_get_name' not found in libm.so.6"):
        capture.LayerCapture("libm.so.6", NAME)
    with pytest.raises(ValueError, match="name is empty"):
        capture.LayerCapture(lib, "")


def _in_fresh_python(code):
    """Runs code in a new interpreter (dlopen side effects stay out of this test process)."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_found_the_loaded_library(lib):
    """libggml_base_path() names the very file libllama loaded (the wheel ships copies, not
    symlinks, of libggml-base.so / .so.0 / .so.0.x.y and libllama loads .so.0), so the capture
    reuses it (RTLD_NOLOAD) instead of loading a second copy of ggml."""
    assert os.path.basename(lib).startswith("libggml-base")
    out = _in_fresh_python("""
        from pyguard.llama import capture
        p = capture.libggml_base_path()
        maps = open("/proc/self/maps").read()
        assert p in maps, (p, [l for l in maps.splitlines() if "ggml-base" in l])
        for _ in range(3):  # dlopen / dlclose repeatedly: the library stays llama.cpp's
            c = capture.LayerCapture(p, "l_out-5")
            assert c.loaded_fresh is False
            del c
        print("ok")
    """)
    assert out.strip() == "ok"
    cap = capture.LayerCapture(lib, NAME)
    assert cap.name == NAME and cap.lib_path == lib and cap.user_data != 0 and cap.callback != 0
    assert "l_out-5" in repr(cap)


def test_second_copy_of_ggml_still_works(model, tokens, lib):
    """If given another copy of the library (here a duplicate file), LayerCapture loads it for good
    (RTLD_NODELETE: reloading would re-run ggml's constructor, which asserts) and still reads the
    tensors, since the functions it uses only read the tensor and call through its buffer."""
    other = [p for p in sorted(glob.glob(os.path.join(os.path.dirname(lib), "libggml-base.so*")))
             if not os.path.samefile(p, lib)]
    if not other:
        pytest.skip("no second copy of libggml-base next to the loaded one")
    out = _in_fresh_python(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import numpy as np
        import test_capture as T
        from llama_cpp import llama_cpp as L
        from pyguard.llama import capture
        model = L.llama_model_load_from_file(str(T.MODEL).encode(), L.llama_model_default_params())
        toks = {tokens!r}
        for i in range(3):  # fresh load, then the same (never unloaded) copy again
            c = capture.LayerCapture({other[0]!r}, T.NAME)
            assert c.loaded_fresh is (i == 0), (i, c.loaded_fresh)
            got = T.captured(model, toks, c)
            del c
        want = T.captured(model, toks, capture.LayerCapture(capture.libggml_base_path(), T.NAME))
        assert got.shape == (len(toks), T.N_EMBD)
        np.testing.assert_array_equal(got, want)
        L.llama_model_free(model)
        print("ok")
    """)
    assert out.strip() == "ok"


def test_refuses_changing_row_length(model, tokens, lib):
    """'Qcur-0' names three nodes: the projection [576, T], its reshape [64, 9, T] and the rope
    output [64, 9, T]. The second has rows of 64: flagged, not crashed, raised by take()."""
    cap = capture.LayerCapture(lib, "Qcur-0")
    with Ctx(model, cap) as c:
        c.decode(tokens)
        with pytest.raises(RuntimeError, match="has rows of 64 values, earlier ones had 576"):
            cap.take()
        assert cap.rows == 0 and cap.take().shape == (0, N_EMBD)  # the error was cleared
    py = capture.PyCapture(lib, "Qcur-0")
    with pytest.raises(RuntimeError, match="has rows of 64 values"):
        captured(model, tokens, py)


def test_refuses_non_float32(model, tokens, lib):
    """The KV cache view is float16: refused with a message, decoding goes on."""
    cap = capture.LayerCapture(lib, "cache_k_l0 (view)")
    with Ctx(model, cap) as c:
        c.decode(tokens)
        with pytest.raises(RuntimeError, match="is not a contiguous float32 matrix"):
            cap.take()


def test_control_vector_shifts_exactly_this_layer(model, tokens, lib, rng):
    """llama.cpp adds the control vector's direction for layer il to l_out-il (its buffer starts at
    layer 1). With v at layer 5 only, captured l_out-5 moves by exactly +v and l_out-4 not at all:
    the capture reads layer 5's output."""
    n_layer = L.llama_model_n_layer(model)
    v = rng.standard_normal(N_EMBD).astype(np.float32)
    cvec = np.zeros((n_layer - 1, N_EMBD), dtype=np.float32)
    cvec[LAYER - 1] = v
    out = {}
    for name in (NAME, capture.layer_name(LAYER - 1), capture.layer_name(LAYER + 1)):
        cap = capture.LayerCapture(lib, name)
        with Ctx(model, cap) as c:
            c.decode(tokens)
            base = cap.take()
            c.reset()
            c.set_cvec(cvec, 1, n_layer - 1)
            c.decode(tokens)
            shifted = cap.take()
        out[name] = (base, shifted)
    base, shifted = out[NAME]
    assert shifted.shape == base.shape == (len(tokens), N_EMBD)
    np.testing.assert_allclose(shifted - base, np.broadcast_to(v, base.shape), rtol=0, atol=1e-4)
    b4, s4 = out[capture.layer_name(LAYER - 1)]
    np.testing.assert_array_equal(s4, b4)
    b6, s6 = out[capture.layer_name(LAYER + 1)]
    assert np.abs(s6 - b6).max() > 1e-2  # downstream layers see the shift


def test_last_layer_holds_only_output_rows(model, tokens, lib):
    """llama.cpp drops the rows without requested outputs before the last layer's FFN: its l_out
    holds one row per requested logit (here only the last token), earlier layers every token."""
    n_layer = L.llama_model_n_layer(model)
    cap = capture.LayerCapture(lib, capture.layer_name(n_layer - 1))
    with Ctx(model, cap) as c:
        c.decode(tokens)
        last_only = cap.take()
        c.reset()
        c.decode(tokens, all_logits=True)
        every = cap.take()
    assert last_only.shape == (1, N_EMBD)
    assert every.shape == (len(tokens), N_EMBD)
    np.testing.assert_allclose(last_only[0], every[-1], rtol=1e-3, atol=1e-3)


def test_rows_follow_ubatch_order_across_sequences(model, tokens, lib):
    """Two sequences in one batch, interleaved item by item. Rows come in llama.cpp's ubatch order:
    batch order with a unified KV cache; regrouped per sequence inside each ubatch without one
    (split_equal). Single-sequence decodes are in batch order either way."""
    a, b = tokens[:20], tokens[20:40]
    assert len(b) == 20
    cap = capture.LayerCapture(lib, NAME)
    ref_a, ref_b = captured(model, a, cap), captured(model, b, cap)
    for unified, n_ubatch in ((True, 64), (False, 64), (False, 16)):
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max, cp.kv_unified = 256, 64, n_ubatch, 2, unified
        cp.n_threads = cp.n_threads_batch = THREADS
        capture.install(cp, cap)
        ctx = L.llama_init_from_model(model, cp)
        batch = L.llama_batch_init(64, 0, 2)
        try:
            items = [it for i in range(20) for it in ((a[i], i, 0), (b[i], i, 1))]
            batch.n_tokens = len(items)
            for j, (t, pos, seq) in enumerate(items):
                batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.logits[j] = t, pos, 1, j >= 38
                batch.seq_id[j][0] = seq
            assert L.llama_decode(ctx, batch) == 0
            got = cap.take()
        finally:
            L.llama_batch_free(batch)
            L.llama_free(ctx)
        if unified:  # batch order: a0 b0 a1 b1 ...
            want = np.stack([ref_a, ref_b], axis=1).reshape(40, N_EMBD)
        else:  # per ubatch of n_ubatch // 2 tokens of each sequence: a0..a7 b0..b7 a8..
            h = n_ubatch // 2
            want = np.concatenate([np.concatenate([ref_a[i : i + h], ref_b[i : i + h]]) for i in range(0, 20, h)])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_engine_takes_the_capture(lib):
    """Engine(cb_eval=..., cb_eval_user_data=...) as it is: eval_callback() supplies both."""
    from pyguard.llama.engine import Engine

    cap = capture.LayerCapture(lib, NAME)
    cb, ud = capture.eval_callback(cap)
    eng = Engine(MODEL, n_ctx=256, n_seq=2, n_threads=THREADS, n_batch=64, cb_eval=cb, cb_eval_user_data=ud)
    try:
        toks = eng.tokenize(PROMPT, add_bos=True)
        eng.decode([(t, i, 0, i == len(toks) - 1) for i, t in enumerate(toks)])
        h = cap.take()
        cap.enabled = False  # generation steps: no copies
        eng.decode([(toks[0], len(toks), 0, True)])
        assert cap.rows == 0
    finally:
        eng.close()
    assert h.shape == (len(toks), N_EMBD) and np.isfinite(h).all()


# -- a batch of several sequences: llama.cpp's ubatches, CMRM's row shift -------------------------
SENTENCES = ["The committee reviewed the proposal for the new library on Tuesday.",
             "Hello there, how are you doing today my friend?",
             "Write a short poem about the sea, the wind and the sky.", "What is two plus two?"]


@pytest.fixture(scope="module")
def engine(lib):
    """A 4-sequence Engine with a LayerCapture on layer 5 that is also its shifter."""
    from pyguard.llama.engine import Engine

    cap = capture.LayerCapture(lib, NAME)
    cb, ud = capture.eval_callback(cap)
    e = Engine(MODEL, n_ctx=128, n_seq=4, n_threads=THREADS, n_batch=64, cb_eval=cb, cb_eval_user_data=ud)
    e.shifter, e.cap = cap, cap
    yield e
    e.close()


def run(e, items, shift=None):
    """Decode ``items`` from an empty cache; (layer-5 rows, logit rows) in item order."""
    e.clear()
    e.cap.clear()
    e.cap.enabled = True
    order = e.decode(items, shift=shift, order=True)
    e.cap.enabled = False
    H = e.cap.take()
    rows = np.empty_like(H)
    rows[order] = H
    return rows, np.stack([e.logits(i)[0] for i in range(len(items))])


def lone_runs(e, toks, cvec=None, shifted=()):
    """Each prompt in sequence 0 alone, all logits; ``shifted`` ones under the control vector."""
    out = []
    for s, t in enumerate(toks):
        e.set_cvec(*cvec) if s in shifted else e.set_cvec(None)
        out.append(run(e, [(x, i, 0, True) for i, x in enumerate(t)]))
    e.set_cvec(None)
    return out


def mixed(toks, rng):
    """The prompts' tokens in one batch, sequence s = prompt s: interleaved at random, each
    sequence's positions in order."""
    labels = rng.permutation([s for s, t in enumerate(toks) for _ in t])
    nxt = [0] * len(toks)
    items = []
    for s in labels:
        items.append((toks[s][nxt[s]], nxt[s], int(s), True))
        nxt[s] += 1
    return items


def test_ubatches_predict_llama_cpp_row_order(engine, rng):
    """Engine.decode's row order (engine.ubatches) is the order the callback saw the rows in:
    several sequences interleaved or grouped, over several ubatches: rows equal their lone runs."""
    from pyguard.llama.engine import ubatches

    toks = [engine.tokenize(s, add_bos=True) for s in SENTENCES]
    alone = lone_runs(engine, toks)
    for items in (mixed(toks, rng), sorted(mixed(toks, rng), key=lambda it: (it[2], it[1])),
                  sorted(mixed(toks, rng), key=lambda it: it[1])):
        H, logits = run(engine, items)
        for s in range(len(toks)):
            mine = [k for k, it in enumerate(items) if it[2] == s]
            np.testing.assert_array_equal(H[mine], alone[s][0])
            np.testing.assert_array_equal(logits[mine], alone[s][1])
    # the rules, by hand: runs of consecutive ids, equal shares, n_ubatch rows at most
    assert [u.tolist() for u in ubatches([0, 0, 1, 1, 1, 3], 8, 4)] == [[0, 1, 2, 3], [4], [5]]
    assert [u.tolist() for u in ubatches([2, 0, 1, 0], 8, 4)] == [[0], [1, 2], [3]]
    assert [u.tolist() for u in ubatches([0] * 5, 2, 4)] == [[0, 1], [2, 3], [4]]
    assert [u.tolist() for u in ubatches([1, 0, 1], 2, 1)] == [[0, 1], [2]]  # one stream: batch order


def test_row_shift_equals_the_control_vector_on_its_rows_only(engine, rng):
    """CMRM's row shift in a mixed batch: the shifted sequence's rows and logits equal a lone run
    under llama.cpp's control vector exactly; the other sequences' equal their plain runs."""
    from pyguard.methods import CMRM

    toks = [engine.tokenize(s, add_bos=True) for s in SENTENCES]
    n_layer = engine.n_layer
    cm = CMRM((rng.standard_normal((n_layer, N_EMBD)) * 0.5).astype(np.float32), alpha=0.7, layers=(2, n_layer - 1))
    alone = lone_runs(engine, toks, cm.cvec_buffer(n_layer, N_EMBD), shifted={1, 3})
    engine.shifter.set_shift(*cm.row_shift(n_layer, N_EMBD))
    try:
        for items in (mixed(toks, rng), sorted(mixed(toks, rng), key=lambda it: (it[2], it[1]))):
            before = engine.shifter.shifts
            H, logits = run(engine, items, shift=[it[2] in (1, 3) for it in items])
            assert engine.shifter.shifts > before
            for s in range(len(toks)):
                mine = [k for k, it in enumerate(items) if it[2] == s]
                np.testing.assert_array_equal(H[mine], alone[s][0])
                np.testing.assert_array_equal(logits[mine], alone[s][1])
        plain = run(engine, [(x, i, 0, True) for i, x in enumerate(toks[1])])
        assert np.abs(plain[1] - alone[1][1]).max() > 0.1  # the shift did something
        # soft tokens, every row: decode_embd(shift=True) equals the control vector too
        embd = (rng.standard_normal((7, N_EMBD)) * 0.02).astype(np.float32)
        got = []
        for shift, cvec in ((True, None), (False, cm.cvec_buffer(n_layer, N_EMBD))):
            engine.clear()
            engine.set_cvec(*cvec) if cvec else engine.set_cvec(None)
            engine.decode_embd(embd, 0, seq=2, shift=shift)
            got.append(engine.logits(-1)[0].copy())
        engine.set_cvec(None)
        np.testing.assert_array_equal(got[0], got[1])
    finally:
        engine.shifter.set_shift(None, 0, 0, 0)


def test_row_shift_refuses_a_plan_llama_cpp_did_not_run(engine, rng):
    """A plan with the wrong ubatches is an error after the decode, and a tensor whose rows differ
    from the plan is left unshifted; bad tables and plans are clear errors."""
    cap = engine.shifter
    v = rng.standard_normal((engine.n_layer, N_EMBD)).astype(np.float32)
    toks = engine.tokenize(SENTENCES[0], add_bos=True)[:10]
    plain = run(engine, [(x, i, 0, True) for i, x in enumerate(toks)])
    cap.set_shift(v, 1.0, 1, engine.n_layer - 1)
    try:
        for plan, msg in (([(np.ones(10, bool), np.ones(10, bool))] * 2, "ran 1 ubatches, the shift was planned for 2"),
                          ([(np.ones(9, bool), np.ones(9, bool))], "has 10 rows, the shift was planned for 9")):
            engine.clear()
            cap.plan_shift(plan)
            cap.enabled = True
            engine._run(_batch(engine, toks))  # noqa: SLF001 - the raw decode, with a plan made by hand
            cap.enabled = False
            with pytest.raises(RuntimeError, match=msg):
                cap.end_shift()
            if "rows" in msg:  # nothing shifted wrongly
                np.testing.assert_array_equal(cap.take(), plain[0])
            cap.clear()
        cap.end_shift()  # no plan: nothing to report
        for args, msg in (((v[:, :5].copy(), 1.0, 1, 3), None), ((v.astype(np.float64), 1.0, 1, 3), "float32"),
                          ((v, float("nan"), 1, 3), "alpha is not finite"), ((v, 1.0, 3, 1), r"layers \[3, 1\]"),
                          ((v, 1.0, 1, engine.n_layer), "outside")):
            if msg:
                with pytest.raises(ValueError, match=msg):
                    cap.set_shift(*args)
        with pytest.raises(ValueError, match="rows and outputs differ"):
            cap.plan_shift([(np.ones(3, bool), np.ones(2, bool))])
        with pytest.raises(ValueError, match="1-D bool or uint8"):
            cap.plan_shift([(np.ones(3, np.float32), np.ones(3, bool))])
        cap.end_shift()
    finally:
        cap.set_shift(None, 0, 0, 0)
    with pytest.raises(ValueError, match="no shift table"):
        cap.plan_shift(True)


def _batch(e, toks):
    b = e.batch
    b.n_tokens = len(toks)
    for i, t in enumerate(toks):
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, i, 1, True
        b.seq_id[i][0] = 0
    return b


def _paired_costs(model, toks, lib, reps, step, threads):
    """Wall time of one decode per configuration, round-robin (so load from other processes
    hits every configuration alike); returns {config: (median ms, median paired diff vs none)}."""
    caps = {
        "no callback": None,
        "C++ disabled": capture.LayerCapture(lib, NAME),
        "C++ enabled": capture.LayerCapture(lib, NAME),
        "Python disabled": capture.PyCapture(lib, NAME),
        "Python enabled": capture.PyCapture(lib, NAME),
    }
    caps["C++ disabled"].enabled = False
    caps["Python disabled"].enabled = False
    ctxs = {k: Ctx(model, cap, threads=threads) for k, cap in caps.items()}
    times = {k: [] for k in ctxs}
    try:
        for c in ctxs.values():
            c.decode(toks)
        for r in range(reps + 1):
            for k, c in ctxs.items():
                if step:  # one generated token after the prompt
                    L.llama_memory_seq_rm(L.llama_get_memory(c.ctx), 0, len(toks), -1)
                else:
                    c.reset()
                t0 = time.perf_counter()
                c.decode(toks[:1] if step else toks, start=len(toks) if step else 0)
                dt = time.perf_counter() - t0
                if c.cap is not None:
                    c.cap.take()
                if r:  # the first round is a warm-up
                    times[k].append(1e3 * dt)
    finally:
        for c in ctxs.values():
            c.close()
    base = np.array(times["no callback"])
    return {k: (float(np.median(v)), float(np.median(np.array(v) - base))) for k, v in times.items()}


def test_report_callback_cost(model, tokens, lib, capsys):
    """What the callback costs per decode: the 40-token prefill and a 1-token generation step,
    without a callback, with the C++ capture (enabled / disabled) and with the Python ctypes
    callback. The cost is per graph (about 940 nodes offered), not per token. Printed, not
    asserted (timing on a shared machine). One thread by default: the callback runs on the calling
    thread between graph pieces, and with several threads, other processes on the machine disturb
    ggml's thread barriers far more than the callback costs. PYGUARD_CAPTURE_REPS scales the
    repetitions, PYGUARD_CAPTURE_THREADS sets the threads."""
    scale = float(os.environ.get("PYGUARD_CAPTURE_REPS", "1"))
    threads = int(os.environ.get("PYGUARD_CAPTURE_THREADS", "1"))
    lines = []
    for step, reps in ((False, max(2, int(3 * scale))), (True, max(10, int(30 * scale)))):
        res = _paired_costs(model, tokens, lib, reps, step, threads)
        what = "1-token step" if step else f"{len(tokens)}-token prefill"
        lines.append(f"{what}, {threads} thread(s), {reps} interleaved rounds (median ms, paired diff):")
        lines += [f"  {k:16s} {ms:8.2f} ms  {d:+7.3f} ms" for k, (ms, d) in res.items()]
    with capsys.disabled():
        print("\ncapture callback cost on SmolLM2-135M\n" + "\n".join(lines))
