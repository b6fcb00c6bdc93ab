"""``pyguard bench``: end-to-end latency of the guarded llama.cpp runtime beside the unguarded
model, measured interleaved in one run: time to first token and decode tokens/s as ratios to
unguarded, and the peak RSS of each configuration (each in its own process). Prints a Markdown
table, writes it and a PNG.

    pyguard bench [--model qwen2.5-coder-0.5b] [--tokens 64] [--rounds 3] [--out bench/]

The PyTorch runtime's report is ``benchmarks/torch_report.py`` (it shares ``plot``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from . import extras, models
from .runtime import Runtime, locate
from .llama.engine import Engine, model_shape
from .llama.reference import naive_coca
from .methods import CASA, CMRM, CoCA

PROMPT = ("I maintain a small Python web service that reads orders from a PostgreSQL table, enriches "
          "them with prices from an internal HTTP API and writes a daily CSV report. The job has become "
          "slow: it now takes forty minutes for about two hundred thousand orders. Explain, step by step, "
          "how you would profile it, which parts are likely to be the bottleneck, and how you would "
          "restructure the code to make it at least ten times faster.")
BENIGN = ["How do I reverse a linked list in Python? Explain the idea and show the code.", "Explain what a hash map is to a new programmer.",
          "Write a haiku about autumn leaves."]


def configs(n_embd: int, n_layer: int, gate_kl: float) -> dict:
    rng = np.random.default_rng(0)
    v = (rng.standard_normal((n_layer, n_embd)) * 0.01).astype(np.float32)
    v[0] = 0
    cmrm = CMRM(v, alpha=1.0, when="always")
    r, heads = 64, 4
    casa = CASA({"Wk": (rng.standard_normal((n_embd, r)) / np.sqrt(n_embd)).astype(np.float32),
                 "q": rng.standard_normal((heads, r)).astype(np.float32),
                 "w": (rng.standard_normal(n_embd) / np.sqrt(n_embd)).astype(np.float32), "b": -20.0},
                layer=n_layer // 2, threshold=0.5)  # b = -20: always "safe", so the answer runs in full
    coca = CoCA(alpha=1.5)
    return {
        "unguarded": {},
        "naive CoCA": "naive",
        "pyguard CoCA": {"coca": coca},
        "gated CoCA (benign)": {"coca": CoCA(alpha=1.5, gate_kl=gate_kl, gate_tokens=8)},
        "CMRM": {"cmrm": cmrm},
        "CASA": {"casa": casa},
        "all three": {"coca": coca, "cmrm": cmrm, "casa": casa},
    }


class Naive:
    """Naive CoCA behind the same call as GuardedLlama (greedy, C++ op)."""

    def __init__(self, path, n_ctx):
        self.tok = Runtime(path, n_ctx=n_ctx).open(coca=CoCA(alpha=1.5))  # tokenization only
        self.engine = Engine(path, n_ctx=n_ctx, n_seq=2)

    def create_chat_completion(self, messages, max_tokens):
        req = self.tok._request(messages, max_tokens, 0.0, 1.0, None, None)
        out = naive_coca(self.engine, req.base[0], req.safe[0], 1.5, max_tokens, backend="cpp")
        return {"usage": {"completion_tokens": len(out)}, "pyguard": {}}

    def close(self):
        self.tok.close()
        self.engine.close()


def make(name, spec, path, n_ctx):
    return Naive(path, n_ctx) if spec == "naive" else Runtime(path, n_ctx=n_ctx).open(**spec)


def timed(g, prompt: str, tokens: int):
    """(seconds to first token, seconds per decoded token, tokens decoded, report). The second
    request repeats the prompt, so its decode time is read from the report (the prompt cache
    supplies the prompt); the naive baseline, without a report, subtracts the first request."""
    msgs = [{"role": "user", "content": prompt}]
    t0 = time.perf_counter()
    g.create_chat_completion(msgs, max_tokens=1)
    t1 = time.perf_counter()
    r = g.create_chat_completion(msgs, max_tokens=tokens)
    t2 = time.perf_counter()
    n = r["usage"]["completion_tokens"]
    per_token = (r["pyguard"].get("timings") or {}).get("decode_ms_per_token")
    tpot = per_token * n / max(n - 1, 1) / 1e3 if per_token else ((t2 - t1) - (t1 - t0)) / max(n - 1, 1)
    return t1 - t0, tpot, n, r["pyguard"]


def gguf_path(model) -> Path:
    """The .gguf file of a default model name or path; ValueError for a Hugging Face folder."""
    kind, path = locate(model)
    if kind != "gguf":
        raise ValueError(f"{model}: pyguard bench measures the llama.cpp runtime (a .gguf or a default model "
                         "name); for a Hugging Face model run benchmarks/torch_report.py")
    return path


def rss_child(name: str, model: str, n_ctx: int, tokens: int, gate_kl: float) -> None:
    path = gguf_path(model)
    n_layer, n_embd = model_shape(path)
    spec = configs(n_embd, n_layer, gate_kl)[name]
    g = make(name, spec, path, n_ctx)
    timed(g, PROMPT, tokens)
    g.close()
    print(json.dumps({"rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """VmHWM: this process's peak resident set (reset by exec, unlike getrusage's ru_maxrss,
    which a fork-exec child inherits from its parent)."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kb / 1024


