"""The llama.cpp runtime on SmolLM2-135M (fast; no safety alignment, so these check the
machinery: exact equalities against independent runs, not refusals)."""
import os
import threading

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from pyguard import models  # noqa: E402
from pyguard.llama import GuardedLlama  # noqa: E402
from pyguard.llama.engine import Engine  # noqa: E402
from pyguard.llama.reference import naive_coca  # noqa: E402
from pyguard.methods import CMRM, CoCA  # noqa: E402

MODEL = models.model_path("smollm2-135m")
pytestmark = pytest.mark.needs_file(MODEL, "SmolLM2")

MSGS = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "List three uses of a paperclip."}]


@pytest.fixture(scope="module")
def plain():
    with GuardedLlama(MODEL, n_ctx=512) as g:
        yield g


def guarded(**coca):
    return GuardedLlama(MODEL, n_ctx=512, coca=CoCA(**coca))


def text(r):
    return r["choices"][0]["message"]["content"]


def test_response_is_openai_shaped(plain):
    r = plain.create_chat_completion(MSGS, max_tokens=8)
    assert r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-")
    assert r["choices"][0]["message"]["role"] == "assistant" and text(r)
    assert r["choices"][0]["finish_reason"] in ("stop", "length")
    assert r["usage"]["completion_tokens"] <= 8 and r["usage"]["prompt_tokens"] > 10
    assert r["pyguard"]["coca"] is None and r["pyguard"]["timings"]["prefill_ms"] > 0


def test_alpha_zero_equals_unguarded(plain):
    want = plain.create_chat_completion(MSGS, max_tokens=24)
    with guarded(alpha=0.0) as g:
        got = g.create_chat_completion(MSGS, max_tokens=24)
    assert text(got) == text(want)
    assert got["usage"]["completion_tokens"] == want["usage"]["completion_tokens"]
    assert got["pyguard"]["coca"]["dual_steps"] == want["usage"]["completion_tokens"]


@pytest.mark.parametrize("position", ["after", "before"])
def test_shared_prefix_equals_two_independent_runs(position):
    """Calibrated logits at every step equal those from two separately prefilled and decoded
    sequences, and so do the greedy tokens."""
    with guarded(alpha=1.7, principle_position=position) as g:
        g.policy.trace = []
        r = g.create_chat_completion(MSGS, max_tokens=16)
        req = g._request(MSGS, 16, 0.0, 1.0, None, None)
        base, safe = req.base[0], req.safe[0]  # text-only prompts: one token list each
        assert 0 < r["pyguard"]["coca"]["shared_prefix_tokens"] < len(safe)
        trace = []
        naive = naive_coca(g.engine, base, safe, 1.7, 16, trace)
        pieces = b"".join(g.engine.piece(t) for t in naive if not g.engine.is_eog(t)).decode("utf-8", "replace")
    assert len(g.policy.trace) == len(trace) == len(naive)
    for step, (got, want) in enumerate(zip(g.policy.trace, trace)):
        np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-3, err_msg=f"step {step}")
    assert text(r) == pieces


def test_principle_changes_the_answer():
    with guarded(alpha=0.0) as g0, guarded(alpha=3.0) as g3:
        a, b = (g.create_chat_completion(MSGS, max_tokens=24) for g in (g0, g3))
    assert text(a) != text(b)
    assert b["pyguard"]["coca"]["kl_max"] > 0


def test_gate_drops_the_safe_sequence():
    with guarded(alpha=1.5, gate_kl=1e9, gate_tokens=3) as g:
        r = g.create_chat_completion(MSGS, max_tokens=12)
    c = r["pyguard"]["coca"]
    assert c["gated"] and c["dual_steps"] == 3 and r["usage"]["completion_tokens"] > 3
    with guarded(alpha=1.5, gate_kl=0.0, gate_tokens=3) as g:
        r = g.create_chat_completion(MSGS, max_tokens=12)
    assert not r["pyguard"]["coca"]["gated"] and r["pyguard"]["coca"]["dual_steps"] == r["usage"]["completion_tokens"]


