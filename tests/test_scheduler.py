"""Continuous batching on llama.cpp (issue #15): concurrent requests give exactly what each gives
alone, mixed guards side by side, cancellation frees the slot, a full queue refuses."""
import threading

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from pyguard import models  # noqa: E402
from pyguard.llama import GuardedLlama  # noqa: E402
from pyguard.llama.scheduler import Cancelled, Kept, QueueFull  # noqa: E402
from pyguard.methods import Cascade, CoCA  # noqa: E402
from test_cascade import casa_random  # noqa: E402

MODEL = models.model_path("smollm2-135m")
pytestmark = pytest.mark.needs_file(MODEL, "SmolLM2")
TOPICS = ["cats", "the sea", "Paris", "bread", "rain", "chess", "music", "trees", "gold", "snow", "ice", "wind",
          "salt", "glass", "fire", "sand"]


def ask(topic):
    return [{"role": "user", "content": f"Tell me about {topic}."}]


def concurrently(fn, args) -> list:
    out = [None] * len(args)

    def run(i):
        try:
            out[i] = fn(args[i])
        except Exception as e:  # noqa: BLE001 - surfaced by the caller's assertion
            out[i] = e
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def answer(r) -> str:
    return r["choices"][0]["message"]["content"]


def tokens(r) -> tuple:
    return r["usage"]["prompt_tokens"], r["usage"]["completion_tokens"]


def test_sixteen_concurrent_greedy_requests_equal_their_lone_runs():
    with GuardedLlama(MODEL, n_ctx=256, parallel=16) as g:
        jobs = []

        def run(topic):
            job = g.submit(ask(topic), 24)
            jobs.append(job)
            return "".join(p for p, *_ in g.events(job)), list(job.out)
        alone = [run(t) for t in TOPICS]
        steps = g.scheduler.stats["steps"]
        together = concurrently(run, TOPICS)
        batched_steps = g.scheduler.stats["steps"] - steps
    assert together == alone  # the same tokens and text, every one
    assert batched_steps < steps / 4  # and they were batched: 16 requests in far fewer decode steps


def test_mixed_guards_side_by_side_equal_their_lone_runs():
    """CoCA pairs, the cascade's three branches, CASA refusals: one batch, each equal to alone."""
    casa = casa_random(576, 10, seed=3)
    with GuardedLlama(MODEL, n_ctx=256, casa=casa, capture_layer=10) as probe:
        scores = np.array([probe.create_chat_completion(ask(t), max_tokens=1)["pyguard"]["casa"]["score"]
                           for t in TOPICS])
    low, high = np.quantile(scores, [0.3, 0.7])  # some of each branch
    cascade = Cascade(casa, CoCA(alpha=1.5), low=float(low), high=float(high))
    with GuardedLlama(MODEL, n_ctx=256, cascade=cascade, parallel=8) as g:
        alone = [g.create_chat_completion(ask(t), max_tokens=12) for t in TOPICS]
        calls = dict(g.scheduler.stats)
        together = concurrently(lambda t: g.create_chat_completion(ask(t), max_tokens=12), TOPICS)
        stats = g.scheduler.stats
    branches = [r["pyguard"]["cascade"]["branch"] for r in alone]
    assert {"none", "coca", "refuse"} <= set(branches)
    for a, b in zip(alone, together):
        assert answer(b) == answer(a) and tokens(b) == tokens(a)
        assert b["pyguard"]["cascade"] == a["pyguard"]["cascade"]
        assert b["pyguard"]["casa"]["score"] == pytest.approx(a["pyguard"]["casa"]["score"], abs=1e-6)
        assert (b["pyguard"]["coca"] or {}).get("dual_steps") == (a["pyguard"]["coca"] or {}).get("dual_steps")
    # one CASA score per step over the prompts that finished in it: fewer calls than prompts
    assert stats["casa_calls"] - calls["casa_calls"] < len(TOPICS)


