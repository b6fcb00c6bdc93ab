"""Method configs (pyguard.methods): validation, file round trips, llama.cpp's control-vector
format, corrupt files, CASA scoring."""
import dataclasses
import math
import re

import numpy as np
import pytest

from pyguard import ops
from pyguard.methods import CASA, CMRM, DEFAULT_PRINCIPLE, DEFAULT_REFUSAL, CoCA, describe_model

gguf = pytest.importorskip("gguf")
pytest.importorskip("safetensors")


def vectors(rng, n_layer=5, n_embd=12, zero_layer0=True):
    v = rng.standard_normal((n_layer, n_embd)).astype(np.float32)
    if zero_layer0:
        v[0] = 0
    return v


def casa_params(rng, d=16, r=4, heads=3):
    return {
        "Wk": (rng.standard_normal((d, r)) / math.sqrt(d)).astype(np.float32),
        "q": rng.standard_normal((heads, r)).astype(np.float32),
        "w": (rng.standard_normal(d) / math.sqrt(d)).astype(np.float32),
        "b": float(np.float32(rng.normal())),
    }


def raises(match, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)


# ----------------------------------------------------------------------------- CoCA
def test_coca_defaults():
    c = CoCA()
    got = (c.alpha, c.principle, c.principle_position, c.gate_kl, c.gate_tokens)
    assert got == (1.5, DEFAULT_PRINCIPLE, "after", None, 8)
    assert DEFAULT_PRINCIPLE.startswith("The assistant should answer in a harmless")


@pytest.mark.parametrize("field, value", [
    ("alpha", math.nan), ("alpha", math.inf), ("alpha", "1"), ("alpha", True),
    ("principle", ""), ("principle", None),
    ("principle_position", "middle"),
    ("gate_kl", -0.1), ("gate_kl", math.inf),
    ("gate_tokens", 0), ("gate_tokens", 2.0),
])
def test_coca_rejects(field, value):
    raises(rf"{field} .*{re.escape(repr(value))}", CoCA, **{field: value})


def test_coca_accepts_edges():
    CoCA(alpha=0, gate_kl=0.0, gate_tokens=1, principle_position="before")
    CoCA(alpha=-2.5)  # negative: anti-calibration, allowed


# ----------------------------------------------------------------------------- CMRM validation
@pytest.mark.parametrize("kwargs, match", [
    ({"vectors": np.zeros(4, np.float32)}, r"vectors must be a non-empty 2-D array, got shape \(4,\)"),
    ({"vectors": np.zeros((0, 4), np.float32)}, r"shape \(0, 4\)"),
    ({"vectors": "abc"}, r"vectors must be a float32 array"),
    ({"alpha": math.nan}, r"alpha must be a finite number, got nan"),
    ({"layers": (0, 5)}, r"layers .* end < 5, got \(0, 5\)"),
    ({"layers": (3, 2)}, r"got \(3, 2\)"),
    ({"layers": (-1, 2)}, r"got \(-1, 2\)"),
    ({"layers": (1.0, 2)}, r"got \(1.0, 2\)"),
    ({"layers": 3}, r"got 3"),
    ({"when": "never"}, r"when must be one of .*'never'"),
    ({"model_hint": 3}, r"model_hint must be a string, got 3"),
])
def test_cmrm_rejects(rng, kwargs, match):
    args = {"vectors": vectors(rng), **kwargs}
    raises(match, CMRM, **args)


def test_cmrm_rejects_nonfinite(rng):
    v = vectors(rng)
    v[3, 7] = np.inf
    raises(r"vectors\[3, 7\] = inf is not finite", CMRM, v)


def test_cmrm_is_a_readonly_float32_copy(rng):
    v = vectors(rng).astype(np.float64)
    c = CMRM(v, layers=[1, 4])
    assert c.vectors.dtype == np.float32 and c.vectors.flags.c_contiguous and not c.vectors.flags.writeable
    assert c.layers == (1, 4) and (c.n_layer, c.n_embd) == v.shape
    v[1] = 0  # the config does not alias the caller's array
    assert c.vectors[1].any()


