"""CASA fitting: prompt hidden states at one layer (cached on disk, resumable), the safety-attention
module trained in torch on a training split with early stopping on a validation split, a threshold
chosen on validation benign prompts for a target false-refusal rate, and a held-out report
(AUROC, accuracy, false refusals, the ROC curve as a PNG).

The module is CASA's formula (DESIGN.md) on standardized hidden states ``(H - mu) / sigma``; the
standardization is folded into the saved parameters exactly (softmax ignores a per-head constant
and the attention weights sum to one), so the file scores raw hidden states.
"""
from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy as np

from .. import extras
from ..datasets import FIT_JAILBREAKS
from ..methods import CASA, CASA_ROWS, check_fits
from ..runtime import Runtime, model_key
from . import NpyCache


# ----------------------------------------------------------------------------- hidden states
class StateCache(NpyCache):
    """Prompt hidden states under ``folder/<model key>-L<layer>/``, one file per prompt text."""

    def __init__(self, folder, model_key: str, layer: int):
        super().__init__(Path(folder) / f"{model_key}-L{layer}")


MODALITIES = ("text", "graft", "image")


def copies(items: list[dict], modalities, folder=None) -> list[dict]:
    """Each item in each of ``modalities`` (its ``modality`` set): as it is (text), as grafted
    content with the answer instruction (graft, ``datasets.grafted``), or as a typographic image
    rendered into ``folder`` (image, ``datasets.typographic``)."""
    from .. import datasets

    out = []
    for m in modalities:
        if m == "text":
            out += [dict(it, modality=m) for it in items]
        elif m == "graft":
            out += [dict(it, modality=m) for it in datasets.grafted(items)]
        elif m == "image":
            out += [dict(it, modality=m, image=str(Path(folder) / it["image"])) for it in datasets.typographic(items, folder)]
        else:
            raise ValueError(f"unknown modality {m!r}; known: {', '.join(MODALITIES)}")
    return out


def collected(fit_on, graft=None, mmproj=None) -> list[str]:
    """The modalities a fitting collects (text, graft with a projector, image with an mmproj);
    ValueError unless ``fit_on`` names some of them."""
    modalities = ["text"] + (["graft"] if graft is not None else []) + (["image"] if mmproj is not None else [])
    need = {"graft": "a projector (--graft)", "image": "an mmproj file (--mmproj)"}
    bad = [m for m in fit_on if m not in modalities]
    if not fit_on or bad:
        raise ValueError(f"fit_on must name collected modalities ({', '.join(modalities)}), got {list(fit_on)}"
                         + "".join(f"; {m} needs {need[m]}" for m in bad if m in need))
    return modalities


def prompt_key(item, tag: str = "") -> str:
    """A prompt's cache key: its text; for grafted content or an image, the content or the image
    bytes' sha256 and ``tag`` (the projector or mmproj that reads it) too; a history's turns before."""
    from .. import models

    if isinstance(item, str):
        return item
    if item.get("graft"):
        key = f"graft\x00{tag}\x00{item['graft']}\x00{item['text']}"
    elif item.get("image"):
        key = f"image\x00{tag}\x00{models.sha256_file(Path(item['image']))}\x00{item['text']}"
    else:
        key = item["text"]
    return f"chat\x00{json.dumps(item['history'])}\x00{key}" if item.get("history") else key


def collect(states_fn, items: list, cache, progress: bool = True, desc: str = "hidden states",
            tag: str = "") -> list[np.ndarray]:
    """``states_fn(messages) -> [T, d]`` (or ``{layer: [T, d]}``) for each item (a text, or a dict
    as ``evaluate.messages`` takes: text, grafted content or an image, a history) as a user chat,
    through the cache (``prompt_key(item, tag)``): a StateCache, None, or ``{layer: StateCache}``
    (the first layer's states are returned; the model runs when any layer's file is missing)."""
    tqdm = extras.tqdm("calibrate")

    from ..evaluate import messages

    stores = cache if isinstance(cache, dict) else {None: cache}
    first = next(iter(stores))
    out = []
    for item in tqdm(items, desc=desc, disable=not progress, unit="prompt"):
        key = prompt_key(item, tag)
        H = stores[first].get(key) if stores[first] is not None else None
        if H is None or not all(c is not None and c.path(key).exists() for c in stores.values()):
            got = states_fn(messages({"text": item} if isinstance(item, str) else item))
            for il, c in stores.items():
                h = np.asarray(got if il is None else got[il], dtype=np.float32)
                if c is not None:
                    c.put(key, h)
                if il == first:
                    H = h
        out.append(H)
    return out


