"""Images through llama.cpp's mtmd: an mmproj beside the text model turns a prompt with media
markers into segments, text tokens and encoded image chunks."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from pathlib import Path

from llama_cpp import llama_cpp as L
from llama_cpp import mtmd_cpp as M

from .engine import Engine

MARKER = M.mtmd_default_marker().decode()


@dataclass(frozen=True)
class Image:
    """An image chunk of a tokenized prompt: ``index`` of the image in the request."""

    index: int
    chunk: object = field(default=None, compare=False)  # mtmd_input_chunk pointer (owned by Segments)
    n_pos: int = field(default=0, compare=False)


class Segments(list):
    """A tokenized multimodal prompt: a list of ``list[int]`` (text) and ``Image`` items; keeps
    the native chunks alive until ``free()``."""

    chunks = None
    bitmaps = ()

    def free(self):
        if self.chunks is not None:
            M.mtmd_input_chunks_free(self.chunks)
            self.chunks = None
        for b in self.bitmaps:
            M.mtmd_bitmap_free(b)
        self.bitmaps = ()


class Vision:
    """An mtmd context for ``engine``'s model, from an mmproj GGUF."""

    def __init__(self, mmproj_path: str | Path, engine: Engine, n_threads: int):
        path = Path(mmproj_path)
        if not path.is_file():
            raise FileNotFoundError(f"mmproj file not found: {path}")
        p = M.mtmd_context_params_default()
        p.use_gpu = False
        p.n_threads = n_threads
        p.print_timings = False
        self.ctx = M.mtmd_init_from_file(str(path).encode(), engine.model, p)
        if not self.ctx:
            raise ValueError(f"cannot load mmproj {path}: not a projector llama.cpp reads, or its "
                             f"output size does not match the model's n_embd = {engine.n_embd}")
        self.engine = engine

    def tokenize(self, text: str, images: list[bytes], add_special: bool) -> Segments:
        segs = Segments()
        bitmaps = []
        try:
            for i, data in enumerate(images):
                buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
                bmp = M.mtmd_helper_bitmap_init_from_buf(self.ctx, buf, len(data), False)
                if not bmp:
                    raise ValueError(f"image {i} cannot be decoded (PNG, JPEG, BMP, GIF, PPM... are read)")
                bitmaps.append(bmp)
            segs.bitmaps = tuple(bitmaps)
            segs.chunks = M.mtmd_input_chunks_init()
            inp = M.mtmd_input_text(text=text.encode(), text_len=len(text.encode()), add_special=add_special,
                                    parse_special=True)
            arr = (M.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            rc = M.mtmd_tokenize(self.ctx, segs.chunks, ctypes.byref(inp), arr, len(bitmaps))
            if rc != 0:
                raise ValueError(f"mtmd could not tokenize the prompt with {len(bitmaps)} image(s) (code {rc})")
            n_img = 0
            for c in range(M.mtmd_input_chunks_size(segs.chunks)):
                chunk = M.mtmd_input_chunks_get(segs.chunks, c)
                if M.mtmd_input_chunk_get_type(chunk) == M.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t()
                    toks = M.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    segs.append([toks[i] for i in range(n.value)])
                else:
                    segs.append(Image(n_img, chunk, M.mtmd_input_chunk_get_n_pos(chunk)))
                    n_img += 1
        except BaseException:
            segs.free()
            raise
        return segs

    def eval_image(self, image: Image, pos: int, seq: int) -> int:
        """Encode and decode an image chunk into sequence ``seq`` at ``pos``; returns the next pos."""
        new = L.llama_pos(0)
        rc = M.mtmd_helper_eval_chunk_single(self.ctx, self.engine.ctx, image.chunk, pos, seq,
                                             self.engine.n_batch, False, ctypes.byref(new))
        if rc != 0:
            raise RuntimeError(f"mtmd failed to evaluate image {image.index} (code {rc})")
        return new.value

    def close(self):
        if getattr(self, "ctx", None):
            M.mtmd_free(self.ctx)
            self.ctx = None
