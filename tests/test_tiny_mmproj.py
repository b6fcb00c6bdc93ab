"""End-to-end multimodal plumbing on llama.cpp's ``mtmd`` (llama-cpp-python low-level bindings), with
the generated tiny llava mmproj of ``tiny_mmproj.py`` beside the SmolLM2-135M text GGUF.

Call sequence exercised (llama-cpp-python 0.3.36):
  llama_backend_init(); llama_model_load_from_file(path: bytes, llama_model_default_params())
  mtmd_context_params_default() -> .use_gpu = False, .n_threads = 2
  mtmd_init_from_file(mmproj: bytes, model, params) -> ctx or None
  mtmd_helper_bitmap_init_from_file(ctx, image: bytes, False) -> bitmap or None   (stb_image)
  mtmd_bitmap_init(nx, ny, (c_uint8 * (nx*ny*3)) RGB bytes)                       (raw pixels)
  mtmd_input_chunks_init(); mtmd_tokenize(ctx, chunks, byref(mtmd_input_text), (c_void_p * n)(bmps), n)
  llama_init_from_model(model, llama_context_default_params())
  mtmd_helper_eval_chunks(ctx, lctx, chunks, n_past: int, seq_id: int, n_batch: int,
                          logits_last: bool, byref(llama_pos())) -> 0; the new n_past comes back
                          through the llama_pos out-parameter
  llama_get_logits_ith(lctx, -1)
  frees: mtmd_input_chunks_free, mtmd_bitmap_free, mtmd_free, llama_free, llama_model_free
"""
from __future__ import annotations

import ctypes
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from tiny_mmproj import image_pixels, n_image_tokens, write_test_image, write_tiny_mmproj

L = pytest.importorskip("llama_cpp.llama_cpp")
M = pytest.importorskip("llama_cpp.mtmd_cpp")

N_EMBD = 576  # SmolLM2-135M
N_THREADS = 2
N_BATCH = 64
IMG_TOKENS = n_image_tokens(32, 8)  # defaults of write_tiny_mmproj: 16