# ----------------------------------------------------------------------------- CMRM files
@pytest.mark.parametrize("ext", ["gguf", "safetensors"])
def test_cmrm_round_trip(rng, tmp_path, ext):
    c = CMRM(vectors(rng), alpha=float(rng.uniform(0.1, 3)), layers=(1, 3), when="always", model_hint="qwen2")
    path = tmp_path / f"v.{ext}"
    c.save(path)
    back = CMRM.load(path)
    assert back == c and back.vectors.dtype == np.float32
    assert CMRM.load(str(path), alpha=0.25, layers=None) == CMRM(c.vectors, 0.25, None, "always", "qwen2")
    raises("alpha", CMRM.load, path, alpha=math.nan)


def test_cmrm_round_trip_defaults(rng, tmp_path):
    for ext in ("gguf", "safetensors"):
        c = CMRM(vectors(rng, n_layer=2, n_embd=3))
        c.save(tmp_path / f"d.{ext}")
        assert CMRM.load(tmp_path / f"d.{ext}") == c


def test_safetensors_keeps_layer0(rng, tmp_path):
    c = CMRM(vectors(rng, zero_layer0=False))
    c.save(tmp_path / "v.safetensors")
    assert CMRM.load(tmp_path / "v.safetensors") == c


def test_gguf_layer0(rng, tmp_path):
    v = vectors(rng, zero_layer0=False)
    raises("cannot shift layer 0", CMRM(v).save, tmp_path / "a.gguf")
    # outside the configured range layer 0 is unused: dropped, as llama.cpp would
    CMRM(v, layers=(1, 4)).save(tmp_path / "b.gguf")
    back = CMRM.load(tmp_path / "b.gguf")
    assert not back.vectors[0].any() and np.array_equal(back.vectors[1:], v[1:])


def test_gguf_is_llama_cpp_control_vector(rng, tmp_path):
    n_layer, n_embd = 6, 10
    v = vectors(rng, n_layer, n_embd)
    CMRM(v, model_hint="llama").save(tmp_path / "v.gguf")
    r = gguf.GGUFReader(tmp_path / "v.gguf")
    assert r.get_field("general.architecture").contents() == "controlvector"
    assert r.get_field("controlvector.model_hint").contents() == "llama"
    count = r.get_field("controlvector.layer_count")
    assert count.types == [gguf.GGUFValueType.INT32] and count.contents() == n_layer - 1
    tensors = {t.name: t for t in r.tensors}
    assert sorted(tensors) == sorted(f"direction.{il}" for il in range(1, n_layer))  # no direction.0
    for il in range(1, n_layer):
        t = tensors[f"direction.{il}"]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [n_embd]
        assert np.array_equal(t.data, v[il])


def write_gguf(path, tensors, arch="controlvector", layer_count=None):
    w = gguf.GGUFWriter(path, arch=arch)
    if layer_count is not None:
        w.add_int32("controlvector.layer_count", layer_count)
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_missing_layers_are_zero(rng, tmp_path):
    a, b = rng.standard_normal((2, 7)).astype(np.float32)
    write_gguf(tmp_path / "p.gguf", {"direction.2": a, "direction.5": b}, layer_count=7)
    c = CMRM.load(tmp_path / "p.gguf")
    want = np.zeros((8, 7), np.float32)
    want[2], want[5] = a, b
    assert np.array_equal(c.vectors, want) and c.alpha == 1.0 and c.layers is None and c.when == "image"
    # without layer_count the highest direction decides
    write_gguf(tmp_path / "q.gguf", {"direction.3": a})
    assert CMRM.load(tmp_path / "q.gguf").vectors.shape == (4, 7)


@pytest.mark.parametrize("tensors, arch, match", [
    ({"direction.1": np.ones(4, np.float32)}, "llama", r"general.architecture is 'llama', expected 'controlvector'"),
    ({"direction.0": np.ones(4, np.float32)}, "controlvector", r"direction.0"),
    ({"blk.1": np.ones(4, np.float32)}, "controlvector", r"blk.1"),
    ({"direction.1": np.ones(4, np.float16)}, "controlvector", r"F32 and 1-D, got F16"),
    ({"direction.1": np.ones((2, 4), np.float32)}, "controlvector", r"1-D"),
    ({"direction.1": np.ones(4, np.float32), "direction.2": np.ones(5, np.float32)}, "controlvector",
     r"differ in length"),
    ({}, "controlvector", r"no direction"),
])
def test_gguf_rejects(tmp_path, tensors, arch, match):
    path = tmp_path / "bad.gguf"
    write_gguf(path, tensors, arch=arch)
    with pytest.raises(ValueError, match=match) as e:
        CMRM.load(path)
    assert str(path) in str(e.value)


