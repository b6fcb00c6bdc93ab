"""pyguard serve beside its anchor, llama.cpp's own llama-server (same vendored llama.cpp, same
model, same prompts, same --parallel, one KV stream per slot in both), driven by guidellm at fixed
concurrency, greedy. Configurations: llama-server; pyguard unguarded; the cascade on benign traffic; the
cascade on a mixed harmful/benign stream; CoCA on every request. Then a soak: the cascade at
twice its capacity (parallel + queue) for ``--soak`` seconds; every request must be answered or
refused with 429, and the server's memory stay flat. Writes anchor.json, anchor.md, anchor.png.

    bash scripts/anchor_setup.sh   # builds llama-server, installs guidellm into .venv-bench (cached)
    .venv/bin/python benchmarks/anchor.py [--model qwen2.5-coder-0.5b] [--parallel 8] [--soak 300]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from serve_batching import cpu

from pyguard import datasets, models
from pyguard.bench import bare_batch_ratio
from pyguard.torch.convert import hf_folder

ROOT = Path(__file__).resolve().parent.parent
GUIDELLM = ROOT / ".venv-bench" / "bin" / "guidellm"


def server_cmd(kind: str, model: str, parallel: int, n_ctx: int, port: int, llama_server: str | None,
               max_queue: int = 64) -> list[str]:
    if kind == "llama-server":
        return [llama_server, "-m", str(models.model_path(model)), "-np", str(parallel), "-c", str(n_ctx * parallel),
                "-t", str(os.cpu_count()), "-no-kvu", "--no-webui", "--host", "127.0.0.1", "--port", str(port)]
    method = {"pyguard": "none", "cascade (benign)": "cascade", "cascade (mixed)": "cascade", "CoCA": "coca"}[kind]
    return [str(ROOT / ".venv/bin/pyguard"), "serve", "--model", model, "--method", method, "--parallel", str(parallel),
            "--max-queue", str(max_queue), "--n-ctx", str(n_ctx), "--port", str(port)]


class Server:
    """A server process, up once /health answers 200; stopped with SIGTERM; RSS sampled on demand."""

    def __init__(self, cmd: list[str], port: int, log: Path):
        self.port, self.log = port, open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {self.proc.returncode}; see {log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"{cmd[0]} did not come up in 180 s; see {log}")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")) / 1024

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            return r.read().decode()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def prompt_rows(kind: str) -> list[str]:
    """Benign prompts, or harmful (AdvBench) and benign alternating. A speed test: every prompt
    is sent once per server (a repeat would measure a prompt cache, not the server)."""
    benign = [r["text"] for r in datasets.benign()]
    if kind == "benign":
        return benign
    return [x for pair in zip([r["text"] for r in datasets.advbench()], benign) for x in pair]


def prompts(path: Path, rows: list[str], tokens: int) -> Path:
    """A guidellm JSONL of ``rows``, each asking for ``tokens`` output tokens."""
    with open(path, "w") as f:
        for text in rows:
            f.write(json.dumps({"prompt": text, "output_tokens_count": tokens}) + "\n")
    return path


def guidellm(port: int, data: Path, tokenizer: Path, streams: int, out: Path, requests: int) -> dict:
    """One guidellm run of ``requests`` at ``streams`` concurrent requests; its benchmark's JSON."""
    limit = {"kind": "max_requests", "count": requests}
    scenario = {"spec": {"backend": {"kind": "openai_http", "target": f"http://127.0.0.1:{port}",
                                     "extras": {"body": {"temperature": 0}}},  # greedy on both servers
                         "profile": {"kind": "concurrent", "streams": streams},
                         "tokenizer": {"kind": "hf_auto", "model": str(tokenizer)},
                         "data": [{"kind": "json_file", "path": str(data)}],
                         "constraints": [limit], "outputs": [{"kind": "json", "path": str(out)}]}}
    sc = out.with_suffix(".scenario.json")
    sc.write_text(json.dumps(scenario))
    subprocess.run([str(GUIDELLM), "run", "--scenario", str(sc), "--disable-console"], check=True,
                   stdout=subprocess.DEVNULL, cwd=out.parent)
    return json.loads(out.read_text())["benchmarks"][0]