def _smollm2_path() -> Path | None:
    candidates = [Path(__file__).resolve().parents[1] / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"]
    try:
        from pyguard.models import model_path

        candidates.append(model_path("smollm2-135m"))
    except Exception:  # pragma: no cover - pyguard.models unavailable
        pass
    return next((p for p in candidates if p.is_file()), None)


@pytest.fixture(scope="module")
def model():
    path = _smollm2_path()
    if path is None:
        pytest.skip("SmolLM2-135M-Instruct.Q4_1.gguf not found (run `pyguard models fetch smollm2-135m`)")
    L.llama_backend_init()
    params = L.llama_model_default_params()
    params.n_gpu_layers = 0
    m = L.llama_model_load_from_file(str(path).encode(), params)
    assert m, f"llama_model_load_from_file failed for {path}"
    assert L.llama_model_n_embd(m) == N_EMBD
    yield m
    L.llama_model_free(m)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mmproj")
    return {
        "mmproj": write_tiny_mmproj(d / "tiny-mmproj.gguf", n_embd_text=N_EMBD),
        "mmproj2": write_tiny_mmproj(d / "tiny-mmproj-2l.gguf", n_embd_text=N_EMBD, layers=2),
        "img0": write_test_image(d / "img0.png", seed=0),
        "img1": write_test_image(d / "img1.png", seed=1),
        "img0_ppm": write_test_image(d / "img0.ppm", seed=0),
    }


def _mtmd_params():
    p = M.mtmd_context_params_default()
    p.use_gpu = False
    p.n_threads = N_THREADS
    p.print_timings = False
    return p


def _init(mmproj: Path, model):
    ctx = M.mtmd_init_from_file(str(mmproj).encode(), model, _mtmd_params())
    assert ctx, f"mtmd_init_from_file returned NULL for {mmproj}"
    return ctx


def _bitmap_from_file(mctx, path: Path):
    bmp = M.mtmd_helper_bitmap_init_from_file(mctx, str(path).encode(), False)
    assert bmp, f"mtmd_helper_bitmap_init_from_file failed for {path}"
    return bmp


def _bitmap_from_pixels(rgb: np.ndarray):
    ny, nx, _ = rgb.shape
    buf = (ctypes.c_uint8 * rgb.size).from_buffer_copy(np.ascontiguousarray(rgb, np.uint8).tobytes())
    bmp = M.mtmd_bitmap_init(nx, ny, buf)
    assert bmp
    return bmp


def _tokenize(mctx, prompt: bytes, bitmaps):
    chunks = M.mtmd_input_chunks_init()
    text = M.mtmd_input_text(text=prompt, text_len=len(prompt), add_special=True, parse_special=True)
    arr = (M.mtmd_bitmap_p_ctypes * max(len(bitmaps), 1))(*bitmaps)
    rc = M.mtmd_tokenize(mctx, chunks, ctypes.byref(text), arr, len(bitmaps))
    if rc != 0:
        M.mtmd_input_chunks_free(chunks)
        raise AssertionError(f"mtmd_tokenize returned {rc}")
    return chunks


def _chunks(chunks):
    return [M.mtmd_input_chunks_get(chunks, i) for i in range(M.mtmd_input_chunks_size(chunks))]


def _prompt(n_images: int = 1) -> bytes:
    marker = M.mtmd_default_marker()
    return (b"<|im_start|>user\n" + b"".join([marker] * n_images)
            + b"\nWhat is in this image?<|im_end|>\n<|im_start|>assistant\n")


def _eval_logits(model, mctx, chunks) -> tuple[np.ndarray, int]:
    """Evaluate all chunks in a fresh llama context; returns (last-token logits, new n_past)."""
    cp = L.llama_context_default_params()
    cp.n_ctx = 256
    cp.n_batch = N_BATCH
    cp.n_ubatch = N_BATCH
    cp.n_threads = N_THREADS
    cp.n_threads_batch = N_THREADS
    lctx = L.llama_init_from_model(model, cp)
    assert lctx
    try:
        new_n_past = L.llama_pos(-1)
        rc = M.mtmd_helper_eval_chunks(mctx, lctx, chunks, 0, 0, N_BATCH, True, ctypes.byref(new_n_past))
        assert rc == 0, f"mtmd_helper_eval_chunks returned {rc}"
        n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
        ptr = L.llama_get_logits_ith(lctx, -1)
        assert ptr
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy(), new_n_past.value
    finally:
        L.llama_free(lctx)


def _image_embeddings(mctx, bitmap) -> np.ndarray:
    """Encode one image (CLIP + projector only) and return its (n_tokens, n_embd) embeddings."""
    chunks = _tokenize(mctx, M.mtmd_default_marker(), [bitmap])
    try:
        (chunk,) = [c for c in _chunks(chunks) if M.mtmd_input_chunk_get_type(c) == M.MTMD_INPUT_CHUNK_TYPE_IMAGE]
        n = M.mtmd_input_chunk_get_n_tokens(chunk)
        assert M.mtmd_encode_chunk(mctx, chunk) == 0
        return np.ctypeslib.as_array(M.mtmd_get_output_embd(mctx), shape=(n, N_EMBD)).copy()
    finally:
        M.mtmd_input_chunks_free(chunks)


# ---------------------------------------------------------------------------------------------
# the writers alone (no llama.cpp)


def test_mmproj_file_layout(tmp_path):
    from gguf import GGUFReader, GGUFValueType

    p = write_tiny_mmproj(tmp_path / "a.gguf")
    assert p.stat().st_size < 512 * 1024
    r = GGUFReader(p)

    def val(key):
        f = r.fields[key]
        return f.contents()

    assert val("general.architecture") == "clip"
    assert val("clip.projector_type") == "mlp"
    assert val("clip.has_vision_encoder") is True
    for key, want in [("clip.vision.image_size", 32), ("clip.vision.patch_size", 8),
                      ("clip.vision.embedding_length", 32), ("clip.vision.feed_forward_length", 128),
                      ("clip.vision.block_count", 1), ("clip.vision.attention.head_count", 2),
                      ("clip.vision.projection_dim", N_EMBD)]:
        assert r.fields[key].types == [GGUFValueType.UINT32], key  # clip.cpp reads them with get_u32
        assert val(key) == want, key
    assert r.fields["clip.vision.attention.layer_norm_epsilon"].types == [GGUFValueType.FLOAT32]
    assert r.fields["clip.vision.image_mean"].types == [GGUFValueType.ARRAY, GGUFValueType.FLOAT32]
    assert len(val("clip.vision.image_std")) == 3

    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}  # ggml ne order
    assert shapes["v.patch_embd.weight"] == (8, 8, 3, 32)
    assert shapes["v.position_embd.weight"] == (32, IMG_TOKENS + 1)
    assert shapes["v.class_embd"] == (32,)
    assert shapes["v.blk.0.ffn_up.weight"] == (32, 128)
    assert shapes["v.blk.0.ffn_down.weight"] == (128, 32)
    assert shapes["mm.0.weight"] == (32, 64)
    assert shapes["mm.2.weight"] == (64, N_EMBD)  # clip_n_mmproj_embd = ne[1] = text n_embd
    assert "v.post_ln.weight" not in shapes

    # deterministic per seed; optional tensors do not change the others
    assert write_tiny_mmproj(tmp_path / "b.gguf").read_bytes() == p.read_bytes()
    assert write_tiny_mmproj(tmp_path / "c.gguf", seed=1).read_bytes() != p.read_bytes()
    r2 = GGUFReader(write_tiny_mmproj(tmp_path / "d.gguf", post_ln=True, class_embedding=False))
    t1 = {t.name: np.array(t.data) for t in r.tensors}
    t2 = {t.name: np.array(t.data) for t in r2.tensors}
    np.testing.assert_array_equal(t1["mm.2.weight"], t2["mm.2.weight"])
    assert "v.post_ln.weight" in t2 and "v.class_embd" not in t2