# ----------------------------------------------------------------------------- cvec_buffer
def test_cvec_buffer_by_hand():
    v = np.array([[0, 0], [1, 2], [3, 4], [5, 6]], np.float32)
    data, start, end = CMRM(v, alpha=2.0).cvec_buffer(n_layer=4, n_embd=2)
    # llama.cpp adds data[n_embd*(il-1) : n_embd*il] to l_out-il, il = 1..3
    assert np.array_equal(data, np.array([-2, -4, -6, -8, -10, -12], np.float32))
    assert data.dtype == np.float32 and data.flags.c_contiguous and (start, end) == (1, 3)
    assert CMRM(v, alpha=-0.5, layers=(2, 2)).cvec_buffer(4, 2)[1:] == (2, 2)
    data, start, end = CMRM(v, layers=(0, 1)).cvec_buffer(4, 2)  # zero layer 0: clamped
    assert (start, end) == (1, 1) and np.array_equal(data, -v[1:].ravel())


def test_cvec_buffer_random(rng):
    v = vectors(rng, 7, 33)
    alpha = float(rng.uniform(-2, 2))
    data, start, end = CMRM(v, alpha=alpha).cvec_buffer(7, 33)
    assert data.shape == (6 * 33,) and (start, end) == (1, 6)
    np.testing.assert_array_equal(data.reshape(6, 33), v[1:] * np.float32(-alpha))


def test_cvec_buffer_layer0(rng):
    v = vectors(rng, zero_layer0=False)
    raises(r"layers \(0, 4\) include layer 0 .* llama.cpp cannot shift layer 0", CMRM(v).cvec_buffer, 5, 12)
    raises(r"layers \(0, 2\)", CMRM(v, layers=(0, 2)).cvec_buffer, 5, 12)
    assert CMRM(v, layers=(1, 4)).cvec_buffer(5, 12)[1:] == (1, 4)


@pytest.mark.parametrize("n_layer, n_embd", [(5, 13), (6, 12), (4, 12)])
def test_cvec_buffer_model_mismatch(rng, n_layer, n_embd):
    raises(rf"CMRM vectors are for n_embd=12, n_layer=5; the model has n_embd={n_embd}, n_layer={n_layer}",
           CMRM(vectors(rng)).cvec_buffer, n_layer, n_embd)


# ----------------------------------------------------------------------------- CASA
def test_casa_defaults(rng):
    c = CASA(casa_params(rng), layer=3)
    assert (c.threshold, c.on_unsafe, c.refusal_text, c.model_hint) == (0.5, "refuse", DEFAULT_REFUSAL, "")
    assert c.n_embd == 16 and all(c.params[k].dtype == np.float32 for k in ("Wk", "q", "w"))
    assert isinstance(c.params["b"], float)