@pytest.mark.parametrize("coca", [False, True])
def test_streaming_equals_non_streaming(plain, coca):
    g = guarded(alpha=1.5) if coca else plain
    try:
        full = g.create_chat_completion(MSGS, max_tokens=20)
        chunks = list(g.create_chat_completion(MSGS, max_tokens=20, stream=True))
    finally:
        if coca:
            g.close()
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text(full)
    assert chunks[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert chunks[-1]["pyguard"]["coca"] == full["pyguard"]["coca"] or not coca


def test_sampling_is_reproducible_by_seed(plain):
    a, b, c = (plain.create_chat_completion(MSGS, max_tokens=16, temperature=0.9, top_p=0.9, seed=s)
               for s in (7, 7, 8))
    assert text(a) == text(b) and text(a) != text(c)
    with guarded(alpha=1.5) as g:
        d, e = (g.create_chat_completion(MSGS, max_tokens=16, temperature=0.9, top_p=0.9, seed=7) for _ in range(2))
    assert text(d) == text(e)


def test_stop_strings_cut_the_text(plain):
    full = text(plain.create_chat_completion(MSGS, max_tokens=30))
    cut = full.split()[3]
    r = plain.create_chat_completion(MSGS, max_tokens=30, stop=[cut])
    assert text(r) == full[: full.index(cut)] and r["choices"][0]["finish_reason"] == "stop"
    chunks = list(plain.create_chat_completion(MSGS, max_tokens=30, stop=cut, stream=True))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text(r)


def test_two_threads_are_serialized(plain):
    want = [text(plain.create_chat_completion([{"role": "user", "content": q}], max_tokens=12))
            for q in ("Name a color.", "Name a fruit.")]
    got = [None, None]

    def ask(i, q):
        got[i] = text(plain.create_chat_completion([{"role": "user", "content": q}], max_tokens=12))

    ts = [threading.Thread(target=ask, args=(i, q)) for i, q in enumerate(("Name a color.", "Name a fruit."))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert got == want


def test_prompt_renders_as_llama_cpp_python_does(plain):
    """The same messages give the same prompt text as llama-cpp-python's Llama."""
    llm = llama_cpp.Llama(str(MODEL), n_ctx=256, verbose=False)
    seen = []
    orig = llm.tokenize
    llm.tokenize = lambda text, add_bos=True, special=False: seen.append((text, add_bos)) or orig(text, add_bos, special)
    llm.create_chat_completion(MSGS, max_tokens=1)
    ours, add_bos = plain.template.render(MSGS)
    assert seen[0] == (ours.encode("utf-8"), add_bos)


def test_last_turn_head_ends_where_the_last_user_message_starts(plain):
    from pyguard.chat import last_turn_head

    render = lambda m: plain.template.render(m)[0]  # noqa: E731
    chats = [MSGS, [{"role": "user", "content": "hi"}],
             [*MSGS, {"role": "assistant", "content": "Bend it."}, {"role": "user", "content": "hi"}]]
    for m in chats:
        text, head = render(m), last_turn_head(render, m)
        assert text.startswith(head) and text[len(head):].startswith(m[-1]["content"])
        assert m[-1]["content"] not in head
        assert last_turn_head(render, [*m[:-1], {"role": "user", "content": "x" + m[-1]["content"]}]) == head
    assert last_turn_head(render, chats[2][:3]) is None  # the last message is the assistant's


@pytest.mark.parametrize("kw,msg", [
    (dict(max_tokens=0), "max_tokens must be a positive integer, got 0"),
    (dict(max_tokens=600), "exceeds the context of 512 tokens per sequence"),
    (dict(messages=[{"role": "robot", "content": "hi"}]), "unknown role 'robot'"),
    (dict(messages=[]), "messages must be a non-empty list"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]),
     "images given, but this model was loaded without an mmproj file"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]),
     "remote URLs are not fetched"),
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(temperature="0.5"), "temperature must be a finite number >= 0, got '0.5'"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(seed="abc", temperature=0.5), "seed must be a non-negative integer, got 'abc'"),
    (dict(stop={"a": 1}), "stop must be a string or a list of strings"),
    (dict(stop=5), "stop must be a string or a list of strings, got 5"),
    (dict(messages=[{"role": "user", "content": [{"type": "text", "text": None}]}]),
     "messages[0].content[0]: a text part needs a string 'text', got None"),
    (dict(messages=[{"role": "user", "content": [{"type": "text", "text": ["a"]}]}]), "a text part needs a string"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "an image_url part needs 'image_url'"),
    (dict(messages=[{"role": "user", "content": "hi \ud800"}]), "messages[0] holds a character that is not valid"),
])
def test_bad_requests_are_clear_errors_and_the_model_stays_usable(plain, kw, msg):
    args = dict(messages=MSGS, max_tokens=4)
    args.update(kw)
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        plain.create_chat_completion(**args)
    assert text(plain.create_chat_completion(MSGS, max_tokens=4))