# ----------------------------------------------------------------------------- the module
def _module(d: int, r: int, heads: int, seed: int):
    import torch

    class SafetyAttention(torch.nn.Module):
        """CASA's score logit for padded prompts: H [B, T, d], mask [B, T] -> [B]."""

        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            self.Wk = torch.nn.Parameter(torch.randn(d, r, generator=g) / math.sqrt(d))
            self.q = torch.nn.Parameter(torch.randn(heads, r, generator=g))
            self.w = torch.nn.Parameter(torch.zeros(d))
            self.b = torch.nn.Parameter(torch.zeros(()))

        def forward(self, H, mask):
            logits = (H @ self.Wk) @ self.q.T / math.sqrt(r)  # [B, T, heads]
            logits = logits.masked_fill(~mask[..., None], float("-inf"))
            a = torch.softmax(logits, dim=1)
            z = torch.einsum("bth,btd->bd", a, H) / self.q.shape[0]
            return z @ self.w + self.b

    return SafetyAttention()


def _padded(states: list[np.ndarray], idx, mu, sigma):
    import torch

    T = max(len(states[i]) for i in idx)
    d = states[idx[0]].shape[1]
    H = torch.zeros(len(idx), T, d)
    mask = torch.zeros(len(idx), T, dtype=torch.bool)
    for j, i in enumerate(idx):
        h = torch.from_numpy(states[i])
        H[j, : len(h)] = (h - mu) / sigma
        mask[j, : len(h)] = True
    return H, mask