@pytest.mark.parametrize("change, match", [
    ({"params": {"Wk": 1}}, r"params must be a dict with keys"),
    ({"params": [1]}, r"params must be a dict .* got list"),
    ({"Wk": np.zeros((16, 5), np.float32)}, r"shapes do not fit: Wk \[d, r\] = \[16, 5\], q \[heads, r\] = \[3, 4\]"),
    ({"w": np.zeros(15, np.float32)}, r"w \[d\] = \[15\]"),
    ({"q": np.zeros(4, np.float32)}, r"params\['q'\] must be a non-empty 2-D array"),
    ({"Wk": np.full((16, 4), np.nan, np.float32)}, r"params\['Wk'\]\[0, 0\] = nan is not finite"),
    ({"b": math.inf}, r"params\['b'\] must be a finite number, got inf"),
    ({"b": np.zeros(2)}, r"params\['b'\] must be a finite number"),
    ({"layer": -1}, r"layer must be an integer >= 0, got -1"),
    ({"layer": 1.5}, r"layer must be an integer >= 0, got 1.5"),
    ({"threshold": 1.5}, r"threshold must be in \[0, 1\], got 1.5"),
    ({"threshold": math.nan}, r"threshold must be a finite number, got nan"),
    ({"on_unsafe": "warn"}, r"on_unsafe must be one of .*'warn'"),
    ({"rows": "last"}, r"rows must be one of \('prompt', 'last-turn'\), got 'last'"),
    ({"refusal_text": ""}, r"refusal_text must be a non-empty string"),
    ({"model_hint": None}, r"model_hint must be a string, got None"),
])
def test_casa_rejects(rng, change, match):
    p = casa_params(rng)
    kwargs = {"params": p, "layer": 2}
    for k, v in change.items():
        (p if k in p else kwargs)[k] = v
    raises(match, CASA, **kwargs)


@pytest.mark.parametrize("ext", ["npz", "safetensors"])
def test_casa_round_trip(rng, tmp_path, ext):
    c = CASA(casa_params(rng), layer=int(rng.integers(0, 30)), threshold=float(rng.uniform()),
             on_unsafe="prefix", refusal_text="Non posso aiutarti — \u2603", model_hint="qwen2")
    path = tmp_path / f"casa.{ext}"
    c.save(path)
    back = CASA.load(path)
    assert back == c
    assert CASA.load(path, threshold=0.9).threshold == 0.9
    assert back != CASA.load(path, layer=c.layer + 1)
    assert back.rows == "prompt" and back != dataclasses.replace(c, rows="last-turn")
    dataclasses.replace(c, rows="last-turn").save(path)
    assert CASA.load(path).rows == "last-turn"


def test_casa_safetensors_layout(rng, tmp_path):
    from safetensors import safe_open

    c = CASA(casa_params(rng), layer=4)
    c.save(tmp_path / "c.safetensors")
    with safe_open(tmp_path / "c.safetensors", framework="np") as f:
        assert sorted(f.keys()) == ["Wk", "b", "q", "w"] and f.get_tensor("b").shape == (1,)
        meta = f.metadata()
    assert meta == {"layer": "4", "threshold": "0.5", "on_unsafe": "refuse", "refusal_text": DEFAULT_REFUSAL,
                    "model_hint": "", "n_embd": "16"}


def test_casa_file_inconsistent(rng, tmp_path):
    c = CASA(casa_params(rng), layer=1)
    np.savez(tmp_path / "x.npz", **{k: c.params[k] for k in ("Wk", "q", "w")}, b=np.zeros(1, np.float32),
             __metadata__=np.array('{"layer": "1", "threshold": "0.5", "on_unsafe": "refuse", '
                                   '"refusal_text": "no", "model_hint": "", "n_embd": "99"}'))
    raises(r"x.npz.* metadata n_embd=99", CASA.load, tmp_path / "x.npz")
    np.savez(tmp_path / "y.npz", Wk=c.params["Wk"])
    raises(r"y.npz.* no tensor 'q'", CASA.load, tmp_path / "y.npz")


def test_casa_check_model(rng):
    c = CASA(casa_params(rng), layer=5)
    c.check_model(16, 6)
    for n_embd, n_layer in [(17, 6), (16, 5)]:
        raises(rf"CASA parameters are for n_embd=16 \(layer 5\), the model has n_embd={n_embd}, n_layer={n_layer}",
               c.check_model, n_embd, n_layer)


