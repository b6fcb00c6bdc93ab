"""Parity of the two runtimes through the grafted modality on Qwen2.5-Coder-0.5B-Instruct: the same
grafted requests, unguarded and greedy, through llama.cpp (Q4_K_M GGUF, soft tokens decoded as
embeddings in the batch) and through PyTorch (the GGUF dequantized to float32, soft tokens through
``inputs_embeds``). Quantization differs, so the answers may too: prints per request how many
leading tokens agree, and the rate of equal first tokens.

    .venv/bin/python benchmarks/graft_parity.py --graft pyguard/data/graft-qwen2.5-coder-0.5b.safetensors [--n 10]
"""
from __future__ import annotations

import argparse

from pyguard import datasets, evaluate, models
from pyguard.graft import Graft


def compare(graft_path, n: int = 10, tokens: int = 8) -> list[dict]:
    """Per item (n held-out AdvBench goals and n held-out benign prompts, grafted): the two
    runtimes' answers and their leading tokens in common (both answers tokenized alike)."""
    from pyguard.llama import GuardedLlama
    from pyguard.torch import convert, guard

    g = Graft.load(graft_path)
    model, tok = convert.load(models.DEFAULT_MODEL)
    items = datasets.grafted(datasets.held_out(datasets.advbench())[:n] + datasets.held_out(datasets.benign())[:n])
    rows = []
    with GuardedLlama(models.model_path(models.DEFAULT_MODEL), n_ctx=512, graft=g) as gl, guard(model, tok, graft=g) as gt:
        for it in items:
            msgs = evaluate.messages(it)
            a = gl.create_chat_completion(msgs, max_tokens=tokens)["choices"][0]["message"]["content"]
            b = gt.create_chat_completion(msgs, max_tokens=tokens)["choices"][0]["message"]["content"]
            ta, tb = tok(a, add_special_tokens=False).input_ids, tok(b, add_special_tokens=False).input_ids
            agree = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
            rows.append({"id": it["id"], "label": it["label"], "llama": a, "torch": b, "agree": agree,
                         "first_equal": bool(ta[:1] == tb[:1])})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--graft", default=models.shipped_graft(models.DEFAULT_MODEL))
    p.add_argument("--n", type=int, default=10, help="items of each label")
    p.add_argument("--tokens", type=int, default=8)
    a = p.parse_args(argv)
    rows = compare(a.graft, a.n, a.tokens)
    for r in rows:
        print(f"{r['id']:<28} agree {r['agree']}/{a.tokens}  llama: {r['llama'][:40]!r}  torch: {r['torch'][:40]!r}")
    first = sum(r["first_equal"] for r in rows)
    print(f"first token equal: {first}/{len(rows)}; mean leading tokens in common: "
          f"{sum(r['agree'] for r in rows) / len(rows):.1f} of {a.tokens}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
