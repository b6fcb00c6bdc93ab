"""Decoder-layer discovery and hidden-state capture for Hugging Face models (tiny, offline)."""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_hf import tiny_llama, tiny_llava  # noqa: E402

from pyguard.torch.layers import capture, decoder_layers  # noqa: E402


def test_layers_found_through_accessors():
    assert len(decoder_layers(tiny_llama(layers=3))) == 3
    llava = tiny_llava(layers=2)
    assert decoder_layers(llava) is llava.get_decoder().layers and len(decoder_layers(llava)) == 2


def test_unsupported_model_is_a_clear_error():
    with pytest.raises(TypeError, match="cannot find the decoder layers of Linear"):
        decoder_layers(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("make", [tiny_llama, tiny_llava], ids=["llama", "llava"])
def test_capture_equals_output_hidden_states(make):
    model = make(layers=3)
    ids = torch.randint(0, 100, (2, 11))
    with torch.no_grad():
        with capture(model, [0, 1]) as store:
            out = model(input_ids=ids, output_hidden_states=True)
    hs = out.hidden_states
    for il in (0, 1):  # hidden_states[il + 1] is layer il's output (the last one is normed)
        torch.testing.assert_close(store[il], hs[il + 1], rtol=0, atol=0)
    assert all(not h.requires_grad for h in store.values())


def test_hooks_are_removed_and_logits_unchanged():
    model = tiny_llama()
    ids = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with capture(model, [1]) as store:
            during = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert store[1].shape == (1, 9, 64)
    assert all(not layer._forward_hooks for layer in decoder_layers(model))
    torch.testing.assert_close(before, during, rtol=0, atol=0)
    torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_capture_rejects_layers_out_of_range():
    with pytest.raises(ValueError, match=r"layers \[3\] are outside the model's 3 decoder layers"):
        with capture(tiny_llama(layers=3), [0, 3]):
            pass