def test_model_hint_mismatch_names_the_file(rng, tmp_path):
    hint = describe_model("qwen2", 5, 12, 1000)
    assert hint == "qwen2 n_layer=5 n_embd=12 n_vocab=1000"
    CMRM(vectors(rng), model_hint=hint).save(tmp_path / "v.gguf")
    c = CMRM.load(tmp_path / "v.gguf")
    assert c.source == str(tmp_path / "v.gguf") and c == CMRM(c.vectors, model_hint=hint)  # source not compared
    c.check_model(12, 5, "qwen2", 1000)
    c.check_model(12, 5)  # architecture and vocabulary unknown: only the shape is checked
    raises(r"CMRM vectors from '.*v.gguf' were fitted on another model: its model_hint is 'qwen2 n_layer=5 "
           r"n_embd=12 n_vocab=1000', the model is 'llama n_layer=5 n_embd=12 n_vocab=1000' \(arch differ\)",
           c.check_model, 12, 5, "llama", 1000)
    raises(r"n_vocab differ", c.check_model, 12, 5, "qwen2", 999)
    raises(r"CMRM vectors from '.*v.gguf' are for n_embd=12, n_layer=5; the model has n_embd=13",
           c.check_model, 13, 5)
    # llama.cpp's cvector-generator writes the architecture only; HF's "mistral" is llama.cpp's "llama"
    CMRM(vectors(rng), model_hint="llama").check_model(12, 5, "mistral", 7)
    raises(r"arch differ", CMRM(vectors(rng), model_hint="llama").check_model, 12, 5, "qwen2", 7)
    # free text (another tool's note) states nothing
    CMRM(vectors(rng), model_hint="gguf-some-model.gguf-123").check_model(12, 5, "qwen2", 7)
    CMRM(vectors(rng), model_hint="Fitted by hand n_vocab=x").check_model(12, 5, "qwen2", 7)
    casa = CASA(casa_params(rng), layer=5, model_hint=describe_model("qwen2", 6, 16, 50))
    casa.save(tmp_path / "c.safetensors")
    loaded = CASA.load(tmp_path / "c.safetensors")
    loaded.check_model(16, 6, "qwen2", 50)
    raises(r"CASA parameters from '.*c.safetensors' were fitted on another model.*\(n_layer, n_vocab differ\)",
           loaded.check_model, 16, 8, "qwen2", 51)


def test_casa_score_matches_op(rng):
    c = CASA(casa_params(rng, d=24, r=5, heads=2), layer=0)
    lengths = rng.integers(1, 20, size=int(rng.integers(1, 6)))
    Hs = [rng.standard_normal((n, 24)).astype(np.float32) for n in lengths]
    H = np.concatenate(Hs)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    p = c.params
    want = ops.casa_score(H, cu, p["Wk"], p["q"], p["w"], p["b"], backend="ref")
    for got in (c.score(Hs), c.score(H, cu), c.score(H, cu, backend="ref")):
        assert got.dtype == np.float32 and got.shape == (len(lengths),)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(c.score(H, cu), ops.casa_score(H, cu, p["Wk"], p["q"], p["w"], p["b"]))
    raises("cu_seqlens is required", c.score, H)
    raises("cu_seqlens must be None", c.score, Hs, cu)


