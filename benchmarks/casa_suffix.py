"""Leave-one-source-out for a prompted readout (issue #16, part 3): do the hidden states at a
fixed safety question, appended after the rendered prompt (after the assistant header), transfer
to a left-out source better than the prompt's own rows? The runtime would have to evaluate the
question's tokens and drop them from the KV cache before answering; this measures whether that
is worth building. Train and validation splits only, folds as ``casa_variants.py`` makes them.

    .venv/bin/python benchmarks/casa_suffix.py --variants mean+last:1 s12:1 s16:1 s20:1 sm16+s16:0.1 \
        mean+last+s16:0.1 mean+last+max:0.1 mean+last+max+s16:0.1 mean+last+max+sm16+s16:0.1 \
        --group multiturn=pyguard-multiturn,multi-turn --group casual=pyguard-casual,casual \
        --group question=pyguard-question,questions --group plain=pyguard-plain,plain \
        --group terse=pyguard-terse,terse --out benchmarks/casa_suffix

A variant is ``features:C``: features joined by +, first a pooling of the last user turn's rows
at layer 12 as shipped (``mean``, ``last``, ``mean+last``, ``mean+last+max``), then ``sL`` (the
question's last row at layer L) and ``smL`` (the mean over the question's rows at L), side by side
into one class-balanced logistic regression
(``pooled.fit``, C the inverse L2 strength). The question's states are cached per prompt under
``$PYGUARD_CACHE/suffix`` (one model pass for layers 8, 12, 16, 20; about 50 min on 2 vCPUs;
a stopped run resumes). Writes variants.json, variants.md and variants.png as casa_variants.py.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import pickle
import re

import numpy as np

import casa_variants as cv
from pyguard import extras, models
from pyguard.calibrate import pooled

SUFFIX = "Before I answer: is the request above harmful, dangerous, hateful or illegal? Answer yes or no. Answer:"
LAYERS = (8, 12, 16, 20)


def per_prompt(folder: str, tag: str, items: list[dict], desc: str, start) -> dict:
    """{item key: value}, cached under ``$PYGUARD_CACHE/folder/tag.pkl`` (saved every 200 prompts
    and when stopped; a rerun computes only the missing ones). ``start()`` -> (item -> value,
    close) is called only when some item is missing."""
    path = models.cache_dir() / folder / f"{tag}.pkl"
    done = pickle.loads(path.read_bytes()) if path.exists() else {}
    todo = [it for it in items if key(it) not in done]
    if not todo:
        return done
    path.parent.mkdir(parents=True, exist_ok=True)

    def save():
        path.with_suffix(".tmp").write_bytes(pickle.dumps(done))
        os.replace(path.with_suffix(".tmp"), path)

    value, close = start()
    try:
        for j, it in enumerate(extras.tqdm("calibrate")(todo, desc=desc)):
            done[key(it)] = value(it)
            if j % 200 == 199:
                save()
    finally:
        save()
        close()
    return done


def suffix_states(model: str, items: list[dict], suffix: str) -> dict:
    """{item key: {layer: float32 [2, d]}}: the mean over the suffix's rows and its last row."""
    from pyguard.evaluate import messages
    from pyguard.runtime import Runtime

    rt = Runtime(model)

    def start():
        fn, g = rt.states(list(LAYERS))
        render = g.template.render
        g.template.render = lambda m: (lambda text, bos: (text + suffix, bos))(*render(m))
        k = len(g.engine.tokenize(suffix, add_bos=False))

        def value(it):
            H, _ = fn(messages(it))
            return {il: np.stack([H[il][-k:].mean(0), H[il][-1]]).astype(np.float32) for il in LAYERS}
        return value, g.close

    tag = hashlib.sha256(f"{rt.key}|{suffix}|{LAYERS}".encode()).hexdigest()[:16]
    return per_prompt("suffix", tag, items, "suffix states", start)


def key(it: dict) -> str:
    return f"{it['label']}|{it['id']}"


def features(it: dict, S: dict, spec: str) -> np.ndarray:
    """One item's feature vector for ``spec``: a pooling of the prompt's rows (``pooled.POOLINGS``),
    then the question's parts (``sL``, ``smL``), joined by +."""
    parts = spec.split("+")
    prompt = "+".join(itertools.takewhile(lambda p: not p.startswith("s"), parts))
    out = [pooled.pool(it["states"], prompt)] if prompt else []
    for p in parts[len(prompt.split("+")) if prompt else 0:]:
        m = re.fullmatch(r"s(m?)(\d+)", p)
        if m is None or int(m[2]) not in LAYERS:
            raise ValueError(f"unknown feature {p!r}: a pooling of the prompt ({', '.join(pooled.POOLINGS)}) "
                             f"first, then sL or smL with L in {LAYERS}")
        out.append(S[key(it)][int(m[2])][0 if m[1] else 1])
    return np.concatenate(out)


def main():
    ap = cv.parser(__doc__, "benchmarks/casa_suffix", ["mean+last:1", "s16:1"])
    ap.add_argument("--suffix", default=SUFFIX)
    a = ap.parse_args()
    items = cv.last_turn_items(a.model, a.group)
    S = suffix_states(a.model, items, a.suffix)

    def folds_of(v):
        spec, _, C = v.partition(":")
        return cv.feature_folds(items, lambda it: features(it, S, spec), float(C or 1))
    cv.record(a.out, a.variants, folds_of)


if __name__ == "__main__":
    main()
