"""GuardedLlama: chat completions from a GGUF model with CoCA, CMRM and CASA applied."""
from __future__ import annotations

import codecs
import functools
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .. import chat, responses
from ..methods import describe_model, unpack_cascade
from ..policy import Policy, check_sampling
from ..text import TextAssembler, common_prefix
from .engine import Engine
from .scheduler import Check, Copy, Cvec, Drop, Embd, ImageChunk, Job, Scheduler, Tokens
from .template import ChatTemplate
from .vision import MARKER, Image, Segments, Vision


class GuardedLlama:
    """A llama.cpp model behind OpenAI-style ``create_chat_completion`` with safety methods.

    coca: CoCA config or None; cmrm: CMRM config or None (control vectors, image requests);
    casa: CASA config or None; cascade: a Cascade (CASA routes each request to no guard, CoCA or
    refusal; instead of coca= and casa=); graft: a ``pyguard.graft.Graft`` for "graft" message
    parts (soft tokens fed as embeddings). ``n_ctx`` is the context of each sequence (CoCA runs two).
    capture_layer: the decoder layer whose prompt hidden states :meth:`prompt_states` returns
    (CASA's layer when CASA is on), or a list of layers (calibration). ``parallel``: requests
    decoded side by side, batched (more wait in a queue of ``max_queue``, 0: unbounded).
    cache_prompt: a request reuses the KV (and CASA's rows) of the longest token prefix it shares
    with the last request of a free slot, as llama-server does. ``n_ctx`` may not exceed the
    model's trained context unless ``n_ctx_limit`` says how far (e.g. a model run with rope
    scaling). Use as a context manager or call ``close()``.
    """

    def __init__(self, model_path, mmproj_path=None, n_ctx: int = 2048, n_threads: int | None = None,
                 coca=None, cmrm=None, casa=None, n_batch: int = 512, verbose: bool = False,
                 capture_layer: int | None = None, cascade=None, graft=None, parallel: int = 1,
                 max_queue: int = 0, cache_prompt: bool = True, n_ctx_limit: int | None = None):
        self.model_path = Path(model_path)
        coca, casa = unpack_cascade(cascade, coca, casa, cmrm)
        self.coca, self.cmrm, self.casa, self.cascade, self.graft = coca, cmrm, casa, cascade, graft
        self._lock = threading.Lock()
        self.vision = self.engine = self._capture = self.scheduler = None
        if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
            raise ValueError(f"parallel must be an integer >= 1, got {parallel!r}")
        if casa is not None and capture_layer not in (None, casa.layer):
            raise ValueError(f"capture_layer {capture_layer} differs from the CASA layer {casa.layer}")
        self.capture_layer = casa.layer if casa is not None else capture_layer
        self._states_layer = self.capture_layer if isinstance(self.capture_layer, int) else None
        if cmrm is not None and cmrm.mode == "sample":  # per-request vectors need every layer's output
            extra = [] if self.capture_layer is None else [self.capture_layer] if self._states_layer is not None \
                else list(self.capture_layer)
            self.capture_layer = sorted({*range(cmrm.n_layer), *extra})
        cb = (None, None)
        rows = cmrm is not None and cmrm.mode == "dataset"  # CMRM shifts its requests' rows in C++
        if rows and self.capture_layer is not None and not isinstance(self.capture_layer, int):
            raise ValueError("dataset-level CMRM shifts rows with the C++ capture, which reads one layer: "
                             f"capture_layer must be one layer, got {self.capture_layer!r}")
        if isinstance(self.capture_layer, int) or rows:  # hidden states copied, rows shifted, in C++
            from . import capture

            il = self.capture_layer if isinstance(self.capture_layer, int) else 0
            self._capture = capture.LayerCapture(capture.libggml_base_path(), capture.layer_name(il))
        elif self.capture_layer is not None:  # several layers (calibration): the ctypes capture
            from . import capture

            self.capture_layer = [int(il) for il in self.capture_layer]
            self._capture = capture.PyCapture(capture.libggml_base_path(),
                                              [capture.layer_name(il) for il in self.capture_layer])
        if self._capture is not None:
            self._capture.enabled = False
            cb = capture.eval_callback(self._capture)
        per_slot = 2 if coca else 1
        self.engine = Engine(model_path, n_ctx=n_ctx, n_seq=parallel * per_slot, n_threads=n_threads,
                             n_batch=n_batch, verbose=verbose, cb_eval=cb[0], cb_eval_user_data=cb[1],
                             n_ctx_limit=n_ctx_limit)
        e = self.engine
        try:
            self.model_hint = describe_model(e.arch, e.n_layer, e.n_embd, e.n_vocab)
            for method in (casa, cmrm, graft):
                if method is not None:
                    method.check_model(e.n_embd, e.n_layer, e.arch, e.n_vocab)
            if isinstance(self.capture_layer, int) and not 0 <= self.capture_layer < e.n_layer - 1:
                raise ValueError(f"layer {self.capture_layer}: capture a layer in [0, {e.n_layer - 1}); llama.cpp "
                                 f"computes the last one ({e.n_layer - 1}) for the logit rows only")
            if isinstance(self.capture_layer, list) and not all(0 <= il < e.n_layer for il in self.capture_layer):
                raise ValueError(f"capture layers {self.capture_layer} must be in [0, {e.n_layer})")
            if mmproj_path is not None:
                self.vision = Vision(mmproj_path, e, n_threads or e.n_threads)
            eos = e.eos
            self.template = ChatTemplate(e.metadata, e.token_text(eos), e.token_text(e.bos), eos)
            if (rows or self._capture is not None) and not e.kv_only:
                raise ValueError(f"CASA, CMRM and hidden-state capture map rows to requests by llama.cpp's batch "
                                 f"split for attention KV caches; {e.arch} is a recurrent or hybrid model")
            table = cmrm.row_shift(e.n_layer, e.n_embd) if rows else None
            if table is not None and table[2] <= table[3]:  # layers to shift (layer 0 never is)
                self._capture.set_shift(*table)
                e.shifter = self._capture
            self.policy = Policy(coca, cmrm, casa, cascade, e.tokenize(casa.refusal_text) if casa else None)
            cl = self.capture_layer
            self._layers = () if cl is None else (cl,) if isinstance(cl, int) else tuple(cl)
            self.scheduler = Scheduler(e, self.policy, parallel, per_slot, self._capture, self._layers,
                                       self.vision, max_queue, finish=self._finished, cache_prompt=cache_prompt)
        except BaseException:
            self.close()
            raise
        self._release = weakref.finalize(self, _release, self.scheduler, self.vision, self.engine, self._capture)
        self.name = self.model_path.name

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Cancel the requests in flight and free the model (a model dropped without close() is
        freed when it is garbage collected)."""
        release = getattr(self, "_release", None) or functools.partial(
            _release, self.scheduler, self.vision, self.engine, self._capture)
        with self._lock:  # no request is being prepared (tokenized) meanwhile
            release()  # the scheduler first: its requests use the engine until it stops
            self.vision = self.engine = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- API -------------------------------------------------------------------------------
    def create_chat_completion(self, messages, max_tokens: int = 256, temperature: float = 0.0,
                               top_p: float = 1.0, seed: int | None = None, stop=None, stream: bool = False,
                               guards: dict | None = None, ignore_eos: bool = False):
        """OpenAI-style chat completion (a dict), or an iterator of chunks when ``stream``.
        temperature 0 is greedy; otherwise temperature / top-p sampling, reproducible by seed.
        guards: this request's choice of the loaded methods (:meth:`pyguard.policy.Policy.guards`),
        e.g. ``{"coca": False}``. ``ignore_eos``: never choose an end-of-generation token (the
        answer runs to ``max_tokens``, as load generators ask). Requests from several threads run
        side by side (up to ``parallel``), batched."""
        job = self.submit(messages, max_tokens, temperature, top_p, seed, stop, guards=guards, ignore_eos=ignore_eos)
        if stream:
            return self._stream(job)
        text, finish, n, report = "", "length", 0, None
        for piece, finish_now, n, report in self.events(job):
            text += piece
            finish = finish_now or finish
        return responses.completion(job.id, self.name, text, finish, job.n_prompt, n, report, job.n_cached)

    def submit(self, messages, max_tokens: int | None = 256, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, stop=None, wake=None, guards: dict | None = None,
               ignore_eos: bool = False) -> "LlamaJob":
        """Queue a request (``max_tokens`` None: up to the context); read its text with
        :meth:`events`; ``wake()`` is called (on the scheduler's thread) whenever new events are
        there. Raises ValueError for a bad request, ``scheduler.QueueFull`` when ``max_queue``
        requests wait already."""
        if self.scheduler is not None:
            self.scheduler.check_room()  # refused before tokenizing: a flood of retries stays cheap
        job = self._request(messages, max_tokens, temperature, top_p, seed, stop, guards=guards)
        job.wake = wake
        if ignore_eos:
            job.suppress = self.engine.eog_tokens
        return self._enqueue(job)

    def _enqueue(self, job: "LlamaJob") -> "LlamaJob":
        try:
            return self.scheduler.submit(job)
        except BaseException:
            job.free()
            raise

    def events(self, job: "LlamaJob") -> Iterator[tuple]:
        """(text piece, finish reason or None, completion tokens, report dict or None) until the
        finish reason is set. Leaving the loop early cancels the request."""
        try:
            while True:
                ev = job.events.get()
                if isinstance(ev, BaseException):
                    raise ev
                yield ev
                if ev[1] is not None:
                    return
        finally:
            job.cancel()  # no-op once finished

    # -- internals -------------------------------------------------------------------------
    def _check_open(self):
        if self.engine is None:
            raise RuntimeError("this GuardedLlama is closed")

    def _request(self, messages, max_tokens, temperature, top_p, seed, stop, states: bool = False,
                 guards: dict | None = None) -> "LlamaJob":
        with self._lock:  # mtmd and the tokenizer are used by one thread at a time
            self._check_open()
            return self._prepare(messages, max_tokens, temperature, top_p, seed, stop, states, guards)

    def _prepare(self, messages, max_tokens, temperature, top_p, seed, stop, states=False,
                 guards: dict | None = None) -> "LlamaJob":
        temperature, stops = check_sampling(1 if max_tokens is None else max_tokens, temperature, top_p, seed, stop)
        use = self.policy.guards(guards)
        prompt = chat.flatten(messages, MARKER)
        if prompt.images and self.vision is None:
            raise ValueError("images given, but this model was loaded without an mmproj file")
        if prompt.grafts and self.graft is None:
            raise ValueError("grafted content given, but this model was loaded without a projector (graft=)")
        soft = [t.numpy() for t in self.graft.soft(prompt.grafts)] if prompt.grafts else None
        base = self._segments(prompt, soft)
        safe = text_only = None
        try:
            if self.coca is not None and use.coca and not states:
                safe = self._segments(chat.with_principle(prompt, self.coca.principle,
                                                          self.coca.principle_position, MARKER), soft)
            n_base, n_safe = n_pos(base), n_pos(safe or [])
            if max_tokens is None:
                max_tokens = max(1, self.engine.n_ctx - max(n_base, n_safe))
            if max(n_base, n_safe) + max_tokens > self.engine.n_ctx:
                which = "the longer CoCA prompt" if n_safe > n_base else "the prompt"
                raise ValueError(f"{which} ({max(n_base, n_safe)} tokens) + max_tokens ({max_tokens}) exceeds "
                                 f"the context of {self.engine.n_ctx} tokens per sequence")
            sample_cmrm = not states and self.policy.cmrm_on(prompt.media, use) and self.cmrm.mode == "sample"
            if sample_cmrm:  # the media-removed twin
                text_only = self._segments(chat.Prompt([dict(m, content=m["content"].replace(MARKER, ""))
                                                        for m in prompt.messages], []))
        except BaseException:
            for segs in (base, safe, text_only):
                segs is not None and segs.free()
            raise
        job = LlamaJob(max_tokens=max_tokens, temperature=temperature, top_p=float(top_p),
                       rng=np.random.default_rng(seed), has_media=prompt.media, guards=use, id=responses.new_id(),
                       base=base, safe=safe, text_only=text_only, n_prompt=n_base, states_only=states,
                       text=TextAssembler(stops), on_token=self._on_token,
                       casa_from=self._casa_from(prompt) if not states else 0)
        if states:  # what CASA would read: the dataset-level shift when it would apply, never the sample one
            on = self.cmrm is not None and self.cmrm.mode == "dataset" and self.policy.cmrm_on(prompt.media, use)
        else:
            self.policy.start(job)
            on = job.report.cmrm is not None and job.report.cmrm.on
        if on and self.cmrm.mode == "dataset":
            job.key, job.shift = "cmrm", self.engine.shifter is not None
        elif on:
            job.key, job.alone = object(), True  # its own vectors, as a control vector
        if not states and text_only is None:  # what the prompt cache may supply: the leading text tokens
            job.prefix = tuple(cacheable(segs) for segs in (base, safe) if segs is not None)
            job.prefix_rows = self.casa is not None and use.casa
        job.plan = self._plan(job)
        return job

    def last_turn_row(self, messages) -> int:
        """The prompt position where the last user message's content starts (``chat.last_turn_row``)."""
        with self._lock:
            self._check_open()
            return self._last_turn_row(chat.flatten(messages, MARKER))

    def _last_turn_row(self, prompt: chat.Prompt) -> int:
        add_bos = []  # the template's, as its renders report it

        def render(messages):
            text, bos = self.template.render(messages)
            add_bos.append(bos)
            return text
        return chat.last_turn_row(render, lambda t: self.engine.tokenize(t, add_bos=add_bos[0]), prompt.messages,
                                  MARKER)

    def _casa_from(self, prompt: chat.Prompt) -> int:
        return self._last_turn_row(prompt) if self.casa is not None and self.casa.rows == "last-turn" else 0

    def _segments(self, prompt: chat.Prompt, soft: list[np.ndarray] | None = None) -> Segments:
        """The prompt as text-token lists and image chunks (or ``Soft`` segments: each grafted
        content's soft tokens, ``soft[i]`` [n_i, n_embd])."""
        text, add_bos = self.template.render(prompt.messages)
        if prompt.images:
            return self.vision.tokenize(text, prompt.images, add_special=add_bos)
        pieces = text.split(MARKER)
        if len(pieces) - 1 != (0 if soft is None else len(soft)):
            raise ValueError(f"the rendered prompt holds {len(pieces) - 1} media markers for "
                             f"{0 if soft is None else len(soft)} grafted contents (is {MARKER!r} in the text?)")
        segs = Segments([self.engine.tokenize(pieces[0], add_bos=add_bos)])
        for i, piece in enumerate(pieces[1:]):
            segs += [Soft(i, soft[i]), self.engine.tokenize(piece, add_bos=False)]
        return Segments(s for s in segs if not isinstance(s, list) or s)

    def _stream(self, job) -> Iterator[dict]:
        yield responses.chunk(job.id, self.name, {"role": "assistant", "content": ""})
        for piece, finish, n, report in self.events(job):
            if piece:
                yield responses.chunk(job.id, self.name, {"content": piece})
            if finish:
                yield responses.chunk(job.id, self.name, {}, finish, report)

    # -- on the scheduler's thread ---------------------------------------------------------
    def _plan(self, j: "LlamaJob"):
        """The request's prompt evaluation (a generator of scheduler ops). The base prompt goes
        into the base sequence (its text in one piece); CASA reads its hidden states and decides;
        then what base and safe share (system prompt, images, the common start of the last text)
        is copied to the safe sequence and the safe tail evaluated. Returns the first logit rows
        and the next positions, or None when the request ends here."""
        e, s0 = self.engine, j.seqs[0]
        if j.text_only is not None:  # sample-level CMRM: this request's vectors (it runs alone)
            last = []
            for segs in (j.base, j.text_only):
                H = yield from self._evaluate(j, segs, s0, 0, True, whole=True)
                yield Drop(s0)
                last.append(np.stack([H[il][-1] for il in range(e.n_layer)]))
            cmrm = self.cmrm.for_request(*last)
            j.report.cmrm.norm = float(np.linalg.norm(cmrm.vectors))
            yield Cvec(cmrm.cvec_buffer(e.n_layer, e.n_embd))
        if j.states_only:
            j.states_out = yield from self._evaluate(j, j.base, s0, 0, True, whole=True)
            return None
        base, safe, cap = j.base, j.safe, self.casa is not None and j.guards.casa
        hb, hs = (*j.have, 0, 0)[:2]  # positions the prompt cache supplied, base and safe
        k = common_prefix(base, safe) if safe is not None else len(base) - 1  # segments shared
        pos = yield from self._evaluate(j, base[:k], s0, 0, cap, skip=hb)
        tb = base[k]
        ts = safe[k] if safe is not None else None
        if any(isinstance(x, (Image, Soft)) for x in [*base[k:], *(safe or [])[k:]]):
            raise AssertionError("base and safe prompts differ before an image")  # with_principle prevents it
        shared = pos + (common_prefix(tb, ts) if ts is not None else 0)
        # the base text in one piece, as the unguarded model evaluates it: a prompt cut in two
        # runs in other ubatches, which round otherwise and can change the answer
        (rb,) = yield [Tokens(s0, tb[max(hb - pos, 0):], max(hb, pos), last=True, capture=cap)]
        if cap:
            H = self._collect(j, pos + len(tb))
            yield Check(H[self.casa.layer][j.casa_from:])
            if j.refused:
                return None
        if ts is None or not self.policy.wants_safe(j):
            if ts is not None:
                yield Drop(j.seqs[1])
            return (rb,), [pos + len(tb)]
        if hs < shared:
            yield Copy(s0, j.seqs[1], shared)  # llama.cpp copies the stream; the safe one keeps the shared prefix
            hs = shared
        (rs,) = yield [Tokens(j.seqs[1], ts[hs - pos:], hs, last=True)]
        self.policy.start_dual(j, shared)
        return (rb, rs), [pos + len(tb), pos + len(ts)]

    def _evaluate(self, j: "LlamaJob", segs, seq: int, pos: int, capture: bool, whole: bool = False,
                  skip: int = 0):
        """Ops evaluating ``segs`` into ``seq`` from ``pos`` (positions before ``skip``, text, are
        there already); returns the next pos, or for a ``whole`` prompt (its last token's logits
        computed) the captured states."""
        for i, seg in enumerate(segs):
            if isinstance(seg, list) and pos + len(seg) <= skip:
                pos += len(seg)
            elif isinstance(seg, list) and pos < skip:
                yield [Tokens(seq, seg[skip - pos:], skip, capture=capture)]
                pos += len(seg)
            elif isinstance(seg, Image):
                pos = yield ImageChunk(seq, seg, pos, capture)
            elif isinstance(seg, Soft):
                yield Embd(seq, seg.embd, pos, capture)
                pos += seg.n_pos
            else:
                yield [Tokens(seq, seg, pos, last=whole and i == len(segs) - 1, capture=capture)]
                pos += len(seg)
        return self._collect(j, pos) if whole else pos

    def _collect(self, j: "LlamaJob", n_prompt: int):
        """The prompt hidden states captured so far, {layer: [n_prompt, n_embd]} (the last layer:
        the last position only); empties the job's buffer."""
        H = {il: np.concatenate(blocks) for il, blocks in j.states.items()}
        j.states = {}
        for il, rows in H.items():
            if il < self.engine.n_layer - 1 and len(rows) != n_prompt:
                raise RuntimeError(f"captured {len(rows)} hidden-state rows for a {n_prompt}-position prompt")
        return H

    def _on_token(self, j: "LlamaJob", tok: int) -> bool:
        """Text for the chosen token; True when the request is finished."""
        n = len(j.out)
        if self.engine.is_eog(tok):
            j.outbox.append((j.text.flush(j.utf8.decode(b"", final=True)), "stop", n - 1, j.report.to_dict()))
            return True
        piece, stopped = j.text.add(j.utf8.decode(self.engine.piece(tok)))
        if stopped:
            j.outbox.append((piece, "stop", n, j.report.to_dict()))
        elif n == j.max_tokens:
            j.outbox.append((piece + j.text.flush(j.utf8.decode(b"", final=True)), "length", n, j.report.to_dict()))
        else:
            j.outbox.append((piece, None, n, None))
            return False
        return True

    def _finished(self, j: "LlamaJob", exc) -> None:
        j.free()
        if exc is not None:
            return
        if j.states_only:
            j.outbox.append(("", "states", 0, j.states_out))
        elif j.refused:
            j.report.timings.prefill_ms = (time.perf_counter() - j.t0) * 1e3
            j.outbox.append((self.casa.refusal_text, "stop", 0, j.report.to_dict()))

    def prompt_states(self, messages, with_mask: bool = False):
        """Hidden states [T, n_embd] (float32) of the prompt ``messages`` at ``capture_layer``: the
        output of that decoder layer at every prompt position (images included), as CASA reads them;
        a dict {layer: states} for several layers (the last layer: the last position only). With
        ``with_mask``, also a bool [T]: True at text positions, False at image positions."""
        if not self._layers:
            raise ValueError("prompt_states needs capture_layer= (or casa=) when the model is loaded")
        job = self._request(messages, 1, 0.0, 1.0, None, None, states=True)
        mask = np.concatenate([np.zeros(seg.n_pos, bool) if isinstance(seg, (Image, Soft)) else np.ones(len(seg), bool)
                               for seg in job.base])
        (_, _, _, H), = list(self.events(self._enqueue(job)))
        states = H[self._states_layer] if self._states_layer is not None else H
        return (states, mask) if with_mask else states


def _release(scheduler, vision, engine, capture) -> None:
    """Stop the scheduler (cancelling its requests), then free mtmd and the model and context;
    ``capture`` stays alive until the context that calls it is gone."""
    if scheduler is not None:
        scheduler.close()
    if vision is not None:
        vision.close()
    if engine is not None:
        engine.close()
    del capture


def cacheable(segments) -> list:
    """The prompt's leading text tokens the prompt cache may supply (never the last one: its
    logits are computed)."""
    head = segments[0] if segments and isinstance(segments[0], list) else []
    return head[:-1] if len(segments) == 1 else list(head)


def n_pos(segments) -> int:
    """Positions a tokenized prompt takes."""
    return sum(s.n_pos if isinstance(s, (Image, Soft)) else len(s) for s in segments)


@dataclass(eq=False)
class LlamaJob(Job):
    """A chat request on the llama.cpp runtime: its tokenized prompts and text state."""

    id: str = ""
    base: Segments = None
    safe: Segments | None = None
    text_only: Segments | None = None  # sample-level CMRM: the prompt without its media
    n_prompt: int = 0
    states_only: bool = False          # prompt_states: evaluate the prompt, capture, stop
    states_out: dict | None = None
    text: TextAssembler = None
    utf8: object = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))

    @property
    def n_cached(self) -> int:
        """Prompt tokens of the base sequence the prompt cache supplied."""
        return self.have[0] if self.have else 0

    def free(self) -> None:
        for segs in (self.base, self.safe, self.text_only):
            if segs is not None:
                segs.free()


@dataclass(frozen=True)
class Soft:
    """Grafted content in a tokenized prompt: soft tokens ``embd`` [n, n_embd] fed as embeddings;
    ``index`` of the content in the request."""

    index: int
    embd: np.ndarray = field(compare=False)

    @property
    def n_pos(self) -> int:
        return len(self.embd)