def test_casa_score_torch(rng):
    torch = pytest.importorskip("torch")
    c = CASA(casa_params(rng), layer=0)
    Hs = [rng.standard_normal((n, 16)).astype(np.float32) for n in (3, 9)]
    got = c.score([torch.from_numpy(h) for h in Hs])
    assert isinstance(got, torch.Tensor)
    np.testing.assert_allclose(got.numpy(), c.score(Hs), rtol=1e-5, atol=1e-6)
    extra = CASA({**casa_params(rng), "w_last": rng.standard_normal(16).astype(np.float32),
                  "w_max": rng.standard_normal(16).astype(np.float32)}, layer=0)
    np.testing.assert_allclose(extra.score([torch.from_numpy(h) for h in Hs]).numpy(), extra.score(Hs),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ext", ["safetensors", "npz"])
@pytest.mark.parametrize("keys", [("w_last",), ("w_max",), ("w_last", "w_max")], ids="+".join)
def test_casa_last_row_and_max_weights(rng, tmp_path, ext, keys):
    """w_last and w_max are optional: scored with the op, kept through save and load, checked for shape."""
    p = {**casa_params(rng), **{k: rng.standard_normal(16).astype(np.float32) for k in keys}}
    c = CASA(p, layer=1)
    Hs = [rng.standard_normal((n, 16)).astype(np.float32) for n in (1, 7)]
    H, cu = np.concatenate(Hs), np.array([0, 1, 8])
    np.testing.assert_array_equal(c.score(Hs), ops.casa_score(H, cu, p["Wk"], p["q"], p["w"], p["b"], p.get("w_last"),
                                                              p.get("w_max")))
    assert not np.allclose(c.score(Hs), CASA(casa_params(rng), layer=1).score(Hs))
    c.save(tmp_path / f"c.{ext}")
    back = CASA.load(tmp_path / f"c.{ext}")
    assert back == c and set(back.params) == {"Wk", "q", "w", "b", *keys}
    raises(rf"{keys[-1]} \[15\], Wk's d = 16", CASA, {**p, keys[-1]: p[keys[-1]][:15]}, 1)
    raises(r"and optionally 'w_last', 'w_max'\), got \['Wk', 'b', 'q', 'w', 'w_first'",
           CASA, {**p, "w_first": p["w"]}, 1)


def test_casa_decide(rng):
    c = CASA(casa_params(rng), layer=0, threshold=0.4)
    got = c.decide(np.array([0.1, 0.4, 0.41, 0.99, np.nan], np.float32))
    assert got.dtype == bool and got.tolist() == [False, False, True, True, True]  # NaN: fail closed
    assert c.decide([0.5]).tolist() == [True]


# ----------------------------------------------------------------------------- file errors
def saved(rng, tmp_path, cls, ext):
    path = tmp_path / f"f.{ext}"
    (CASA(casa_params(rng), layer=1) if cls is CASA else CMRM(vectors(rng))).save(path)
    return path


LOADERS = [(CMRM, "gguf"), (CMRM, "safetensors"), (CASA, "safetensors"), (CASA, "npz")]


@pytest.mark.parametrize("cls, ext", LOADERS)
def test_missing_file(tmp_path, cls, ext):
    path = tmp_path / f"nope.{ext}"
    with pytest.raises(FileNotFoundError, match=str(path)):
        cls.load(path)


@pytest.mark.parametrize("cls, ext", LOADERS)
def test_corrupt_file(rng, tmp_path, cls, ext):
    data = saved(rng, tmp_path, cls, ext).read_bytes()
    cases = {"random": rng.bytes(int(rng.integers(1, 2 * len(data)))), "empty": b""}
    for cut in (len(data) // 2, len(data) - 1, len(data) - 5, 8):
        cases[f"cut{cut}"] = data[:cut]
    for name, content in cases.items():
        path = tmp_path / f"{name}.{ext}"
        path.write_bytes(content)
        with pytest.raises(ValueError, match="is not a valid") as e:
            cls.load(path)
        assert str(path) in str(e.value), name


NUMPY_ONLY = """
import sys
for m in ("torch", "gguf", "safetensors", "safetensors.numpy"):
    sys.modules[m] = None  # import fails
import numpy as np
from pyguard.methods import CASA, CMRM
c = CASA({"Wk": np.ones((4, 2)), "q": np.ones((1, 2)), "w": np.ones(4), "b": 0.5}, layer=0)
c.save(sys.argv[1])
assert CASA.load(sys.argv[1]) == c
for f in (lambda: CMRM([[0, 0], [1, 1]]).save(sys.argv[2]), lambda: c.save(sys.argv[3])):
    try:
        f()
        raise SystemExit("no ImportError")
    except ImportError as e:
        print(e)
"""


def test_numpy_only(tmp_path):
    import subprocess
    import sys

    paths = [str(tmp_path / f) for f in ("c.npz", "v.gguf", "c.safetensors")]
    out = subprocess.run([sys.executable, "-c", NUMPY_ONLY, *paths], capture_output=True, text=True, check=True).stdout
    assert "needs gguf: pip install 'pyguard[llama]'" in out and "needs safetensors: pip install 'pyguard[llama]'" in out


def test_wrong_kind_of_file(rng, tmp_path):
    raises(r"CMRM files end in .gguf or .safetensors, got '.*v.npz'", CMRM.load, tmp_path / "v.npz")
    raises(r"CASA files end in .safetensors or .npz", CASA(casa_params(rng), layer=0).save, tmp_path / "c.gguf")
    path = saved(rng, tmp_path, CMRM, "safetensors")  # a CMRM file read as CASA
    raises(rf"{path}.* no tensor 'Wk'", CASA.load, path)
