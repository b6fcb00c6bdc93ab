"""A tiny, randomly initialised LLaVA-style multimodal projector GGUF ("mmproj") for tests.

No vision-language weights exist on the project's machines, so multimodal tests pair the text GGUF
(SmolLM2-135M, n_embd 576) with this file, written by the ``gguf`` package. llama.cpp's ``mtmd``
library loads it like a real ``llava`` mmproj (projector type ``mlp``): CLIP ViT encoder + 2-layer MLP.

What llama.cpp's CLIP loader (``tools/mtmd/clip.cpp``, ``clip-impl.h``, ``models/llava.cpp``) needs:

metadata (types matter: ``gguf_get_val_u32`` and friends abort on a type mismatch)
  general.architecture                   str   "clip" (written by GGUFWriter; not read by clip.cpp)
  clip.has_vision_encoder                bool  true, else no vision context is created
  clip.projector_type                    str   "mlp" (PROJECTOR_TYPE_MLP -> clip_graph_llava)
  clip.vision.image_size                 u32   required (get_u32, throws "Key not found")
  clip.vision.patch_size                 u32   required
  clip.vision.embedding_length           u32   required (ViT width)
  clip.vision.feed_forward_length        u32   required
  clip.vision.block_count                u32   required
  clip.vision.projection_dim             u32   required (only logged for mlp)
  clip.vision.attention.head_count       u32   required
  clip.vision.attention.layer_norm_epsilon f32 required
  clip.vision.image_mean / image_std     f32[3] required (the llama.cpp in llama-cpp-python 0.3.36
                                               fails the load; older clip.cpp hit a GGML_ASSERT, abort())
  clip.use_gelu                          bool  optional; false -> quick_gelu in the ViT FFN (HF CLIP's
                                               default "quick_gelu"), true -> gelu. The projector always
                                               uses gelu.
  clip.vision.feature_layer              i32[] optional; see ``feature_layer`` below

A missing required key makes ``mtmd_init_from_file`` log "Key not found: ..." and return NULL.

tensors (numpy shapes; ggml's ne is the reverse). F32 everywhere works on the CPU backend (F16
matrices too). Only attn_out/ffn_up/ffn_down of every block are checked at load ("unable to find
tensor"); a missing tensor that the graph uses (patch_embd, position_embd, q/k/v of an evaluated
block, mm.0.*, mm.2.*) is NOT checked and segfaults inside ``mtmd_init_from_file`` (warmup graph).
  v.patch_embd.weight     (width, 3, patch, patch)   conv2d kernel, required by the llava graph
  v.patch_embd.bias       (width,)                   optional (CLIP has none)
  v.class_embd            (width,)                   optional; llava graph concatenates it AFTER the
                                                     patches (ggml-org/llama.cpp#25814)
  v.position_embd.weight  (n_patches + 1, width)     rows gathered by position 0..n_pos-1
  v.pre_ln.{weight,bias}  (width,)                   optional, CLIP's pre_layrnorm
  v.post_ln.{weight,bias} (width,)                   optional; HF LLaVA applies none to the selected
                                                     hidden state, so it is off by default
  v.blk.{i}.ln1/ln2.{weight,bias}        (width,)
  v.blk.{i}.attn_q/attn_k/attn_v/attn_out.{weight (width, width), bias (width,)}
                                         attn_out.weight is required at load; q/k/v are needed by
                                         the graph whenever block i actually runs
  v.blk.{i}.ffn_up.{weight (ff, width), bias (ff,)}      required
  v.blk.{i}.ffn_down.{weight (width, ff), bias (width,)} required
                                         (ff must differ from width: for mlp the loader swaps up/down
                                         when ffn_down's ne[0] == width, for old converted files)
  mm.0.{weight (hidden, width), bias (hidden,)}          projector layer 1, then gelu
  mm.2.{weight (n_embd_text, hidden), bias (n_embd_text,)}  projector layer 2;
                                         clip_n_mmproj_embd() = mm.2.weight ne[1] must equal the text
                                         model's n_embd or mtmd_init_from_file fails

Graph facts worth knowing (models/llava.cpp): by default the llava graph runs only the first
``block_count - 1`` blocks (LLaVA's "second-to-last layer" feature), so with ``layers=1`` no
transformer block is evaluated: patch embedding -> CLS appended as the LAST row -> + position rows
0..n_pos-1 -> pre_ln -> [post_ln] -> rows 1..n_patches (so patch 0 is dropped and CLS kept:
ggml-org/llama.cpp#25814) -> mm.0 -> gelu -> mm.2. Pass ``feature_layer=k`` to evaluate k blocks
instead (writes ``clip.vision.feature_layer = [k]``; post_ln only applies when k == layers). One
image gives ``(image_size // patch_size) ** 2`` tokens; the image is padded to a square and resized
to ``image_size`` first. ``clip.has_llava_projector`` / ``clip.has_audio_encoder`` /
``general.file_type`` are written like real files do but are not needed.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = ["write_tiny_mmproj", "write_test_image", "image_pixels", "n_image_tokens"]

# CLIP's (OpenAI) normalisation, as real llava mmproj files carry it.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def n_image_tokens(image_size: int = 32, patch_size: int = 8) -> int:
    """Tokens one image becomes with the llava ``mlp`` projector."""
    return (image_size // patch_size) ** 2


def write_tiny_mmproj(
    path,
    n_embd_text: int = 576,
    image_size: int = 32,
    patch_size: int = 8,
    width: int = 32,
    layers: int = 1,
    heads: int = 2,
    seed: int = 0,
    *,
    ff: int | None = None,
    proj_hidden: int = 64,
    use_gelu: bool = False,
    class_embedding: bool = True,
    post_ln: bool = False,
    feature_layer: int | None = None,
    f16: bool = False,
) -> Path:
    """Write a random llava ``mlp`` mmproj GGUF whose image embeddings have ``n_embd_text`` values.

    ``ff`` is the ViT FFN width (default ``4 * width``), ``proj_hidden`` the projector's hidden size
    (HF LLaVA uses the text width; 64 keeps the file small), ``feature_layer`` the number of blocks
    the llava graph evaluates (default: llama.cpp's ``layers - 1``), ``f16`` stores the matrices as
    float16 (norms, biases and embeddings stay float32). Returns the path.
    """
    from gguf import GGUFWriter

    if image_size % patch_size:
        raise ValueError("image_size must be a multiple of patch_size")
    if width % heads:
        raise ValueError("width must be a multiple of heads")
    if layers < 1:
        raise ValueError("layers must be >= 1")
    ff = 4 * width if ff is None else ff
    if ff == width:
        raise ValueError("ff must differ from width (llama.cpp swaps ffn up/down otherwise)")
    if feature_layer is not None and not 0 <= feature_layer <= layers:
        raise ValueError("feature_layer must be in [0, layers]")

    path = Path(path)
    n_patches = (image_size // patch_size) ** 2
    n_pos = n_patches + (1 if class_embedding else 0)
    mat_dtype = np.float16 if f16 else np.float32
    tensors: dict[str, np.ndarray] = {}

    def rand(name: str, shape: tuple[int, ...]) -> np.ndarray:
        # one stream per tensor name: optional tensors do not shift the values of the others
        return np.random.default_rng([seed, zlib.crc32(name.encode())]).standard_normal(shape)

    def mat(name: str, rows: int, cols: int) -> None:  # nn.Linear weight, scaled by 1/sqrt(fan_in)
        tensors[name] = (rand(name, (rows, cols)) / np.sqrt(cols)).astype(mat_dtype)

    def vec(name: str, n: int, scale: float = 0.02, base: float = 0.0) -> None:
        tensors[name] = (base + scale * rand(name, (n,))).astype(np.float32)

    def norm(prefix: str) -> None:
        vec(f"{prefix}.weight", width, 0.05, 1.0)
        vec(f"{prefix}.bias", width)

    name = "v.patch_embd.weight"  # conv2d kernel (out, in, kh, kw), no bias as in CLIP
    fan_in = 3 * patch_size * patch_size
    tensors[name] = (rand(name, (width, 3, patch_size, patch_size)) / np.sqrt(fan_in)).astype(mat_dtype)
    if class_embedding:
        vec("v.class_embd", width, 1.0)
    name = "v.position_embd.weight"
    tensors[name] = (0.5 * rand(name, (n_pos, width))).astype(np.float32)
    norm("v.pre_ln")
    for i in range(layers):
        p = f"v.blk.{i}"
        norm(f"{p}.ln1")
        for part in ("attn_q", "attn_k", "attn_v", "attn_out"):
            mat(f"{p}.{part}.weight", width, width)
            vec(f"{p}.{part}.bias", width)
        norm(f"{p}.ln2")
        mat(f"{p}.ffn_up.weight", ff, width)
        vec(f"{p}.ffn_up.bias", ff)
        mat(f"{p}.ffn_down.weight", width, ff)
        vec(f"{p}.ffn_down.bias", width)
    if post_ln:
        norm("v.post_ln")
    mat("mm.0.weight", proj_hidden, width)
    vec("mm.0.bias", proj_hidden)
    mat("mm.2.weight", n_embd_text, proj_hidden)
    vec("mm.2.bias", n_embd_text)

    w = GGUFWriter(str(path), "clip")  # sets general.architecture = "clip"
    w.add_string("general.name", "pyguard-tiny-mmproj")
    w.add_string("general.description", f"random llava mlp projector for tests (seed {seed})")
    w.add_uint32("general.file_type", 1 if f16 else 0)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_audio_encoder", False)
    w.add_bool("clip.has_llava_projector", True)
    w.add_string("clip.projector_type", "mlp")
    w.add_bool("clip.use_gelu", bool(use_gelu))
    w.add_uint32("clip.vision.image_size", image_size)
    w.add_uint32("clip.vision.patch_size", patch_size)
    w.add_uint32("clip.vision.embedding_length", width)
    w.add_uint32("clip.vision.feed_forward_length", ff)
    w.add_uint32("clip.vision.block_count", layers)
    w.add_uint32("clip.vision.projection_dim", n_embd_text)
    w.add_uint32("clip.vision.attention.head_count", heads)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    w.add_array("clip.vision.image_mean", [float(x) for x in CLIP_MEAN])
    w.add_array("clip.vision.image_std", [float(x) for x in CLIP_STD])
    if feature_layer is not None:
        w.add_array("clip.vision.feature_layer", [int(feature_layer)])
    for name, t in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 array as a PNG (8-bit truecolour, no filtering)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b""))


def image_pixels(size: int = 48, seed: int = 0) -> np.ndarray:
    """The (size, size, 3) uint8 pixels ``write_test_image`` writes: a seeded gradient plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / max(size - 1, 1)
    phase = rng.uniform(0, 2 * np.pi, 3)
    base = np.stack([np.sin(2 * np.pi * (xx + yy) + phase[c]) for c in range(3)], axis=-1)
    img = 127.5 + 80 * base + 40 * rng.standard_normal((size, size, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def write_test_image(path, size: int = 48, seed: int = 0) -> Path:
    """Write a small RGB image that stb_image decodes: PNG, or binary PPM (P6) if ``path`` ends in
    ``.ppm``. Standard library + numpy only. Returns the path."""
    path = Path(path)
    rgb = image_pixels(size, seed)
    if path.suffix.lower() == ".ppm":
        path.write_bytes(b"P6\n%d %d\n255\n" % (size, size) + rgb.tobytes())
    else:
        path.write_bytes(_png_bytes(rgb))
    return path
