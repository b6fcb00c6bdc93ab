"""End-to-end latency of the guarded PyTorch runtime (pyguard.torch) on CPU, float32, beside the
model's own ``generate``, measured interleaved in one run: time to first token and decode tokens/s
as ratios to unguarded, for a tiny random LLaVA (image prompt, tests/tiny_hf.py) and
Qwen2.5-Coder-0.5B-Instruct. Prints a Markdown table per model, writes a PNG.

    .venv/bin/python benchmarks/torch_report.py [--model both|qwen|tiny-llava] [--tokens 32] [--rounds 3]

Every run decodes exactly --tokens tokens (end of text ignored: ``min_new_tokens`` for the model's
``generate``, ``eos_token_id=[]`` for pyguard), greedy. TTFT = time of a 1-token run; decode s/token
= (time of the N-token run - TTFT) / (N - 1).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import DynamicCache

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
from pyguard import bench as llama_report  # noqa: E402  (PROMPT, BENIGN, configs, plot)

from pyguard import ops  # noqa: E402
from pyguard.methods import CoCA  # noqa: E402
from pyguard.torch import guard  # noqa: E402
from pyguard.torch.matmul import plain_linears, transposed  # noqa: E402

ALPHA = 1.5  # llama_report.configs' CoCA
BARE_TEXT = "Write a long story about a lighthouse keeper."


def load(name: str, tmp: Path):
    """(model, tokenizer or processor, tokenizer, encoded prompts [batch of one each])."""
    if name == "qwen":
        from pyguard.torch import convert

        model, tok = convert.load("qwen2.5-coder-0.5b")
        proc, prompts = tok, [llama_report.PROMPT, *llama_report.BENIGN[:2]]
        msgs = [[{"role": "user", "content": p}] for p in prompts]
        images = None
    else:
        from PIL import Image
        from tiny_hf import tiny_llava, tiny_processor
        from tiny_mmproj import write_test_image

        model = tiny_llava()
        proc = tiny_processor(model)
        tok = proc.tokenizer
        text = {"type": "text", "text": "What is in this image? Describe it."}
        msgs = [[{"role": "user", "content": [{"type": "image"}, text]}]]
        images = [Image.open(write_test_image(tmp / "x.png")).convert("RGB")]
    encs = []
    for m in msgs:
        text = proc.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
        kw = {"images": images} if images else {}
        encs.append(dict(proc(text=[text], return_tensors="pt", add_special_tokens=False, **kw)))
    return model, proc, tok, encs


@torch.no_grad()
def naive_coca(model, base: list, safe: list, alpha: float, n: int, pixel_values=None) -> list:
    """CoCA the naive way: two independent sequences, each with its own DynamicCache, prefilled in
    full, then one batch-of-one forward of each per step; greedy on ``ops.coca_step``."""
    kw = {} if pixel_values is None else {"pixel_values": pixel_values}
    caches = [DynamicCache(), DynamicCache()]
    logits = [model(input_ids=torch.tensor([ids]), past_key_values=c, use_cache=True, logits_to_keep=1, **kw)
              .logits[:, -1].float() for ids, c in zip((base, safe), caches)]
    a, temp, out = torch.tensor([alpha]), torch.ones(1), []
    while True:
        tok, _ = ops.coca_step(logits[0], logits[1], a, temp, out=logits[0])
        out.append(int(tok[0]))
        if len(out) == n:
            return out
        ids = torch.tensor([[out[-1]]])
        logits = [model(input_ids=ids, past_key_values=c, use_cache=True).logits[:, -1].float() for c in caches]


def runner(spec, model, proc, tok):
    """A function (encoded prompt, n) -> the n new tokens, for one configuration."""
    if spec == "hf":
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return lambda enc, n: model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                             pad_token_id=pad)[0, enc["input_ids"].shape[1]:].tolist()
    if spec == "naive":
        g = guard(model, proc, coca=CoCA(alpha=ALPHA))  # only to splice the principle into the prompt

        def run(enc, n):
            base = enc["input_ids"][0].tolist()
            return naive_coca(model, base, g._spliced(base, 0), ALPHA, n, enc.get("pixel_values"))
        return run
    g = guard(model, proc, **spec)
    return lambda enc, n: g.generate(**enc, max_new_tokens=n, eos_token_id=[])[0, enc["input_ids"].shape[1]:].tolist()


def timed(run, enc, n: int):
    """(seconds to first token, seconds per decoded token, the n tokens)."""
    t0 = time.perf_counter()
    run(enc, 1)
    t1 = time.perf_counter()
    toks = run(enc, n)
    t2 = time.perf_counter()
    if len(toks) != n:
        raise RuntimeError(f"{len(toks)} tokens instead of {n}")
    return t1 - t0, ((t2 - t1) - (t1 - t0)) / max(n - 1, 1), toks


def run_model(name: str, tokens: int, rounds: int, tmp: Path):
    model, proc, tok, encs = load(name, tmp)
    cfg = model.config.get_text_config()
    # CoCA alpha 1.5; CMRM random * 0.01, when="always", hooks on every layer (layer 0's vector is zero);
    # CASA random with b = -20 (never refuses) at layer n_layer // 2
    specs = llama_report.configs(cfg.hidden_size, cfg.num_hidden_layers, gate_kl=0.5)
    specs.pop("gated CoCA (benign)")  # pyguard.torch's gate is not benchmarked here
    specs = {"unguarded": "hf", "unguarded via pyguard": specs.pop("unguarded"), **specs}
    runs = {k: runner(spec, model, proc, tok) for k, spec in specs.items()}
    for run in runs.values():  # warm-up (first calls allocate and initialize), not timed
        run(encs[0], 2)
    res = {k: {"ttft": [], "tpot": []} for k in runs}
    for r in range(rounds):
        first = {}
        for k, run in runs.items():
            for i, enc in enumerate(encs):
                ttft, tpot, first[k, i] = timed(run, enc, tokens)
                res[k]["ttft"].append(ttft)
                res[k]["tpot"].append(tpot)
            print(f"  {name} {k}: ttft {ttft * 1e3:.0f} ms, {1 / tpot:.1f} tok/s", file=sys.stderr)
        if r == 0:
            for i in range(len(encs)):
                assert first["naive CoCA", i] == first["pyguard CoCA", i], f"naive != pyguard CoCA on prompt {i}"
    return res, bare_batch(model, tok, tokens, rounds)


@torch.no_grad()
def bare_batch(model, tok, tokens: int, rounds: int) -> dict:
    """Median seconds of a plain decode step (DynamicCache, one token per row) by (batch, linears transposed)."""
    prompt = torch.tensor([tok(BARE_TEXT, add_special_tokens=False).input_ids])
    times = {(b, s): [] for s in (False, True) for b in (1, 2)}
    for _ in range(rounds):
        for b, s in times:
            cache, ids = DynamicCache(), prompt.expand(b, -1)
            model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            with transposed(plain_linears(model)) if s else contextlib.nullcontext():
                t0 = time.perf_counter()
                for _ in range(tokens):
                    model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True, logits_to_keep=1)
                times[b, s].append((time.perf_counter() - t0) / tokens)
    return {k: statistics.median(v) for k, v in times.items()}


def table(res, bare: dict) -> str:
    b_ttft, b_tpot = statistics.median(res["unguarded"]["ttft"]), statistics.median(res["unguarded"]["tpot"])
    lines = ["| configuration | TTFT ms | TTFT / unguarded | decode tok/s | tok/s / unguarded | note |",
             "|---|---|---|---|---|---|"]
    notes = {"unguarded": "the model's own generate",
             "unguarded via pyguard": "guard() with no method: the loop's overhead",
             "naive CoCA": "two sequences, own caches, batch of one each"}
    for k, r in res.items():
        ttft, tpot = statistics.median(r["ttft"]), statistics.median(r["tpot"])
        lines.append(f"| {k} | {ttft * 1e3:.0f} | {ttft / b_ttft:.2f} | {1 / tpot:.1f} | {b_tpot / tpot:.2f} | "
                     f"{notes.get(k, '')} |")
    one = bare[1, False]  # batch 2 (transposed linears, as CoCA runs it) against the plain batch-1 step
    for label, two, also in (("", bare[2, False], ""),
                             (", linears transposed", bare[2, True], f" ({bare[1, True] * 1e3:.1f} with it)")):
        lines.append(f"| bare forward, batch of two vs one{label} | | | {1 / two:.1f} | {one / two:.2f} | step ms: "
                     f"batch 1 {one * 1e3:.1f}{also}, batch 2 {two * 1e3:.1f}; the limit for dual decoding |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["both", "qwen", "tiny-llava"], default="both")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--png", type=Path, default=HERE / "torch_report.png")
    a = p.parse_args(argv)
    names = ["tiny-llava", "qwen"] if a.model == "both" else [a.model]
    with tempfile.TemporaryDirectory() as tmp:
        out = {n: run_model(n, a.tokens, a.rounds, Path(tmp)) for n in names}
    print(f"{os.cpu_count()} cores ({platform.machine()}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"float32, {a.tokens} new tokens, greedy, {a.rounds} rounds interleaved (medians)")
    labels = {"qwen": "Qwen2.5-Coder-0.5B-Instruct (3 text prompts)", "tiny-llava": "tiny random LLaVA (image prompt)"}
    for n, (res, bare) in out.items():
        print(f"\n{labels[n]}\n\n{table(res, bare)}")
    llama_report.plot({labels[n]: res for n, (res, _) in out.items()}, a.png,
         f"pyguard on PyTorch (CPU, float32): {torch.get_num_threads()} threads")
    print(f"\nplot: {a.png}")
    return out


if __name__ == "__main__":
    main()
