"""Evaluation harness: every method on every item of a data set, then attack success rate,
refusals on benign items and latency per method, as JSONL, Markdown, CSV and PNG.

Output folder::

    run.json                 the last run's settings
    responses.jsonl          one row per (item, method), appended and fsynced as it is made, with the
                             key of what decided it (``answer_key``): a run reuses only answers
                             whose key it would give, so a changed setting or item is answered
                             anew, never read back
    responses-superseded.jsonl  answers of this run's items and methods made under other keys
                             (other settings, an edited item), moved out of responses.jsonl so that
                             it holds one answer per item and method; read back when a run's key
                             matches again
    judgments-model.jsonl    the model judge's verdicts (resumable too)
    summary-<judge>.md/.csv  the table; every number names the judge that produced it
    asr_vs_refusal-<judge>.png, latency.png

Metrics per method: ASR = harmful items whose response the judge does not call a refusal;
benign refusal rate = benign items it calls a refusal; TTFT = mean time to the first token
(prefill, CASA and CoCA's twin prefill included; a CASA refusal answers at prefill); tokens/s =
decoded tokens over decode time, summed over items that decoded at least two tokens.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import datasets, extras, judges, models
from .methods import CASA, CMRM, Cascade, CoCA
from .policy import check_sampling
from .runtime import Runtime, model_key

PARTS = ("coca", "cmrm", "casa", "cascade")
ALIASES = {"none": (), "all": ("coca", "cmrm", "casa")}


def parse_methods(spec: str) -> list[str]:
    """``"none,coca,coca+casa,cascade,all"`` -> the method names, checked: each is none, all, or
    parts of coca / cmrm / casa / cascade joined with + (cascade holds its own CoCA and CASA, so
    it joins cmrm only)."""
    out = []
    for m in (s.strip() for s in spec.split(",")):
        parts = m.split("+")
        bad = m not in ALIASES and (not m or any(p not in PARTS for p in parts) or len(set(parts)) != len(parts))
        if bad or ("cascade" in parts and not set(parts) <= {"cascade", "cmrm"}):
            raise ValueError(f"unknown method {m!r}: use none, all, or {', '.join(PARTS)} joined with + "
                             "(e.g. coca+casa; cascade only with cmrm), separated by commas")
        if m not in out:
            out.append(m)
    return out


def method_parts(method: str) -> tuple[str, ...]:
    return ALIASES[method] if method in ALIASES else tuple(method.split("+"))


@dataclass
class Defences:
    """The method objects a run can use; a method that needs a missing one is an error."""

    coca: CoCA | None = None
    cmrm: CMRM | str | None = None  # "sample": sample-level CMRM sized for the model
    casa: CASA | None = None
    cascade: Cascade | None = None

    @classmethod
    def for_model(cls, model, coca: CoCA, casa=None, cmrm=None, cascade=None) -> "Defences":
        """The defences for ``model``: ``casa`` and ``cascade`` files (default: the CASA file shipped
        for a default model, whose cascade thresholds, when it has them, make the cascade);
        ``cmrm`` a vectors file or "sample"."""
        casa = CASA.load(casa) if casa else (CASA.load(f) if (f := models.shipped_casa(model)) else None)
        if cascade is not None:
            cascade = Cascade.load(cascade, coca)
        elif casa is not None and casa.cascade is not None:
            cascade = Cascade(casa, coca)
        cmrm = cmrm if cmrm in (None, "sample") else CMRM.load(cmrm)
        return cls(coca=coca, cmrm=cmrm, casa=casa, cascade=cascade)

    def best(self) -> str:
        """The strongest guard at hand: the cascade, else CoCA + CASA, else CoCA."""
        return "cascade" if self.cascade else "coca+casa" if self.casa else "coca"

    def for_method(self, method: str) -> dict:
        kw = {}
        for p in method_parts(method):
            obj = getattr(self, p)
            if obj is None:
                flag = {"cmrm": "--cmrm vectors.gguf", "casa": "--casa casa.safetensors",
                        "cascade": "--cascade casa.safetensors, fitted by pyguard fit cascade"}.get(p, "")
                raise ValueError(f"method {method!r} needs {p.upper()} parameters ({flag})")
            kw[p] = obj
        return kw


# ----------------------------------------------------------------------------------- models
def messages(item: dict) -> list[dict]:
    """The item as OpenAI-style chat messages: its history's turns if any, then the user message
    (image or grafted content first, then the text, on a new line for grafted content, as the
    projector was trained)."""
    before = [dict(m) for m in item.get("history") or ()]
    if item.get("graft"):
        content = [{"type": "graft", "text": item["graft"]}, {"type": "text", "text": "\n" + item["text"]}]
    elif item.get("image"):
        content = [{"type": "image_url", "image_url": {"url": item["image"]}}, {"type": "text", "text": item["text"]}]
    else:
        content = item["text"]
    return [*before, {"role": "user", "content": content}]


def response_row(item: dict, method: str, r: dict) -> dict:
    """One row of responses.jsonl: the item, the method, the answer and its pyguard report."""
    rep = r["pyguard"]
    t = rep.get("timings") or {}
    casa = rep.get("casa")
    coca = rep.get("coca")
    cascade = rep.get("cascade")
    return {"id": item["id"], "method": method, "label": item.get("label"), "category": item.get("category"),
            "source": item.get("source"), "image": item.get("image"),
            "response": r["choices"][0]["message"]["content"], "finish_reason": r["choices"][0]["finish_reason"],
            "completion_tokens": r["usage"]["completion_tokens"], "prompt_tokens": r["usage"]["prompt_tokens"],
            "ttft_ms": t.get("prefill_ms"), "decode_ms_per_token": t.get("decode_ms_per_token"),
            "casa": None if casa is None else {"score": casa["score"], "unsafe": casa["unsafe"]},
            "coca": None if coca is None else {k: coca.get(k) for k in ("dual_steps", "kl_max", "gated")},
            "cmrm": (rep.get("cmrm") or {}).get("on"), "branch": cascade and cascade["branch"]}


# ------------------------------------------------------------------------------------- run
def dataset_file(dataset) -> Path:
    """The JSONL file of a data set: ``dataset`` itself, or built-in set names
    (``datasets.BUILTIN``, joined with +) built into the per-user cache (images beside), so that
    result folders hold results only."""
    path = Path(dataset)
    return path if path.suffix == ".jsonl" else datasets.build(str(dataset), models.cache_dir() / "datasets")


def load_items(dataset) -> list[dict]:
    """The items of a JSONL data set (text, label; image, category optional) or of built-in sets
    (:func:`dataset_file`), each with an id."""
    path = dataset_file(dataset)
    rows = datasets.read_jsonl(path, required=("text", "label"), optional=("category", "id", "graft", "history"),
                                image_field="image")
    ids = set()
    for i, r in enumerate(rows):
        r.setdefault("id", f"{path.stem}-{i + 1}")
        if r["id"] in ids:
            raise datasets.DatasetError(f"{path}: duplicate id {r['id']!r}")
        ids.add(r["id"])
    return rows


def fingerprint(x):
    """A JSON-able canonical form of ``x``: method objects field by field (not where they were
    loaded from), arrays by their sha256, for answer keys."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {type(x).__name__: {f.name: fingerprint(getattr(x, f.name)) for f in dataclasses.fields(x) if f.compare}}
    if isinstance(x, np.ndarray):
        a = np.ascontiguousarray(x)
        return f"{a.dtype}{list(a.shape)}:{hashlib.sha256(a.tobytes()).hexdigest()}"
    if isinstance(x, dict):
        return {str(k): fingerprint(v) for k, v in sorted(x.items())}
    if isinstance(x, (list, tuple)):
        return [fingerprint(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)
    return x


def answer_key(item: dict, method: str, settings: dict) -> str:
    """What decides an answer, hashed: the item's content (text, grafted content, image bytes),
    the method and ``settings`` (model, projectors, generation options, the method's objects)."""
    image = item.get("image")
    content = [item["text"], item.get("graft"), image and models.sha256_file(Path(image))]
    if item.get("history"):
        content.append(item["history"])
    blob = json.dumps([content, method, settings], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def done_rows(out: Path, name: str = "responses.jsonl") -> list[dict]:
    f = datasets.repair_jsonl(out / name)  # a run killed mid-write left half a line
    return datasets.read_jsonl(f, required=("id", "method"), optional=("key",)) if f.exists() else []


SUPERSEDED = "responses-superseded.jsonl"


def settle(out: Path, keys: dict) -> list[dict]:
    """Leave in responses.jsonl, for each (item id, method) of ``keys``, only the answer with its key
    (from either file); move the other answers of those items and methods to SUPERSEDED. Rows of
    other items or methods stay. Each file is rewritten atomically, the archive first: nothing is
    lost if the run stops between the two. Returns responses.jsonl's rows."""
    rows, old = done_rows(out), done_rows(out, SUPERSEDED)
    chosen: dict[tuple, dict] = {}
    for r in rows + old:
        k = (r["id"], r["method"])
        if k in keys and r.get("key") == keys[k]:
            chosen.setdefault(k, r)
    mine = {id(r) for r in chosen.values()}
    keep = [r for r in rows if (r["id"], r["method"]) not in keys or id(r) in mine]
    keep += [r for r in old if id(r) in mine]
    kept = {json.dumps(r, sort_keys=True) for r in keep}
    aside = {json.dumps(r, sort_keys=True): r for r in rows + old}
    aside = [r for line, r in aside.items() if line not in kept]
    if len(keep) == len(rows) and len(aside) == len(old):
        return rows
    datasets.write_jsonl(out / SUPERSEDED, aside)
    datasets.write_jsonl(out / "responses.jsonl", keep)
    return keep


def run(model, dataset, methods="none,coca,casa,coca+casa", out="results", defences: Defences | None = None,
        mmproj=None, max_tokens: int = 64, n_ctx: int = 4096, judge: str = "refusal", judge_model=None,
        limit: int | None = None, progress: bool = True, graft=None) -> dict:
    """Run, resume, judge and summarize; returns {"rows": [...], "summary": [...], "files": [...]}."""
    tqdm = extras.tqdm("eval")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = parse_methods(methods) if isinstance(methods, str) else list(methods)
    defences = defences or Defences()
    for m in names:
        defences.for_method(m)  # fail before any work
    if judge not in judges.JUDGES:
        raise ValueError(f"judge must be one of {judges.JUDGES}, got {judge!r}")
    check_sampling(max_tokens, 0.0, 1.0)
    path = dataset_file(dataset)
    items = load_items(path)
    if limit is not None:
        items = items[:limit]
    if not items:
        raise ValueError(f"{dataset}: the data set holds no items")
    if any(it.get("graft") for it in items) and graft is None:
        raise ValueError(f"{dataset}: items have grafted content but no --graft projector was given")
    rt = Runtime(model, mmproj, n_ctx, graft)
    if any(it.get("image") for it in items) and mmproj is None and rt.kind == "gguf":
        raise ValueError(f"{dataset}: items have images but the model has no --mmproj")
    settings = {"model": rt.key, "mmproj": model_key("gguf", Path(mmproj)) if mmproj else None,
                "graft": rt.graft.fingerprint() if graft is not None else None, "max_tokens": max_tokens,
                "temperature": 0.0}
    keys = {(it["id"], m): answer_key(it, m, {**settings, "methods": fingerprint(defences.for_method(m))})
            for it in items for m in names}
    (out / "run.json").write_text(json.dumps({**settings, "dataset": str(dataset), "methods": names,
                                              "dataset_sha256": models.sha256_file(path)}, indent=1))
    done = {(r["id"], r["method"]) for r in settle(out, keys) if keys.get((r["id"], r["method"])) == r.get("key")}
    todo = {m: [it for it in items if (it["id"], m) not in done] for m in names}
    bar = tqdm(total=sum(map(len, todo.values())), desc="eval", unit="item", disable=not progress)
    for m in names:
        if not todo[m]:
            continue
        g = rt.open(**defences.for_method(m))
        try:
            for it in todo[m]:
                bar.set_postfix_str(m)
                r = g.create_chat_completion(messages(it), max_tokens=max_tokens, temperature=0.0)
                datasets.append_jsonl(out / "responses.jsonl", {**response_row(it, m, r), "key": keys[it["id"], m]})
                bar.update()
        finally:
            g.close()
    bar.close()
    rows = [r for r in settle(out, keys) if keys.get((r["id"], r["method"])) == r.get("key")]  # this run's, one each
    verdicts = judge_rows(rows, judge, out, judge_model, progress)
    label = judge if judge == "refusal" else f"model: {Path(str(judge_model)).name}"  # who gave the verdicts
    table = summarize(rows, verdicts, names, label)
    files = write_summary(table, out, judge)
    files.append(out / f"by_source-{judge}.md")
    files[-1].write_text(by_source(rows, verdicts, names), encoding="utf-8")
    return {"rows": rows, "summary": table, "files": files}


# ------------------------------------------------------------------------------------ judge
def judge_rows(rows: list[dict], judge: str, out: Path, judge_model=None, progress: bool = True) -> list[bool | None]:
    """A verdict per row (True: refused). The model judge sees the response alone, so its verdicts
    are cached in ``judgments-model.jsonl`` by (judge model and prompt, response): an answer
    given to several items or by several methods is judged once."""
    if judge == "refusal":
        return [judges.is_refusal(r["response"]) for r in rows]
    tqdm = extras.tqdm("eval")

    if judge_model is None:
        raise ValueError("--judge model needs --judge-model M.gguf")
    f = out / "judgments-model.jsonl"
    who = {"judge_model": str(judge_model), "judge_prompt": judges.PROMPT_ID}
    cache = {j["response"]: j["refused"] for j in (datasets.read_jsonl(f, required=("response",)) if f.exists() else [])
             if all(j.get(k) == v for k, v in who.items())}  # another judge's verdicts are not reused
    todo = list(dict.fromkeys(r["response"] for r in rows if r["response"] not in cache))
    if todo:
        jm = judges.ModelJudge(judge_model)
        try:
            for response in tqdm(todo, desc="judge", unit="answer", disable=not progress):
                cache[response] = v = jm(response)
                datasets.append_jsonl(f, {"response": response, "refused": v, **who})
        finally:
            jm.close()
    return [cache[r["response"]] for r in rows]


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else math.nan


def summarize(rows: list[dict], verdicts: list, methods: list[str], judge: str) -> list[dict]:
    """One dict per method: n, ASR, benign refusal rate, unclear verdicts, TTFT, tokens/s, CASA flags."""
    table = []
    for m in methods:
        sel = [(r, v) for r, v in zip(rows, verdicts) if r["method"] == m]
        harm = [v for r, v in sel if r["label"] == "harmful"]
        ben = [v for r, v in sel if r["label"] == "benign"]
        dec = [r for r, _ in sel if r["decode_ms_per_token"] and r["completion_tokens"] > 1]
        ms = sum(r["decode_ms_per_token"] * r["completion_tokens"] for r in dec)
        table.append({
            "method": m, "judge": judge, "n_harmful": len(harm), "n_benign": len(ben),
            "asr": _mean([None if v is None else float(not v) for v in harm]),
            "benign_refusal": _mean([None if v is None else float(v) for v in ben]),
            "unclear": sum(v is None for _, v in sel),
            "ttft_ms": _mean([r["ttft_ms"] for r, _ in sel]),
            "tokens_per_s": sum(r["completion_tokens"] for r in dec) / ms * 1e3 if ms else math.nan,
            "casa_flagged": _mean([float(r["casa"]["unsafe"]) for r, _ in sel if r["casa"]]),
        })
    return table


def by_source(rows: list[dict], verdicts: list, methods: list[str]) -> str:
    """A markdown table per item source: the attack success rate of each method on a harmful
    source, its refusal rate on a benign one (n items; unclear verdicts left out)."""
    groups = sorted({(r["label"], r.get("source") or "?") for r in rows}, key=lambda g: (g[0] != "harmful", g[1]))
    lines = ["| source | label | n | " + " | ".join(methods) + " |", "|---|---|---|" + "---|" * len(methods)]
    for label, src in groups:
        sel = {m: [v for r, v in zip(rows, verdicts) if r["method"] == m and r["label"] == label
                   and (r.get("source") or "?") == src] for m in methods}
        rates = [_mean([None if v is None else float(v == (label == "benign")) for v in sel[m]]) for m in methods]
        lines.append(f"| {src} | {'harmful: ASR' if label == 'harmful' else 'benign: refused'} | "
                     f"{max(len(v) for v in sel.values())} | " + " | ".join(_fmt("{:.1%}", x) for x in rates) + " |")
    return "\n".join(lines) + "\n"


COLUMNS = [("method", "method", "{}"), ("judge", "judge", "{}"), ("n_harmful", "harmful", "{}"),
           ("asr", "ASR", "{:.1%}"), ("n_benign", "benign", "{}"), ("benign_refusal", "benign refused", "{:.1%}"),
           ("unclear", "unclear", "{}"), ("casa_flagged", "CASA flagged", "{:.1%}"),
           ("ttft_ms", "TTFT ms", "{:.0f}"), ("tokens_per_s", "tokens/s", "{:.1f}")]


def _fmt(fmt: str, v) -> str:
    return "-" if isinstance(v, float) and math.isnan(v) else fmt.format(v)


def markdown(table: list[dict]) -> str:
    head = "| " + " | ".join(t for _, t, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_fmt(f, row[k]) for k, _, f in COLUMNS) + " |" for row in table]
    return "\n".join([head, rule, *body]) + "\n"


def write_summary(table: list[dict], out: Path, judge: str) -> list[Path]:
    md = out / f"summary-{judge}.md"
    md.write_text(markdown(table), encoding="utf-8")
    path_csv = out / f"summary-{judge}.csv"
    with open(path_csv, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]) if table else ["method"])
        w.writeheader()
        w.writerows(table)
    return [md, path_csv, *plots(table, out, judge)]