@pytest.mark.parametrize("coca", [None, CoCA()], ids=["plain", "coca"])
def test_temperatures_below_the_floor_are_greedy(coca):
    """1e-40 overflowed numpy's sampler and 5e-324 failed in C++ with CoCA: below
    MIN_TEMPERATURE a request is greedy."""
    with GuardedLlama(MODEL, n_ctx=256, coca=coca) as g:
        greedy = text(g.create_chat_completion(MSGS, max_tokens=6))
        for t in (1e-40, 5e-324, 9e-6):
            assert text(g.create_chat_completion(MSGS, max_tokens=6, temperature=t, seed=1)) == greedy


def test_coca_context_counts_the_longer_prompt():
    with guarded(alpha=1.5) as g:
        req = g._request(MSGS, 1, 0.0, 1.0, None, None)
        room = 512 - len(req.safe[0])
        assert len(req.safe[0]) > len(req.base[0])
        g.create_chat_completion(MSGS, max_tokens=room)  # fits
        with pytest.raises(ValueError, match="the longer CoCA prompt"):
            g.create_chat_completion(MSGS, max_tokens=room + 1)


def test_bad_model_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="model file not found"):
        GuardedLlama(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="cannot load model"):
        GuardedLlama(bad)


@pytest.mark.parametrize("kw,err,msg", [
    ({"n_batch": -1, "coca": CoCA()}, ValueError, "n_batch must be an integer >= 1, got -1"),  # was heap corruption
    ({"n_batch": 0}, ValueError, "n_batch must be an integer >= 1"),
    ({"n_threads": 0}, ValueError, "n_threads must be an integer >= 1"),
    ({"n_ctx": 64.5}, ValueError, "n_ctx must be an integer >= 8"),
    ({"n_ctx": 10**9}, ValueError, "exceeds the model's trained context of 8192 tokens"),  # was a memory runaway
    ({"n_ctx": 8192, "parallel": 16}, ValueError, r"needs 2\.8 GiB of KV cache; 1\.0 GiB of memory is available"),
    ({"coca": "yes"}, TypeError, "coca= takes a pyguard.methods.CoCA"),
    ({"cmrm": 3}, TypeError, "cmrm= takes a pyguard.methods.CMRM"),
], ids=["n_batch-1", "n_batch0", "threads0", "n_ctx-float", "n_ctx-huge", "kv-memory", "coca-str", "cmrm-int"])
def test_bad_constructor_arguments_are_clear_errors(kw, err, msg, monkeypatch):
    from pyguard.llama import engine

    monkeypatch.setattr(engine, "_available_memory", lambda: 2**30)  # the same verdict on any machine
    with pytest.raises(err, match=msg):
        GuardedLlama(MODEL, **kw)


