"""pyguard.torch.convert: the registry GGUF turned once into a reusable Hugging Face folder."""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from fetched import fetched  # noqa: E402
from pyguard import models  # noqa: E402
from pyguard.torch import convert  # noqa: E402

NAME = "qwen2.5-coder-0.5b"


@pytest.fixture(scope="module")
def folder():
    fetched(models.model_path(NAME), NAME)
    return convert.hf_folder(NAME)  # converts (~1.5 min) unless scripts/setup.sh already did


def test_folder_is_converted_once(folder):
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    before = folder.stat().st_mtime_ns
    assert convert.hf_folder(NAME) == folder
    assert folder.stat().st_mtime_ns == before


def test_load_generates(folder):
    model, tok = convert.load(NAME)
    assert type(model).__name__ == "Qwen2ForCausalLM" and not model.training
    assert model.config.num_hidden_layers == 24 and model.config.hidden_size == 896
    assert model.dtype == torch.float32
    msgs = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_missing_gguf_says_how_to_fetch(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"run `pyguard models fetch {NAME}`"):
        convert.hf_folder(NAME, cache=tmp_path)
    assert not (tmp_path / "hf").exists()
