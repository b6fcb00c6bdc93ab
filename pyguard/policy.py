"""The per-request safety policy, written once for both runtimes: the CMRM switch, the CASA
decision and its action (refuse, or force the refusal's tokens first), cascade routing, CoCA's
token choice with its gate, sampling, and the typed ``pyguard`` report.

A runtime (``pyguard.llama`` or ``pyguard.torch``) evaluates prompts and hands this module logit
rows; everything decided per request is decided here. numpy only (the edge path); torch rows
work too, through :func:`pyguard.ops.coca_step`.
"""
from __future__ import annotations

import numbers

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np

from . import ops
from .methods import CASA, CMRM, Cascade, CoCA, casa_report, coca_report
from .reference import is_torch
from .sampling import sample


# ----------------------------------------------------------------------------- the report
@dataclass
class CasaReport:
    """CASA's decision on a prompt. Under a cascade, ``unsafe`` means its refuse branch."""

    score: float
    unsafe: bool
    threshold: float
    layer: int
    action: Optional[str]  # "refuse" | "prefix" | None (safe)
    ms: float


@dataclass
class CocaReport:
    alpha: float
    shared_prefix_tokens: int
    dual_steps: int = 0
    gated: bool = False
    kl_max: float = 0.0


@dataclass
class CmrmReport:
    on: bool
    mode: str
    norm: Optional[float] = None  # sample-level CMRM: the norm of this request's vectors


@dataclass
class Timings:
    prefill_ms: Optional[float] = None
    decode_ms_per_token: Optional[float] = None


@dataclass
class Report:
    """What pyguard did for one request (``to_dict()``: the ``pyguard`` entry of a response)."""

    casa: Optional[CasaReport] = None
    coca: Optional[CocaReport] = None
    cmrm: Optional[CmrmReport] = None
    cascade: Optional[dict] = None  # {"branch", "why"} under a cascade
    timings: Timings = field(default_factory=Timings)

    def to_dict(self) -> dict:
        out = {"casa": None if self.casa is None else asdict(self.casa),
               "coca": None if self.coca is None else asdict(self.coca),
               "timings": asdict(self.timings),
               "cmrm": None if self.cmrm is None else asdict(self.cmrm)}
        if out["cmrm"] is not None and out["cmrm"]["norm"] is None:
            del out["cmrm"]["norm"]
        if self.cascade is not None:
            out["cascade"] = dict(self.cascade)
        return out


# ----------------------------------------------------------------------------- one request
@dataclass(frozen=True)
class Guards:
    """Which of the loaded methods run for one request (see :meth:`Policy.guards`)."""

    coca: bool = True
    casa: bool = True
    cmrm: bool = True
    alpha: Optional[float] = None  # CoCA's alpha for this request (None: the loaded one)


ALL = Guards()


@dataclass(eq=False)
class Request:
    """One request's generation state, as the policy and a runtime's loop see it."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    rng: Any = None  # numpy Generator (sampling); None when greedy
    has_media: bool = False  # images or grafted content: what CMRM shifts
    guards: Guards = ALL
    suppress: tuple = ()   # token ids never chosen (e.g. end of generation, for ignore_eos)
    report: Report = field(default_factory=Report)
    out: list = field(default_factory=list)     # chosen tokens
    forced: list = field(default_factory=list)  # tokens forced at the first steps (CASA "prefix")
    dual: bool = False     # CoCA's safe sequence still runs
    refused: bool = False  # CASA refused: its refusal text is the whole answer
    casa_from: int = 0     # the first prompt row CASA reads (its rows "last-turn": the last user message's)
    t0: float = field(default_factory=time.perf_counter)
    t_first: Optional[float] = None

    @property
    def step(self) -> int:
        return len(self.out)


MIN_TEMPERATURE = ops.MIN_TEMPERATURE  # below it sampling is greedy, as in vLLM: logits / T would overflow


def check_sampling(max_tokens, temperature, top_p, seed=None, stop=None) -> tuple[float, list]:
    """ValueError naming the first invalid generation option. Returns (the temperature used: 0,
    greedy, for any below ``MIN_TEMPERATURE``; the stop strings as a list)."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not (temperature >= 0 and np.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not (0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer, got {seed!r:.80}")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(x, str) for x in stop)):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r:.80}")
    return (0.0 if temperature < MIN_TEMPERATURE else float(temperature)), ([stop] if isinstance(stop, str) else list(stop or []))