@pytest.mark.parametrize("cascade", [False, True], ids=["cmrm", "cmrm+cascade"])
def test_cmrm_image_requests_share_steps_with_text_requests(tmp_path, cascade):
    """Dataset-level CMRM shifts only the rows of image requests: image requests and text
    requests in one batch each answer as alone; text beside them answers as without CMRM; the
    image requests' answers are the shifted ones. Under the cascade too: CASA reads the shifted
    prompt states, CoCA's safe sequence is shifted with its base, and the branches, CASA scores
    and answers equal the lone runs'."""
    from tiny_mmproj import write_test_image, write_tiny_mmproj

    from pyguard.methods import CMRM

    mmproj = write_tiny_mmproj(tmp_path / "mmproj.gguf", n_embd_text=576)
    images = [write_test_image(tmp_path / f"img{i}.png", seed=i) for i in range(2)]
    v = (np.random.default_rng(5).standard_normal((30, 576)) * 0.3).astype(np.float32)
    v[0] = 0
    calls = [[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(p)}},
                                           {"type": "text", "text": "What is this?"}]}] for p in images]
    calls += [ask(t) for t in TOPICS[:4]]
    guard = {}
    if cascade:
        casa = casa_random(576, 10, seed=3)
        with GuardedLlama(MODEL, mmproj_path=mmproj, n_ctx=256, casa=casa, cmrm=CMRM(v, alpha=1.0)) as probe:
            scores = [probe.create_chat_completion(m, max_tokens=1)["pyguard"]["casa"]["score"] for m in calls]
        low, high = np.sort(scores)[[1, -2]]  # both branches and a refusal among six requests
        guard = {"cascade": Cascade(casa, CoCA(alpha=1.5), low=float(low), high=float(high))}
    with GuardedLlama(MODEL, mmproj_path=mmproj, n_ctx=256, **guard) as plain:
        unshifted = [answer(plain.create_chat_completion(m, max_tokens=10)) for m in calls]
    with GuardedLlama(MODEL, mmproj_path=mmproj, n_ctx=256, cmrm=CMRM(v, alpha=1.0), parallel=6, **guard) as g:
        alone = [g.create_chat_completion(m, max_tokens=10) for m in calls]
        steps = g.scheduler.stats["steps"]
        together = concurrently(lambda m: g.create_chat_completion(m, max_tokens=10), calls)
        batched = g.scheduler.stats["steps"] - steps
        shifts = g._capture.shifts
    assert [answer(r) for r in together] == [answer(r) for r in alone]
    assert [r["pyguard"]["cmrm"]["on"] for r in together] == [True, True, False, False, False, False]
    if cascade:
        assert [r["pyguard"]["cascade"] for r in together] == [r["pyguard"]["cascade"] for r in alone]
        assert {r["pyguard"]["cascade"]["branch"] for r in alone} == {"none", "coca", "refuse"}
        for a, b in zip(alone, together):
            assert b["pyguard"]["casa"]["score"] == pytest.approx(a["pyguard"]["casa"]["score"], abs=1e-6)
    assert [answer(r) for r in together[2:]] == unshifted[2:]  # text beside images: not shifted
    assert answer(together[0]) != unshifted[0] or answer(together[1]) != unshifted[1]  # images: shifted
    assert shifts > 0 and batched < steps / 2  # side by side in shared steps


def test_per_request_guards_side_by_side():
    """One batch of CoCA as loaded, CoCA off, and CoCA at alpha 0 (the base row): off and alpha 0
    answer as the unguarded model does, the default as CoCA alone."""
    topics = TOPICS[:4]
    with GuardedLlama(MODEL, n_ctx=256) as plain:
        unguarded = [answer(plain.create_chat_completion(ask(t), max_tokens=12)) for t in topics]
    with GuardedLlama(MODEL, n_ctx=256, coca=CoCA(alpha=1.5), parallel=8) as g:
        guarded = [g.create_chat_completion(ask(t), max_tokens=12) for t in topics]
        calls = [(t, c) for t in topics for c in (None, {"coca": False}, {"alpha": 0})]
        out = concurrently(lambda a: g.create_chat_completion(ask(a[0]), max_tokens=12, guards=a[1]), calls)
        with pytest.raises(ValueError, match="loaded without CASA"):
            g.create_chat_completion(ask("x"), guards={"casa": True})
    for i, t in enumerate(topics):
        default, off, zero = out[3 * i: 3 * i + 3]
        assert answer(default) == answer(guarded[i]) and default["pyguard"]["coca"]["alpha"] == 1.5
        assert answer(off) == unguarded[i] and off["pyguard"]["coca"] is None
        assert answer(zero) == unguarded[i] and zero["pyguard"]["coca"]["alpha"] == 0
        assert zero["pyguard"]["coca"]["dual_steps"] == zero["usage"]["completion_tokens"]


@pytest.mark.parametrize("kw", [{}, {"coca": CoCA()}, {"coca": CoCA(principle_position="before")},
                                {"casa": casa_random(576, 10, seed=3)}], ids=["plain", "coca", "coca-before", "casa"])
