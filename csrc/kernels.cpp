// The three fused ops, written once with GCC vector extensions and compiled once per instruction
// set: CMake builds this file with -DPYGUARD_ISA_NS=generic (baseline flags) and
// -DPYGUARD_ISA_NS=avx2 (-mavx2 -mfma). No -march=native: dispatch.cpp picks at run time.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels.h"

#ifndef PYGUARD_ISA_NS
#error "compile with -DPYGUARD_ISA_NS=<namespace>"
#endif

namespace pyguard {
namespace PYGUARD_ISA_NS {
namespace {

constexpr int W = 8;  // lanes per vector (two SSE registers on the generic path)
typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

inline vf splat(float x) { return vf{} + x; }
inline vf loadu(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void storeu(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }  // NaN-ignoring where b is the running max
inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
inline double hsum(vf v) {
  double s = 0;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}

// exp for x <= ~88 (Cephes polynomial, ~1 ulp); exp(x) = 0 for x < -87.3, NaN stays NaN.
inline vf vexp(vf x) {
  const vf xc = vmax(x, splat(-87.3f));
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: round to nearest integer
  vf t = xc * splat(1.44269504088896341f) + magic;
  const vf n = t - magic;
  vf r = xc - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  vf p = splat(1.9875691500E-4f);
  p = p * r + splat(1.3981999507E-3f);
  p = p * r + splat(8.3334519073E-3f);
  p = p * r + splat(4.1665795894E-2f);
  p = p * r + splat(1.6666665459E-1f);
  p = p * r + splat(5.0000001201E-1f);
  p = p * r * r + r + splat(1.0f);
  const vi ni = (vi)t - (vi)magic;  // the integer n, from the rounded float's low bits
  const vf scale = (vf)((ni + 127) << 23);
  const vf y = p * scale;
  return x < splat(-87.3f) ? splat(0.0f) : y;
}

// ---------------------------------------------------------------------------------------------
// coca_step. Each row is cut into chunks (for threads); each chunk is swept in L1-sized blocks:
// block maxima first, then one rescale of the running sums, then exp-sums and the calibrated
// logits. Memory is read once; the block re-read hits L1.

constexpr int64_t kBlock = 512;    // floats per block, a multiple of W
constexpr int64_t kChunk = 32768;  // floats per thread task, a multiple of kBlock

struct CocaPartial {
  float m_s = -kInf, m_b = -kInf;  // running maxima of safe / base
  double S_s = 0, S_b = 0, A = 0;  // sum e^(s-m_s), sum e^(b-m_b), sum e^(s-m_s) (s-b)
  float best = -kInf;              // max calibrated logit (NaN ignored)
  int64_t best_idx = -1;           // its first index
  int64_t nan_idx = -1;            // first index of a NaN calibrated logit
  float bad = 0;                   // NaN if any input is non-finite
};

inline void rescale(float& m, double& S, double* A, float m_new) {
  if (m_new > m) {
    const double f = std::exp(static_cast<double>(m) - static_cast<double>(m_new));
    S *= f;
    if (A) *A *= f;
    m = m_new;
  }
}

void coca_chunk(const float* base, const float* safe, int64_t n, int64_t offset, float a,
                float it, float* out, CocaPartial& P) {
  alignas(64) float cbuf[kBlock];
  const vf va = splat(a), vma = splat(1.0f - a), vit = splat(it);
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t len = std::min(kBlock, n - b0);
    const int64_t lv = len - len % W;
    const float* bp = base + b0;
    const float* sp = safe + b0;
    // Sweep 1: block maxima and the non-finite flag.
    vf ms = splat(-kInf), mb = splat(-kInf), bad = splat(0.0f);
    for (int64_t i = 0; i < lv; i += W) {
      const vf s = loadu(sp + i), b = loadu(bp + i);
      ms = vmax(s, ms);
      mb = vmax(b, mb);
      bad += s * 0.0f + b * 0.0f;
    }
    float ms1 = hmax(ms), mb1 = hmax(mb), bad1 = static_cast<float>(hsum(bad));
    for (int64_t i = lv; i < len; ++i) {
      ms1 = sp[i] > ms1 ? sp[i] : ms1;
      mb1 = bp[i] > mb1 ? bp[i] : mb1;
      bad1 += sp[i] * 0.0f + bp[i] * 0.0f;
    }
    P.bad += bad1;
    rescale(P.m_s, P.S_s, &P.A, ms1);
    rescale(P.m_b, P.S_b, nullptr, mb1);
    // Sweep 2: exp-sums against the running maxima; calibrated logits.
    const vf vms = splat(P.m_s), vmb = splat(P.m_b);
    vf Ss = splat(0.0f), Sb = splat(0.0f), Av = splat(0.0f), cmax = splat(-kInf);
    vi cnan = vi{} + 0;
    for (int64_t i = 0; i < lv; i += W) {
      const vf s = loadu(sp + i), b = loadu(bp + i);
      const vf es = vexp(s - vms);
      Ss += es;
      Av += es * (s - b);
      Sb += vexp(b - vmb);
      const vf c = (vma * b + va * s) * vit;
      cnan |= (c != c);
      cmax = vmax(c, cmax);
      std::memcpy(cbuf + i, &c, sizeof c);
    }
    double Ss1 = hsum(Ss), Sb1 = hsum(Sb), A1 = hsum(Av);
    float cmax1 = hmax(cmax);
    bool any_nan = false;
    for (int i = 0; i < W; ++i) any_nan |= cnan[i] != 0;
    for (int64_t i = lv; i < len; ++i) {
      const float s = sp[i], b = bp[i];
      const double es = std::exp(static_cast<double>(s) - P.m_s);
      Ss1 += es;
      A1 += es * (static_cast<double>(s) - b);
      Sb1 += std::exp(static_cast<double>(b) - P.m_b);
      const float c = ((1.0f - a) * b + a * s) * it;
      any_nan |= c != c;
      cmax1 = c > cmax1 ? c : cmax1;
      cbuf[i] = c;
    }
    P.S_s += Ss1;
    P.S_b += Sb1;
    P.A += A1;
    if (out) std::memcpy(out + b0, cbuf, len * sizeof(float));
    if (any_nan && P.nan_idx < 0) {
      int64_t i = 0;
      while (i < len && cbuf[i] == cbuf[i]) ++i;
      P.nan_idx = offset + b0 + i;
    }
    if (cmax1 > P.best || (P.best_idx < 0 && cmax1 == P.best)) {
      int64_t i = 0;
      while (i < len && !(cbuf[i] == cmax1)) ++i;  // i == len only for an all-NaN block
      if (i < len) {
        P.best = cmax1;
        P.best_idx = offset + b0 + i;
      }
    }
  }
}

// Merge q (a later chunk of the same row) into p.
void coca_merge(CocaPartial& p, const CocaPartial& q) {
  const float ms = std::max(p.m_s, q.m_s), mb = std::max(p.m_b, q.m_b);
  auto f = [](float m, float mnew) {
    return m == -kInf ? 0.0 : std::exp(static_cast<double>(m) - static_cast<double>(mnew));
  };
  const double fp = f(p.m_s, ms), fq = f(q.m_s, ms);
  p.S_s = p.S_s * fp + q.S_s * fq;
  p.A = p.A * fp + q.A * fq;
  p.S_b = p.S_b * f(p.m_b, mb) + q.S_b * f(q.m_b, mb);
  p.m_s = ms;
  p.m_b = mb;
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
#pragma omp parallel for schedule(static) if (B * V > 65536)
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
#pragma omp parallel for schedule(static) if (N * d > 262144)
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
constexpr int kMaxCols = 16;  // dot products per pass over a token

struct CasaPartial {
  std::vector<double> m, l, acc;  // per head: running max logit, sum e^(x-m), sum e^(x-m) u
  float bad = 0;
};

void casa_tokens(const float* H, int64_t t0, int64_t t1, int64_t d, const float* G, int64_t cols,
                 CasaPartial& P) {
  const int64_t heads = cols - 1;
  const int64_t dv = d - d % W;
  std::vector<float> g(static_cast<size_t>(cols));
  for (int64_t t = t0; t < t1; ++t) {
    const float* x = H + t * d;
    vf bad = splat(0.0f);
    for (int64_t c0 = 0; c0 < cols; c0 += kMaxCols) {
      const int64_t nc = std::min<int64_t>(kMaxCols, cols - c0);
      vf acc[kMaxCols];
      for (int64_t c = 0; c < nc; ++c) acc[c] = splat(0.0f);
      for (int64_t j = 0; j < dv; j += W) {
        const vf xv = loadu(x + j);
        if (c0 == 0) bad += xv * 0.0f;
        for (int64_t c = 0; c < nc; ++c) acc[c] += xv * loadu(G + (c0 + c) * d + j);
      }
      for (int64_t c = 0; c < nc; ++c) {
        double sum = hsum(acc[c]);
        for (int64_t j = dv; j < d; ++j) sum += static_cast<double>(x[j]) * G[(c0 + c) * d + j];
        g[c0 + c] = static_cast<float>(sum);
      }
    }
    float bad1 = static_cast<float>(hsum(bad));
    for (int64_t j = dv; j < d; ++j) bad1 += x[j] * 0.0f;
    P.bad += bad1;
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
                float b, float* s) {
  (void)T;
  const int64_t cols = heads + 1;
  std::vector<float> G(static_cast<size_t>(cols * d));
  const double inv_sqrt_r = 1.0 / std::sqrt(static_cast<double>(r));
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t k = 0; k < d; ++k) {
      double sum = 0;
      for (int64_t i = 0; i < r; ++i) sum += static_cast<double>(Wk[k * r + i]) * q[h * r + i];
      G[h * d + k] = static_cast<float>(sum * inv_sqrt_r);
    }
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
  for (int64_t i = 0; i < B; ++i) {
    CasaPartial& p = parts[first[i]];
    for (int64_t t = first[i] + 1; t < first[i + 1]; ++t) casa_merge(p, parts[t]);
    double logit = 0;
    for (int64_t h = 0; h < heads; ++h) logit += p.acc[h] / p.l[h];
    logit = logit / static_cast<double>(heads) + b;
    s[i] = static_cast<float>(1.0 / (1.0 + std::exp(-logit))) + p.bad;
  }
}

}  // namespace PYGUARD_ISA_NS
}  // namespace pyguard
