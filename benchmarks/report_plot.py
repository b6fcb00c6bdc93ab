"""The plot of the runtime latency reports (llama_report.py, torch_report.py): per model one row of
two panels, decode tokens/s and time to first token of every configuration as ratios to the
unguarded one (medians)."""
from __future__ import annotations

import statistics
from pathlib import Path


def plot(rows: dict, path: Path, title: str, base: str = "unguarded"):
    """rows: row label (None: none) -> {configuration: {"ttft": [s, ...], "tpot": [s, ...]}}, ``base`` first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
