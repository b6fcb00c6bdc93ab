"""Continuous batching on one llama.cpp context: every active sequence's next token, and chunks of
newly arrived prompts, in ONE ``llama_decode`` per step; one ``coca_step`` over all CoCA pairs and
one CASA score over all prompts that finished prefilling in that step.

A request is a *plan*: a generator that yields what its prompt needs evaluated (token runs,
soft-token runs, images, KV copies, a CASA check) and gets back logit rows and captured hidden
states; :class:`pyguard.llama.guarded.GuardedLlama` writes the plan, this module runs many at
once on a thread of its own. Per-request choices (tokens, CASA's decision, CoCA's gate) are
:class:`pyguard.policy.Policy`'s.

Sequences: slot i owns sequence ``i`` (base) and ``parallel + i`` (CoCA's safe one), each in a KV
stream of its own (``Engine``): the base sequences of busy slots are consecutive ids, and the safe
ones follow, so a step's batch is one run of ids, which llama.cpp computes as one ubatch (a gap
starts another: 8 base sequences of a CoCA-sized context, ids 0, 2, .., 14, ran as 8).
``engine.ubatches`` predicts that split, which says which captured row (CASA's prompt states)
belongs to which request and which rows CMRM's row shift reaches (``Job.shift``): requests with
and without it share a step. Only a request with a control vector of its own (sample-level CMRM)
runs alone.

Prompt cache (as llama-server's ``cache_prompt``): a finished request's KV stays in its slot's
sequences, with the tokens it holds (and CASA's rows of them). A new request goes to the free slot
whose base sequence shares the longest token prefix with it; each of its sequences keeps that
shared prefix (computed under the same control vector) and the plan evaluates only the rest.
"""
from __future__ import annotations

import queue
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..policy import Policy, Request


# ----------------------------------------------------------------------------- plan ops
@dataclass
class Tokens:
    """Evaluate ``tokens`` into sequence ``seq`` from position ``pos``; with ``last`` the plan gets
    the last token's logit row [1, V]; with ``capture`` its hidden states go to the request."""

    seq: int
    tokens: list
    pos: int
    last: bool = False
    capture: bool = False
    done: int = 0  # tokens evaluated so far


@dataclass
class Embd:
    """Soft tokens ``embd`` [n, n_embd] into ``seq`` from ``pos`` (a decode of their own)."""

    seq: int
    embd: np.ndarray
    pos: int
    capture: bool = False


@dataclass
class ImageChunk:
    """An mtmd image chunk into ``seq`` from ``pos`` (its own decodes); the plan gets the next pos."""

    seq: int
    image: object
    pos: int
    capture: bool = False


@dataclass
class Copy:
    """Copy sequence ``src`` into ``dst`` as it is now (no compute: a KV copy); ``dst`` keeps the
    first ``n`` positions (-1: all)."""

    src: int
    dst: int
    n: int = -1


@dataclass
class Drop:
    seq: int


@dataclass
class Cvec:
    """Set the context's control vector (None clears it): only for requests that run ``alone``."""

    data: object


@dataclass
class Check:
    """CASA's check of the prompt hidden states ``H`` [T, n_embd]; scored with the others of the step."""

    H: np.ndarray


@dataclass
class Kept:
    """What one sequence's KV holds: ``tokens[p]`` at position p (None: media), computed under
    the control-vector ``key``; ``rows``: the captured hidden states (a single-layer capture) of
    positions 0 .. n_rows - 1, as blocks."""

    tokens: list = field(default_factory=list)
    key: object = None
    rows: list = field(default_factory=list)
    n_rows: int = 0

    def reusable(self, prefix: list, key, need_rows: bool) -> int:
        """Leading positions of ``prefix`` this KV holds."""
        if key != self.key:
            return 0
        n = 0
        for a, b in zip(self.tokens, prefix):
            if a is None or a != b:
                break
            n += 1
        return min(n, self.n_rows) if need_rows else n

    def truncate(self, n: int) -> None:
        del self.tokens[n:]
        if self.n_rows > n:
            self.rows, self.n_rows = ([np.concatenate(self.rows)[:n]] if n else []), n


class QueueFull(RuntimeError):
    """The scheduler's queue holds ``max_queue`` requests already."""


class Cancelled(RuntimeError):
    pass


