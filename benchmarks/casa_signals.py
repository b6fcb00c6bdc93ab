"""Leave-one-source-out for two signals other than the served model's prompt states (issue #16,
part 3): does either transfer to a left-out style where the L12 probe does not?

- ``emb``: a sentence encoder's embedding of the last user message (all-MiniLM-L6-v2, the TGA
  retriever's ``pyguard.tga.SentenceEncoder``, 384-d), as the probe's only input or beside the
  shipped pooling of the L12 last-turn rows (``mean+last+max+emb``).
- ``judge``: the served model's own zero-shot answer to a safety question appended after the
  assistant header (``casa_suffix.SUFFIX``): logit(" yes" | " Yes") - logit(" no" | " No") at the
  question's last token. Nothing is fitted; each fold only picks its threshold on validation.

Train and validation splits only, the folds ``casa_variants.py`` makes:

    .venv/bin/python benchmarks/casa_signals.py --variants judge emb:0.1 mean+last+max:0.1 \
        mean+last+max+emb:0.1 --group multiturn=pyguard-multiturn,multi-turn \
        --group casual=pyguard-casual,casual --group question=pyguard-question,questions \
        --group plain=pyguard-plain,plain --group terse=pyguard-terse,terse --out benchmarks/casa_signals

A variant is ``judge`` or ``features:C`` (features joined by +: a ``pooled.POOLINGS`` pooling
first, then ``emb``; one class-balanced logistic regression, C the inverse L2 strength). The
judge's scores are cached per prompt under ``$PYGUARD_CACHE/judge`` (one prefill per prompt,
about 47 min for 3528 prompts on 2 vCPUs; a stopped run resumes). Writes variants.json, variants.md and
variants.png as casa_variants.py.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

import casa_variants as cv
from casa_suffix import SUFFIX, key, per_prompt
from pyguard.calibrate import loso, pooled
from pyguard.calibrate.casa import choose_threshold


def judge_scores(model: str, items: list[dict], question: str) -> dict:
    """{item key: logit(yes) - logit(no)} for the model's first answer token after ``question``."""
    from pyguard.evaluate import messages
    from pyguard.runtime import Runtime

    rt = Runtime(model)

    def start():
        import llama_cpp

        g = rt.open()  # only its chat template
        llm = llama_cpp.Llama(str(rt.path), n_ctx=4096, n_threads=os.cpu_count(), verbose=False)
        ids = {w: llm.tokenize(w.encode(), add_bos=False) for w in (" yes", " Yes", " no", " No")}
        if any(len(t) != 1 for t in ids.values()):
            g.close()
            raise ValueError(f"the judge reads one-token answers; this tokenizer splits them: {ids}")
        yes, Yes, no, No = (t[0] for t in ids.values())

        def value(it):
            text, bos = g.template.render(messages(it))
            llm.reset()
            llm.eval(llm.tokenize((text + question).encode(), add_bos=bos, special=True))
            lg = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
            return float(np.logaddexp(lg[yes], lg[Yes]) - np.logaddexp(lg[no], lg[No]))
        return value, g.close

    tag = hashlib.sha256(f"{rt.key}|{question}".encode()).hexdigest()[:16]
    return per_prompt("judge", tag, items, "judge", start)


class Judge:
    """A fixed score: each item's ``states`` is [[judge score]]; only the threshold is chosen."""

    def score(self, states: list[np.ndarray]) -> np.ndarray:
        return np.array([float(h[0, 0]) for h in states])


def fit_judge(train, val, test, layer, target_frr: float = 0.05, **_):
    j = Judge()
    j.threshold = choose_threshold(j.score([h for h, _ in val]), np.array([y for _, y in val]), target_frr)
    return j, {}


def features(it: dict, E: dict, spec: str) -> np.ndarray:
    """``spec``: a pooling of the prompt's rows (``pooled.POOLINGS``) and/or ``emb``, joined by +."""
    parts = spec.split("+")
    emb = parts[-1] == "emb"
    prompt = "+".join(parts[:-1] if emb else parts)
    if prompt and prompt not in pooled.POOLINGS or not (prompt or emb):
        raise ValueError(f"unknown features {spec!r}: a pooling ({', '.join(pooled.POOLINGS)}), emb, or both as POOLING+emb")
    out = [pooled.pool(it["states"], prompt)] if prompt else []
    return np.concatenate(out + ([E[key(it)]] if emb else []))


def main():
    ap = cv.parser(__doc__, "benchmarks/casa_signals", ["judge", "emb:0.1"])
    ap.add_argument("--question", default=SUFFIX)
    a = ap.parse_args()
    items = cv.last_turn_items(a.model, a.group)
    E = {}

    def folds_of(v):
        if v == "judge":  # a fixed score per prompt: only each fold's threshold is chosen
            J = judge_scores(a.model, items, a.question)
            run = [dict(it, states=np.array([[J[key(it)]]])) for it in items]
            return loso.run(run, 12, pooling="judge", fit=fit_judge, progress=False)["folds"]
        spec, _, C = v.partition(":")
        if spec.endswith("emb") and not E:
            from pyguard.tga import SentenceEncoder

            E.update(zip(map(key, items), SentenceEncoder().encode([it["text"] for it in items]).numpy()))
        return cv.feature_folds(items, lambda it: features(it, E, spec), float(C or 1))
    cv.record(a.out, a.variants, folds_of)


if __name__ == "__main__":
    main()
