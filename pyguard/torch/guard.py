"""Guarded generation for Hugging Face causal LMs and LLaVA-style VLMs: CoCA on a shared-prefix
KV cache, CMRM forward hooks, the CASA check before the first token.

One mechanism for every family: the prompts are run as batches through the model's own forward
(``attention_mask``, ``position_ids``, ``past_key_values``, ``logits_to_keep``); hooks exist only
while a guarded call runs, so the model itself is never changed.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from .. import chat, extras, responses
from ..methods import describe_model, unpack_cascade
from ..policy import Policy, Report, Request, check_sampling
from ..text import TextAssembler, common_prefix
from .cmrm import RowSelector, shift_layers
from .layers import capture, decoder_layers
from .matmul import MAX_ROWS, plain_linears, transposed

GRAFT_ID = -1  # the token id standing for a soft token of grafted content in a prompt's ids
_GENERATE_OPTIONS = {"max_new_tokens", "do_sample", "temperature", "top_p", "streamer", "eos_token_id",
                     "pad_token_id", "generator"}


def guard(model, processor_or_tokenizer, coca=None, cmrm=None, casa=None, cascade=None, graft=None) -> "GuardedModel":
    """A :class:`GuardedModel` (also a context manager) around a Hugging Face model."""
    return GuardedModel(model, processor_or_tokenizer, coca=coca, cmrm=cmrm, casa=casa, cascade=cascade, graft=graft)


@dataclass(eq=False)
class _Request(Request):
    """One prompt of a batch (the policy's :class:`~pyguard.policy.Request`): token ids without
    padding (base, and with the principle: safe)."""

    base: list = None
    safe: list | None = None
    soft: torch.Tensor | None = None  # the grafted contents' soft tokens [sum n_i, d], in order
    done: bool = False


class GuardedModel:
    """A Hugging Face model with CoCA / CMRM / CASA applied by :meth:`generate` and
    :meth:`create_chat_completion`. ``last_report`` holds the ``pyguard`` report of each request
    of the last call. ``graft``: a ``pyguard.graft.Graft`` for "graft" message parts (its soft
    tokens go in through ``inputs_embeds``). The per-request decisions are ``policy``'s
    (:class:`pyguard.policy.Policy`, shared with the llama.cpp runtime). Use as a context
    manager or call :meth:`close`."""

    def __init__(self, model, processor_or_tokenizer, coca=None, cmrm=None, casa=None, cascade=None, graft=None):
        coca, casa = unpack_cascade(cascade, coca, casa, cmrm)
        self.cascade = cascade
        self.layers = decoder_layers(model)  # TypeError naming the class when the guard cannot hook it
        if model.get_output_embeddings() is None:
            raise TypeError(f"{type(model).__name__} has no language-model head: pyguard needs a model that "
                            "returns next-token logits (...ForCausalLM or ...ForConditionalGeneration)")
        cfg = model.config.get_text_config()
        self.n_layer, self.n_embd = len(self.layers), cfg.hidden_size
        model_id = (self.n_embd, self.n_layer, cfg.model_type, cfg.vocab_size)
        self.model_hint = describe_model(cfg.model_type, self.n_layer, self.n_embd, cfg.vocab_size)
        for method in (cmrm, casa, graft):
            if method is not None:
                method.check_model(*model_id)
        self.model, self.coca, self.cmrm, self.casa, self.graft = model, coca, cmrm, casa, graft
        self._linears = plain_linears(model)  # few-row CPU forwards run them transposed (pyguard.torch.matmul)
        proc = processor_or_tokenizer
        self.processor = proc if hasattr(proc, "tokenizer") else None
        self.tokenizer = proc.tokenizer if self.processor is not None else proc
        self.image_token_id = getattr(model.config, "image_token_id", getattr(model.config, "image_token_index", None))
        self.has_vision = getattr(model.config, "vision_config", None) is not None
        refusal = self.tokenizer(casa.refusal_text, add_special_tokens=False).input_ids if casa else None
        self.policy = Policy(coca, cmrm, casa, cascade, refusal)
        self._last: list = []
        self._lock = threading.Lock()

    @property
    def last_report(self) -> list[dict]:
        """The ``pyguard`` report of each request of the last call."""
        return [r.report.to_dict() for r in self._last]

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_open(self):
        if self.model is None:
            raise RuntimeError("this GuardedModel is closed")

    # -- generate ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, pixel_values=None, **kwargs) -> torch.Tensor:
        """Like the model's ``generate``: token ids [B, T] (left-padded with ``attention_mask``),
        ``pixel_values`` for LLaVA, ``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``,
        ``streamer``, ``eos_token_id``, ``pad_token_id``, ``generator`` (torch.Generator for sampling).
        Returns [B, T + n] with finished rows padded. With CoCA the prompts must end with the chat
        template's generation prompt: the principle is put before it. A CASA module that reads the
        last user message (rows "last-turn") needs the messages: :meth:`create_chat_completion`."""
        self._check_open()
        opts = {k: kwargs.pop(k) for k in list(kwargs) if k in _GENERATE_OPTIONS}
        extra = {k: v for k, v in kwargs.items() if k in ("image_sizes",)}
        unknown = sorted(set(kwargs) - set(extra))
        if unknown:
            raise TypeError(f"GuardedModel.generate does not support {', '.join(unknown)} "
                            f"(supported: {', '.join(sorted(_GENERATE_OPTIONS | {'image_sizes'}))})")
        if not torch.is_tensor(input_ids) or input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a [B, T] tensor of token ids, got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}")
        if self.casa is not None and self.casa.rows == "last-turn":
            raise ValueError("the CASA module reads the last user message (rows='last-turn'), "
                             "which bare token ids do not mark: use create_chat_completion(messages)")
        prompts = [row[m.bool()].tolist() for row, m in zip(input_ids.cpu(), attention_mask.cpu())]
        if any(not p for p in prompts):
            raise ValueError("a row of input_ids has no tokens (attention_mask all zero)")
        reqs = [self._request(p, self._spliced(p, b) if self.coca is not None else None) for b, p in enumerate(prompts)]
        streamer = opts.pop("streamer", None)
        if streamer is not None:
            if len(reqs) != 1:
                raise ValueError("a streamer takes a batch of one prompt")
            streamer.put(input_ids.cpu())
        pad = self._pad_id(opts.pop("pad_token_id", None), opts.get("eos_token_id"))
        steps = 0
        for toks in self._run(reqs, pixel_values, extra, **opts):
            steps += 1
            if streamer is not None and toks[0] is not None:
                streamer.put(torch.tensor([toks[0]]))
        if streamer is not None:
            streamer.end()
        new = torch.full((len(reqs), steps), pad, dtype=input_ids.dtype)
        for b, r in enumerate(reqs):
            new[b, : len(r.out)] = torch.tensor(r.out, dtype=input_ids.dtype)
        return torch.cat([input_ids, new.to(input_ids.device)], dim=1)

    def _spliced(self, prompt: list, b: int) -> list:
        """The prompt with the principle's tokens before the chat template's generation prompt."""
        if self.coca.principle_position != "after":
            raise ValueError("CoCA principle_position='before' needs the messages: use create_chat_completion")
        principle, suffix = self._splice_tokens
        if prompt[len(prompt) - len(suffix):] != suffix:
            raise ValueError(f"CoCA: prompt {b} does not end with the chat template's generation prompt "
                             f"{self.tokenizer.decode(suffix)!r}; render it with apply_chat_template("
                             "add_generation_prompt=True) or use create_chat_completion(messages)")
        return prompt[: len(prompt) - len(suffix)] + principle + suffix

    @functools.cached_property
    def _splice_tokens(self) -> tuple[list, list]:
        """(the principle's token ids, the ids the chat template puts after the last user text: end
        of turn, assistant header), tokenized once per guard."""
        probe = "\x00pyguard\x00"
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": probe}], add_generation_prompt=True,
                                                  tokenize=False)
        return (self.tokenizer("\n\n" + self.coca.principle, add_special_tokens=False).input_ids,
                self.tokenizer(text.partition(probe)[2], add_special_tokens=False).input_ids)

    def _request(self, base: list, safe: list | None, soft: torch.Tensor | None = None) -> _Request:
        has_media = (self.image_token_id is not None and self.image_token_id in base) or GRAFT_ID in base
        return _Request(max_tokens=1, base=base, safe=safe, has_media=has_media, soft=soft)

    def _inputs(self, ids: torch.Tensor, soft: list) -> dict:
        """The forward's input for token ids [R, T]: ``input_ids``, or ``inputs_embeds`` [R, T, d]
        with row r's soft tokens ``soft[r]`` [n_r, d] in order at its GRAFT_ID positions."""
        at = None if all(s is None for s in soft) else ids == GRAFT_ID
        if at is None or not at.any():
            return {"input_ids": ids}
        x = self.model.get_input_embeddings()(ids.masked_fill(at, 0))
        rows = [s for s, a in zip(soft, at) if a.any()]
        if any(s is None for s in rows) or sum(len(s) for s in rows) != int(at.sum()):
            raise RuntimeError("the prompt's grafted-content positions do not match its soft tokens")
        x[at] = torch.cat(rows).to(x.device, x.dtype)
        return {"inputs_embeds": x}

    def _pad_id(self, pad, eos) -> int:
        gc = getattr(self.model, "generation_config", None)
        for cand in (pad, getattr(gc, "pad_token_id", None), self.tokenizer.pad_token_id, *self._eos_ids(eos)):
            if cand is not None:
                return int(cand)
        return 0

    def _eos_ids(self, eos) -> list:
        gc = getattr(self.model, "generation_config", None)
        for cand in (eos, getattr(gc, "eos_token_id", None), self.tokenizer.eos_token_id):
            if cand is not None:
                return [int(x) for x in (cand if isinstance(cand, (list, tuple)) else [cand])]
        return []

    # -- chat --------------------------------------------------------------------------------
    def create_chat_completion(self, messages, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                               seed: int | None = None, stop=None, stream: bool = False):
        """OpenAI-style chat completion (a dict with a ``pyguard`` report), or an iterator of
        chunks when ``stream``. temperature 0 is greedy."""
        self._check_open()
        temperature, stops = check_sampling(max_tokens, temperature, top_p, seed, stop)
        prompt, marker = self._flatten(messages)
        soft = self._soft(prompt)
        base, pixel_values = self._encode(prompt, marker, soft)
        safe = None
        if self.coca is not None:
            safe, _ = self._encode(chat.with_principle(prompt, self.coca.principle, self.coca.principle_position, marker),
                                   marker, soft, pixels=False)
        req = self._request(base, safe, None if soft is None else torch.cat(soft))
        if self.casa is not None and self.casa.rows == "last-turn":
            req.casa_from = self._last_turn_row(prompt, marker)
        opts = dict(max_new_tokens=max_tokens, do_sample=temperature > 0, temperature=temperature or 1.0,
                    top_p=top_p, rng=np.random.default_rng(seed))
        cid, name = responses.new_id(), type(self.model).__name__
        pieces = self._texts(req, pixel_values, opts, stops)
        if stream:
            return self._stream(cid, name, pieces)
        text, finish = "", "length"
        for piece, finish_now in pieces:
            text += piece
            finish = finish_now or finish
        return responses.completion(cid, name, text, finish, len(base), len(req.out), req.report.to_dict())

    def _stream(self, cid, name, pieces):
        yield responses.chunk(cid, name, {"role": "assistant", "content": ""})
        for piece, finish in pieces:
            if piece:
                yield responses.chunk(cid, name, {"content": piece})
            if finish:
                yield responses.chunk(cid, name, {}, finish, self.last_report[0])

    @torch.no_grad()
    def prompt_states(self, messages, layer, with_mask: bool = False):
        """Hidden states [T, d] of the prompt ``messages`` (chat template, generation prompt) at
        decoder layer ``layer``: what CASA reads (CMRM applied when it would be); a dict
        {layer: [T, d]} when ``layer`` is a list. With ``with_mask``, also a bool [T]: True at text
        positions, False at image positions."""
        self._check_open()
        layers = [layer] if isinstance(layer, int) else list(layer)
        bad = [il for il in layers if not 0 <= il < self.n_layer]
        if bad:
            raise ValueError(f"layers {bad} are outside the model's {self.n_layer} decoder layers")
        prompt, marker = self._flatten(messages)
        soft = self._soft(prompt)
        ids, pixel_values = self._encode(prompt, marker, soft)
        kw = {} if pixel_values is None else {"pixel_values": pixel_values.to(self._device(), dtype=self.model.dtype)}
        kw |= self._inputs(torch.tensor([ids], device=self._device()), [None if soft is None else torch.cat(soft)])
        shift = self.cmrm is not None and self.cmrm.mode == "dataset" and (self.cmrm.when == "always" or prompt.media)
        with self._lock, shift_layers(self.model, self.cmrm) if shift else contextlib.nullcontext(), \
                capture(self.model, layers) as store:
            self.model(logits_to_keep=1, **kw)
        states = store[layer][0] if isinstance(layer, int) else {il: store[il][0] for il in layers}
        if not with_mask:
            return states
        return states, torch.tensor([t not in (self.image_token_id, GRAFT_ID) for t in ids])

    def last_turn_row(self, messages) -> int:
        """The prompt position where the last user message's content starts (``chat.last_turn_row``)."""
        self._check_open()
        return self._last_turn_row(*self._flatten(messages))

    def _last_turn_row(self, prompt: chat.Prompt, marker: str) -> int:
        render = lambda m: self.tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)  # noqa: E731
        return chat.last_turn_row(render, lambda t: self.tokenizer(t, add_special_tokens=False).input_ids,
                                  prompt.messages, marker)

    def _flatten(self, messages) -> tuple[chat.Prompt, str]:
        """(the messages flattened with the processor's image token as marker, the marker);
        ValueError when they hold images this model or this guard cannot take."""
        marker = getattr(self.processor, "image_token", None) or "<image>"
        prompt = chat.flatten(messages, marker)
        if prompt.grafts and self.graft is None:
            raise ValueError("grafted content given, but this guard has no projector (graft=)")
        if prompt.images and (self.processor is None or not self.has_vision):
            raise ValueError(f"images given, but {type(self.model).__name__} takes text only"
                             if not self.has_vision else "images given, but no processor (only a tokenizer) was passed")
        return prompt, marker

    def _soft(self, prompt: chat.Prompt) -> list[torch.Tensor] | None:
        """The soft tokens of the prompt's grafted contents, [n_i, d] each, or None."""
        return self.graft.soft(prompt.grafts) if prompt.grafts else None

    def _encode(self, prompt: chat.Prompt, marker: str, soft: list | None = None, pixels: bool = True):
        """-> (token ids, pixel_values or None) of a flattened prompt rendered by the chat template;
        grafted content i is ``len(soft[i])`` GRAFT_ID tokens."""
        text = self.tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False)
        if prompt.grafts:
            pieces = text.split(marker)
            if len(pieces) - 1 != len(prompt.grafts):
                raise ValueError(f"the rendered prompt holds {len(pieces) - 1} markers {marker!r} for "
                                 f"{len(prompt.grafts)} grafted contents")
            ids = self.tokenizer(pieces[0], add_special_tokens=False).input_ids
            for s, piece in zip(soft, pieces[1:]):
                ids += [GRAFT_ID] * len(s) + self.tokenizer(piece, add_special_tokens=False).input_ids
            return ids, None
        if not prompt.images:
            return self.tokenizer(text, add_special_tokens=False).input_ids, None
        import io

        Image = extras.need("PIL.Image", "images")

        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in prompt.images]
        enc = self.processor(text=[text], images=images, return_tensors="pt", add_special_tokens=False)
        return enc["input_ids"][0].tolist(), (enc["pixel_values"] if pixels else None)

    def _texts(self, req: _Request, pixel_values, opts: dict, stops: list):
        """Yields (text piece, finish reason or None) for one request."""
        text = TextAssembler(stops)
        shown = ""
        eos = set(self._eos_ids(None))
        for (tok,) in self._run([req], pixel_values, {}, **opts):
            if tok in eos:
                yield text.flush(), "stop"
                return
            full = self.tokenizer.decode(req.out, skip_special_tokens=True)
            stable = full[: len(full) - 1] if full.endswith("\ufffd") else full  # a character still incomplete
            piece, stopped = text.add(stable[len(shown):])
            shown = stable if len(stable) > len(shown) else shown
            if stopped:
                yield piece, "stop"
                return
            yield piece, None
        full = self.tokenizer.decode(req.out, skip_special_tokens=True)
        yield text.flush(full[len(shown):]), "length"

    # -- the decode loop ---------------------------------------------------------------------
    def _device(self):
        return self.model.get_output_embeddings().weight.device

    def _run(self, reqs: list, pixel_values, extra: dict, max_new_tokens=None, do_sample=False, temperature=1.0,
             top_p=1.0, eos_token_id=None, generator=None, rng=None):
        """Validates the options; returns an iterator over steps of the new token of each request
        (None when it has finished). Sampling draws from ``rng`` (a numpy Generator, as the
        llama.cpp runtime does), else from one seeded by ``generator`` (a torch.Generator)."""
        if max_new_tokens is None:
            max_new_tokens = getattr(getattr(self.model, "generation_config", None), "max_new_tokens", None) or 20
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if do_sample and not (temperature > 0):
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if pixel_values is not None and not self.has_vision:
            raise ValueError(f"pixel_values given, but {type(self.model).__name__} takes text only")
        if rng is None:
            seed = None if generator is None else int(torch.randint(2 ** 62, (1,), generator=generator,
                                                                    device=generator.device))
            rng = np.random.default_rng(seed)
        self._last = reqs
        for r in reqs:
            r.max_tokens, r.temperature, r.top_p, r.rng = max_new_tokens, temperature if do_sample else 0.0, top_p, rng
            r.report = Report()
            self.policy.start(r)
        return self._decode(reqs, pixel_values, extra, max_new_tokens, self._eos_ids(eos_token_id))

    @torch.no_grad()
    def _decode(self, reqs, pixel_values, extra, max_new_tokens, eos):
        with self._lock:  # one request batch at a time: the hooks and the cache belong to it
            yield from self._decode_locked(reqs, pixel_values, extra, max_new_tokens, eos)

    def _decode_locked(self, reqs, pixel_values, extra, max_new_tokens, eos):
        t0 = time.perf_counter()
        for r in reqs:
            r.t0 = t0
        dev = self._device()
        shift = self.cmrm is not None and any(r.report.cmrm.on for r in reqs)
        per_request = self._sample_vectors(reqs, pixel_values) if shift and self.cmrm.mode == "sample" else None
        with shift_layers(self.model, self.cmrm) if shift else contextlib.nullcontext() as select:
            state = _Batch(self, reqs, select, dev, per_request)
            decide = lambda states: self._casa_check(reqs, states, eos)  # noqa: E731
            with capture(self.model, [self.casa.layer]) if self.casa else contextlib.nullcontext() as store:
                logits = state.prefill(pixel_values, extra, store, decide if store is not None else None)
            for r in reqs:
                self.policy.first_token(r)
            for _ in range(max_new_tokens):
                live = [i for i, r in enumerate(reqs) if not r.done]
                toks = [None] * len(reqs)
                chosen = self.policy.choose([reqs[i] for i in live], state.logit_rows(live, logits))
                for i, t in zip(live, chosen):
                    r, toks[i] = reqs[i], t
                    r.done = t in eos or len(r.out) == max_new_tokens or (r.refused and len(r.out) == len(r.forced))
                yield toks
                if all(r.done for r in reqs):
                    break
                logits = state.step(toks)

    def _sample_vectors(self, reqs, pixel_values) -> torch.Tensor:
        """Sample-level CMRM: [n_requests, n_layer, d], for each request with an image (or grafted
        content) its prompt's last-token layer outputs minus those of the prompt with the image
        (grafted) tokens removed (zeros for the others). Two extra forwards per such request."""
        layers = list(range(self.n_layer))
        dev = self._device()
        media = GRAFT_ID if pixel_values is None else self.image_token_id
        counts = [r.base.count(media) if r.has_media else 0 for r in reqs]
        per_image = sum(counts) // len(pixel_values) if pixel_values is not None else 1
        out = torch.zeros(len(reqs), self.n_layer, self.n_embd)
        first = 0
        for i, r in enumerate(reqs):
            n_img = counts[i] // per_image
            pixels = {}
            if pixel_values is not None:
                pv, first = pixel_values[first:first + n_img], first + n_img
                pixels = {"pixel_values": pv.to(dev, dtype=self.model.dtype)}
            if not r.has_media:
                continue
            last = []
            for ids, kw in ((r.base, pixels), ([t for t in r.base if t != media], {})):
                with capture(self.model, layers) as store:
                    self.model(logits_to_keep=1, **self._inputs(torch.tensor([ids], device=dev), [r.soft]), **kw)
                last.append(torch.stack([store[il][0, -1] for il in layers]).float().cpu().numpy())
            vec = self.cmrm.for_request(*last).vectors
            out[i] = torch.tensor(vec)
            r.report.cmrm.norm = float((vec ** 2).sum() ** 0.5)
        return out

    def _casa_check(self, reqs, states: list, eos: list) -> None:
        """Score each prompt's layer-L hidden states; the policy decides; refused requests end
        with their forced refusal (and end of sequence: token ids are this API's answer)."""
        t0 = time.perf_counter()
        scores = self.casa.score([h[r.casa_from:].float() for r, h in zip(reqs, states)])
        self.policy.decide(reqs, scores, (time.perf_counter() - t0) * 1e3)
        for r in reqs:
            if r.refused:  # the refusal is the answer: no more forwards for it
                r.forced += eos[:1]
                r.dual = False