@dataclass(eq=False)
class Job(Request):
    """A request in the scheduler: the policy's state, the plan and what it waits for."""

    plan: object = None        # generator of ops; returns (first rows, next positions) or None (job ends)
    key: object = None         # what shifts its KV (CMRM): the prompt cache reuses KV only under the same key
    shift: bool = False        # its rows get CMRM's row shift (the engine's shifter)
    alone: bool = False        # it sets a control vector of its own (Cvec): no other job runs beside it
    prefix: tuple = ()         # per sequence: the prompt tokens it may take from the cache (none: fresh)
    prefix_rows: bool = False  # the base prefix's captured rows are needed too (CASA reads them)
    have: list = field(default_factory=list)  # per sequence: positions taken from the cache
    on_token: object = None    # callable(job, token) -> bool (True: finished); the runtime's text
    slot: int = -1
    seqs: tuple = ()
    phase: str = "waiting"     # waiting | prefill | decode
    pending: object = None     # the op (or list of Tokens) the plan waits on
    states: dict = field(default_factory=dict)  # {layer: [row blocks]} captured, until the plan collects them
    rows: tuple = ()           # logit rows for the next choose()
    next: list = field(default_factory=list)   # (token, pos, seq) items of the next decode
    pos: list = field(default_factory=list)    # next position of each live sequence
    events: queue.Queue = field(default_factory=queue.Queue)  # what the caller reads
    outbox: list = field(default_factory=list)  # events of this step, delivered once it is over
    wake: object = None        # callable() after events were delivered (e.g. an asyncio loop's)
    cancelled: bool = False
    finished: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    """Runs jobs on ``engine`` (a context with ``parallel * per_slot`` sequences, a KV stream each).

    capture: a LayerCapture / PyCapture installed in the engine's context, or None; its layers
    ``capture_layers``. vision: the mtmd context, or None. finish(job, exc): a bound method
    (held weakly), called on the scheduler thread when a job ends (free its native memory)."""

    def __init__(self, engine, policy: Policy, parallel: int, per_slot: int, capture=None,
                 capture_layers: tuple = (), vision=None, max_queue: int = 0, finish=None,
                 cache_prompt: bool = True):
        if not 1 <= parallel * per_slot <= engine.n_seq or parallel * per_slot > engine.n_batch:
            raise ValueError(f"parallel = {parallel} x {per_slot} sequences must be in [1, {engine.n_seq}] "
                             f"and at most n_batch = {engine.n_batch}")
        self.engine, self.policy, self.parallel, self.per_slot = engine, policy, parallel, per_slot
        self.capture, self.capture_layers, self.vision = capture, tuple(capture_layers), vision
        self.max_queue, self.cache_prompt = max_queue, cache_prompt
        # weakly: the thread must not keep the guarded model that owns this scheduler alive
        self._finish = weakref.WeakMethod(finish) if finish is not None else None
        self.kept = [Kept() for _ in range(parallel * per_slot)]
        self.waiting: deque = deque()
        self.active: list = []
        self._free_slots = list(range(parallel))
        self._cv = threading.Condition()
        self._ended: list = []
        self._closing = False
        self._cvec = None  # the context's control vector (Engine.set_cvec arguments), set by a lone job
        self.stats = {"steps": 0, "decoded_rows": 0, "casa_calls": 0, "coca_calls": 0, "cached_tokens": 0}
        self._thread = threading.Thread(target=self._loop, name="pyguard-scheduler", daemon=True)
        self._thread.start()

    # -- the caller's side -----------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        with self._cv:
            if self._closing:
                raise RuntimeError("the scheduler is closed")
            self.check_room()
            self.waiting.append(job)
            self._cv.notify_all()
        return job

    def check_room(self) -> None:
        """QueueFull when ``max_queue`` requests wait: a cheap check before a job is prepared."""
        with self._cv:
            if self.max_queue and len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (the queue holds {self.max_queue})")

    def depth(self) -> tuple[int, int]:
        """(waiting jobs, active jobs)."""
        with self._cv:
            return len(self.waiting), len(self.active)

    def n_sequences(self) -> int:
        """KV sequences in use: one per active job, two while CoCA runs for it."""
        with self._cv:
            return sum(1 + bool(j.dual) for j in self.active)

    def close(self) -> None:
        """Cancel the jobs in flight and stop the thread."""
        with self._cv:
            self._closing = True
            for j in [*self.waiting, *self.active]:
                j.cancelled = True
            self._cv.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()

    # -- the scheduler thread --------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closing and not self.active and not self._admissible():
                    self._cv.wait()
                if self._closing and not self.active and not self.waiting:
                    return
                self._admit()
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 - a failed decode fails its jobs, not the thread
                if self.capture is not None:  # a capture the step left on would copy every later decode
                    self.capture.enabled = False
                    self.capture.clear()
                for j in list(self.active):
                    self._end(j, e)
            self._deliver()

    def _deliver(self) -> None:
        """Hand the step's events to the callers, once the step is over (the engine is idle
        when the last job's final event arrives)."""
        with self._cv:
            jobs, self._ended = [*self.active, *self._ended], []
        for j in jobs:
            if not j.outbox:
                continue
            while j.outbox:
                j.events.put(j.outbox.pop(0))
            if j.wake is not None:
                j.wake()

    def _admissible(self) -> bool:
        if not self.waiting or not self._free_slots:
            return False
        head = self.waiting[0]
        return head.cancelled or not self.active or not (head.alone or any(j.alone for j in self.active))

    def _admit(self) -> None:
        """Start waiting jobs, in order, while slots are free and no job that runs alone is
        active or waiting at the head."""
        while self._admissible():
            j = self.waiting.popleft()
            if j.cancelled:
                self._end(j, Cancelled("cancelled before it started"))
                continue
            if not self.active and self._cvec is not None:  # a lone job left it
                self._set_cvec(None)
            j.slot = max(self._free_slots, key=lambda slot: (self._reusable(j, slot, 0), -slot))
            self._free_slots.remove(j.slot)
            j.seqs = tuple(j.slot + k * self.parallel for k in range(self.per_slot))
            j.t0 = time.perf_counter()
            j.phase = "prefill"
            self.active.append(j)
            try:
                j.have = [self._take_cached(j, s, i) for i, s in enumerate(j.seqs)]
            except Exception as e:  # noqa: BLE001 - the job fails, the scheduler goes on
                self._end(j, e)
                continue
            self._advance(j, None)

    def _advance(self, j: Job, value) -> None:
        """Run j's plan with ``value`` until it waits on a decode or a check (or ends)."""
        try:
            while True:
                op = j.plan.send(value)
                value = None
                if isinstance(op, Copy):
                    self.engine.copy_seq(op.src, op.dst)
                    src = self.kept[op.src]
                    self.kept[op.dst] = dst = Kept(list(src.tokens), src.key)
                    if op.n >= 0:
                        self.engine.drop_seq(op.dst, keep=op.n)
                        dst.truncate(op.n)
                elif isinstance(op, Drop):
                    self._drop(op.seq)
                elif isinstance(op, Cvec):
                    self._set_cvec(op.data)
                else:
                    if isinstance(op, list) and not all(t.tokens for t in op):
                        raise AssertionError(f"a plan asked to evaluate no tokens: {op}")
                    j.pending = op
                    return
        except StopIteration as stop:
            j.pending = None
            if stop.value is None:  # refused, or states only: the job ends here
                self._end(j, None)
            else:
                (j.rows, j.pos), j.phase = stop.value, "decode"
                self.policy.first_token(j)
        except Exception as e:  # noqa: BLE001 - the job fails with its error; others go on
            self._end(j, e)

    def _step(self) -> None:
        e = self.engine
        for j in list(self.active):
            if j.cancelled:
                self._end(j, Cancelled("cancelled"))
        # media: decodes of their own (mtmd; soft tokens)
        for j in list(self.active):
            while isinstance(j.pending, (Embd, ImageChunk)) and not j.finished:
                op = j.pending
                cap = self._capturing(op.capture)
                if isinstance(op, Embd):
                    e.decode_embd(op.embd, op.pos, op.seq, want_last=False, shift=j.shift)
                    nxt = op.pos + len(op.embd)
                else:
                    with e.shifting(j.shift):
                        nxt = self.vision.eval_image(op.image, op.pos, op.seq)
                self._track(op.seq, op.pos, [None] * (nxt - op.pos), j.key)
                if cap:
                    self._take_states([(j, op.seq, op.pos, 0, None)])
                self._advance(j, None if isinstance(op, Embd) else nxt)
        # one batch: the decoding sequences' next tokens, then prefill chunks
        items, owners = [], []
        for j in self.active:
            if j.next and not j.finished:
                for tok, pos, seq in j.next:
                    items.append((tok, pos, seq, True))
                    owners.append((j, None))
                j.next = []
        budget = e.n_batch - len(items)
        prefilling = []
        for j in self.active:
            if budget <= 0 or j.finished or not isinstance(j.pending, list):
                continue
            for op in j.pending:
                n = min(len(op.tokens) - op.done, budget)
                for i in range(op.done, op.done + n):
                    items.append((op.tokens[i], op.pos + i, op.seq, op.last and i == len(op.tokens) - 1))
                    owners.append((j, op))
                op.done += n
                budget -= n
            prefilling.append(j)
        if items:
            # by sequence id: llama.cpp cuts a batch of several KV streams into one ubatch per run
            # of consecutive ids in batch order (8 sequences of Qwen2.5-0.5B on 2 cores: 149 ms a
            # step in order, 203 ms reversed, 226 ms interleaved)
            order = sorted(range(len(items)), key=lambda i: (items[i][2], items[i][1]))
            items, owners = [items[i] for i in order], [owners[i] for i in order]
            cap = self._capturing(any(op is not None and op.capture for _, op in owners))
            shift = [j.shift for j, _ in owners]
            computed = e.decode(items, shift=shift if any(shift) else None, order=cap)
            for (tok, pos, seq, _), (j, _) in zip(items, owners):
                self._track(seq, pos, [tok], j.key)
            if cap:
                self._take_states(_spans(owners, items), computed, np.array([it[3] for it in items], bool))
            self.stats["steps"] += 1
            self.stats["decoded_rows"] += len(items)
            got: dict = {}  # job -> [(op or None, logit row)], in batch order
            for i, (_, _, _, want) in enumerate(items):
                if want:
                    got.setdefault(owners[i][0], []).append((owners[i][1], np.array(e.logits(i))))
            for j in self.active:
                if j.phase == "decode" and j in got:
                    j.rows = tuple(row for op, row in got[j] if op is None)
            for j in prefilling:
                if not j.finished and all(op.done == len(op.tokens) for op in j.pending):
                    rows = {id(op): row for op, row in got.get(j, []) if op is not None}
                    self._advance(j, [rows.get(id(op)) for op in j.pending])
        self._checks()
        self._choose()

    def _checks(self) -> None:
        """One CASA score over every prompt that finished prefilling; the plans go on."""
        while True:
            waiting = [j for j in self.active if isinstance(j.pending, Check) and not j.finished]
            if not waiting:
                return
            t0 = time.perf_counter()
            scores = self.policy.casa.score([j.pending.H for j in waiting])
            self.stats["casa_calls"] += 1
            self.policy.decide(waiting, scores, (time.perf_counter() - t0) * 1e3)
            for j in waiting:
                self._advance(j, None)

    def _choose(self) -> None:
        """The next token of every job with logit rows."""
        ready = [j for j in self.active if j.phase == "decode" and j.rows]
        if not ready:
            return
        was_dual = [j.dual for j in ready]
        if any(was_dual):
            self.stats["coca_calls"] += 1
        toks = self.policy.choose(ready, [j.rows for j in ready])
        for j, tok, dual in zip(ready, toks, was_dual):
            j.rows = ()
            if dual and not j.dual:  # gated: the safe sequence goes
                self._drop(j.seqs[1])
                j.pos = j.pos[:1]
            if j.on_token(j, tok):
                self._end(j, None)
                continue
            j.next = [(tok, p, s) for p, s in zip(j.pos, j.seqs)]
            j.pos = [p + 1 for p in j.pos]

    def _set_cvec(self, args: tuple | None) -> None:
        """Set the control vector (``Engine.set_cvec`` arguments) or clear it (None)."""
        self.engine.set_cvec(*args) if args is not None else self.engine.set_cvec(None)
        self._cvec = args

    # -- capture -----------------------------------------------------------------------------
    def _capturing(self, on: bool) -> bool:
        if not on or not self.capture_layers:
            return False
        self.capture.clear()
        self.capture.enabled = True
        return True

    def _take_states(self, spans, rows=None, wants=None) -> None:
        """Hand the rows captured in the last decode to the jobs of ``spans``: (job, seq, pos, a,
        b), items a .. b-1 (b None: every row) of sequence ``seq`` from ``pos``. llama.cpp
        computed item ``rows[k]``'s row k (``Engine.decode``; the last layer: the items with
        ``wants`` only). A single layer's rows are also kept with the sequence (prompt cache)."""
        cap = self.capture
        cap.enabled = False
        if len(self.capture_layers) == 1:
            got = {self.capture_layers[0]: cap.take()}
        else:
            named = cap.take_all()
            got = {il: named[n] for il, n in zip(self.capture_layers, cap.names)}
        for il, H in got.items():
            if rows is None:
                where = np.arange(len(H))
            else:
                present = rows if len(H) == len(rows) else rows[wants[rows]]
                if len(present) != len(H):
                    raise RuntimeError(f"captured {len(H)} rows of layer {il} in a decode of {len(rows)} tokens")
                where = np.full(len(wants), -1)
                where[present] = np.arange(len(H))
            for j, seq, pos, a, b in spans:
                w = where[a:b]
                block = H[w[w >= 0]]
                j.states.setdefault(il, []).append(block)
                kept = self.kept[seq]
                if len(got) == 1 and kept.n_rows == pos:
                    kept.rows.append(block)
                    kept.n_rows += len(block)

    # -- the prompt cache --------------------------------------------------------------------
    def _reusable(self, j: Job, seq: int, i: int) -> int:
        """Leading positions of j's i-th prefix that sequence ``seq`` holds already."""
        if not self.cache_prompt or i >= len(j.prefix) or not j.prefix[i]:
            return 0
        rows = i == 0 and j.prefix_rows
        if rows and len(self.capture_layers) != 1:
            return 0
        return self.kept[seq].reusable(j.prefix[i], j.key, rows)

    def _take_cached(self, j: Job, seq: int, i: int) -> int:
        """Keep what ``seq`` holds of j's i-th prefix, drop the rest; the positions kept."""
        n = self._reusable(j, seq, i)
        kept = self.kept[seq]
        if not n:
            self._drop(seq)
            return 0
        self.engine.drop_seq(seq, keep=n)
        kept.truncate(n)
        if i == 0 and j.prefix_rows:
            j.states = {self.capture_layers[0]: [np.concatenate(kept.rows)[:n]]}
        if i == 0:
            self.stats["cached_tokens"] += n  # prompt tokens, as the request's usage counts them
        return n

    def _track(self, seq: int, pos: int, tokens: list, key) -> None:
        """Tokens decoded into ``seq`` from ``pos`` (None: media positions) under ``key``."""
        kept = self.kept[seq]
        if not kept.tokens:
            kept.key = key
        if len(kept.tokens) != pos:  # not where the sequence ended: trust nothing before pos
            self.kept[seq] = kept = Kept([None] * pos, kept.key)
        kept.tokens.extend(tokens)

    def _drop(self, seq: int) -> None:
        self.engine.drop_seq(seq)
        self.kept[seq] = Kept()

    # -- endings -----------------------------------------------------------------------------
    def _end(self, j: Job, exc: Exception | None) -> None:
        if j.finished:
            return
        j.finished = True
        if j in self.active:
            self.active.remove(j)
            if exc is not None or not self.cache_prompt:  # otherwise the KV stays for the next request
                for s in j.seqs:
                    self._drop(s)
            self._free_slots.append(j.slot)
            self._free_slots.sort()
        if j.plan is not None:
            j.plan.close()
        finish = self._finish() if self._finish is not None else None
        if finish is not None:
            finish(j, exc)
        if exc is not None:
            j.outbox.append(exc)
        with self._cv:
            self._ended.append(j)
            self._cv.notify_all()


def _spans(owners, items) -> list:
    """(job, seq, first pos, a, b) of each capturing op's items a .. b-1 in a batch ordered by
    (seq, pos): an op's items are consecutive."""
    spans = []
    for i, (j, op) in enumerate(owners):
        if op is None or not op.capture:
            continue
        if spans and spans[-1][1] is op and spans[-1][-1] == i:
            spans[-1][-1] = i + 1
        else:
            spans.append([j, op, items[i][1], i, i + 1])
    return [(j, op.seq, pos, a, b) for j, op, pos, a, b in spans]