def _scores(model, states, mu, sigma, batch: int = 16) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for k in range(0, len(states), batch):
            idx = list(range(k, min(k + batch, len(states))))
            out.append(torch.sigmoid(model(*_padded(states, idx, mu, sigma))))
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def fit(train, val, test, layer: int, r: int = 32, heads: int = 4, lr: float = 3e-3, weight_decay: float = 1e-2,
        epochs: int = 60, patience: int = 8, batch: int = 16, target_frr: float = 0.05, seed: int = 0,
        progress: bool = True, threshold_on=None, **casa_kw):
    """Fit CASA on (states [T, d], label 1 harmful / 0 benign) lists.

    Trains on ``train`` (binary cross-entropy, AdamW), keeps the epoch with the best validation
    loss (stops after ``patience`` epochs without improvement), sets the threshold so that at most
    ``target_frr`` of the validation benign prompts score above it (of ``threshold_on``'s, when
    given: pairs like ``val``'s), and reports on ``test``. Returns (CASA, report dict)."""
    import torch
    trange = extras.need("tqdm.auto", "calibrate").trange

    for name, part in (("train", train), ("val", val), ("test", test)):
        labels = {y for _, y in part}
        if labels != {0, 1}:
            raise ValueError(f"the {name} split needs harmful and benign prompts, has labels {sorted(labels)}")
    if not 0 <= target_frr < 1:
        raise ValueError(f"target_frr must be in [0, 1), got {target_frr}")
    torch.manual_seed(seed)
    Xtr, ytr = [h for h, _ in train], torch.tensor([float(y) for _, y in train])
    Xva, yva = [h for h, _ in val], np.array([y for _, y in val])
    allrows = np.concatenate(Xtr).astype(np.float64)
    mu = torch.from_numpy(allrows.mean(0).astype(np.float32))
    sigma = torch.from_numpy(allrows.std(0).astype(np.float32) + 1e-3)
    d = Xtr[0].shape[1]
    model = _module(d, r, heads, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    pos_weight = (ytr == 0).sum() / max((ytr == 1).sum(), 1)  # balance the classes
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    rng = np.random.default_rng(seed)
    best, best_state, since, history = math.inf, None, 0, []
    for epoch in trange(epochs, desc="CASA epochs", disable=not progress):
        model.train()
        order = rng.permutation(len(Xtr))
        total = 0.0
        for k in range(0, len(order), batch):
            idx = order[k : k + batch].tolist()
            loss = loss_fn(model(*_padded(Xtr, idx, mu, sigma)), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        model.eval()
        s = np.clip(_scores(model, Xva, mu, sigma), 1e-7, 1 - 1e-7)
        vloss = float(-np.mean(yva * np.log(s) + (1 - yva) * np.log(1 - s)))
        history.append({"epoch": epoch, "train_loss": total / len(order), "val_loss": vloss})
        if vloss < best - 1e-4:
            best, since = vloss, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since += 1
            if since >= patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    th = val if threshold_on is None else threshold_on
    threshold = choose_threshold(_scores(model, [h for h, _ in th], mu, sigma), np.array([y for _, y in th]),
                                 target_frr)
    casa = _export(model, mu, sigma, layer, threshold, **casa_kw)
    test_scores = casa.score([h for h, _ in test])
    report = evaluate(np.array([y for _, y in test]), np.asarray(test_scores), threshold)
    report.update(layer=layer, threshold=threshold, target_frr=target_frr, epochs_run=len(history),
                  best_val_loss=best, history=history, r=r, heads=heads,
                  n={"train": len(train), "val": len(val), "test": len(test)})
    return casa, report


def counted(items: list[dict], frr_on) -> list[dict]:
    """The harmful items and the benign ones from the sources in ``frr_on`` (those a false-refusal
    target counts); an error if none of the benign items is from them."""
    frr_on = set(frr_on)
    out = [it for it in items if it["label"] == "harmful" or it.get("source") in frr_on]
    if not any(it["label"] != "harmful" for it in out):
        have = sorted({it.get("source", "?") for it in items if it["label"] != "harmful"})
        raise ValueError(f"no validation benign prompt is from {sorted(frr_on)} (benign sources: {have})")
    return out


def choose_threshold(scores: np.ndarray, labels: np.ndarray, target_frr: float) -> float:
    """The threshold (unsafe iff score > threshold) that, on these validation scores, keeps the
    false-refusal rate <= target_frr and maximizes detection rate - false-refusal rate; of the
    interval of thresholds that do equally well, its middle (the widest margin on both sides)."""
    cuts = np.unique(np.concatenate([[0.0], scores]))
    benign, harmful = scores[labels == 0], scores[labels == 1]
    frr = np.array([np.mean(benign > t) for t in cuts])
    det = np.array([np.mean(harmful > t) for t in cuts])
    gain = np.where(frr <= target_frr, det - frr, -np.inf)
    best = np.flatnonzero(gain == gain.max())
    lo = cuts[best[0]]
    above = scores[scores > cuts[best[-1]]]
    hi = above.min() if above.size else 1.0
    return float(min(max((lo + hi) / 2, 0.0), 1.0))


def _export(model, mu, sigma, layer: int, threshold: float, **casa_kw) -> CASA:
    """Fold the standardization into Wk, w, b: the CASA formula on raw hidden states."""
    import torch

    with torch.no_grad():
        Wk = (model.Wk / sigma[:, None]).numpy()
        w = (model.w / sigma).numpy()
        b = float(model.b - (model.w * mu / sigma).sum())
    return CASA({"Wk": Wk, "q": model.q.detach().numpy(), "w": w, "b": b}, layer=layer, threshold=threshold,
                **casa_kw)


def evaluate(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """AUROC, accuracy, false-refusal rate (benign above the threshold), detection rate (harmful
    above it) and the ROC curve points."""
    metrics = extras.need("sklearn.metrics", "calibrate")

    unsafe = scores > threshold
    fpr, tpr, _ = metrics.roc_curve(labels, scores)
    return {"auroc": float(metrics.roc_auc_score(labels, scores)), "accuracy": float(np.mean(unsafe == (labels == 1))),
            "false_refusal_rate": float(np.mean(unsafe[labels == 0])),
            "detection_rate": float(np.mean(unsafe[labels == 1])),
            "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()}}


def save_report(report: dict, folder, title: str = "CASA") -> tuple[Path, Path]:
    """report.json and roc.png in ``folder``; returns their paths."""
    plt = extras.pyplot("calibrate")

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    js = folder / "report.json"
    js.write_text(json.dumps(report, indent=1))
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(report["roc"]["fpr"], report["roc"]["tpr"], lw=1.5, label=f"AUROC {report['auroc']:.3f}")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.axvline(report["false_refusal_rate"], color="tab:red", lw=0.8,
               label=f"threshold {report['threshold']:.3f}: FRR {report['false_refusal_rate']:.1%}, "
                     f"detected {report['detection_rate']:.1%}")
    by = report.get("test_by_modality", {})
    for m, r in by.items() if len(by) > 1 else ():
        ax.plot(r["roc"]["fpr"], r["roc"]["tpr"], lw=1, ls="--", label=f"as {m}{'' if r['fitted_on'] else ' (not fitted on)'}: "
                f"AUROC {r['auroc']:.3f}, FRR {r['false_refusal_rate']:.1%}, detected {r['detection_rate']:.1%}")
    ax.set_xlabel("false refusal rate (benign)")
    ax.set_ylabel("detection rate (harmful)")
    ax.set_title("\n".join(textwrap.wrap(f"{title}, layer {report['layer']} (held-out"
                                         f"{', fitted on ' + ' + '.join(report['fit_on']) if 'fit_on' in report else ''})",
                                         50)), fontsize=8)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    png = folder / "roc.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return js, png


# ----------------------------------------------------------------------------- end to end
def prompt_sets(harmful=None, benign=None, jailbreaks: int = FIT_JAILBREAKS) -> list[dict]:
    """Labelled items: JSONL files (``{"text": ...}`` per line; a path or a list of paths) or, by
    default, ``datasets.harmful(jailbreaks)`` and the shipped benign sets (benign, benign_risky)."""
    from .. import datasets

    items = []
    for paths, label in ((harmful, "harmful"), (benign, "benign")):
        if paths is None:
            rows = datasets.harmful(jailbreaks) if label == "harmful" else datasets.benign() + datasets.benign_risky()
        else:
            rows = [dict(r, id=r.get("id") or f"{Path(path).stem}-{i + 1}")
                    for path in ([paths] if isinstance(paths, (str, Path)) else paths)
                    for i, r in enumerate(datasets.read_jsonl(path))]
        items += [dict(r, label=label) for r in rows]
    return items


def hidden_states(model: str, layer: int, items: list, cache=None, progress: bool = True,
                  desc: str = "hidden states", fitted: CASA | None = None, graft=None, mmproj=None, also=(),
                  rows: str = "prompt"):
    """Each item's (a text, or a dict with grafted content or an image) prompt hidden states
    [T, d] at ``layer`` (cached per prompt under ``cache``, default ``$PYGUARD_CACHE/states``),
    with the model's cache key and ``model_hint``. ``also``: more layers read in the same pass
    and only cached (one model pass fills the cache for a comparison of layers). ``fitted``: a
    CASA module that must fit this model, checked before any work (its ``rows`` replace
    ``rows``); ``graft``: a projector file or Graft; ``mmproj``: for images; ``rows``:
    "last-turn" keeps the rows from each prompt's last user message on (cached whole)."""
    from .. import models
    from ..evaluate import messages

    if graft is not None:
        from ..graft import Graft

        graft = Graft.of(graft)
    tag = "" if graft is None and mmproj is None else \
        f"{graft.fingerprint() if graft is not None else ''}|{'' if mmproj is None else model_key('gguf', Path(mmproj))}"
    layers = list(dict.fromkeys([int(layer), *map(int, also)]))
    rows = fitted.rows if fitted is not None else rows
    if rows not in CASA_ROWS:
        raise ValueError(f"rows must be one of {CASA_ROWS}, got {rows!r}")
    rt = Runtime(model, mmproj, 4096, graft)
    fn, g = rt.states(layers)
    try:
        if fitted is not None:
            check_fits(fitted, g.model_hint)
        folder = Path(cache) if cache else models.cache_dir() / "states"
        H = collect(lambda m: fn(m)[0], items, {il: StateCache(folder, rt.key, il) for il in layers}, progress, desc,
                    tag)
        if rows == "last-turn":
            H = [h[g.last_turn_row(messages({"text": it} if isinstance(it, str) else it)):] for h, it in zip(H, items)]
    finally:
        g.close()
    return H, rt.key, g.model_hint


def run(model: str, layer: int, out, harmful=None, benign=None, report_dir=None, cache=None,
        target_frr: float = 0.05, jailbreaks: int = FIT_JAILBREAKS, seed: int = 0, progress: bool = True,
        graft=None, mmproj=None, fit_on=("text",), pooling: str = "attention", rows: str = "prompt",
        frr_on=None, **fit_kw):
    """Collect hidden states (cached), split by goal (``datasets.FIT_FRACTIONS``), fit, save the CASA file and the
    report (report.json, roc.png). Returns (CASA, report).

    With ``graft`` (a projector file or Graft) every request is also given as grafted content,
    with ``mmproj`` as a typographic image (``copies``); a request's copies stay in its split.
    The module is fitted (and its threshold chosen) on the modalities in ``fit_on``; the report
    gives the held-out figures on those, and per modality (``test_by_modality``) on each one
    that was collected, so a fit on one modality is measured on the others too (transfer).
    ``pooling``: "attention" trains CASA's module (``fit``), "mean", "last", "mean+last" or "mean+last+max" a
    pooled probe (``pooled.fit``, saved as the same formula with Wk = 0, w_last and w_max); ``rows``: the prompt rows it reads
    (``CASA.rows``: "prompt", or "last-turn" for the last user message's). ``frr_on``: the benign
    sources whose false refusals ``target_frr`` bounds when the threshold is chosen (default: all;
    e.g. the risky-looking ones, where over-refusal happens)."""
    from .. import datasets, models

    from . import pooled

    if pooling not in ("attention", *pooled.POOLINGS):
        raise ValueError(f"pooling must be attention or one of {', '.join(pooled.POOLINGS)}, got {pooling!r}")
    modalities = collected(fit_on, graft, mmproj)
    items = prompt_sets(harmful, benign, jailbreaks)
    folder = Path(cache) if cache else models.cache_dir() / "states"
    parts = [copies(p, modalities, folder / "typographic") for p in datasets.split(items, datasets.FIT_FRACTIONS, seed)]
    flat = [it for p in parts for it in p]
    H, key, hint = hidden_states(model, layer, flat, cache, progress, graft=graft, mmproj=mmproj, rows=rows)
    for it, h in zip(flat, H):
        it["states"] = h
    train, val, test = ([(it["states"], int(it["label"] == "harmful")) for it in p if it["modality"] in fit_on]
                        for p in parts)
    if frr_on is not None:
        fit_kw["threshold_on"] = [(it["states"], int(it["label"] == "harmful"))
                                  for it in counted([it for it in parts[1] if it["modality"] in fit_on], frr_on)]
    if pooling == "attention":
        casa, report = fit(train, val, test, layer, target_frr=target_frr, seed=seed, progress=progress,
                           model_hint=hint, rows=rows, **fit_kw)
    else:
        probe, report = pooled.fit(train, val, test, layer, pooling, target_frr=target_frr, seed=seed, **fit_kw)
        casa = probe.to_casa(layer, model_hint=hint, rows=rows)
    report["fit_on"], report["rows"], report["frr_on"] = list(fit_on), rows, frr_on and sorted(frr_on)
    report["test_by_source"], report["test_by_modality"] = {}, {}
    held = [it for it in parts[2] if it["modality"] in fit_on]
    scores = np.asarray(casa.score([it["states"] for it in held]))
    for src in sorted({it.get("source", "?") for it in held}):
        sel = [i for i, it in enumerate(held) if it.get("source", "?") == src]
        report["test_by_source"][src] = {"n": len(sel), "flagged": float(np.mean(scores[sel] > casa.threshold))}
    for m in modalities:
        sel = [it for it in parts[2] if it["modality"] == m]
        r = evaluate(np.array([it["label"] == "harmful" for it in sel]), np.asarray(casa.score([it["states"] for it in sel])),
                     casa.threshold)
        report["test_by_modality"][m] = r | {"n": len(sel), "fitted_on": m in fit_on}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    casa.save(out)
    save_report(report, report_dir or Path(out).with_suffix(""), title=f"CASA {key}")
    return casa, report
