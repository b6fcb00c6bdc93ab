// pyguard CPU kernels on raw pointers: no Python, no torch.
//
// kernels.cpp is compiled once per instruction set (namespaces pyguard::generic, pyguard::avx2);
// dispatch.cpp picks one at run time. Callers (bindings.cpp) validate every argument first:
// these functions assume shapes, ranges and pointers are consistent.
#pragma once
#include <cstdint>

namespace pyguard {

// Calibrated logits c = ((1 - alpha) * base + alpha * safe) * inv_temp for B rows of V logits.
//   base, safe [B, V]; alpha, inv_temp [B]; force [B] (-1 = none) or nullptr;
//   out [B, V] or nullptr, may alias base or safe.
// Writes token[b] = force[b] if >= 0, else the first index of the first NaN of c, else the first
// index of max c; kl[b] = KL(softmax(safe) || softmax(base)), NaN if the row has a non-finite input.
#define PYGUARD_KERNEL_DECLS                                                                       \
  void coca_step(const float* base, const float* safe, int64_t B, int64_t V, const float* alpha,   \
                 const float* inv_temp, const int64_t* force, float* out, int64_t* token,          \
                 float* kl);                                                                       \
  /* h[n, :] -= alpha * v for rows n with mask[n] != 0 (all rows if mask is nullptr). h [N, d]. */ \
  void cmrm_shift(float* h, int64_t N, int64_t d, const float* v, float alpha,                     \
                  const uint8_t* mask);                                                            \
  /* Safety-attention score per sequence. H [T, d]; cu [B + 1] (cu[0] = 0, strictly increasing, \
     cu[B] = T); Wk [d, r]; q [heads, r]; w [d]; w_last [d] (weights of each sequence's last    \
     row) or nullptr; w_max [d] (weights of its rows' maximum per dimension) or nullptr. s [B];   \
     NaN for a sequence with non-finite H. */                                                    \
  void casa_score(const float* H, int64_t T, int64_t d, const int64_t* cu, int64_t B,              \
                  const float* Wk, int64_t r, const float* q, int64_t heads, const float* w,       \
                  const float* w_last, const float* w_max, float b, float* s);

namespace generic { PYGUARD_KERNEL_DECLS }
namespace avx2 { PYGUARD_KERNEL_DECLS }

// Run-time choice of instruction set.
enum class Isa { generic = 0, avx2 = 1 };
const char* isa_name(Isa isa);
bool isa_supported(Isa isa);  // CPU probe
Isa active_isa();             // PYGUARD_ISA env var if set, else the best supported
void set_isa(Isa isa);        // throws std::invalid_argument if the CPU lacks it

// Calls the active ISA's kernel.
PYGUARD_KERNEL_DECLS

}  // namespace pyguard
