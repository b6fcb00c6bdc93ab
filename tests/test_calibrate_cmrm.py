"""CMRM vector extraction: per-anchor differences, mean / PCA, llama.cpp's control-vector layout,
resuming, both runtimes, bad anchor files."""
import base64
import io
import json

import numpy as np
import pytest

from pyguard.calibrate import cmrm as cal
from pyguard.methods import CMRM


def anchors_file(tmp_path, n=3, **extra):
    src = cal.read_anchors()[:n]
    rows = [{"image": a["image"], "text": a["text"], **extra} for a in src]
    p = tmp_path / "anchors.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_shipped_anchors_and_counterparts():
    rows = cal.read_anchors()
    assert len(rows) == 16 and all(r["text"] for r in rows)
    from PIL import Image

    mm, text = cal.messages(rows[0], "remove")
    assert text == [{"role": "user", "content": rows[0]["text"]}]
    assert mm[0]["content"][0]["image_url"]["url"] == rows[0]["image"]
    for kind in ("blank", "noise"):
        _, other = cal.messages(rows[0], kind)
        uri = other[0]["content"][0]["image_url"]["url"]
        im = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
        assert im.size == Image.open(rows[0]["image"]).size
        assert other[0]["content"][1]["text"] == rows[0]["text"]


def test_summary_and_combine(rng):
    states = {0: rng.standard_normal((5, 4)), 1: rng.standard_normal((5, 4)), 2: rng.standard_normal((1, 4))}
    mask = np.array([1, 0, 0, 1, 1], bool)
    last = cal.summary(states, mask, "last", 3)
    np.testing.assert_allclose(last, np.stack([states[0][-1], states[1][-1], states[2][-1]]), rtol=1e-6)
    mean = cal.summary(states, mask, "mean", 3)
    np.testing.assert_allclose(mean[1], states[1][mask].mean(0), rtol=1e-5, atol=1e-6)  # float32 sums
    np.testing.assert_allclose(mean[2], states[2][-1], rtol=1e-6)  # the llama.cpp last layer: last position
    # PCA: differences along one direction with noise -> that direction, the mean's sign and length
    u = np.array([3.0, 4.0, 0.0]) / 5
    diffs = np.stack([[u * s + rng.standard_normal(3) * 1e-3] for s in (1.0, 2.0, 3.0, 6.0)]).astype(np.float32)
    pc = cal.combine(diffs, "pca")[0]
    np.testing.assert_allclose(pc, u * 3.0, atol=1e-2)
    np.testing.assert_allclose(cal.combine(diffs, "mean")[0], diffs.mean(0)[0], rtol=1e-6)
    with pytest.raises(ValueError, match="method must be one of"):
        cal.combine(diffs, "median")


def test_increments_sum_back_to_the_vectors(rng):
    """A residual stream shifted at every layer by the increments has lost v_l by layer l's output
    (the vectors themselves would take away v_1 + ... + v_l)."""
    v = rng.standard_normal((7, 5)).astype(np.float32)
    v[0] = 0
    inc = cal.increments(v)
    assert inc.shape == v.shape and inc.dtype == np.float32
    np.testing.assert_allclose(np.cumsum(inc, axis=0), v, atol=1e-5)
    np.testing.assert_allclose(inc[3], v[3] - v[2], rtol=1e-6)


def test_extract_resumes_without_recomputing(tmp_path):
    calls = []

    def fn(messages):
        calls.append(messages)
        has_image = isinstance(messages[0]["content"], list) and len(messages[0]["content"]) == 2
        T = 6 if has_image else 3
        return {il: np.full((T, 4), il + (10.0 if has_image else 0.0), np.float32) for il in range(2)}, np.ones(T, bool)

    rows = cal.read_anchors(anchors_file(tmp_path, 3))
    d = cal.extract(fn, rows, 2, "m", tmp_path / "c", progress=False)
    assert d.shape == (3, 2, 4) and np.all(d == 10.0) and len(calls) == 6
    more = cal.read_anchors()[:4]
    d2 = cal.extract(fn, more, 2, "m", tmp_path / "c", progress=False)
    assert len(calls) == 8 and np.array_equal(d2[:3], d)  # only the new anchor was computed


