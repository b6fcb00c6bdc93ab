"""Compiles the Triton kernels for real GPUs (sm_80, sm_90) down to cubin with Triton's bundled
toolchain; no GPU needed. Run as a script (without TRITON_INTERPRET) it prints one JSON line per
case; tests/test_triton_compile.py drives it."""
import json
import sys

CASES = []
for arch in (80, 90):
    for dtype in ("fp32", "bf16", "fp16"):
        for has_out, has_force in ((True, True), (False, False)):
            CASES.append((f"coca-sm{arch}-{dtype}-out{int(has_out)}-force{int(has_force)}", arch, "coca", "_coca_step_kernel",
                          {"base_ptr": f"*{dtype}", "safe_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "alpha_ptr": "*fp32",
                           "temp_ptr": "*fp32", "force_ptr": "*i64", "token_ptr": "*i64", "kl_ptr": "*fp32", "V": "i32"},
                          {"HAS_OUT": has_out, "HAS_FORCE": has_force, "BLOCK": 1024}))
    for dtype in ("fp32", "bf16"):
        CASES.append((f"cmrm-sm{arch}-{dtype}", arch, "cmrm", "_cmrm_shift_kernel",
                      {"h_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "mask_ptr": "*u8", "alpha": "fp32", "d": "i32"},
                      {"HAS_MASK": True, "BLOCK": 1024}))
    for has_last, has_max in ((False, False), (True, False), (True, True)):
        CASES.append((f"casa-sm{arch}-last{int(has_last)}-max{int(has_max)}", arch, "casa", "_casa_score_kernel",
                      {"H_ptr": "*fp32", "cu_ptr": "*i64", "Wk_ptr": "*fp32", "q_ptr": "*fp32", "w_ptr": "*fp32",
                       "w_last_ptr": "*fp32", "w_max_ptr": "*fp32", "s_ptr": "*fp32", "b": "fp32", "d": "i32",
                       "r": "i32", "heads": "i32", "scale": "fp32"},
                      {"HAS_LAST": has_last, "HAS_MAX": has_max, "BLOCK_T": 16, "BLOCK_D": 64, "BLOCK_R": 64,
                       "BLOCK_H": 16}))


def main():
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for name, arch, module, fn_name, sig, constexprs in CASES:
        fn = getattr(importlib.import_module(f"pyguard.kernels.{module}"), fn_name)
        try:
            src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs)
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32))
            res = dict(ok=bool(k.asm.get("cubin")), mma="mma" in k.asm["ptx"], error="")
        except Exception as e:  # reported per case by the test
            res = dict(ok=False, mma=False, error=f"{type(e).__name__}: {e}"[:2000])
        print(json.dumps({"case": name, **res}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