class Policy:
    """The safety methods a guarded model runs, applied per request.

    refusal: the token ids of CASA's refusal text (its ``prefix`` action forces them); eos: the
    end-of-generation token a refused request ends with in token-level APIs."""

    def __init__(self, coca: CoCA | None = None, cmrm: CMRM | None = None, casa: CASA | None = None,
                 cascade: Cascade | None = None, refusal: list | None = None):
        self.coca, self.cmrm, self.casa, self.cascade = coca, cmrm, casa, cascade
        self.refusal = list(refusal or [])
        self.trace: list | None = None  # tests: a list collecting the calibrated rows [n_dual, V] per step
        self._held: dict = {}  # name -> ((values, device), the vector there): see _vector

    # -- before the first token ------------------------------------------------------------
    def guards(self, choice: Optional[dict]) -> Guards:
        """A request's choice of methods, e.g. ``{"coca": False}`` or ``{"cascade": False,
        "cmrm": True, "alpha": 2.0}``: each key turns a loaded method off or on (``cascade``
        turns the cascade's CASA and CoCA together); ``alpha`` sets CoCA's. ValueError naming
        the first key this model cannot honour."""
        if choice is None:
            return ALL
        if not isinstance(choice, dict):
            raise ValueError(f"pyguard: expected an object of method switches, got {choice!r:.80}")
        loaded = {"coca": self.coca, "casa": self.casa, "cmrm": self.cmrm}
        on = {k: True for k in loaded}
        for key, value in choice.items():
            if key == "alpha":
                if self.coca is None:
                    raise ValueError("pyguard.alpha: this model runs without CoCA")
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                    raise ValueError(f"pyguard.alpha must be a finite number, got {value!r:.80}")
                continue
            if key not in (*loaded, "cascade"):
                raise ValueError(f"pyguard.{key}: unknown switch (known: coca, casa, cmrm, cascade, alpha)")
            if not isinstance(value, bool):
                raise ValueError(f"pyguard.{key} must be true or false, got {value!r:.80}")
            if key == "cascade" or (self.cascade is not None and key in ("coca", "casa")):
                if self.cascade is None:
                    raise ValueError("pyguard.cascade: this model runs without a cascade")
                if key != "cascade":
                    raise ValueError(f"pyguard.{key}: under a cascade CASA routes to CoCA; "
                                     "switch both with pyguard.cascade")
                on["coca"] = on["casa"] = value
            elif loaded[key] is None:
                if value:
                    raise ValueError(f"pyguard.{key}: this model was loaded without {key.upper()}")
            else:
                on[key] = value
        alpha = choice.get("alpha")
        return Guards(**on, alpha=None if alpha is None else float(alpha))

    def cmrm_on(self, has_media: bool, guards: Guards = ALL) -> bool:
        """Whether CMRM shifts this request (sample-level CMRM: requests with media only)."""
        c = self.cmrm
        if c is None or not guards.cmrm:
            return False
        return has_media if c.mode == "sample" else (c.when == "always" or has_media)

    def start(self, req: Request) -> None:
        if self.cmrm is not None:
            req.report.cmrm = CmrmReport(self.cmrm_on(req.has_media, req.guards), self.cmrm.mode)

    def decide(self, reqs: list, scores, ms: float) -> None:
        """CASA's decision for each request from its prompt's score; sets the forced tokens and,
        for a refusal, ``refused``. Under a cascade also the branch (``dual`` off for "none")."""
        for r, s in zip(reqs, np.asarray(scores, dtype=np.float64).tolist()):
            r.report.casa = rep = CasaReport(**casa_report(self.casa, self.cascade, s, ms))
            if self.cascade is not None:
                r.report.cascade = self.cascade.report(s)
            if rep.unsafe:
                r.forced = list(self.refusal)
                r.refused = rep.action == "refuse"

    def wants_safe(self, req: Request) -> bool:
        """Whether CoCA's safe sequence must be evaluated for this request (after decide)."""
        return (self.coca is not None and req.guards.coca and not req.refused
                and (req.report.cascade is None or req.report.cascade["branch"] == "coca"))

    def start_dual(self, req: Request, shared: int) -> None:
        """CoCA's two sequences are ready: ``shared`` prompt positions were evaluated once."""
        req.dual = True
        req.report.coca = CocaReport(**coca_report(self.coca, shared))
        if req.guards.alpha is not None:
            req.report.coca.alpha = req.guards.alpha

    def first_token(self, req: Request) -> None:
        req.t_first = time.perf_counter()
        req.report.timings.prefill_ms = (req.t_first - req.t0) * 1e3

    # -- each step -------------------------------------------------------------------------
    def choose(self, reqs: list, rows: list) -> list:
        """The next token of each request. rows[i]: the request's logit rows, (base [1, V],) or,
        while ``dual``, (base [1, V], safe [1, V]): numpy, or torch on any device (it stays
        there: one read back per step, of the greedy tokens and CoCA's KL, plus one per sampled
        row). None for a request whose next token is forced. One ``coca_step`` serves every dual
        request. Requests whose safe sequence the gate drops have ``dual`` False afterwards."""
        toks: list = [None] * len(reqs)
        dual = [i for i, r in enumerate(reqs) if r.dual]
        plain, argmax = [], []  # the greedy rows' requests and their argmax (unread)
        read = []
        if dual:
            rs = [reqs[i] for i in dual]
            base, safe = _cat([rows[i][0] for i in dual]), _cat([rows[i][1] for i in dual])
            for j, r in enumerate(rs):
                if r.suppress:
                    base[j, list(r.suppress)] = safe[j, list(r.suppress)] = NEVER
            alpha = self._vector("alpha", [r.report.coca.alpha for r in rs], "float32", base)
            temp = self._vector("temperature", [r.temperature if r.temperature > 0 else 1.0 for r in rs], "float32", base)
            forced = [r.forced[r.step] if r.step < len(r.forced) else -1 for r in rs]
            force = self._vector("forced", forced, "int64", base) if max(forced) >= 0 else None
            cal = base.copy() if isinstance(base, np.ndarray) else base.clone()
            read = list(ops._coca_step(base, safe, alpha, temp, force, cal))  # checked when built: no host reads
            if self.trace is not None:
                self.trace.append(cal)
        for i, r in enumerate(reqs):
            if r.dual or r.step < len(r.forced):
                continue
            row = rows[i][0][0]
            if r.suppress:
                row = row.copy() if isinstance(row, np.ndarray) else row.clone()
                row[list(r.suppress)] = NEVER
            if r.temperature > 0:
                toks[i] = sample(row / r.temperature, r.top_p, r.rng)
            else:
                plain.append(i)
                argmax.append(row.argmax())
        if argmax:
            read.append(_stack(argmax))
        got = _to_host(read)
        if dual:
            tok, kl = got[0], got[1]
            for j, (i, r) in enumerate(zip(dual, rs)):
                toks[i] = int(tok[j]) if r.temperature <= 0 or forced[j] >= 0 else sample(cal[j], r.top_p, r.rng)
                rep = r.report.coca
                rep.dual_steps += 1
                rep.kl_max = max(rep.kl_max, kl[j])
                c = self.coca
                if (c.gate_kl is not None and r.step + 1 == c.gate_tokens and rep.kl_max < c.gate_kl
                        and r.step + 1 >= len(r.forced)):
                    r.dual, rep.gated = False, True
        for i, t in zip(plain, got[-1] if plain else ()):
            toks[i] = int(t)
        for i, r in enumerate(reqs):
            if toks[i] is None:
                toks[i] = r.forced[r.step]
        for r, t in zip(reqs, toks):
            r.out.append(t)
            r.report.timings.decode_ms_per_token = (time.perf_counter() - r.t_first) * 1e3 / len(r.out)
        return toks

    def _vector(self, name: str, values: list, dtype: str, like):
        """The per-row vector ``name`` of the kind (and device) of ``like``; a torch one is
        copied to its device only when its values change."""
        if isinstance(like, np.ndarray):
            return np.array(values, dtype)
        import torch

        key, held = self._held.get(name, (None, None))
        if key != (values, like.device):
            held = torch.tensor(values, dtype=getattr(torch, dtype), device=like.device)
            self._held[name] = ((list(values), like.device), held)
        return held


NEVER = -1e30  # a suppressed token's logit: finite, so CoCA's difference of two rows stays 0


def _cat(rows: list):
    """Rows [1, V] stacked to [n, V], numpy or torch."""
    if isinstance(rows[0], np.ndarray):
        return np.concatenate(rows)
    import torch

    return torch.cat(rows)


def _stack(xs: list):
    """0-d arrays (numpy scalars or torch tensors) stacked to [n]."""
    if is_torch(xs[0]):
        import torch

        return torch.stack(xs)
    return np.array(xs)


def _to_host(parts: list) -> list:
    """Each 1-D array of ``parts`` as a list of Python numbers; torch tensors (one device) are
    read back together, in one copy."""
    if not parts or not is_torch(parts[0]):
        return [np.asarray(p).tolist() for p in parts]
    import torch

    flat = torch.cat([p.reshape(-1).double() for p in parts]).tolist()  # float64: exact for ids and KL
    out, k = [], 0
    for p in parts:
        out.append(flat[k:k + p.numel()])
        k += p.numel()
    return out