def summary(b: dict) -> dict:
    m = b["metrics"]
    ok = lambda k: m[k]["successful"]  # noqa: E731
    return {"tok_s": ok("output_token_count")["total_sum"] / b["duration"],
            "req_s": m["request_totals"]["successful"] / b["duration"],
            "ttft_p50": ok("time_to_first_token_ms")["percentiles"]["p50"],
            "ttft_p95": ok("time_to_first_token_ms")["percentiles"]["p95"],
            "itl_p50": ok("inter_token_latency_ms")["percentiles"]["p50"],
            "itl_p95": ok("inter_token_latency_ms")["percentiles"]["p95"],
            "requests": m["request_totals"]}


def soak(model: str, parallel: int, n_ctx: int, seconds: int, rows: list[str], tokens: int, out: Path) -> dict:
    """The cascade at twice its capacity for ``seconds``: ``4 * parallel`` closed-loop clients
    against ``parallel`` slots and a queue of ``parallel``; a refused client waits Retry-After.
    (guidellm stops a run whose error rate is high, so the soak drives the server itself.)"""
    port = 8479
    s = Server(server_cmd("cascade (mixed)", model, parallel, n_ctx, port, None, max_queue=parallel), port,
               out / "soak-server.log")
    rss, counts, stop = [], {}, threading.Event()
    lock = threading.Lock()

    def client(k: int):
        i = k
        while not stop.is_set():
            body = json.dumps({"messages": [{"role": "user", "content": rows[i % len(rows)]}], "max_tokens": tokens,
                               "temperature": 0, "stream": True}).encode()
            i += 4 * parallel
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            wait = 0.0
            try:
                with urllib.request.urlopen(req, timeout=600) as r:
                    done = b"[DONE]" in r.read()
                    key = "200" if done else "200 without [DONE]"
            except urllib.error.HTTPError as e:
                key, wait = str(e.code), float(e.headers.get("Retry-After") or 0)
            except OSError as e:
                key = f"transport error: {type(e).__name__}"
            with lock:
                counts[key] = counts.get(key, 0) + 1
            stop.wait(wait)

    clients = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(4 * parallel)]
    t_end = time.time() + seconds
    for t in clients:
        t.start()
    try:
        while time.time() < t_end:
            rss.append((time.time(), s.rss_mb()))
            time.sleep(min(10, max(0.0, t_end - time.time())))
        stop.set()
        for t in clients:
            t.join()
        statuses = {ln.split('status="')[1].split('"')[0]: int(float(ln.split()[-1]))
                    for ln in s.metrics().splitlines() if ln.startswith("pyguard_requests_total{")}
    finally:
        stop.set()
        s.stop()
    first = [r for ts, r in rss if ts - rss[0][0] < 60]
    last = [r for ts, r in rss if rss[-1][0] - ts < 60]
    return {"seconds": seconds, "clients": 4 * parallel, "client_counts": counts, "server_counts": statuses,
            "rss_first_min_mb": max(first), "rss_last_min_mb": max(last), "rss_max_mb": max(r for _, r in rss),
            "exit_code": s.proc.returncode}