def test_n_ctx_limit_overrides_the_trained_context(monkeypatch):
    from pyguard.llama import engine

    monkeypatch.setattr(engine, "_available_memory", lambda: 2**40)
    with GuardedLlama(MODEL, n_ctx=9000, n_ctx_limit=9000) as g:  # trained: 8192
        assert g.engine.n_ctx == 9000
    with pytest.raises(ValueError, match="n_ctx = 9000 exceeds n_ctx_limit = 8500"):
        GuardedLlama(MODEL, n_ctx=9000, n_ctx_limit=8500)


def test_context_is_what_was_asked():
    """llama.cpp pads a small context (64 -> 256 cells); requests are bounded by the 64 asked for."""
    with GuardedLlama(MODEL, n_ctx=64) as g:
        assert g.engine.n_ctx == 64
        with pytest.raises(ValueError, match="exceeds the context of 64 tokens"):
            g.create_chat_completion(MSGS, max_tokens=60)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads Linux's /proc")
def test_a_dropped_model_is_freed():
    """A GuardedLlama dropped without close() frees its context and stops its thread (it kept
    ~17 MB each before it had a finaliser)."""
    import gc

    for _ in range(2):  # allocator warm-up
        GuardedLlama(MODEL, n_ctx=256).create_chat_completion(MSGS, max_tokens=2)
    gc.collect()
    base, threads = _rss(), threading.active_count()
    for _ in range(8):
        g = GuardedLlama(MODEL, n_ctx=256)
        g.create_chat_completion(MSGS, max_tokens=2)
        del g
    gc.collect()
    assert threading.active_count() == threads
    assert _rss() - base < 40 * 2**20  # 8 leaked models would hold > 130 MB


def test_closed_model_says_so():
    g = GuardedLlama(MODEL, n_ctx=256)
    g.close()
    g.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        g.create_chat_completion(MSGS, max_tokens=2)


# -- images (a tiny random mmproj beside SmolLM2: the pipeline, not image understanding) ------------
@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    from tiny_mmproj import write_test_image, write_tiny_mmproj

    d = tmp_path_factory.mktemp("mm")
    return write_tiny_mmproj(d / "mmproj.gguf", n_embd_text=576), [write_test_image(d / f"img{i}.png", seed=i) for i in range(2)]


def image_msgs(path, question="What is in this picture?"):
    return [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(path)}},
                                         {"type": "text", "text": question}]}]


def test_image_requests_end_to_end(image_files):
    mmproj, images = image_files
    with GuardedLlama(MODEL, mmproj_path=mmproj, n_ctx=512) as g:
        a = g.create_chat_completion(image_msgs(images[0]), max_tokens=12)
        b = g.create_chat_completion(image_msgs(images[1]), max_tokens=12)
        data = "data:image/png;base64," + __import__("base64").b64encode(images[0].read_bytes()).decode()
        c = g.create_chat_completion(image_msgs(data), max_tokens=12)
    assert text(a) == text(c)  # the same image from a path and from a data URI
    assert a["usage"]["prompt_tokens"] == b["usage"]["prompt_tokens"] > 16  # image positions counted
    with GuardedLlama(MODEL, mmproj_path=mmproj, n_ctx=512, coca=CoCA(alpha=0.0)) as g:
        d = g.create_chat_completion(image_msgs(images[0]), max_tokens=12)
    assert text(d) == text(a)  # alpha 0 with an image: the unguarded answer
    assert d["pyguard"]["coca"]["shared_prefix_tokens"] > 16  # system prompt and image decoded once


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads Linux's /proc")
def test_unread_image_streams_leave_nothing_behind(image_files):
    """A stream with an image, created and dropped unread, many times: memory flat (its image
    chunks are freed when the request ends)."""
    import gc

    mmproj, images = image_files
    with GuardedLlama(MODEL, mmproj_path=mmproj, n_ctx=256, parallel=2) as g:
        for _ in range(5):
            g.create_chat_completion(image_msgs(images[0]), max_tokens=2, stream=True)
        gc.collect()
        base = _rss()
        for _ in range(60):
            g.create_chat_completion(image_msgs(images[0]), max_tokens=2, stream=True)
        gc.collect()
        assert text(g.create_chat_completion(image_msgs(images[1]), max_tokens=2))
        assert _rss() - base < 20 * 2**20  # 60 x 0.9 MB kept would be > 50 MB


