"""The README's main job until the runtimes land: run the three fused ops on every backend this
machine has, check each against the reference, and print a speed table."""
from __future__ import annotations

import os

import numpy as np

from . import ops
from .timing import interleaved


def _backends() -> list[str]:
    """(label, backend, isa) for the reference, C++ on each ISA, and Triton."""
    out = [("reference (numpy)", "ref", None)]
    try:
        C = ops.native()
        out += [(f"C++ {isa}", "cpp", isa) for isa in C.ISAS if C.isa_supported(isa)]
    except ImportError as e:
        print(f"note: {e}")
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
        ops.triton_kernels()
        where = "GPU" if torch.cuda.is_available() else "CPU interpreter"
        out.append((f"Triton ({where})", "triton", None))
    except ImportError as e:
        print(f"note: {e}")
    return out


def _cases(rng):
    """(name, call(backend) -> outputs) for one realistic size of each op."""
    B, V = 2, 151936  # a CoCA pair on Qwen2.5's vocabulary
    base = (rng.standard_normal((B, V)) * 3).astype(np.float32)
    safe = (base + rng.standard_normal((B, V))).astype(np.float32)
    out = np.empty_like(base)
    coca = lambda be: ops.coca_step(base, safe, 1.5, out=out, backend=be) + (out.copy(),)

    N, d = 300, 896  # prompt rows of a 0.5B model
    h0 = rng.standard_normal((N, d)).astype(np.float32)
    v = rng.standard_normal(d).astype(np.float32)
    mask = np.arange(N) >= 40  # rows from the first image position on
    h = h0.copy()

    def cmrm(be):
        h[...] = h0
        return (ops.cmrm_shift_(h, v, 1.0, row_mask=mask, backend=be).copy(),)

    lengths = [120, 300]
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    H = rng.standard_normal((cu[-1], d)).astype(np.float32)
    Wk = (rng.standard_normal((d, 64)) / np.sqrt(d)).astype(np.float32)
    q = rng.standard_normal((4, 64)).astype(np.float32)
    w = (rng.standard_normal(d) / np.sqrt(d)).astype(np.float32)
    casa = lambda be: (ops.casa_score(H, cu, Wk, q, w, 0.1, backend=be),)
    return [(f"coca_step  B={B} V={V}", coca), (f"cmrm_shift_ N={N} d={d}", cmrm),
            (f"casa_score  B=2 T={lengths} d={d}", casa)]


def run(seed: int = 0) -> int:
    """Prints the table; returns the number of backend results that disagree with the reference."""
    rng = np.random.default_rng(seed)
    backends = _backends()
    C = ops.native() if any(b == "cpp" for _, b, _ in backends) else None
    bad = 0
    print(f"{'op':34s} {'backend':24s} {'time':>10s} {'speed-up':>9s}  max |diff| vs reference")
    for name, call in _cases(rng):
        want = call("ref")
        fns = {}
        for label, be, isa in backends:
            fns[label] = (lambda be=be, isa=isa: (C.set_isa(isa) if isa else None, call(be))[1])
        got = {label: fn() for label, fn in fns.items()}
        # The Triton interpreter is too slow to time side by side; it is run once above.
        timed = {k: f for k, f in fns.items() if "interpreter" not in k}
        times = interleaved(timed, min_time=0.3)
        ref_t = times[backends[0][0]]
        for i, (label, _, _) in enumerate(backends):
            diff = max(float(np.nanmax(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64))))
                       for g, w in zip(got[label], want))
            ok = diff <= 1e-3
            bad += not ok
            t = times.get(label)
            tt = f"{t * 1e3:8.3f}ms" if t else "  (once)  "
            sp = f"{ref_t / t:8.1f}x" if t else " " * 9
            print(f"{name if i == 0 else '':34s} {label:24s} {tt:>10s} {sp}  {diff:.2e}{'' if ok else '  MISMATCH'}")
    if C is not None:
        C.set_isa(C.ISAS[-1] if C.isa_supported(C.ISAS[-1]) else "generic")
    print("\nall backends agree with the reference" if not bad else f"\n{bad} results disagree")
    return bad
