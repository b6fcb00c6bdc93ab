"""CMRM shift vectors from anchor pairs: for each anchor (an image and a text), every decoder layer's
output for the multimodal prompt minus the same for its text-only counterpart (the image removed,
or replaced by a blank or a noise image of the same size), at the last prompt token or averaged
over the text tokens; the dataset-level vector of a layer is the mean difference over anchors (or
their first principal component, with the mean's sign and length along it).

Anchor files are JSONL, one ``{"image": path, "text": str}`` per line, image paths relative to the
file. Anchors of a grafted modality (``pyguard.graft``) are ``{"graft": content, "text": str}``;
their counterpart is the content inlined as text (``inline``) or removed. Each anchor's differences [n_layer, d] are cached on disk (keyed by model, anchor and
options), so an interrupted run resumes without recomputing finished anchors.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
from pathlib import Path

import numpy as np

from .. import extras
from ..methods import CMRM
from ..runtime import Runtime
from . import NpyCache

COUNTERPARTS = ("remove", "blank", "noise", "inline")
POSITIONS = ("last", "mean")
METHODS = ("mean", "pca")
ANCHORS = Path(__file__).resolve().parents[1] / "data" / "anchors" / "anchors.jsonl"


def read_anchors(path=None) -> list[dict]:
    """The anchors of a JSONL file: [{"image": absolute path, "text": str}]; errors name file:line."""
    from ..datasets import read_jsonl

    path = path or ANCHORS
    rows = read_jsonl(path, required=("image", "text"), image_field="image")
    if not rows:
        raise ValueError(f"{path}: no anchors")
    return rows


def _data_uri(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def messages(anchor: dict, counterpart: str = "remove", seed: int = 0) -> tuple[list, list]:
    """(multimodal messages, text-only counterpart messages) of one anchor."""
    Image = extras.need("PIL.Image", "images")

    if counterpart not in COUNTERPARTS:
        raise ValueError(f"counterpart must be one of {COUNTERPARTS}, got {counterpart!r}")
    if "graft" in anchor:
        from ..datasets import text_prompt

        if counterpart not in ("inline", "remove"):
            raise ValueError(f"grafted anchors take counterpart 'inline' or 'remove', got {counterpart!r}")
        mm = [{"role": "user", "content": [{"type": "graft", "text": anchor["graft"]},
                                           {"type": "text", "text": "\n" + anchor["text"]}]}]
        text = text_prompt(anchor["graft"], anchor["text"]) if counterpart == "inline" else anchor["text"]
        return mm, [{"role": "user", "content": text}]
    if counterpart == "inline":
        raise ValueError("counterpart 'inline' is for grafted anchors ({'graft': content, 'text': ...})")

    def user(url):
        parts = [] if url is None else [{"type": "image_url", "image_url": {"url": url}}]
        return [{"role": "user", "content": parts + [{"type": "text", "text": anchor["text"]}]}]

    mm = user(anchor["image"])
    if counterpart == "remove":
        return mm, [{"role": "user", "content": anchor["text"]}]
    with Image.open(anchor["image"]) as im:
        size = im.size
    if counterpart == "blank":
        other = Image.new("RGB", size, (255, 255, 255))
    else:
        rng = np.random.default_rng(seed)
        other = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    return mm, user(_data_uri(other))


def summary(states: dict, mask: np.ndarray, position: str, n_layer: int) -> np.ndarray:
    """[n_layer, d]: each layer's output at the last prompt position, or its mean over the text
    positions (``mask``). llama.cpp computes its last layer for the last position only: that
    layer always uses the last position."""
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
    rows = []
    for il in range(n_layer):
        H = np.asarray(states[il], dtype=np.float32)
        rows.append(H[mask].mean(0) if position == "mean" and len(H) == len(mask) else H[-1])
    return np.stack(rows)


def combine(diffs: np.ndarray, method: str = "mean") -> np.ndarray:
    """Dataset-level vectors [n_layer, d] from per-anchor differences [N, n_layer, d]."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    mean = diffs.mean(0)
    if method == "mean" or len(diffs) < 2:
        return mean
    out = np.empty_like(mean)
    for il in range(diffs.shape[1]):
        X = diffs[:, il].astype(np.float64)
        pc = np.linalg.svd(X - X.mean(0), full_matrices=False)[2][0]
        along = float(mean[il] @ pc)  # the mean's signed length along the component
        out[il] = pc * along
    return out