def test_bad_images_and_mmproj(image_files, tmp_path):
    mmproj, images = image_files
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with GuardedLlama(MODEL, mmproj_path=mmproj, n_ctx=512) as g:
        with pytest.raises(ValueError, match="image 0 cannot be decoded"):
            g.create_chat_completion(image_msgs(junk), max_tokens=4)
        with pytest.raises(ValueError, match="image file not found"):
            g.create_chat_completion(image_msgs(tmp_path / "nope.png"), max_tokens=4)
        assert text(g.create_chat_completion(image_msgs(images[0]), max_tokens=4))
    bad = tmp_path / "bad-mmproj.gguf"
    bad.write_bytes(b"GGUF" + np.random.default_rng(1).bytes(2048))
    with pytest.raises(ValueError, match="cannot load mmproj"):
        GuardedLlama(MODEL, mmproj_path=bad)
    with pytest.raises(FileNotFoundError, match="mmproj file not found"):
        GuardedLlama(MODEL, mmproj_path=tmp_path / "none.gguf")


# -- CMRM ------------------------------------------------------------------------------------------
def first_step_logits(**kw):
    """Base logits of the first decode step (CoCA alpha 0 traces them exactly)."""
    with GuardedLlama(MODEL, n_ctx=512, coca=CoCA(alpha=0.0), **kw) as g:
        g.policy.trace = []
        r = g.create_chat_completion(MSGS, max_tokens=1)
        base = g._request(MSGS, 1, 0.0, 1.0, None, None).base[0]
    return g.policy.trace[0][0], r, base


def test_cmrm_zero_vector_changes_nothing(plain):
    zero = CMRM(np.zeros((30, 576), np.float32), alpha=2.0, when="always")
    with GuardedLlama(MODEL, n_ctx=512, cmrm=zero) as g:
        r = g.create_chat_completion(MSGS, max_tokens=16)
    assert r["pyguard"]["cmrm"] == {"on": True, "mode": "dataset"}
    assert text(r) == text(plain.create_chat_completion(MSGS, max_tokens=16))


def test_cmrm_equals_the_control_vector_applied_by_llama_cpp(rng):
    v = (rng.standard_normal((30, 576)) * 0.3).astype(np.float32)
    v[0] = 0
    shifted, r, base = first_step_logits(cmrm=CMRM(v, alpha=0.8, layers=(3, 20), when="always"))
    plain_logits, _, _ = first_step_logits()
    with Engine(MODEL, n_ctx=512, n_seq=1) as e:  # llama.cpp's own control vector, set by hand
        e.set_cvec((-0.8 * v[1:]).ravel(), 3, 20)
        e.decode([(t, i, 0, i == len(base) - 1) for i, t in enumerate(base)])
        direct = e.logits(-1)[0].copy()
    np.testing.assert_array_equal(shifted, direct)  # the row shift does llama.cpp's arithmetic
    assert np.abs(shifted - plain_logits).max() > 0.1  # the shift did something


def test_cmrm_when_image_is_off_for_text(plain):
    v = np.ones((30, 576), np.float32)
    v[0] = 0
    with GuardedLlama(MODEL, n_ctx=512, cmrm=CMRM(v, alpha=5.0)) as g:
        r = g.create_chat_completion(MSGS, max_tokens=12)
    assert r["pyguard"]["cmrm"] == {"on": False, "mode": "dataset"}
    assert text(r) == text(plain.create_chat_completion(MSGS, max_tokens=12))


