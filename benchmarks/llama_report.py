"""End-to-end latency of the guarded llama.cpp runtime beside the unguarded model, measured
interleaved in one run: time to first token and decode tokens/s as ratios to unguarded, and the
peak RSS of each configuration (each in its own process). Prints a Markdown table, writes a PNG.

    .venv/bin/python benchmarks/llama_report.py [--model qwen2.5-coder-0.5b] [--tokens 64] [--rounds 3]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_plot import plot  # noqa: E402

from pyguard import models  # noqa: E402
from pyguard.llama import GuardedLlama  # noqa: E402
from pyguard.llama.engine import Engine  # noqa: E402
from pyguard.llama.reference import naive_coca  # noqa: E402
from pyguard.methods import CASA, CMRM, CoCA  # noqa: E402

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
        self.tok = GuardedLlama(path, n_ctx=n_ctx, coca=CoCA(alpha=1.5))  # tokenization only
        self.engine = Engine(path, n_ctx=n_ctx, n_seq=2)

    def create_chat_completion(self, messages, max_tokens):
        req = self.tok._request(messages, max_tokens, 0.0, 1.0, None, None)
        out = naive_coca(self.engine, req["base"][0], req["safe"][0], 1.5, max_tokens, backend="cpp")
        return {"usage": {"completion_tokens": len(out)}, "pyguard": {}}

    def close(self):
        self.tok.close()
        self.engine.close()


def make(name, spec, path, n_ctx):
    return Naive(path, n_ctx) if spec == "naive" else GuardedLlama(path, n_ctx=n_ctx, **spec)


def timed(g, prompt: str, tokens: int):
    """(seconds to first token, seconds per decoded token, tokens decoded, report)."""
    msgs = [{"role": "user", "content": prompt}]
    t0 = time.perf_counter()
    g.create_chat_completion(msgs, max_tokens=1)
    t1 = time.perf_counter()
    r = g.create_chat_completion(msgs, max_tokens=tokens)
    t2 = time.perf_counter()
    n = r["usage"]["completion_tokens"]
    return t1 - t0, ((t2 - t1) - (t1 - t0)) / max(n - 1, 1), n, r["pyguard"]


def rss_child(name: str, model: str, n_ctx: int, tokens: int, gate_kl: float) -> None:
    path = models.model_path(model)
    with Engine(path, n_ctx=64, n_seq=1) as e:
        spec = configs(e.n_embd, e.n_layer, gate_kl)[name]
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


def run(model: str, tokens: int, rounds: int, n_ctx: int, gate_kl: float):
    path = models.model_path(model)
    with Engine(path, n_ctx=64, n_seq=1) as e:
        specs = configs(e.n_embd, e.n_layer, gate_kl)
    gs = {name: make(name, spec, path, n_ctx) for name, spec in specs.items()}
    res = {name: {"ttft": [], "tpot": [], "n": [], "gated": 0, "runs": 0} for name in gs}
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
                print(f"  {name}: ttft {ttft * 1e3:.0f} ms, {1 / tpot:.1f} tok/s", file=sys.stderr)
    finally:
        for g in gs.values():
            g.close()
    for name in res:
        cmd = [sys.executable, __file__, "--rss", name, "--model", model, "--tokens", str(tokens),
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
                     f"{statistics.median(r['n']):.0f} | {r['rss_mb']:.0f} | {note} |")
    lines.append(f"| bare llama_decode, batch of two vs one | | | | {bare:.2f} | | | the limit for dual decoding |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=models.DEFAULT_MODEL)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n-ctx", type=int, default=1024)
    p.add_argument("--gate-kl", type=float, default=0.5)
    p.add_argument("--png", type=Path, default=Path(__file__).with_name("llama_report.png"))
    p.add_argument("--rss", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.rss:
        return rss_child(a.rss, a.model, a.n_ctx, a.tokens, a.gate_kl)
    res = run(a.model, a.tokens, a.rounds, a.n_ctx, a.gate_kl)
    bare = bare_batch_ratio(models.model_path(a.model), a.tokens, a.rounds)
    print(f"model {a.model}, {os.cpu_count()} cores ({platform.machine()}), {a.tokens} new tokens, greedy, "
          f"{a.rounds} rounds interleaved (medians)")
    print(table(res, bare))
    plot({None: res}, a.png, f"pyguard on llama.cpp: {a.model}, {os.cpu_count()} threads")
    print(f"plot: {a.png}")


if __name__ == "__main__":
    main()