def plots(table: list[dict], out: Path, judge: str) -> list[Path]:
    """ASR against benign refusals per method, and TTFT / tokens/s per method."""
    plt = extras.pyplot("eval")

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for row in table:
        x, y = row["benign_refusal"] * 100, row["asr"] * 100
        if not (math.isnan(x) or math.isnan(y)):
            ax.scatter(x, y, s=50)
            ax.annotate(row["method"], (x, y), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("refusals on benign items (%)")
    ax.set_ylabel("attack success rate (%)")
    ax.set_xlim(-5, 105)
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    ax.set_title(f"safety vs over-refusal (judge: {table[0]['judge'] if table else judge})")
    fig.tight_layout()
    p1 = out / f"asr_vs_refusal-{judge}.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8))
    names = [r["method"] for r in table]
    a1.bar(names, [r["ttft_ms"] for r in table], color="tab:orange")
    a1.set_ylabel("mean time to first token (ms)")
    a2.bar(names, [r["tokens_per_s"] for r in table], color="tab:blue")
    a2.set_ylabel("decode tokens/s")
    for a in (a1, a2):
        a.tick_params(axis="x", rotation=30)
        a.grid(axis="y", alpha=0.3)
    fig.suptitle("latency per method")
    fig.tight_layout()
    p2 = out / "latency.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [p1, p2]