def test_cmrm_vectors_for_another_model_are_refused(tmp_path):
    with pytest.raises(ValueError, match="CMRM vectors are for n_embd=896, n_layer=24; the model has n_embd=576, n_layer=30"):
        GuardedLlama(MODEL, cmrm=CMRM(np.zeros((24, 896), np.float32)))
    # same shape, fitted on another architecture and vocabulary: refused, naming the file
    CMRM(np.zeros((30, 576), np.float32), model_hint="qwen2 n_layer=30 n_embd=576 n_vocab=151936").save(tmp_path / "q.gguf")
    with pytest.raises(ValueError, match=r"CMRM vectors from '.*q.gguf' were fitted on another model: .* the model is "
                                         r"'llama n_layer=30 n_embd=576 n_vocab=49152' \(arch, n_vocab differ\)"):
        GuardedLlama(MODEL, cmrm=CMRM.load(tmp_path / "q.gguf"))


# -- CASA ------------------------------------------------------------------------------------------
def casa_params(rng, b, d=576, r=16, heads=2, layer=10, with_last=False, with_max=False, **kw):
    from pyguard.methods import CASA

    p = {"Wk": (rng.standard_normal((d, r)) / np.sqrt(d)).astype(np.float32),
         "q": rng.standard_normal((heads, r)).astype(np.float32),
         "w": (rng.standard_normal(d) * 0.2 / np.sqrt(d)).astype(np.float32), "b": b}
    if with_last:
        p["w_last"] = (rng.standard_normal(d) * 0.2 / np.sqrt(d)).astype(np.float32)
    if with_max:
        p["w_max"] = (rng.standard_normal(d) * 0.05 / np.sqrt(d)).astype(np.float32)
    return CASA(p, layer=layer, **kw)


@pytest.mark.parametrize("coca,with_last,with_max", [(False, False, False), (True, False, False), (False, True, False),
                                                     (False, True, True)])
def test_casa_score_equals_casa_score_on_independently_captured_states(rng, coca, with_last, with_max):
    from pyguard import ops
    from pyguard.llama import capture

    casa = casa_params(rng, 0.0, threshold=1.0, with_last=with_last, with_max=with_max)  # never unsafe: answers
    with GuardedLlama(MODEL, n_ctx=512, casa=casa, coca=CoCA(alpha=1.5) if coca else None) as g:
        r = g.create_chat_completion(MSGS, max_tokens=4)
        base = g._request(MSGS, 1, 0.0, 1.0, None, None).base[0]
    got = r["pyguard"]["casa"]
    assert got["unsafe"] is False and got["action"] is None and text(r)
    py = capture.PyCapture(capture.libggml_base_path(), "l_out-10")  # the ctypes oracle
    cb, ud = capture.eval_callback(py)
    with Engine(MODEL, n_ctx=512, n_seq=1, cb_eval=cb, cb_eval_user_data=ud) as e:
        py.enabled = True
        e.decode([(t, i, 0, i == len(base) - 1) for i, t in enumerate(base)])
        H = py.take()
    assert H.shape == (len(base), 576)
    p = casa.params
    want = ops.casa_score(H, np.array([0, len(H)]), p["Wk"], p["q"], p["w"], 0.0, p.get("w_last"), p.get("w_max"),
                          backend="ref")
    assert 0.01 < want[0] < 0.99
    np.testing.assert_allclose(got["score"], want[0], rtol=1e-4)


@pytest.mark.parametrize("coca", [False, True])
def test_casa_unsafe_refuses_or_forces_the_refusal_prefix(rng, coca):
    kw = dict(coca=CoCA(alpha=1.5)) if coca else {}
    with GuardedLlama(MODEL, n_ctx=512, casa=casa_params(rng, 30.0), **kw) as g:
        r = g.create_chat_completion(MSGS, max_tokens=16)
        chunks = list(g.create_chat_completion(MSGS, max_tokens=16, stream=True))
    assert text(r) == "I'm sorry, but I can't help with that."
    assert r["usage"]["completion_tokens"] == 0 and r["choices"][0]["finish_reason"] == "stop"
    assert r["pyguard"]["casa"]["unsafe"] and r["pyguard"]["casa"]["action"] == "refuse"
    assert r["pyguard"]["coca"] is None  # the decode loop never ran
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text(r)
    with GuardedLlama(MODEL, n_ctx=512, casa=casa_params(rng, 30.0, on_unsafe="prefix"), **kw) as g:
        r = g.create_chat_completion(MSGS, max_tokens=24)
    assert text(r).startswith("I'm sorry, but I can't help with that.") and len(text(r)) > 40
    assert r["pyguard"]["casa"]["action"] == "prefix"


