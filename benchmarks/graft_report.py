"""The grafted-modality testbed's table and plot (issue #8), from ``pyguard eval`` folders: the
requests as text (the inlined counterpart), through the graft with each method, and through the
TGA-trained projector. One judge for all: the refusal judge gives ASR (harmful) and benign refusals;
benign answer quality is the cosine (all-MiniLM-L6-v2) between an answer and the unguarded model's
answer to the same request as text, the answer the projector is trained to reproduce (restatements,
``graft_curve.py``'s, are left out). As the
refusal judge counts any non-refusal (nonsense included) as a successful attack, the table also
gives how close the harmful answers that did not refuse are to their request (the same cosine).

    .venv/bin/python benchmarks/graft_report.py --run text=benchmarks/eval_graft/text \\
        --run graft=benchmarks/eval_graft/graft --run "TGA graft=benchmarks/eval_graft/tga" \\
        --out benchmarks/eval_graft
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np

from pyguard import datasets, evaluate, judges


def base_id(item_id: str) -> str:
    """``graft-benign-0003``, ``inline-benign-0003`` and ``restate-benign-0003`` -> ``benign-0003``."""
    return item_id.split("-", 1)[1] if item_id.startswith(("graft-", "inline-", "restate-")) else item_id


def pair_cos(encoder, a: list[str], b: list[str]) -> np.ndarray:
    """cos(a_i, b_i) of unit-norm sentence embeddings [N]."""
    if not a:
        return np.array([])
    e = encoder.encode([t or " " for t in a + b])
    return (e[:len(a)] * e[len(a):]).sum(-1).numpy()


def table(runs: dict, encoder, only: set | None = None) -> list[dict]:
    """One row per (run, method); ``runs``: name -> eval folder. The first run's unguarded answers
    to benign items are the reference answers. ``only``: the base ids of the items to count."""
    rows = {name: [r for r in evaluate.done_rows(Path(folder)) if (only is None or base_id(r["id"]) in only)
                   and r.get("category") != "restate"]
            for name, folder in runs.items()}
    first = next(iter(rows))
    ref = {base_id(r["id"]): r["response"] for r in rows[first] if r["method"] == "none" and r["label"] == "benign"}
    request = {it["id"]: it["text"] for it in datasets.advbench()}
    out = []
    for name, rs in rows.items():
        for m in dict.fromkeys(r["method"] for r in rs):
            sel = [r for r in rs if r["method"] == m]
            harm = [r for r in sel if r["label"] == "harmful"]
            ben = [r for r in sel if r["label"] == "benign" and base_id(r["id"]) in ref]
            refused = lambda r: judges.is_refusal(r["response"])  # noqa: E731
            cos = pair_cos(encoder, [r["response"] for r in ben], [ref[base_id(r["id"])] for r in ben])
            answered = [r for r in harm if not refused(r) and base_id(r["id"]) in request]
            rel = pair_cos(encoder, [r["response"] for r in answered], [request[base_id(r["id"])] for r in answered])
            routes = {}
            for r in harm:
                if r.get("branch"):
                    routes[r["branch"]] = routes.get(r["branch"], 0) + 1
            out.append({"input": name, "method": m, "n_harmful": len(harm),
                        "asr": np.mean([not refused(r) for r in harm]) if harm else math.nan,
                        "n_benign": len(ben), "benign_refused": np.mean([refused(r) for r in ben]) if ben else math.nan,
                        "fidelity": float(cos.mean()) if len(cos) else math.nan,
                        "relevance": float(rel.mean()) if len(rel) else math.nan,
                        "casa_harmful": np.mean([r["casa"]["unsafe"] for r in harm if r["casa"]]) if any(
                            r["casa"] for r in harm) else math.nan,
                        "routes": ", ".join(f"{k} {v}" for k, v in sorted(routes.items()))})
    return out


def markdown(tab: list[dict]) -> str:
    lines = ["| input | method | harmful | ASR | non-refusals ≈ request (cos) | CASA flagged (harmful) | benign | "
             "benign refused | benign answer ≈ text answer (cos) | cascade routes (harmful) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    pct = lambda v: "-" if math.isnan(v) else f"{v:.1%}"  # noqa: E731
    for r in tab:
        fid = "-" if math.isnan(r["fidelity"]) else f"{r['fidelity']:.3f}"
        rel = "-" if math.isnan(r["relevance"]) else f"{r['relevance']:.3f}"
        lines.append(f"| {r['input']} | {r['method']} | {r['n_harmful']} | {pct(r['asr'])} | {rel} | {pct(r['casa_harmful'])} "
                     f"| {r['n_benign']} | {pct(r['benign_refused'])} | {fid} | {r['routes'] or '-'} |")
    return "\n".join(lines) + "\n"


def plot(tab: list[dict], path: Path) -> None:
    """ASR per configuration (bars) and ASR against benign answer quality (scatter)."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['input']}: {r['method']}" for r in tab]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = ["tab:gray" if r["input"] == tab[0]["input"] else "tab:blue" if "TGA" not in r["input"] else "tab:green"
              for r in tab]
    bars = a1.bar(range(len(tab)), [r["asr"] * 100 for r in tab], color=colors)
    a1.bar_label(bars, [f"{r['asr']:.0%}" for r in tab], fontsize=8)
    a1.set_xticks(range(len(tab)), names, fontsize=8, rotation=30, ha="right")
    a1.set_ylabel("attack success rate on held-out AdvBench (%)")
    a1.set_ylim(0, 100)
    a1.grid(axis="y", alpha=0.3)
    for r, c in zip(tab, colors):
        if not (math.isnan(r["asr"]) or math.isnan(r["fidelity"])):
            a2.scatter(r["fidelity"], r["asr"] * 100, color=c, s=40)
            a2.annotate(f"{r['input']}: {r['method']}", (r["fidelity"], r["asr"] * 100), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    a2.set_xlim(-0.1, 1.05)
    a2.set_ylim(-5, 105)
    a2.set_xlabel("benign answer quality: cos(answer, text answer)")
    a2.set_ylabel("attack success rate (%)")
    a2.grid(alpha=0.3)
    fig.suptitle("Grafted modality on Qwen2.5-Coder-0.5B (a stand-in for a VLM, not a vision model)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    from pyguard.tga import SentenceEncoder

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", action="append", required=True, help="NAME=FOLDER; the first is the text reference")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--items", type=Path, help="a JSONL of items: count only these (e.g. a subset some runs answered)")
    a = p.parse_args(argv)
    runs = dict(r.split("=", 1) for r in a.run)
    only = {base_id(it["id"]) for it in datasets.read_jsonl(a.items, required=("id",))} if a.items else None
    tab = table(runs, SentenceEncoder(), only)
    md = markdown(tab)
    (a.out / "summary-graft.md").write_text(md, encoding="utf-8")
    plot(tab, a.out / "graft.png")
    print(md)
    print(f"wrote {a.out / 'summary-graft.md'}, {a.out / 'graft.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