@pytest.mark.parametrize("suffix", [".png", ".ppm"])
def test_test_image_encoding(tmp_path, suffix):
    p = write_test_image(tmp_path / f"x{suffix}", size=20, seed=3)
    data = p.read_bytes()
    want = image_pixels(20, 3)
    if suffix == ".ppm":
        header = b"P6\n20 20\n255\n"
        assert data.startswith(header)
        got = np.frombuffer(data[len(header):], np.uint8).reshape(20, 20, 3)
    else:
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        pos, idat, ihdr = 8, b"", None
        while pos < len(data):
            (n,) = struct.unpack(">I", data[pos:pos + 4])
            tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
            assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(tag + body)
            if tag == b"IHDR":
                ihdr = struct.unpack(">IIBBBBB", body)
            elif tag == b"IDAT":
                idat += body
            pos += 12 + n
        assert ihdr == (20, 20, 8, 2, 0, 0, 0)
        rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(20, 1 + 20 * 3)
        assert (rows[:, 0] == 0).all()
        got = rows[:, 1:].reshape(20, 20, 3)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(image_pixels(20, 3), image_pixels(20, 4))


def test_caps_from_file(files):
    caps = M.mtmd_get_cap_from_file(str(files["mmproj"]).encode())
    assert caps.inp_vision and not caps.inp_audio


# ---------------------------------------------------------------------------------------------
# llama.cpp end to end


def test_tokenize_chunks(model, files):
    mctx = _init(files["mmproj"], model)
    bmp = chunks = None
    try:
        assert M.mtmd_support_vision(mctx) and not M.mtmd_support_audio(mctx)
        assert not M.mtmd_decode_use_mrope(mctx)
        bmp = _bitmap_from_file(mctx, files["img0"])
        assert (M.mtmd_bitmap_get_nx(bmp), M.mtmd_bitmap_get_ny(bmp)) == (48, 48)
        assert M.mtmd_bitmap_get_n_bytes(bmp) == 48 * 48 * 3
        assert not M.mtmd_bitmap_is_audio(bmp)

        chunks = _tokenize(mctx, _prompt(), [bmp])
        parts = _chunks(chunks)
        types = [M.mtmd_input_chunk_get_type(c) for c in parts]
        assert types == [M.MTMD_INPUT_CHUNK_TYPE_TEXT, M.MTMD_INPUT_CHUNK_TYPE_IMAGE,
                         M.MTMD_INPUT_CHUNK_TYPE_TEXT]
        n_tok = [M.mtmd_input_chunk_get_n_tokens(c) for c in parts]
        assert n_tok[1] == IMG_TOKENS and n_tok[0] > 0 and n_tok[2] > 0
        assert [M.mtmd_input_chunk_get_n_pos(c) for c in parts] == n_tok  # no M-RoPE: 1 pos/token
        assert M.mtmd_helper_get_n_tokens(chunks) == sum(n_tok)
        assert M.mtmd_helper_get_n_pos(chunks) == sum(n_tok)

        img = M.mtmd_input_chunk_get_tokens_image(parts[1])
        assert img and M.mtmd_image_tokens_get_n_tokens(img) == IMG_TOKENS
        assert M.mtmd_image_tokens_get_n_pos(img) == IMG_TOKENS
        n = ctypes.c_size_t(0)
        toks = M.mtmd_input_chunk_get_tokens_text(parts[0], ctypes.byref(n))
        assert n.value == n_tok[0] and toks
        assert M.mtmd_input_chunk_get_tokens_image(parts[0]) is None

        # one marker per bitmap: a mismatch is an error, not a crash
        bad = M.mtmd_input_chunks_init()
        t = M.mtmd_input_text(text=b"no marker", text_len=9, add_special=True, parse_special=True)
        assert M.mtmd_tokenize(mctx, bad, ctypes.byref(t), (M.mtmd_bitmap_p_ctypes * 1)(bmp), 1) != 0
        M.mtmd_input_chunks_free(bad)
    finally:
        if chunks:
            M.mtmd_input_chunks_free(chunks)
        if bmp:
            M.mtmd_bitmap_free(bmp)
        M.mtmd_free(mctx)