def test_casa_for_another_model_or_the_last_layer_is_refused(rng):
    with pytest.raises(ValueError, match="n_embd=896"):
        GuardedLlama(MODEL, casa=casa_params(rng, 0.0, d=896))
    with pytest.raises(ValueError, match=r"computes the last one \(29\) for the logit rows only"):
        GuardedLlama(MODEL, casa=casa_params(rng, 0.0, layer=29))


def test_casa_reads_image_positions_too(rng, image_files):
    mmproj, images = image_files
    casa = casa_params(rng, 0.0, threshold=1.0)
    with GuardedLlama(MODEL, mmproj_path=mmproj, n_ctx=512, casa=casa, coca=CoCA(alpha=1.0)) as g:
        r = g.create_chat_completion(image_msgs(images[0]), max_tokens=4)
    assert r["pyguard"]["casa"]["unsafe"] is False and np.isfinite(r["pyguard"]["casa"]["score"])


# -- input embeddings (soft tokens, issue #8's graft) ---------------------------------------------------
def test_decode_embd_equals_the_token_route():
    gguf = pytest.importorskip("gguf")
    from gguf import quants

    t = next(t for t in gguf.GGUFReader(str(MODEL)).tensors if t.name == "token_embd.weight")
    W = quants.dequantize(t.data, t.tensor_type)  # [n_vocab, n_embd], as llama.cpp's get_rows reads it
    with Engine(MODEL, n_ctx=256, n_seq=2, n_batch=8) as e:  # n_batch 8: chunked
        toks = e.tokenize("The quick brown fox jumps over the lazy dog near the river bank", add_bos=False)
        assert len(toks) > 8
        e.decode([(tk, i, 0, i == len(toks) - 1) for i, tk in enumerate(toks)])
        want = e.logits(-1).copy()
        e.clear()
        e.decode_embd(W[toks[:5]], 0, seq=1, want_last=False)  # a prefix as embeddings, the rest as tokens
        e.decode([(tk, 5 + i, 1, i == len(toks) - 6) for i, tk in enumerate(toks[5:])])
        np.testing.assert_array_equal(e.logits(-1), want)
        e.clear()
        e.decode_embd(W[toks], 0)
        np.testing.assert_array_equal(e.logits(-1), want)
        for bad, msg in ((W[toks][:, :10], r"embd must be \[n, 576\]"), (np.zeros((0, 576)), "n >= 1"),
                         (np.full((2, 576), np.nan), "NaN or infinite")):
            with pytest.raises(ValueError, match=msg):
                e.decode_embd(bad, 0)
        with pytest.raises(ValueError, match=r"seq must be in \[0, 2\)"):
            e.decode_embd(W[toks], 0, seq=2)


def test_engine_uses_only_llama_cpp_public_modules():
    """The engine imports llama_cpp's public low-level module, none of its private ones (an upgrade
    of llama-cpp-python is then not a port)."""
    import ast
    import inspect

    from pyguard.llama import engine as E

    names = []
    for node in ast.walk(ast.parse(inspect.getsource(E))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llama_cpp"):
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.startswith("llama_cpp")]
    assert names and not [n for n in names if any(part.startswith("_") for part in n.split("."))], names


def test_a_file_that_is_not_gguf_is_one_clear_error(tmp_path, capfd):
    from pyguard.llama.engine import Engine

    bad = tmp_path / "m.gguf"
    bad.write_bytes(b"GGUF but not really" * 10)
    with pytest.raises(ValueError, match="not a GGUF model llama.cpp can read"):
        Engine(bad, n_ctx=64, n_seq=1)
    assert "error" not in capfd.readouterr().err.lower()  # the loader's own lines are not printed