class _Batch:
    """The rows in flight: each request's base row and, while CoCA runs for it, its safe row,
    sharing one KV cache; finished rows are dropped from the cache."""

    def __init__(self, guard: GuardedModel, reqs: list, select: RowSelector | None, device, per_request=None):
        self.g, self.reqs, self.select, self.dev = guard, reqs, select, device
        self.per_request = per_request  # sample-level CMRM vectors [n_requests, n_layer, d] or None
        self.rows: list[tuple[int, int]] = []  # (request index, 0 base | 1 safe)
        self.selected: list | None = None  # the rows CMRM's row selection was last set for
        self.cache = self.mask = self.pos = None

    def _forward(self, ids, mask, pos, grafts: bool = True, **kw):
        """Logits [rows, V] at the last position; ``grafts`` False: ids holds no grafted content."""
        if self.select is not None and self.selected != self.rows:  # to the device only when the rows change
            self.selected = list(self.rows)
            self.select.set([self.reqs[i].report.cmrm.on for i, _ in self.rows],
                            None if self.per_request is None else self.per_request[[i for i, _ in self.rows]])
        few_rows = self.dev.type == "cpu" and 2 <= ids.numel() <= MAX_ROWS
        with transposed(self.g._linears) if few_rows else contextlib.nullcontext():
            inputs = self.g._inputs(ids, [self.reqs[i].soft if grafts else None for i, _ in self.rows])
            out = self.g.model(attention_mask=mask, position_ids=pos, past_key_values=self.cache,
                               use_cache=True, logits_to_keep=1, **inputs, **kw)
        self.cache = out.past_key_values
        return out.logits[:, -1].float()

    def _left_pad(self, seqs: list) -> tuple:
        n = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), n), dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            if s:
                ids[i, n - len(s):] = torch.tensor(s)
                mask[i, n - len(s):] = 1
        return ids.to(self.dev), mask.to(self.dev)

    def _positions(self, new_mask):
        """Positions of the new columns: previous tokens of the row + 0, 1, ... (pads: 0)."""
        full = new_mask if self.mask is None else torch.cat([self.mask, new_mask], dim=1)
        pos = (full.cumsum(1) - 1).clamp(min=0)[:, full.shape[1] - new_mask.shape[1]:]
        return full, pos

    def prefill(self, pixel_values, extra: dict, store, decide=None):
        """Shared prefixes (batch B), then with CoCA the expansion to 2B rows and the two tails
        (under a cascade: the base tails, CASA's routes, then safe rows forked from the prefix for
        the CoCA branch only). ``decide(states)`` gets each request's base-prompt layer-L states
        [T_i, d] once they are all computed. Returns the last-position logits [rows, V]."""
        g, reqs = self.g, self.reqs
        cut = [common_prefix(r.base, r.safe) if r.safe is not None else len(r.base) for r in reqs]
        tails = [(r.base[k:], r.safe[k:]) for r, k in zip(reqs, cut) if r.safe is not None]
        if any(m in t for m in (g.image_token_id, GRAFT_ID) if m is not None for pair in tails for t in pair):
            raise ValueError("the principle would come before an image: CoCA puts it after the last image")
        self.rows = [(i, 0) for i in range(len(reqs))]
        ids, mask = self._left_pad([r.base[:k] for r, k in zip(reqs, cut)])
        full, pos = self._positions(mask)
        kw = dict(extra)
        if pixel_values is not None:
            kw["pixel_values"] = pixel_values.to(self.dev, dtype=g.model.dtype)
        logits = self._forward(ids, full, pos, **kw)
        self.mask, self.pos = full, pos[:, -1]
        states = [store[g.casa.layer][i][mask[i].bool()] for i in range(len(reqs))] if store is not None else None
        if tails and g.cascade is not None:
            return self._cascade_tails(cut, states, store, decide)
        if tails:
            self.cache.batch_repeat_interleave(2)
            self.mask = self.mask.repeat_interleave(2, dim=0)
            self.rows = [(i, k) for i in range(len(reqs)) for k in (0, 1)]
            ids, tmask = self._left_pad([t for pair in tails for t in pair])
            self.mask, pos = self._positions(tmask)
            logits = self._forward(ids, self.mask, pos)
            self.pos = pos[:, -1]
            if store is not None:
                tail_h = store[g.casa.layer]
                states = [torch.cat([s, tail_h[2 * i][tmask[2 * i].bool()]]) for i, s in enumerate(states)]
            for r, k in zip(reqs, cut):
                g.policy.start_dual(r, k)
        if decide is not None:
            decide(states)
        return logits

    def _cascade_tails(self, cut: list, states: list, store, decide):
        """The cascade after the shared prefixes: base tails on the B rows, CASA's routes, then a
        safe row for each CoCA-branch request: its base row's cache (the prefix; the base tail
        masked out) with the safe tail on top. Nothing is computed twice."""
        g, reqs, B = self.g, self.reqs, len(self.reqs)
        ids, tmask = self._left_pad([r.base[k:] for r, k in zip(reqs, cut)])
        self.mask, pos = self._positions(tmask)
        base_logits = self._forward(ids, self.mask, pos)
        self.pos = pos[:, -1]
        tail_h = store[g.casa.layer]
        decide([torch.cat([s, tail_h[i][tmask[i].bool()]]) for i, s in enumerate(states)])
        fork = [i for i, r in enumerate(reqs) if g.policy.wants_safe(r)]
        if not fork:
            return base_logits
        self.cache.batch_select_indices(torch.tensor(list(range(B)) + fork, dtype=torch.long, device=self.dev))
        safe_mask = self.mask[fork].clone()
        safe_mask[:, -tmask.shape[1]:] = 0  # the safe rows do not see the base tails
        self.mask = torch.cat([self.mask, safe_mask])
        self.rows = [(i, 0) for i in range(B)] + [(i, 1) for i in fork]
        ids, smask = self._left_pad([[] for _ in range(B)] + [reqs[i].safe[cut[i]:] for i in fork])
        self.mask, pos = self._positions(smask)  # base rows: an all-padding tail, masked out
        logits = self._forward(ids, self.mask, pos)
        logits[:B] = base_logits
        self.pos = torch.cat([self.pos, pos[B:, -1]])
        for i in fork:
            g.policy.start_dual(reqs[i], cut[i])
        return logits

    def logit_rows(self, live: list, logits) -> list:
        """The logit rows of requests ``live`` for the policy, each (base [1, V],) or (base, safe)
        while dual; (None,) when its rows were dropped (a refusal's forced tokens)."""
        where = {row: j for j, row in enumerate(self.rows)}
        out = []
        for i in live:
            j = where.get((i, 0))
            if j is None:
                out.append((None,))
            elif self.reqs[i].dual:
                k = where[(i, 1)]
                out.append((logits[j:j + 1], logits[k:k + 1]))
            else:
                out.append((logits[j:j + 1],))
        return out

    def step(self, toks: list):
        """Drop the rows of finished (or gated) requests; run one forward of the new tokens."""
        keep = [j for j, (i, k) in enumerate(self.rows) if not self.reqs[i].done and not self.reqs[i].refused
                and (k == 0 or self.reqs[i].dual)]
        if not keep:
            self.rows = []
            return None
        if len(keep) != len(self.rows):
            self.cache.batch_select_indices(torch.tensor(keep, dtype=torch.long, device=self.dev))
            self.mask, self.pos = self.mask[keep], self.pos[keep]
            self.rows = [self.rows[j] for j in keep]
        ids = torch.tensor([[toks[i]] for i, _ in self.rows], device=self.dev)
        self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=self.dev)], 1)
        self.pos = self.pos + 1
        return self._forward(ids, self.mask, self.pos[:, None], grafts=False)