@pytest.mark.parametrize("which", ["mmproj", "mmproj2"], ids=["0-blocks-run", "1-block-runs"])
def test_eval_chunks_logits(model, files, which):
    mctx = _init(files[which], model)
    owned = []
    try:
        results = {}
        for name in ("img0", "img1", "img0"):
            bmp = _bitmap_from_file(mctx, files[name])
            owned.append(bmp)
            chunks = _tokenize(mctx, _prompt(), [bmp])
            try:
                n_pos = M.mtmd_helper_get_n_pos(chunks)
                logits, n_past = _eval_logits(model, mctx, chunks)
            finally:
                M.mtmd_input_chunks_free(chunks)
            assert n_past == n_pos
            assert np.isfinite(logits).all()
            assert logits.std() > 0
            if name in results:  # same image again: same logits
                np.testing.assert_allclose(logits, results[name], rtol=1e-4, atol=1e-4)
            results[name] = logits
        diff = np.abs(results["img0"] - results["img1"]).max()
        assert diff > 1e-3, "a different image must change the next-token logits"
    finally:
        for b in owned:
            M.mtmd_bitmap_free(b)
        M.mtmd_free(mctx)


def test_image_embeddings(model, files):
    mctx = _init(files["mmproj"], model)
    owned = []

    def embed(bmp):
        owned.append(bmp)
        return _image_embeddings(mctx, bmp)

    try:
        from_png = embed(_bitmap_from_file(mctx, files["img0"]))
        assert from_png.shape == (IMG_TOKENS, N_EMBD) and np.isfinite(from_png).all()
        # the same pixels through the PPM loader and as raw RGB bytes: identical embeddings
        np.testing.assert_array_equal(embed(_bitmap_from_file(mctx, files["img0_ppm"])), from_png)
        np.testing.assert_array_equal(embed(_bitmap_from_pixels(image_pixels(48, 0))), from_png)
        other = embed(_bitmap_from_file(mctx, files["img1"]))
        assert np.abs(other - from_png).max() > 1e-3
        # the tokens differ from each other (position embeddings and content)
        assert np.abs(from_png - from_png.mean(axis=0)).max() > 1e-3
    finally:
        for b in owned:
            M.mtmd_bitmap_free(b)
        M.mtmd_free(mctx)


@pytest.mark.parametrize("case", ["random-bytes", "magic-then-garbage", "wrong-n-embd", "missing-file"])
def test_bad_mmproj_returns_null(model, tmp_path, case):
    p = tmp_path / "bad.gguf"
    rng = np.random.default_rng(1234)
    if case == "random-bytes":
        p.write_bytes(rng.bytes(4096))
    elif case == "magic-then-garbage":
        p.write_bytes(b"GGUF" + rng.bytes(4092))
    elif case == "wrong-n-embd":
        write_tiny_mmproj(p, n_embd_text=64)  # loads as CLIP, but 64 != SmolLM2's 576
    assert M.mtmd_init_from_file(str(p).encode(), model, _mtmd_params()) is None
