"""The PyTorch runtime on the real Qwen2.5-Coder-0.5B (loaded from its GGUF through transformers)
and its parity with the llama.cpp runtime."""
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("llama_cpp")

from fetched import fetched  # noqa: E402
from pyguard import models  # noqa: E402
from pyguard.methods import CoCA  # noqa: E402
from pyguard.torch import convert, guard  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import parity  # noqa: E402


@pytest.fixture(scope="module")
def qwen():
    fetched(models.model_path(models.DEFAULT_MODEL), models.DEFAULT_MODEL)
    return convert.load(models.DEFAULT_MODEL)


def test_alpha_zero_equals_generate_on_qwen(qwen):
    model, tok = qwen
    msgs = [{"role": "user", "content": "Write a Python function that reverses a string."}]
    enc = tok(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False), add_special_tokens=False,
              return_tensors="pt")
    with torch.no_grad():
        want = model.generate(**enc, max_new_tokens=6, do_sample=False)
    with guard(model, tok, coca=CoCA(alpha=0.0)) as g:
        got = g.generate(**enc, max_new_tokens=6)
        assert g.last_report[0]["coca"]["shared_prefix_tokens"] >= enc.input_ids.shape[1] - 5
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_parity_with_the_llama_cpp_runtime(qwen):
    rows = parity.compare(parity.PROMPTS[3:7], tokens=4, hf=qwen)
    print("\n".join(f"{r['agree']}/4 equal: {r['prompt'][:40]!r} llama {r['text_llama']!r} torch {r['text_torch']!r}"
                    for r in rows))
    assert all(r["same_prompt_tokens"] for r in rows)  # both render and tokenize the chat identically
    assert sum(r["agree"] >= 1 for r in rows) >= 3  # most first tokens agree despite Q4_K_M vs float32
