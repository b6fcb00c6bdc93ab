"""CMRM forward hooks on tiny Hugging Face models."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_hf import tiny_llama, tiny_llava  # noqa: E402

from pyguard.methods import CMRM  # noqa: E402
from pyguard.torch.cmrm import shift_layers  # noqa: E402
from pyguard.torch.layers import decoder_layers  # noqa: E402


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("make", [tiny_llama, tiny_llava], ids=["llama", "llava"])
def test_zero_vectors_change_nothing_and_hooks_go(make):
    model = make(layers=3)
    ids = torch.randint(0, 100, (2, 7))
    before = logits(model, ids)
    with shift_layers(model, CMRM(np.zeros((3, 64), np.float32), alpha=3.0)):
        during = logits(model, ids)
    torch.testing.assert_close(during, before, rtol=0, atol=0)
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=0)
    assert all(not layer._forward_hooks for layer in decoder_layers(model))


def test_equals_subtracting_by_hand_on_selected_rows(rng):
    model = tiny_llama(layers=3)
    v = rng.standard_normal((3, 64)).astype(np.float32)
    ids = torch.randint(0, 100, (3, 6))
    rows = torch.tensor([True, False, True])

    def by_hand(il):
        def fn(_m, _a, out):
            h = out[0] if isinstance(out, tuple) else out
            shifted = h - 0.7 * torch.from_numpy(v[il])
            new = torch.where(rows[:, None, None], shifted, h)
            return (new, *out[1:]) if isinstance(out, tuple) else new
        return fn

    handles = [decoder_layers(model)[il].register_forward_hook(by_hand(il)) for il in (1, 2)]
    want = logits(model, ids)
    for h in handles:
        h.remove()
    with shift_layers(model, CMRM(v, alpha=0.7, layers=(1, 2))) as select:
        select.set(rows.tolist())
        got = logits(model, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain = logits(model, ids)
    torch.testing.assert_close(got[1], plain[1], rtol=0, atol=0)  # unselected row untouched
    assert (got[0] - plain[0]).abs().max() > 1e-3


def test_vectors_for_another_model_are_refused():
    with pytest.raises(ValueError, match="CMRM vectors are for n_embd=32, n_layer=3; the model has n_embd=64, n_layer=3"):
        with shift_layers(tiny_llama(layers=3), CMRM(np.zeros((3, 32), np.float32))):
            pass