def test_bad_anchor_files_name_file_and_line(tmp_path):
    p = tmp_path / "a.jsonl"
    good = json.dumps({"image": cal.read_anchors()[0]["image"], "text": "hi"})
    p.write_text(good + "\n" + json.dumps({"image": "missing.png", "text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"a\.jsonl:2.*missing\.png"):
        cal.read_anchors(p)
    p.write_text(good + "\n" + json.dumps({"image": cal.read_anchors()[0]["image"], "text": ""}) + "\n")
    with pytest.raises(ValueError, match=r"a\.jsonl:2"):
        cal.read_anchors(p)
    p.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"a\.jsonl:1"):
        cal.read_anchors(p)
    with pytest.raises(FileNotFoundError):
        cal.read_anchors(tmp_path / "nope.jsonl")


def test_torch_path_equals_hidden_states_by_hand(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tiny_hf import tiny_llava, tiny_processor

    from pyguard.torch import guard

    model = tiny_llava(seed=1)
    with guard(model, tiny_processor(model)) as g:
        def fn(m):
            states, mask = g.prompt_states(m, list(range(g.n_layer)), with_mask=True)
            return {il: h.numpy() for il, h in states.items()}, mask.numpy()
        rows = cal.read_anchors(anchors_file(tmp_path, 1))
        d = cal.extract(fn, rows, g.n_layer, "tiny", None, progress=False)
        mm, text = cal.messages(rows[0])
        (smm, mask), (stx, _) = fn(mm), fn(text)
    assert (~mask).sum() == 16  # the image positions
    want = np.stack([smm[il][-1] - stx[il][-1] for il in range(g.n_layer)])
    np.testing.assert_allclose(d[0], want, rtol=1e-5, atol=1e-6)
    assert np.abs(want).max() > 1e-3  # the image changes the last token's states


def test_gguf_file_follows_llama_cpp_layout_and_applies_like_the_vectors(tmp_path):
    pytest.importorskip("llama_cpp")
    gguf = pytest.importorskip("gguf")
    from tiny_mmproj import write_test_image, write_tiny_mmproj

    from pyguard import models
    from pyguard.llama import GuardedLlama

    path = models.model_path("smollm2-135m")
    if not path.exists():
        pytest.skip("SmolLM2 not fetched")
    mmproj = write_tiny_mmproj(tmp_path / "mmproj.gguf", n_embd_text=576)
    out = tmp_path / "v.gguf"
    c = cal.run(str(path), anchors_file(tmp_path, 2), out, mmproj, cache=tmp_path / "cache", progress=False)
    assert c.vectors.shape == (30, 576) and np.all(c.vectors[0] == 0) and c.layers == (1, 29)
    r = gguf.GGUFReader(out)
    names = [t.name for t in r.tensors]
    assert names == [f"direction.{il}" for il in range(1, 30)]  # layer 0 absent, one tensor per layer
    assert all(t.data.shape == (576,) and t.data.dtype == np.float32 for t in r.tensors)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    assert arch == "controlvector" and int(r.fields["controlvector.layer_count"].parts[-1][0]) == 29
    loaded = CMRM.load(out)
    np.testing.assert_array_equal(loaded.vectors, c.vectors)
    img = write_test_image(tmp_path / "q.png")
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(img)}},
                                         {"type": "text", "text": "What is this?"}]}]
    got = []
    for v in (loaded, c, None):
        with GuardedLlama(path, mmproj_path=mmproj, n_ctx=256, cmrm=v, capture_layer=12) as g:
            got.append(g.prompt_states(msgs))
    np.testing.assert_array_equal(got[0], got[1])  # the file applies exactly like the in-memory vectors
    assert np.abs(got[0] - got[2]).max() > 1e-3  # and it does shift the states


def test_sample_level_cmrm_on_llama_equals_its_own_vectors(tmp_path):
    pytest.importorskip("llama_cpp")
    from tiny_mmproj import write_test_image, write_tiny_mmproj

    from pyguard import models
    from pyguard.llama import GuardedLlama
    from pyguard.methods import CoCA

    path = models.model_path("smollm2-135m")
    if not path.exists():
        pytest.skip("SmolLM2 not fetched")
    mmproj = write_tiny_mmproj(tmp_path / "mmproj.gguf", n_embd_text=576)
    img = write_test_image(tmp_path / "q.png")
    text = "What is this?"
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(img)}},
                                         {"type": "text", "text": text}]}]
    with GuardedLlama(path, mmproj_path=mmproj, n_ctx=256, capture_layer=list(range(30))) as g:
        mm = g.prompt_states(msgs)
        tx = g.prompt_states([{"role": "user", "content": text}])
    v = np.stack([mm[il][-1] - tx[il][-1] for il in range(30)])
    v[0] = 0
    traces, reports = [], []
    for cmrm in (CMRM.sample(30, 576, alpha=2.0), CMRM(v, alpha=2.0), None):
        with GuardedLlama(path, mmproj_path=mmproj, n_ctx=256, cmrm=cmrm, coca=CoCA(alpha=0.0)) as g:
            g.policy.trace = []  # with alpha 0 the calibrated logits are the base sequence's
            r = g.create_chat_completion(msgs, max_tokens=3)
            traces.append(np.stack(g.policy.trace))
            reports.append(r["pyguard"]["cmrm"])
    assert reports[0]["mode"] == "sample" and reports[0]["on"] and reports[0]["norm"] > 0
    np.testing.assert_allclose(traces[0], traces[1], rtol=1e-5, atol=1e-5)  # the request's own vectors
    assert np.abs(traces[0] - traces[2]).max() > 1e-3
    with GuardedLlama(path, mmproj_path=mmproj, n_ctx=256, cmrm=CMRM.sample(30, 576)) as g:  # text only: off
        assert g.create_chat_completion([{"role": "user", "content": text}], max_tokens=1)["pyguard"]["cmrm"]["on"] is False
