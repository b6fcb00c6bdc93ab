// Run-time instruction-set dispatch: a cpuid probe, overridable with PYGUARD_ISA or set_isa().
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels.h"

namespace pyguard {

const char* isa_name(Isa isa) { return isa == Isa::avx2 ? "avx2" : "generic"; }

bool isa_supported(Isa isa) {
  if (isa == Isa::generic) return true;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

static Isa initial_isa() {
  const char* env = std::getenv("PYGUARD_ISA");
  if (env && *env) {
    Isa want = std::strcmp(env, "avx2") == 0 ? Isa::avx2 : Isa::generic;
    if (std::strcmp(env, isa_name(want)) != 0 || !isa_supported(want)) {
      throw std::invalid_argument(std::string("PYGUARD_ISA=") + env +
                                  " is not an instruction set this CPU supports");
    }
    return want;
  }
  return isa_supported(Isa::avx2) ? Isa::avx2 : Isa::generic;
}

static std::atomic<int> g_isa{-1};

Isa active_isa() {
  int v = g_isa.load();
  if (v < 0) {
    v = static_cast<int>(initial_isa());
    g_isa.store(v);
  }
  return static_cast<Isa>(v);
}

void set_isa(Isa isa) {
  if (!isa_supported(isa)) {
    throw std::invalid_argument(std::string("instruction set ") + isa_name(isa) +
                                " is not supported by this CPU");
  }
  g_isa.store(static_cast<int>(isa));
}

#define PYGUARD_DISPATCH(fn, ...) \
  (active_isa() == Isa::avx2 ? avx2::fn(__VA_ARGS__) : generic::fn(__VA_ARGS__))

void coca_step(const float* base, const float* safe, int64_t B, int64_t V, const float* alpha,
               const float* inv_temp, const int64_t* force, float* out, int64_t* token, float* kl) {
  PYGUARD_DISPATCH(coca_step, base, safe, B, V, alpha, inv_temp, force, out, token, kl);
}

void cmrm_shift(float* h, int64_t N, int64_t d, const float* v, float alpha, const uint8_t* mask) {
  PYGUARD_DISPATCH(cmrm_shift, h, N, d, v, alpha, mask);
}

void casa_score(const float* H, int64_t T, int64_t d, const int64_t* cu, int64_t B,
                const float* Wk, int64_t r, const float* q, int64_t heads, const float* w,
                const float* w_last, const float* w_max, float b, float* s) {
  PYGUARD_DISPATCH(casa_score, H, T, d, cu, B, Wk, r, q, heads, w, w_last, w_max, b, s);
}

}  // namespace pyguard
