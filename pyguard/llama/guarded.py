"""GuardedLlama: chat completions from a GGUF model with CoCA, CMRM and CASA applied."""
from __future__ import annotations

import codecs
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .. import chat, ops, responses
from ..methods import casa_report, coca_report, describe_model, unpack_cascade
from ..text import TextAssembler, common_prefix
from ..sampling import sample
from .engine import Engine
from .template import ChatTemplate
from .vision import MARKER, Image, Segments, Vision


class GuardedLlama:
    """A llama.cpp model behind OpenAI-style ``create_chat_completion`` with safety methods.

    coca: CoCA config or None; cmrm: CMRM config or None (control vectors, image requests);
    casa: CASA config or None; cascade: a Cascade (CASA routes each request to no guard, CoCA or
    refusal; instead of coca= and casa=); graft: a ``pyguard.graft.Graft`` for "graft" message
    parts (soft tokens fed as embeddings). ``n_ctx`` is the context of each sequence (CoCA runs two).
    capture_layer: the decoder layer whose prompt hidden states :meth:`prompt_states` returns
    (CASA's layer when CASA is on), or a list of layers (calibration). Use as a context manager or
    call ``close()``.
    """

    def __init__(self, model_path, mmproj_path=None, n_ctx: int = 2048, n_threads: int | None = None,
                 coca=None, cmrm=None, casa=None, n_batch: int = 512, verbose: bool = False,
                 capture_layer: int | None = None, cascade=None, graft=None):
        self.model_path = Path(model_path)
        coca, casa = unpack_cascade(cascade, coca, casa)
        self.coca, self.cmrm, self.casa, self.cascade, self.graft = coca, cmrm, casa, cascade, graft
        self._lock = threading.Lock()
        self.vision = self.engine = self._capture = None
        if casa is not None and capture_layer not in (None, casa.layer):
            raise ValueError(f"capture_layer {capture_layer} differs from the CASA layer {casa.layer}")
        self.capture_layer = casa.layer if casa is not None else capture_layer
        self._states_layer = self.capture_layer if isinstance(self.capture_layer, int) else None
        if cmrm is not None and cmrm.mode == "sample":  # per-request vectors need every layer's output
            extra = [] if self.capture_layer is None else [self.capture_layer] if self._states_layer is not None \
                else list(self.capture_layer)
            self.capture_layer = sorted({*range(cmrm.n_layer), *extra})
        cb = (None, None)
        if isinstance(self.capture_layer, int):  # the layer's hidden states, copied in C++ during llama_decode
            from . import capture

            self._capture = capture.LayerCapture(capture.libggml_base_path(), capture.layer_name(self.capture_layer))
        elif self.capture_layer is not None:  # several layers (calibration): the ctypes capture
            from . import capture

            self.capture_layer = [int(il) for il in self.capture_layer]
            self._capture = capture.PyCapture(capture.libggml_base_path(),
                                              [capture.layer_name(il) for il in self.capture_layer])
        if self._capture is not None:
            self._capture.enabled = False
            cb = capture.eval_callback(self._capture)
        self.engine = Engine(model_path, n_ctx=n_ctx, n_seq=2 if coca else 1, n_threads=n_threads,
                             n_batch=n_batch, verbose=verbose, cb_eval=cb[0], cb_eval_user_data=cb[1])
        e = self.engine
        try:
            self.model_hint = describe_model(e.arch, e.n_layer, e.n_embd, e.n_vocab)
            for method in (casa, cmrm, graft):
                if method is not None:
                    method.check_model(e.n_embd, e.n_layer, e.arch, e.n_vocab)
            if casa is not None:
                self._refusal = e.tokenize(casa.refusal_text)
            if isinstance(self.capture_layer, int) and not 0 <= self.capture_layer < e.n_layer - 1:
                raise ValueError(f"layer {self.capture_layer}: capture a layer in [0, {e.n_layer - 1}); llama.cpp "
                                 f"computes the last one ({e.n_layer - 1}) for the logit rows only")
            if isinstance(self.capture_layer, list) and not all(0 <= il < e.n_layer for il in self.capture_layer):
                raise ValueError(f"capture layers {self.capture_layer} must be in [0, {e.n_layer})")
            if mmproj_path is not None:
                self.vision = Vision(mmproj_path, e, n_threads or e.n_threads)
            eos = e.model.token_eos()
            self.template = ChatTemplate(e.metadata, e.token_text(eos), e.token_text(e.model.token_bos()), eos)
            self._cvec = cmrm.cvec_buffer(e.n_layer, e.n_embd) if cmrm is not None else None
        except BaseException:
            self.close()
            raise
        self._out = np.empty((1, e.n_vocab), np.float32)
        self._base_row = np.empty((1, e.n_vocab), np.float32)
        self.name = self.model_path.name
        self._trace: list | None = None  # tests: set to a list to collect calibrated logits per step

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self.vision is not None:
                self.vision.close()
                self.vision = None
            if self.engine is not None:
                self.engine.close()  # before the capture object it points to goes
                self.engine = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- API -------------------------------------------------------------------------------
    def create_chat_completion(self, messages, max_tokens: int = 256, temperature: float = 0.0,
                               top_p: float = 1.0, seed: int | None = None, stop=None, stream: bool = False):
        """OpenAI-style chat completion (a dict), or an iterator of chunks when ``stream``.
        temperature 0 is greedy; otherwise temperature / top-p sampling, reproducible by seed."""
        req = self._request(messages, max_tokens, temperature, top_p, seed, stop)
        if stream:
            return self._stream(req)
        with self._lock:
            self._check_open()
            text, finish, n, report = "", "length", 0, None
            for piece, finish_now, n, report in self._run(req):
                text += piece
                finish = finish_now or finish
        return responses.completion(req["id"], self.name, text, finish, req["n_prompt"], n, report)

    # -- internals -------------------------------------------------------------------------
    def _check_open(self):
        if self.engine is None:
            raise RuntimeError("this GuardedLlama is closed")

    def _request(self, messages, max_tokens, temperature, top_p, seed, stop) -> dict:
        with self._lock:  # mtmd and the tokenizer are used by one thread at a time
            self._check_open()
            return self._prepare(messages, max_tokens, temperature, top_p, seed, stop)

    def _prepare(self, messages, max_tokens, temperature, top_p, seed, stop) -> dict:
        if not isinstance(max_tokens, int) or max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if not (temperature >= 0 and np.isfinite(temperature)):
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if not (0 < top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        prompt = chat.flatten(messages, MARKER)
        if prompt.images and self.vision is None:
            raise ValueError("images given, but this model was loaded without an mmproj file")
        if prompt.grafts and self.graft is None:
            raise ValueError("grafted content given, but this model was loaded without a projector (graft=)")
        soft = [t.numpy() for t in self.graft.soft(prompt.grafts)] if prompt.grafts else None
        base = self._segments(prompt, soft)
        safe = None
        try:
            if self.coca is not None:
                safe = self._segments(chat.with_principle(prompt, self.coca.principle,
                                                          self.coca.principle_position, MARKER), soft)
            n_base, n_safe = n_pos(base), n_pos(safe or [])
            if max(n_base, n_safe) + max_tokens > self.engine.n_ctx:
                which = "the longer CoCA prompt" if n_safe > n_base else "the prompt"
                raise ValueError(f"{which} ({max(n_base, n_safe)} tokens) + max_tokens ({max_tokens}) exceeds "
                                 f"the context of {self.engine.n_ctx} tokens per sequence")
        except BaseException:
            for segs in (base, safe):
                segs is not None and segs.free()
            raise
        text_only = None
        if self.cmrm is not None and self.cmrm.mode == "sample" and prompt.media:  # the media-removed twin
            text_only = self._segments(chat.Prompt([dict(m, content=m["content"].replace(MARKER, ""))
                                                    for m in prompt.messages], []))
        return dict(id=responses.new_id(), base=base, safe=safe, text_only=text_only, n_prompt=n_base,
                    max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p), stops=stops,
                    rng=np.random.default_rng(seed), has_image=prompt.media)

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

    def _stream(self, req) -> Iterator[dict]:
        with self._lock:
            self._check_open()
            yield responses.chunk(req["id"], self.name, {"role": "assistant", "content": ""})
            for piece, finish, n, report in self._run(req):
                if piece:
                    yield responses.chunk(req["id"], self.name, {"content": piece})
                if finish:
                    yield responses.chunk(req["id"], self.name, {}, finish, report)

    def _run(self, req):
        """Yields (text piece, finish reason or None, completion tokens, report)."""
        try:
            yield from self._texts(req)
        finally:
            for segs in (req["base"], req["safe"], req["text_only"]):
                if segs is not None:
                    segs.free()

    def _texts(self, req):
        text = TextAssembler(req["stops"])
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # pieces may split characters
        n = 0
        for tok, report in self._decode(req):
            n += 1
            if tok is None and report["casa"] is not None and report["casa"]["action"] == "refuse":
                yield self.casa.refusal_text, "stop", 0, report
                return
            if tok is None or self.engine.is_eog(tok):
                yield text.flush(utf8.decode(b"", final=True)), "stop", n - 1, report
                return
            piece, stopped = text.add(utf8.decode(self.engine.piece(tok)))
            if stopped:
                yield piece, "stop", n, report
                return
            if n == req["max_tokens"]:
                yield piece + text.flush(utf8.decode(b"", final=True)), "length", n, report
                return
            yield piece, None, n, report

    def _decode(self, req):
        """Yields (token, report) until max_tokens; the report is updated in place."""
        e, coca = self.engine, self.coca
        t0 = time.perf_counter()
        per_request = self.cmrm is not None and self.cmrm.mode == "sample"
        cmrm_on = self._cvec is not None and (req["has_image"] or (self.cmrm.when == "always" and not per_request))
        report = {"casa": None, "coca": None, "timings": {},
                  "cmrm": {"on": cmrm_on, "mode": self.cmrm.mode} if self.cmrm is not None else None}
        cvec = self._sample_cvec(req, report) if cmrm_on and per_request else self._cvec
        e.clear()
        e.set_cvec(*cvec) if cmrm_on else e.set_cvec(None)
        base, safe = req["base"], req["safe"]
        T, top_p, rng = req["temperature"], req["top_p"], req["rng"]
        pos0, pos1, shared, rows = self._prefill(base, safe, report)
        dual = len(rows) == 2  # not for a cascade's unguarded branch
        forced = []
        if report["casa"] is not None and report["casa"]["unsafe"]:
            if report["casa"]["action"] == "refuse":
                report["timings"] = {"prefill_ms": (time.perf_counter() - t0) * 1e3, "decode_ms_per_token": None}
                yield None, report  # the refusal text replaces the answer
                return
            forced = list(self._refusal)
        if dual:
            C = ops.native()
            alpha = np.full(1, coca.alpha, np.float32)
            temp = np.full(1, T if T > 0 else 1.0, np.float32)
            report["coca"] = rep = coca_report(coca, shared)
        t_first = time.perf_counter()
        report["timings"] = timings = {"prefill_ms": (t_first - t0) * 1e3, "decode_ms_per_token": None}
        for step in range(req["max_tokens"]):
            if dual:
                out = self._out if T > 0 or self._trace is not None else None
                force = np.array([forced[step]], np.int64) if step < len(forced) else None
                tok, kl = C.coca_step(*rows, alpha, temp, force, out)
                if self._trace is not None:
                    self._trace.append(self._out[0].copy())
                tok = sample(self._out[0], top_p, rng) if T > 0 and step >= len(forced) else int(tok[0])
                rep["dual_steps"] += 1
                rep["kl_max"] = max(rep["kl_max"], float(kl[0]))
                if (coca.gate_kl is not None and step + 1 == coca.gate_tokens and rep["kl_max"] < coca.gate_kl
                        and step + 1 >= len(forced)):
                    e.drop_seq(1)
                    dual, rep["gated"] = False, True
            else:
                row = rows[0][0]
                if step < len(forced):
                    tok = forced[step]
                else:
                    tok = int(np.argmax(row)) if T <= 0 else sample(row / np.float32(T), top_p, rng)
            yield tok, report
            if step + 1 == req["max_tokens"] or e.is_eog(tok):
                break
            if dual:
                e.decode([(tok, pos0, 0, True), (tok, pos1, 1, True)])
                rows = (e.logits(0), e.logits(1))
                pos1 += 1
            else:
                e.decode([(tok, pos0, 0, True)])
                rows = (e.logits(-1),)
            pos0 += 1
            timings["decode_ms_per_token"] = (time.perf_counter() - t_first) * 1e3 / (step + 1)

    def _prefill(self, base: Segments, safe: Segments | None, report: dict, states: bool = False):
        """Evaluate the prompt(s): what base and safe share (system prompt, images, the common
        start of the last text) once into sequence 0, copied to sequence 1; then the two tails,
        in one batch unless CASA reads the base prompt's hidden states first (then base, CASA's
        decision, safe). Returns (next pos of seq 0, of seq 1, shared positions, logit rows
        [1, V] of the first step: (base, safe) or (base,)). ``states``: capture the base prompt's
        hidden states into report["states"] (CASA does when on)."""
        e = self.engine
        cap = self._capture if (self.casa is not None or states) else None
        k = len(base) - 1
        if safe is not None:
            k = 0
            while k < min(len(base), len(safe)) - 1 and base[k] == safe[k]:
                k += 1
        if cap is not None:
            cap.clear()
            cap.enabled = True
        try:
            pos = 0
            for seg in base[:k]:
                if isinstance(seg, Image):
                    pos = self.vision.eval_image(seg, pos, 0)
                elif isinstance(seg, Soft):
                    e.decode_embd(seg.embd, pos, 0, want_last=False)
                    pos += seg.n_pos
                else:
                    e.decode([(t, pos + i, 0, False) for i, t in enumerate(seg)])
                    pos += len(seg)
            tb = base[k]
            ts = safe[k] if safe is not None else None
            if any(isinstance(x, (Image, Soft)) for x in [*base[k:], *(safe or [])[k:]]):
                raise AssertionError("base and safe prompts differ before an image")  # with_principle prevents it
            P = common_prefix(tb, ts) if ts is not None else len(tb) - 1
            e.decode([(t, pos + i, 0, False) for i, t in enumerate(tb[:P])])
            if ts is None or cap is not None:
                if ts is not None:
                    e.copy_seq(0, 1)
                e.decode([(t, pos + P + i, 0, i == len(tb) - P - 1) for i, t in enumerate(tb[P:])])
                if cap is not None:
                    cap.enabled = False
                    self._take_states(report, pos + len(tb))
                    if self.casa is not None and not states:
                        self._casa_check(report)
                if ts is None:
                    return pos + len(tb), 0, pos + P, (e.logits(-1),)
                if report["casa"]["action"] == "refuse":
                    return pos + len(tb), 0, pos + P, ()
                if (report.get("cascade") or {}).get("branch") == "none":  # no safe sequence for it
                    e.drop_seq(1)
                    return pos + len(tb), 0, pos + P, (e.logits(-1),)
                first_base = self._base_row
                first_base[...] = e.logits(-1)
                e.decode([(t, pos + P + i, 1, i == len(ts) - P - 1) for i, t in enumerate(ts[P:])])
                return pos + len(tb), pos + len(ts), pos + P, (first_base, e.logits(-1))
            e.copy_seq(0, 1)
            e.decode([(t, pos + P + i, 0, False) for i, t in enumerate(tb[P:-1])]
                     + [(t, pos + P + i, 1, False) for i, t in enumerate(ts[P:-1])])
            e.decode([(tb[-1], pos + len(tb) - 1, 0, True), (ts[-1], pos + len(ts) - 1, 1, True)])
            return pos + len(tb), pos + len(ts), pos + P, (e.logits(0), e.logits(1))
        finally:
            if cap is not None:
                cap.enabled = False

    def _take_states(self, report: dict, n_prompt: int) -> None:
        """The captured prompt hidden states [n_prompt, n_embd] into report["states"] (a dict
        {layer: rows} for several layers; the last layer has the last position only)."""
        if isinstance(self.capture_layer, list):
            rows = self._capture.take_all()
            report["states"] = {il: rows[n] for il, n in zip(self.capture_layer, self._capture.names)}
            full = [H for il, H in report["states"].items() if il < self.engine.n_layer - 1]
            if self._states_layer is not None:  # one layer asked for (CASA's), several captured
                report["all_states"] = report["states"]
                report["states"] = report["states"][self._states_layer]
        else:
            full = [self._capture.take()]
            report["states"] = full[0]
        for H in full:
            if len(H) != n_prompt:
                raise RuntimeError(f"captured {len(H)} hidden-state rows for a {n_prompt}-position prompt")

    def prompt_states(self, messages, with_mask: bool = False):
        """Hidden states [T, n_embd] (float32) of the prompt ``messages`` at ``capture_layer``: the
        output of that decoder layer at every prompt position (images included), as CASA reads them;
        a dict {layer: states} for several layers (the last layer: the last position only). With
        ``with_mask``, also a bool [T]: True at text positions, False at image positions."""
        if self._capture is None:
            raise ValueError("prompt_states needs capture_layer= (or casa=) when the model is loaded")
        req = self._request(messages, 1, 0.0, 1.0, None, None)
        try:
            with self._lock:
                self._check_open()
                self.engine.clear()
                on = (self._cvec is not None and self.cmrm.mode == "dataset"
                      and (self.cmrm.when == "always" or req["has_image"]))
                self.engine.set_cvec(*self._cvec) if on else self.engine.set_cvec(None)
                report = {}
                self._prefill(req["base"], None, report, states=True)
            if not with_mask:
                return report["states"]
            mask = np.concatenate([np.zeros(seg.n_pos, bool) if isinstance(seg, (Image, Soft)) else np.ones(len(seg), bool)
                                   for seg in req["base"]])
            return report["states"], mask
        finally:
            for segs in (req["base"], req["safe"], req["text_only"]):
                segs is not None and segs.free()

    def _sample_cvec(self, req: dict, report: dict):
        """Sample-level CMRM: this request's vectors (last-token layer outputs of its prompt minus
        those of the prompt without its images; two extra prefills) as a control-vector buffer."""
        e, last = self.engine, []
        for segs in (req["base"], req["text_only"]):
            e.clear()
            e.set_cvec(None)
            rep = {}
            self._prefill(segs, None, rep, states=True)
            states = rep.get("all_states", rep["states"])
            last.append(np.stack([states[il][-1] for il in range(e.n_layer)]))
        cmrm = self.cmrm.for_request(*last)
        report["cmrm"]["norm"] = float(np.linalg.norm(cmrm.vectors))
        return cmrm.cvec_buffer(e.n_layer, e.n_embd)

    def _casa_check(self, report: dict) -> None:
        """Score the captured prompt hidden states; record the decision in the report."""
        t0 = time.perf_counter()
        H = report.pop("states")
        score = float(self.casa.score([H])[0])
        report["casa"] = casa_report(self.casa, self.cascade, score, (time.perf_counter() - t0) * 1e3)
        if self.cascade is not None:
            report["cascade"] = self.cascade.report(score)


def n_pos(segments) -> int:
    """Positions a tokenized prompt takes."""
    return sum(s.n_pos if isinstance(s, (Image, Soft)) else len(s) for s in segments)


@dataclass(frozen=True)
class Soft:
    """Grafted content in a tokenized prompt: soft tokens ``embd`` [n, n_embd] fed as embeddings;
    ``index`` of the content in the request."""

    index: int
    embd: np.ndarray = field(compare=False)

    @property
    def n_pos(self) -> int:
        return len(self.embd)
