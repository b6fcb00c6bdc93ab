// The three fused ops, written once with GCC vector extensions and compiled once per instruction
// set: CMake builds this file with -DPYGUARD_ISA_NS=generic (baseline flags) and
// -DPYGUARD_ISA_NS=avx2 (-mavx2 -mfma). No -march=native: dispatch.cpp picks at run time.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels.h"

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#ifndef PYGUARD_ISA_NS
#error "compile with -DPYGUARD_ISA_NS=<namespace>"
#endif

namespace pyguard {
namespace PYGUARD_ISA_NS {
namespace {

#ifdef __AVX2__
constexpr int W = 8;  // lanes per vector: one register of the instruction set
#else
constexpr int W = 4;
#endif
typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));
typedef uint32_t vu __attribute__((vector_size(4 * W)));  // bit arithmetic (wraps, no UB)

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

__attribute__((always_inline)) inline vf splat(float x) { return vf{} + x; }
__attribute__((always_inline)) inline vf loadu(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
__attribute__((always_inline)) inline void storeu(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
// a > b ? a : b per lane (so a NaN in a is ignored when b is a running max), one instruction.
__attribute__((always_inline)) inline vf vmax(vf a, vf b) {
#if defined(__AVX__)
  return (vf)_mm256_max_ps((__m256)a, (__m256)b);
#elif defined(__SSE2__)
  return (vf)_mm_max_ps((__m128)a, (__m128)b);
#else
  return a > b ? a : b;
#endif
}
__attribute__((always_inline)) inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
__attribute__((always_inline)) inline double hsum(vf v) {
  double s = 0;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}

constexpr float kLog2e = 1.44269504088896341f;

// 2^u for u <= 0 (the kernels take exp(x - m) as 2^(x log2e - m log2e), one FMA for the
// argument). Degree-5 minimax polynomial for 2^f, |f| <= 1/2, max relative error 1.9e-7;
// the exponent is added to the bits. u < -126 is clamped (about 1e-38, not 0).
__attribute__((always_inline)) inline vf vexp2(vf u) {
  u = vmax(u, splat(-126.0f));
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf t = u + magic;
  const vf f = u - (t - magic);
  vf p = splat(0.001326472731307149f);
  p = p * f + splat(0.009671512991189957f);
  p = p * f + splat(0.05550733581185341f);
  p = p * f + splat(0.24022242426872253f);
  p = p * f + splat(0.6931470036506653f);
  p = p * f + splat(1.0f);
  // The low bits of t hold the integer n; shifted to the exponent field they scale p by 2^n.
  return (vf)((vu)p + ((vu)t << 23));
}

// ---------------------------------------------------------------------------------------------
// coca_step. Each row is cut into chunks (for threads); each chunk is swept once in L1-sized
// blocks. Exp-sums of a block are taken against the running maxima from the blocks before it
// (lazy rescaling: exponents up to e^kSlack are fine in float) and rescaled once per block; a block
// whose maximum jumps more than kSlack above them is swept again (rare: it costs one block).

constexpr int64_t kBlock = 512;    // floats per block, a multiple of W
constexpr int64_t kChunk = 32768;  // floats per thread task, a multiple of kBlock
constexpr float kSlack = 60.0f;

struct CocaPartial {
  float m_s = -kInf, m_b = -kInf;  // reference maxima of safe / base
  double S_s = 0, S_b = 0, A = 0;  // sum e^(s-m_s), sum e^(b-m_b), sum e^(s-m_s) (s-b)
  float best = -kInf;              // max calibrated logit (NaN ignored)
  int64_t best_idx = -1;           // its first index
  int64_t nan_idx = -1;            // first index of a NaN calibrated logit
  float bad = 0;                   // NaN if any input is non-finite
};

// Merge sums (mq, Sq, Aq) taken against reference mq into (m, S, A) taken against m.
__attribute__((always_inline)) inline void merge_lse(float& m, double& S, double* A, float mq,
                                                     double Sq, double Aq) {
  const float mn = std::max(m, mq);
  auto f = [mn](float x) { return x == -kInf ? 0.0 : std::exp(static_cast<double>(x) - mn); };
  const double fp = f(m), fq = f(mq);
  S = S * fp + Sq * fq;
  if (A) *A = *A * fp + Aq * fq;
  m = mn;
}

struct BlockSums {
  double S_s = 0, S_b = 0, A = 0;
  float bad = 0, ms = -kInf, mb = -kInf, cmax = -kInf;
  bool any_nan = false;  // maybe: some c is NaN or inf
};

// One sweep over a block: exp-sums against (rs, rb), block maxima, the non-finite flag
// ((s - b) * 0 is NaN iff s or b is NaN or inf), calibrated logits c = cb * base + ca * safe into cp.
BlockSums coca_block(const float* bp, const float* sp, float* cp, int64_t len, float rs, float rb,
                     float ca, float cb) {
  const int64_t lv = len - len % W;
  const vf L = splat(kLog2e), vrs = splat(-rs * kLog2e), vrb = splat(-rb * kLog2e);
  const vf va = splat(ca), vb = splat(cb);
  vf Ss = splat(0.0f), Sb = splat(0.0f), Av = splat(0.0f), bad = splat(0.0f);
  vf ms = splat(-kInf), mb = splat(-kInf), cmax = splat(-kInf), cbad = splat(0.0f);
  for (int64_t i = 0; i < lv; i += W) {
    const vf s = loadu(sp + i), b = loadu(bp + i);
    const vf es = vexp2(s * L + vrs), sb = s - b;
    ms = vmax(s, ms);
    mb = vmax(b, mb);
    Ss += es;
    Av += es * sb;
    bad += sb * 0.0f;
    Sb += vexp2(b * L + vrb);
    const vf c = vb * b + va * s;
    cbad += c * 0.0f;  // NaN iff some c is NaN or inf: then the block is scanned for a NaN
    cmax = vmax(c, cmax);
    storeu(cp + i, c);
  }
  BlockSums k;
  k.S_s = hsum(Ss), k.S_b = hsum(Sb), k.A = hsum(Av);
  k.bad = static_cast<float>(hsum(bad));
  k.ms = hmax(ms), k.mb = hmax(mb), k.cmax = hmax(cmax);
  k.any_nan = std::isnan(hsum(cbad));
  for (int64_t i = lv; i < len; ++i) {
    const float s = sp[i], b = bp[i];
    const double es = std::exp(static_cast<double>(s) - rs);
    k.S_s += es;
    k.A += es * (static_cast<double>(s) - b);
    k.bad += (s - b) * 0.0f;
    k.S_b += std::exp(static_cast<double>(b) - rb);
    k.ms = s > k.ms ? s : k.ms;
    k.mb = b > k.mb ? b : k.mb;
    const float c = cb * b + ca * s;
    k.any_nan |= c != c;
    k.cmax = c > k.cmax ? c : k.cmax;
    cp[i] = c;
  }
  return k;
}

void coca_chunk(const float* base, const float* safe, int64_t n, int64_t offset, float a,
                float it, float* out, CocaPartial& P) {
  alignas(64) float cbuf[kBlock];  // calibrated logits of the block when there is no out
  const float ca = a * it, cb = (1.0f - a) * it;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t len = std::min(kBlock, n - b0);
    const float* bp = base + b0;
    const float* sp = safe + b0;
    float* cp = out ? out + b0 : cbuf;  // element i is written after base[i], safe[i] are read
    float rs = P.m_s, rb = P.m_b;
    if (b0 == 0) rs = sp[0], rb = bp[0];
    BlockSums k = coca_block(bp, sp, cp, len, rs, rb, ca, cb);
    if (!(k.ms <= rs + kSlack) || !(k.mb <= rb + kSlack)) {  // far above the reference: again
      rs = std::max(rs, k.ms), rb = std::max(rb, k.mb);
      k = coca_block(bp, sp, cp, len, rs, rb, ca, cb);
    }
    merge_lse(P.m_s, P.S_s, &P.A, rs, k.S_s, k.A);
    merge_lse(P.m_b, P.S_b, nullptr, rb, k.S_b, 0.0);
    merge_lse(P.m_s, P.S_s, &P.A, k.ms, 0.0, 0.0);  // keep the reference at the running max
    merge_lse(P.m_b, P.S_b, nullptr, k.mb, 0.0, 0.0);
    P.bad += k.bad;
    if (k.any_nan && P.nan_idx < 0) {
      int64_t i = 0;
      while (i < len && cp[i] == cp[i]) ++i;
      if (i < len) P.nan_idx = offset + b0 + i;
    }
    if (k.cmax > P.best || (P.best_idx < 0 && k.cmax == P.best)) {
      int64_t i = 0;
      while (i < len && !(cp[i] == k.cmax)) ++i;  // i == len only for an all-NaN block
      if (i < len) {
        P.best = k.cmax;
        P.best_idx = offset + b0 + i;
      }
    }
  }
}

// Merge q (a later chunk of the same row) into p.
void coca_merge(CocaPartial& p, const CocaPartial& q) {
  merge_lse(p.m_s, p.S_s, &p.A, q.m_s, q.S_s, q.A);
  merge_lse(p.m_b, p.S_b, nullptr, q.m_b, q.S_b, 0.0);
  if (q.best_idx >= 0 && (p.best_idx < 0 || q.best > p.best)) {
    p.best = q.best;
    p.best_idx = q.best_idx;
  }
  if (p.nan_idx < 0) p.nan_idx = q.nan_idx;
  p.bad += q.bad;
}

}  // namespace

void coca_step(const float* base, const float* safe, int64_t B, int64_t V, const float* alpha,
               const float* inv_temp, const int64_t* force, float* out, int64_t* token,
               float* kl) {
  const int64_t nc = (V + kChunk - 1) / kChunk;
  std::vector<CocaPartial> parts(static_cast<size_t>(B * nc));
#pragma omp parallel for schedule(dynamic) if (B * V > 65536)
  for (int64_t t = 0; t < B * nc; ++t) {
    const int64_t row = t / nc, c0 = (t % nc) * kChunk;
    const int64_t off = row * V + c0;
    coca_chunk(base + off, safe + off, std::min(kChunk, V - c0), c0, alpha[row], inv_temp[row],
               out ? out + off : nullptr, parts[t]);
  }
  for (int64_t row = 0; row < B; ++row) {
    CocaPartial& p = parts[row * nc];
    for (int64_t c = 1; c < nc; ++c) coca_merge(p, parts[row * nc + c]);
    const double lse_s = p.m_s + std::log(p.S_s), lse_b = p.m_b + std::log(p.S_b);
    kl[row] = static_cast<float>(p.A / p.S_s - lse_s + lse_b) + p.bad;
    const int64_t pick = p.nan_idx >= 0 ? p.nan_idx : std::max<int64_t>(p.best_idx, 0);
    token[row] = force && force[row] >= 0 ? force[row] : pick;
  }
}

// ---------------------------------------------------------------------------------------------
// cmrm_shift: h[n, :] -= alpha * v on masked rows; a streaming update, vectorized by the compiler.

void cmrm_shift(float* h, int64_t N, int64_t d, const float* v, float alpha, const uint8_t* mask) {
  std::vector<float> av(static_cast<size_t>(d));
  for (int64_t j = 0; j < d; ++j) av[j] = alpha * v[j];
  const float* __restrict__ a = av.data();
#pragma omp parallel for schedule(dynamic, 16) if (N * d > 262144)
  for (int64_t n = 0; n < N; ++n) {
    if (mask && !mask[n]) continue;
    float* __restrict__ row = h + n * d;
    for (int64_t j = 0; j < d; ++j) row[j] -= a[j];
  }
}

// ---------------------------------------------------------------------------------------------
// casa_score. Per head, logit_t = (H_t Wk) . q_h / sqrt(r) = H_t . G_h with G_h = Wk q_h / sqrt(r),
// and w . z = mean_h sum_t a_ht (w . H_t). So each token costs heads + 1 dot products of length d
// (G = [G_0 .. G_{heads-1}, w], built once per call) and z is never formed. Sequences are cut into
// token chunks for threads; per-head online softmax partials are merged in order.

constexpr int64_t kTokChunk = 64;
constexpr int kMaxCols = 8;  // dot products per pass over a token (register accumulators)

struct CasaPartial {
  std::vector<double> m, l, acc;  // per head: running max logit, sum e^(x-m), sum e^(x-m) u
  float bad = 0;
};

// g[c] = x . G[c] for NC columns of G (rows of length d); bad accumulates x * 0 when asked.
template <int NC>
void dots(const float* x, const float* G, int64_t d, float* g, vf& bad, bool check) {
  const int64_t dv = d - d % W;
  vf acc[NC];
  for (int c = 0; c < NC; ++c) acc[c] = splat(0.0f);
  for (int64_t j = 0; j < dv; j += W) {
    const vf xv = loadu(x + j);
    if (check) bad += xv * 0.0f;
    for (int c = 0; c < NC; ++c) acc[c] += xv * loadu(G + c * d + j);
  }
  for (int c = 0; c < NC; ++c) {
    double sum = hsum(acc[c]);
    for (int64_t j = dv; j < d; ++j) sum += static_cast<double>(x[j]) * G[c * d + j];
    g[c] = static_cast<float>(sum);
  }
  if (check) {
    float tail = 0;
    for (int64_t j = dv; j < d; ++j) tail += x[j] * 0.0f;
    bad[0] += tail;
  }
}

using DotsFn = void (*)(const float*, const float*, int64_t, float*, vf&, bool);
constexpr DotsFn kDots[kMaxCols + 1] = {nullptr,  dots<1>, dots<2>, dots<3>, dots<4>,
                                        dots<5>,  dots<6>, dots<7>, dots<8>};

void casa_tokens(const float* H, int64_t t0, int64_t t1, int64_t d, const float* G, int64_t cols,
                 CasaPartial& P) {
  const int64_t heads = cols - 1;
  std::vector<float> g(static_cast<size_t>(cols));
  for (int64_t t = t0; t < t1; ++t) {
    const float* x = H + t * d;
    vf bad = splat(0.0f);
    for (int64_t c0 = 0; c0 < cols; c0 += kMaxCols) {
      const int64_t nc = std::min<int64_t>(kMaxCols, cols - c0);
      kDots[nc](x, G + c0 * d, d, g.data() + c0, bad, c0 == 0);
    }
    P.bad += static_cast<float>(hsum(bad));
    const double u = g[heads];
    for (int64_t h = 0; h < heads; ++h) {
      const double x_h = g[h];
      if (x_h > P.m[h]) {
        const double f = std::exp(P.m[h] - x_h);
        P.l[h] *= f;
        P.acc[h] *= f;
        P.m[h] = x_h;
      }
      const double e = std::exp(x_h - P.m[h]);
      P.l[h] += e;
      P.acc[h] += e * u;
    }
  }
}

void casa_merge(CasaPartial& p, const CasaPartial& q) {
  for (size_t h = 0; h < p.m.size(); ++h) {
    const double m = std::max(p.m[h], q.m[h]);
    const double fp = p.m[h] == -INFINITY ? 0.0 : std::exp(p.m[h] - m);
    const double fq = q.m[h] == -INFINITY ? 0.0 : std::exp(q.m[h] - m);
    p.l[h] = p.l[h] * fp + q.l[h] * fq;
    p.acc[h] = p.acc[h] * fp + q.acc[h] * fq;
    p.m[h] = m;
  }
  p.bad += q.bad;
}

void casa_score(const float* H, int64_t T, int64_t d, const int64_t* cu, int64_t B,
                const float* Wk, int64_t r, const float* q, int64_t heads, const float* w,
                const float* w_last, const float* w_max, float b, float* s) {
  (void)T;
  const int64_t cols = heads + 1;
  // G [cols, d]: row h < heads is Wk q_h / sqrt(r), row heads is w.
  std::vector<float> G(static_cast<size_t>(cols * d)), wq(static_cast<size_t>(heads));
  const float inv_sqrt_r = static_cast<float>(1.0 / std::sqrt(static_cast<double>(r)));
  vf unused = splat(0.0f);
  for (int64_t k = 0; k < d; ++k) {
    for (int64_t h0 = 0; h0 < heads; h0 += kMaxCols) {
      const int64_t nc = std::min<int64_t>(kMaxCols, heads - h0);
      kDots[nc](Wk + k * r, q + h0 * r, r, wq.data() + h0, unused, false);
    }
    for (int64_t h = 0; h < heads; ++h) G[h * d + k] = wq[h] * inv_sqrt_r;
  }
  std::memcpy(G.data() + heads * d, w, d * sizeof(float));
  // Tasks: (sequence, token chunk).
  std::vector<int64_t> first(static_cast<size_t>(B + 1), 0);
  for (int64_t i = 0; i < B; ++i) first[i + 1] = first[i] + (cu[i + 1] - cu[i] + kTokChunk - 1) / kTokChunk;
  const int64_t ntask = first[B];
  std::vector<CasaPartial> parts(static_cast<size_t>(ntask));
  for (auto& p : parts) {
    p.m.assign(heads, -INFINITY);
    p.l.assign(heads, 0.0);
    p.acc.assign(heads, 0.0);
  }
#pragma omp parallel for schedule(dynamic) if (ntask > 1 && cu[B] * d > 65536)
  for (int64_t t = 0; t < ntask; ++t) {
    const int64_t seq = std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1;
    const int64_t t0 = cu[seq] + (t - first[seq]) * kTokChunk;
    casa_tokens(H, t0, std::min(t0 + kTokChunk, cu[seq + 1]), d, G.data(), cols, parts[t]);
  }
  std::vector<float> mx(w_max != nullptr ? static_cast<size_t>(d) : 0);
  for (int64_t i = 0; i < B; ++i) {
    CasaPartial& p = parts[first[i]];
    for (int64_t t = first[i] + 1; t < first[i + 1]; ++t) casa_merge(p, parts[t]);
    double logit = 0;
    for (int64_t h = 0; h < heads; ++h) logit += p.acc[h] / p.l[h];
    logit = logit / static_cast<double>(heads) + b;
    if (w_last != nullptr) {  // the last row is the sequence's: its non-finite values are in p.bad
      float u = 0;
      kDots[1](H + (cu[i + 1] - 1) * d, w_last, d, &u, unused, false);
      logit += u;
    }
    if (w_max != nullptr) {  // the rows' maximum per dimension (NaN rows are in p.bad already)
      mx.assign(H + cu[i] * d, H + (cu[i] + 1) * d);
      for (int64_t t = cu[i] + 1; t < cu[i + 1]; ++t) {
        const float* row = H + t * d;
        for (int64_t k = 0; k < d; ++k) mx[k] = std::max(mx[k], row[k]);
      }
      float u = 0;
      kDots[1](mx.data(), w_max, d, &u, unused, false);
      logit += u;
    }
    s[i] = static_cast<float>(1.0 / (1.0 + std::exp(-logit))) + p.bad;
  }
}

}  // namespace PYGUARD_ISA_NS
}  // namespace pyguard