def bare_batch_ratio(path, tokens: int, rounds: int) -> float:
    """Decode speed of one sequence when every step is a batch of two (two sequences), relative
    to a batch of one: the limit for dual-sequence CoCA on this machine."""
    with Engine(path, n_ctx=512, n_seq=2) as e:
        prompt = e.tokenize("Write a long story about a lighthouse keeper.")
        one, two = [], []
        for _ in range(rounds):
            for batch, acc in ((1, one), (2, two)):
                e.clear()
                e.decode([(t, i, s, False) for s in range(batch) for i, t in enumerate(prompt)])
                t0 = time.perf_counter()
                for k in range(tokens):
                    e.decode([(100, len(prompt) + k, s, True) for s in range(batch)])
                acc.append(time.perf_counter() - t0)
    return statistics.median(one) / statistics.median(two)


def run(model: str, tokens: int, rounds: int, n_ctx: int, gate_kl: float, progress: bool = True, rss: bool = True):
    tqdm = extras.tqdm("eval")

    path = gguf_path(model)
    n_layer, n_embd = model_shape(path)
    specs = configs(n_embd, n_layer, gate_kl)
    gs = {name: make(name, spec, path, n_ctx) for name, spec in specs.items()}
    res = {name: {"ttft": [], "tpot": [], "n": [], "gated": 0, "runs": 0, "rss_mb": float("nan")} for name in gs}
    bar = tqdm(total=rounds * len(gs), desc="bench", unit="config", disable=not progress)
    try:
        for _ in range(rounds):
            for name, g in gs.items():
                for p in [PROMPT, *BENIGN]:  # all benign: the gate may drop the safe sequence
                    ttft, tpot, n, rep = timed(g, p, tokens)
                    res[name]["ttft"].append(ttft)
                    res[name]["tpot"].append(tpot)
                    res[name]["n"].append(n)
                    res[name]["runs"] += 1
                    res[name]["gated"] += bool((rep.get("coca") or {}).get("gated"))
                bar.set_postfix_str(f"{name}: ttft {ttft * 1e3:.0f} ms, {1 / tpot:.1f} tok/s")
                bar.update()
    finally:
        bar.close()
        for g in gs.values():
            g.close()
    for name in res if rss else ():
        cmd = [sys.executable, "-m", "pyguard.bench", "--rss", name, "--model", str(model), "--tokens", str(tokens),
               "--n-ctx", str(n_ctx), "--gate-kl", str(gate_kl)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        res[name]["rss_mb"] = json.loads(out.strip().splitlines()[-1])["rss_mb"]
    return res


def table(res, bare: float) -> str:
    base = res["unguarded"]
    b_ttft, b_tpot = statistics.median(base["ttft"]), statistics.median(base["tpot"])
    lines = ["| configuration | TTFT ms | TTFT / unguarded | decode tok/s | tok/s / unguarded | tokens | peak RSS MB | note |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        ttft, tpot = statistics.median(r["ttft"]), statistics.median(r["tpot"])
        note = f"gated {r['gated']}/{r['runs']}" if name.startswith("gated") else ""
        lines.append(f"| {name} | {ttft * 1e3:.0f} | {ttft / b_ttft:.2f} | {1 / tpot:.1f} | {b_tpot / tpot:.2f} | "
                     f"{statistics.median(r['n']):.0f} | {r['rss_mb']:.0f} | {note} |".replace("| nan |", "| - |"))
    lines.append(f"| bare llama_decode, batch of two vs one | | | | {bare:.2f} | | | the limit for dual decoding |")
    return "\n".join(lines)


def plot(rows: dict, path: Path, title: str, base: str = "unguarded"):
    """rows: row label (None: none) -> {configuration: {"ttft": [s, ...], "tpot": [s, ...]}}, ``base`` first."""
    plt = extras.pyplot("eval")

    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 4 * len(rows)), squeeze=False)
    for (label, res), row in zip(rows.items(), axes):
        names = list(res)
        b_ttft, b_tpot = (statistics.median(res[base][k]) for k in ("ttft", "tpot"))
        for ax, key, xlabel in ((row[0], "tpot", "decode tokens/s ÷ unguarded"), (row[1], "ttft", "time to first token ÷ unguarded")):
            vals = [(b_tpot / statistics.median(res[n]["tpot"])) if key == "tpot" else statistics.median(res[n]["ttft"]) / b_ttft
                    for n in names]
            ax.barh(names, vals, color=["gray"] + ["tab:blue"] * (len(names) - 1))
            ax.axvline(1.0, color="k", lw=0.8)
            ax.set_xlabel(xlabel)
            ax.invert_yaxis()
            for y, v in enumerate(vals):
                ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
        row[1].set_yticklabels([])
        if label:
            row[0].set_title(label, loc="left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(model=models.DEFAULT_MODEL, tokens: int = 64, rounds: int = 3, n_ctx: int = 1024, gate_kl: float = 0.5,
           out=None, progress: bool = True, rss: bool = True) -> tuple[str, list[Path]]:
    """Run the comparison; returns the Markdown (a header line and the table) and, with ``out``,
    the files written there (bench.md, bench.png). ``rss``: measure each configuration's peak
    memory in its own process."""
    res = run(model, tokens, rounds, n_ctx, gate_kl, progress, rss)
    bare = bare_batch_ratio(gguf_path(model), tokens, rounds)
    text = (f"model {Path(str(model)).name}, {os.cpu_count()} cores ({platform.machine()}), {tokens} new tokens, "
            f"greedy, {rounds} rounds interleaved (medians)\n\n{table(res, bare)}\n")
    files = []
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.md").write_text(text, encoding="utf-8")
        plot({None: res}, out / "bench.png", f"pyguard on llama.cpp: {Path(str(model)).name}, {os.cpu_count()} threads")
        files = [out / "bench.md", out / "bench.png"]
    return text, files


def main(argv=None):
    """``python -m pyguard.bench``: the same report (used for the per-configuration RSS children)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=models.DEFAULT_MODEL)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n-ctx", type=int, default=1024)
    p.add_argument("--gate-kl", type=float, default=0.5)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--rss", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.rss:
        return rss_child(a.rss, a.model, a.n_ctx, a.tokens, a.gate_kl)
    text, files = report(a.model, a.tokens, a.rounds, a.n_ctx, a.gate_kl, a.out)
    print(text + "".join(f"wrote {f}\n" for f in files), end="")


if __name__ == "__main__":
    main()
