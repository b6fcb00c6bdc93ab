"""The GPU benchmark of scripts/gpu_check.sh: each fused op beside the same computation in torch
eager and a device copy of as many bytes, then guarded vs unguarded decode on the PyTorch
runtime. One markdown table; every ratio is measured side by side in this one run.

    python benchmarks/gpu_bench.py [--device cuda] [--out FILE] [--quick]

The ops run through the runtimes' own entry points (``ops._coca_step``, ``ops._cmrm_shift_``;
``ops.casa_score`` for the once-per-prompt check): Triton on CUDA, C++ on the CPU. The decode
model is Qwen2.5-0.5B's shape (24 layers, d 896, vocab 151936) with random weights in bf16
(latency depends on the shape, not the weights), so no model file is needed; ``--quick`` shrinks
everything for a CPU smoke test.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # baselines: the same math in torch eager
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tiny_hf: an offline chat tokenizer
import baselines as bl  # noqa: E402

from pyguard import ops  # noqa: E402
from pyguard.timing import cpu_model  # noqa: E402


def timed(fn, device: str, reps: int) -> float:
    """Median seconds of fn() over reps calls after warm-up (CUDA events on a GPU)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def op_rows(device: str, quick: bool, reps: int) -> list[dict]:
    """One row per (op, shape): pyguard's kernel, torch eager, a copy of the bytes the op moves."""
    g = torch.Generator(device=device).manual_seed(0)
    randn = lambda *s, dtype=torch.float32: torch.randn(*s, generator=g, device=device).to(dtype)  # noqa: E731
    V = 4096 if quick else 151936
    rows = []
    for B in (1, 8):
        base, safe = randn(B, V), randn(B, V)
        alpha, temp = torch.full((B,), 1.5, device=device), torch.ones(B, device=device)
        out = torch.empty_like(base)
        rows.append(dict(op="coca_step (decode step)", shape=f"B={B} V={V} fp32", bytes=3 * base.nbytes,
                         kernel=lambda: ops._coca_step(base, safe, alpha, temp, None, out),
                         eager=lambda: bl.coca_torch(base, safe, alpha, temp, out)))
    d = 256 if quick else 896
    for N, dtype in ((1, torch.bfloat16), (2 if quick else 2048, torch.bfloat16), (2 if quick else 2048, torch.float32)):
        h, v = randn(N, d, dtype=dtype), randn(d, dtype=dtype) * 0.01
        name = "decode" if N == 1 else "prefill"
        rows.append(dict(op=f"cmrm_shift_ (one layer, {name})", shape=f"N={N} d={d} {str(dtype)[6:]}",
                         bytes=2 * h.nbytes,
                         kernel=lambda h=h, v=v: ops._cmrm_shift_(h, v, 0.5),
                         eager=lambda h=h, v=v: bl.cmrm_torch(h, v, 0.5)))
    T, r, heads = (64, 16, 4) if quick else (512, 64, 4)
    H, Wk, q, w = randn(T, d), randn(d, r) / d ** 0.5, randn(heads, r), randn(d) / d ** 0.5
    cu = torch.tensor([0, T], device=device)
    rows.append(dict(op="casa_score (one prompt)", shape=f"T={T} d={d} r={r} heads={heads}", bytes=H.nbytes,
                     kernel=lambda: ops.casa_score(H, cu, Wk, q, w, 0.1),
                     eager=lambda: bl.casa_torch(H, [0, T], Wk, q, w, 0.1)))
    for row in rows:
        src = torch.empty(row["bytes"] // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        row["copy"] = lambda s=src, t=dst: t.copy_(s)
        for key in ("kernel", "eager", "copy"):
            row[key] = timed(row[key], device, reps)
    return rows


def decode_rows(device: str, quick: bool, n_tokens: int, reps: int) -> list[dict]:
    """Seconds per generated token (prefill included, batch 1) of the model's own generate and
    of guard() with no method, CoCA, and CoCA + CMRM (every layer) + CASA."""
    import transformers
    from tiny_hf import tiny_tokenizer

    from pyguard.methods import CASA, CMRM, CoCA
    from pyguard.torch import guard

    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096) if quick else \
        dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2, vocab_size=151936)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape, tie_word_embeddings=True))
    model = model.to(torch.bfloat16 if device == "cuda" else torch.float32).eval()
    tok = tiny_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "Write a poem about the sea. " * 4}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    L, d = shape["num_hidden_layers"], shape["hidden_size"]
    rng = np.random.default_rng(0)
    casa = CASA({"Wk": rng.standard_normal((d, 16)).astype(np.float32) / d ** 0.5,
                 "q": rng.standard_normal((4, 16)).astype(np.float32),
                 "w": rng.standard_normal(d).astype(np.float32) / d ** 0.5, "b": 0.0},
                layer=L // 3, threshold=1.0)  # never refuses: every run decodes n_tokens
    cmrm = CMRM(rng.standard_normal((L, d)).astype(np.float32) * 0.01, when="always")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def per_token(generate):
        def run():
            out = generate()
            sync()
            assert out.shape[1] == ids.shape[1] + n_tokens, out.shape
        for _ in range(2):
            run()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        return float(np.median(times)) / n_tokens

    eos = dict(eos_token_id=[])  # no early end: every run makes n_tokens
    with torch.no_grad():
        rows = [dict(run="model.generate (unguarded)",
                     s=per_token(lambda: model.generate(ids, max_new_tokens=n_tokens, min_new_tokens=n_tokens,
                                                        do_sample=False, pad_token_id=0)))]
        for name, methods in (("guard(), no method", {}), ("guard(coca)", dict(coca=CoCA(alpha=1.5))),
                              ("guard(coca, cmrm all layers, casa)", dict(coca=CoCA(alpha=1.5), cmrm=cmrm, casa=casa))):
            with guard(model, tok, **methods) as gm:
                rows.append(dict(run=name, s=per_token(lambda: gm.generate(ids, max_new_tokens=n_tokens, **eos))))
    return rows


def machine(device: str) -> str:
    import triton

    what = torch.cuda.get_device_name() if device == "cuda" else cpu_model()
    return f"{what}; torch {torch.__version__}, triton {triton.__version__}"


def table(device: str, ops_: list[dict], decode: list[dict], n_tokens: int) -> str:
    kernel = "Triton" if device == "cuda" else "C++"
    lines = [f"Device: {machine(device)}", "",
             f"| op | shape | pyguard ({kernel}) µs | torch eager µs | eager / pyguard | pyguard GB/s | "
             "device copy GB/s | pyguard / copy time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in ops_:
        lines.append(f"| {r['op']} | {r['shape']} | {r['kernel'] * 1e6:.1f} | {r['eager'] * 1e6:.1f} | "
                     f"{r['eager'] / r['kernel']:.2f} | {r['bytes'] / r['kernel'] / 1e9:.0f} | "
                     f"{r['bytes'] / r['copy'] / 1e9:.0f} | {r['kernel'] / r['copy']:.2f} |")
    base = decode[0]["s"]
    lines += ["", f"| decode, batch 1, {n_tokens} tokens (prefill included) | ms / token | vs model.generate |",
              "|---|---|---|"]
    lines += [f"| {r['run']} | {r['s'] * 1e3:.2f} | {r['s'] / base:.2f} |" for r in decode]
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", help="also write the table to this markdown file")
    ap.add_argument("--quick", action="store_true", help="small shapes and few repetitions (a smoke test)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_bench: no CUDA device visible to torch (use --device cpu for a smoke test)")
    reps, n_tokens = (3, 4) if args.quick else (50, 64)
    text = table(args.device, op_rows(args.device, args.quick, reps),
                 decode_rows(args.device, args.quick, n_tokens, 3 if args.quick else 5), n_tokens)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    main()