def test_prompt_cache_reuses_the_shared_prefix_and_answers_the_same(kw):
    """The KV (and CASA's rows) of the prefix a request shares with the last one in its slot is
    reused; answers, CASA scores and the report are those of a run without the cache."""
    runs = {}
    for cache in (False, True):
        with GuardedLlama(MODEL, n_ctx=256, parallel=2, cache_prompt=cache, **kw) as g:
            runs[cache] = [g.create_chat_completion(ask(t), max_tokens=8) for t in TOPICS[:4]]
            turn2 = [*ask(TOPICS[3]), runs[cache][3]["choices"][0]["message"], {"role": "user", "content": "More?"}]
            before = g.scheduler.stats["cached_tokens"]
            runs[cache].append(g.create_chat_completion(turn2, max_tokens=8))
            cached = g.scheduler.stats["cached_tokens"], g.scheduler.stats["cached_tokens"] - before
        if not cache:
            assert cached == (0, 0)
    n_prompt = runs[True][3]["usage"]["prompt_tokens"]
    assert cached[0] > 3 * 10 and cached[1] >= n_prompt  # the system prompt each time; the whole first turn
    assert runs[True][-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == cached[1]
    for a, b in zip(runs[False], runs[True]):
        assert answer(b) == answer(a) and tokens(b) == tokens(a)
        assert a["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        for key in ("casa", "coca"):
            x, y = a["pyguard"][key], b["pyguard"][key]
            assert (x is None) == (y is None)
            if x is not None:
                assert {k: v for k, v in y.items() if k != "ms"} == pytest.approx({k: v for k, v in x.items() if k != "ms"})


def test_kept_kv_is_reused_only_for_its_tokens_its_control_vector_and_captured_rows():
    k = Kept([1, 2, 3, None, 5], key="dataset", rows=[np.zeros((2, 4), np.float32)], n_rows=2)
    assert k.reusable([1, 2, 3, 4], "dataset", False) == 3
    assert k.reusable([1, 2, 3, None, 5], "dataset", False) == 3  # media positions are never matched
    assert k.reusable([1, 2, 3], None, False) == 0  # computed under another control vector
    assert k.reusable([1, 2, 3], "dataset", True) == 2  # CASA needs the rows: two were captured
    assert k.reusable([1, 9], "dataset", False) == 1
    k.truncate(1)
    assert k.tokens == [1] and k.n_rows == 1 and np.concatenate(k.rows).shape == (1, 4)


def test_a_half_read_stream_blocks_nothing():
    """A stream read twice and kept: another request from another thread still runs, and
    close() returns (nothing holds a lock across a yield to the caller)."""
    g = GuardedLlama(MODEL, n_ctx=256, parallel=2)
    it = g.create_chat_completion(ask("cats"), stream=True, max_tokens=200)
    next(it), next(it)
    out = concurrently(lambda t: g.create_chat_completion(ask(t), max_tokens=4), ["rain"])
    assert answer(out[0])
    closer = threading.Thread(target=g.close)
    closer.start()
    closer.join(30)
    assert not closer.is_alive()
    with pytest.raises(Cancelled):  # the abandoned stream ends with the model's close
        list(it)


def test_cancelled_stream_frees_its_slot_and_the_next_request_runs():
    with GuardedLlama(MODEL, n_ctx=256, parallel=1, coca=CoCA()) as g:
        stream = g.create_chat_completion(ask("cats"), max_tokens=150, stream=True)
        next(stream), next(stream)
        stream.close()  # the client went away
        r = g.create_chat_completion(ask("the sea"), max_tokens=4)
        assert r["usage"]["completion_tokens"] == 4
        assert g.scheduler.depth() == (0, 0) and g.scheduler.n_sequences() == 0


def test_full_queue_is_refused_and_accepted_requests_all_finish():
    with GuardedLlama(MODEL, n_ctx=256, parallel=1, max_queue=2) as g:
        jobs, refused = [], 0
        for t in TOPICS[:8]:
            try:
                jobs.append(g.submit(ask(t), 16))
            except QueueFull as e:
                refused += 1
                assert "the queue holds 2" in str(e)
        # two wait in the queue, and one more when the scheduler thread admitted the first already
        assert 2 <= len(jobs) <= 3 and refused == 8 - len(jobs)
        for job in jobs:  # nothing accepted is lost
            events = list(g.events(job))
            assert events[-1][1] in ("stop", "length")


def test_close_cancels_waiting_requests_with_an_error():
    g = GuardedLlama(MODEL, n_ctx=256, parallel=1)
    jobs = [g.submit(ask(t), 64) for t in TOPICS[:3]]
    g.close()
    outcomes = []
    for job in jobs:
        try:
            outcomes.append(list(g.events(job))[-1][1])
        except Cancelled:
            outcomes.append("cancelled")
    assert "cancelled" in outcomes and all(o in ("cancelled", "stop", "length") for o in outcomes)
    with pytest.raises(RuntimeError, match="closed"):
        g.create_chat_completion(ask("cats"), max_tokens=2)