def plot(res: dict, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, levels in res.items():
        cs = sorted(int(c) for c in levels)
        for ax, key in zip(axes, ("tok_s", "ttft_p50", "itl_p50")):
            ax.plot(cs, [levels[str(c)][key] for c in cs], marker="o", label=name,
                    color="k" if name == "llama-server" else None)
    for ax, label in zip(axes, ("output tokens/s (aggregate)", "TTFT p50 (ms)", "inter-token latency p50 (ms)")):
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=models.DEFAULT_MODEL)
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--n-ctx", type=int, default=1024, help="context per slot")
    p.add_argument("--concurrency", default="1,4,8,16")
    p.add_argument("--tokens", type=int, default=32, help="output tokens per request (ignore_eos)")
    p.add_argument("--soak", type=int, default=300, help="soak seconds (0: none)")
    p.add_argument("--soak-only", action="store_true", help="run the soak, keep the other results in --out")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "anchor")
    a = p.parse_args()
    if not GUIDELLM.exists():
        sys.exit("run bash scripts/anchor_setup.sh first (llama-server and guidellm)")
    llama_server = subprocess.run(["bash", str(ROOT / "scripts/anchor_setup.sh")], check=True, capture_output=True,
                                  text=True).stdout.strip().splitlines()[-1]
    a.out.mkdir(parents=True, exist_ok=True)
    tokenizer = hf_folder(a.model)
    rows = {k: prompt_rows(k) for k in ("benign", "mixed")}
    levels = [int(c) for c in a.concurrency.split(",")]
    res: dict = {}
    if a.soak_only:
        old = json.loads((a.out / "anchor.json").read_text())
        res = old["results"]
    for kind in () if a.soak_only else ("llama-server", "pyguard", "cascade (benign)", "cascade (mixed)", "CoCA"):
        port = 8470
        s = Server(server_cmd(kind, a.model, a.parallel, a.n_ctx, port, llama_server), port,
                   a.out / f"server-{kind.split()[0]}.log")
        traffic = rows["mixed" if "mixed" in kind else "benign"]
        start = 0
        try:  # warm-up on the last prompts, the runs from the first: none is sent twice
            guidellm(port, prompts(a.out / "warmup.jsonl", traffic[-4:], a.tokens), tokenizer, 2,
                     a.out / "warmup.json", requests=4)
            res[kind] = {}
            for c in levels:
                n = max(8, 2 * c)
                data = prompts(a.out / f"prompts-{c}.jsonl", traffic[start:start + n], a.tokens)
                start += n
                b = guidellm(port, data, tokenizer, c, a.out / f"run-{kind.split()[0]}-{c}.json", requests=n)
                res[kind][str(c)] = summary(b)
                print(kind, c, {k: round(v, 1) for k, v in res[kind][str(c)].items() if k != "requests"}, flush=True)
        finally:
            s.stop()
    bare = old["bare_batch_of_two_ratio"] if a.soak_only else bare_batch_ratio(models.model_path(a.model), a.tokens, 3)
    report = {"model": a.model, "parallel": a.parallel, "tokens": a.tokens, "cpu": cpu(), "cores": os.cpu_count(),
              "results": res, "bare_batch_of_two_ratio": bare}
    if a.soak:
        report["soak"] = soak(a.model, a.parallel, a.n_ctx, a.soak, rows["mixed"], a.tokens, a.out)
    (a.out / "anchor.json").write_text(json.dumps(report, indent=1))
    lines = [f"{a.model}, --parallel {a.parallel}, {a.tokens} output tokens per request (ignore_eos), guidellm "
             f"concurrent; CPU: {cpu()} ({os.cpu_count()} cores)", "",
             "| server | clients | output tok/s | / llama-server | req/s | TTFT p50 ms | TTFT p95 ms | ITL p50 ms "
             "| ITL p95 ms | ok / errored |", "|---|---|---|---|---|---|---|---|---|---|"]
    for kind, by in res.items():
        for c, r in by.items():
            ratio = r["tok_s"] / res["llama-server"][c]["tok_s"]
            lines.append(f"| {kind} | {c} | {r['tok_s']:.1f} | {ratio:.2f} | {r['req_s']:.2f} | {r['ttft_p50']:.0f} | "
                         f"{r['ttft_p95']:.0f} | {r['itl_p50']:.0f} | {r['itl_p95']:.0f} | "
                         f"{r['requests']['successful']} / {r['requests']['errored']} |")
    lines.append(f"\nbare llama_decode, batch of two vs one (same run): {bare:.2f}")
    if a.soak:
        lines.append(f"\nsoak: {json.dumps(report['soak'])}")
    (a.out / "anchor.md").write_text("\n".join(lines) + "\n")
    plot(res, a.out / "anchor.png", f"pyguard serve vs llama-server: {a.model}, --parallel {a.parallel}, "
                                    f"{os.cpu_count()} cores")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