def increments(vectors: np.ndarray) -> np.ndarray:
    """Per-layer increments [n_layer, d]: row l is ``v_l - v_{l-1}`` (row 0 kept). Each measured
    vector ``v_l`` is a layer output's difference, which carries every earlier layer's: shifted at
    every layer, the residual stream loses ``v_1 + ... + v_l`` by layer l instead of ``v_l``. The
    increments' running sum is ``v_l``, so shifting by them removes each layer's difference once."""
    v = np.asarray(vectors, np.float32)
    return np.concatenate([v[:1], np.diff(v, axis=0)])


def extract(states_fn, anchors: list[dict], n_layer: int, model_id: str, cache=None, counterpart: str = "remove",
            position: str = "last", progress: bool = True) -> np.ndarray:
    """Per-anchor differences [N, n_layer, d] (multimodal minus counterpart) through the cache.
    ``states_fn(messages) -> ({layer: [T, d]}, text mask [T])``."""
    tqdm = extras.tqdm("calibrate")

    store = NpyCache(cache) if cache is not None else None
    out = []
    for i, a in enumerate(tqdm(anchors, desc="CMRM anchors", disable=not progress, unit="anchor")):
        if "graft" in a:
            media_hash = hashlib.sha256(a["graft"].encode()).hexdigest()
        else:
            with open(a["image"], "rb") as f:
                media_hash = hashlib.sha256(f.read()).hexdigest()
        key = json.dumps([model_id, a["text"], media_hash, counterpart, position])
        d = store.get(key) if store is not None else None
        if d is None:
            mm, text = messages(a, counterpart, seed=i)
            d = (summary(*states_fn(mm), position, n_layer) - summary(*states_fn(text), position, n_layer))
            d = d.astype(np.float32)
            if store is not None:
                store.put(key, d)
        out.append(d)
    return np.stack(out)


def states_function(model: str, mmproj=None, n_ctx: int = 4096, graft=None):
    """(``messages -> ({layer: [T, d]}, mask)``, n_layer, cache key, model_hint, closer) for a GGUF (+ mmproj,
    llama.cpp) or a Hugging Face folder (PyTorch; LLaVA with its processor); ``graft``: a projector
    file or a ``Graft``, for grafted anchors."""
    rt = Runtime(model, mmproj, n_ctx, graft)
    tag = "" if rt.graft is None else f"-graft-{rt.graft.fingerprint()}"
    key = rt.key + (f"-{Path(mmproj).name if mmproj else 'text'}" if rt.kind == "gguf" else "") + tag
    n_layer = rt.shape[0]
    fn, g = rt.states(list(range(n_layer)))
    return fn, n_layer, key, g.model_hint, g.close


def graft_anchors(n: int = 64, seed: int = 0) -> list[dict]:
    """Anchors for a grafted modality: ``n`` of the projector's benign training requests (a
    seeded draw), each with the answer instruction."""
    from ..datasets import ANSWER
    from ..graft import benign_requests

    reqs = benign_requests(seed)
    pick = np.random.default_rng(seed).permutation(len(reqs))[:n]
    return [{"graft": reqs[i], "text": ANSWER} for i in sorted(pick)]


def anchor_rows(anchors, grafted: bool = False) -> list[dict]:
    """The anchors: a list as given, a JSONL file's, or by default the shipped image anchors
    (``graft_anchors()`` for a grafted modality)."""
    if isinstance(anchors, list):
        return anchors
    if grafted and not anchors:
        return graft_anchors()
    return read_anchors(anchors or ANCHORS)


def run(model: str, anchors=ANCHORS, out=None, mmproj=None, counterpart: str = "remove", position: str = "last",
        method: str = "mean", alpha: float = 1.0, cache=None, progress: bool = True, graft=None) -> CMRM:
    """Extract dataset-level vectors and, with ``out`` (.gguf or .safetensors), save them. The CMRM
    applies to layers 1 .. n_layer-1 (llama.cpp cannot shift layer 0), to image requests.
    ``anchors``: a JSONL file or a list of anchor dicts; with ``graft`` (a projector file or Graft) the
    default anchors are ``graft_anchors()``."""
    from .. import models

    rows = anchor_rows(anchors, graft is not None)
    fn, n_layer, key, hint, close = states_function(model, mmproj, graft=graft)
    try:
        folder = Path(cache) if cache else models.cache_dir() / "cmrm"
        diffs = extract(fn, rows, n_layer, key, folder / key, counterpart, position, progress)
    finally:
        close()
    vectors = combine(diffs, method)
    vectors[0] = 0.0
    cmrm = CMRM(vectors, alpha=alpha, layers=(1, n_layer - 1), when="image", model_hint=hint)
    if out is not None:
        cmrm.save(out)
    return cmrm
