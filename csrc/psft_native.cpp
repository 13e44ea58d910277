// The per-chunk epilogue of the fused lm-head losses, for the CPU (psft_kernels/native.py).
//
// The GEMMs stay in ATen (MKL / oneDNN); these kernels replace the chain of PyTorch ops that the
// chunked backend runs over each (rows x V) logit block by one pass per row that stays in the
// core's cache: two passes over a row for the statistics (max; then exp sums) and one for the
// logit gradient. Rows are split over ATen's intra-op threads.
//
//   stats(z, y, zq, ...)    softcap / temperature applied in place; returns per-row
//                           [lse, logp, entropy, rowmax, ref_lse, kl, log S, ref rowmax, log S']
//                           (METHOD.md; S = sum exp(z - rowmax));
//                           with keep_exp, z <- exp(z - rowmax) - S onehot(y)  (S = sum of exps);
//                           with a softcap, optionally slope <- dz/dx, from the raw logits
//   dlogits(z, y, zq, ...)  z <- dl/dx = (g (onehot - p) + e dH/dz + k dKL/dz) dz/dx, in place
//                           (dz/dx: 1/T, or with a softcap the slope from stats / transform)
//   transform(x, ...)       x <- softcap(x) / T, in place (the backward recomputes raw logits),
//                           optionally slope <- dz/dx
//   move_rows(x, dst, src)  x[dst] <- x[src], row by row, in place (fills the holes of clipped rows)
//
// Loops are written on GCC/Clang vector types (no intrinsics): the same source is compiled for
// the baseline ISA or with -mavx2 / -mavx512f, by psft_kernels/_native_build.py.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>

namespace {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#else
constexpr int kVecBytes = 32;  // two SSE / NEON registers where AVX is absent
#endif

template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float vec __attribute__((vector_size(kVecBytes)));
  typedef int32_t ivec __attribute__((vector_size(kVecBytes)));
};
template <>
struct Simd<double> {
  typedef double vec __attribute__((vector_size(kVecBytes)));
  typedef int64_t ivec __attribute__((vector_size(kVecBytes)));
};
template <typename T>
using vec_t = typename Simd<T>::vec;
template <typename T>
using ivec_t = typename Simd<T>::ivec;
template <typename T>
constexpr int kLanes = kVecBytes / static_cast<int>(sizeof(T));

template <typename T>
inline vec_t<T> splat(T x) {
  // Lane by lane, not `vec_t<T>{} + x`: 0 + (-0.0) is +0.0, which made the sign mask below zero
  // (|x| was x, and tanh / the softcap's slope of logits below -44 s overflowed to garbage or NaN).
  vec_t<T> v;
  for (int i = 0; i < kLanes<T>; ++i) v[i] = x;
  return v;
}
template <typename T>
inline vec_t<T> load(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof v);  // unaligned load
  return v;
}
template <typename T>
inline void store(T* p, vec_t<T> v) {
  std::memcpy(p, &v, sizeof v);
}
// The last, partial vector of a row: lanes at or past `n` read as `pad` and are never written.
template <typename T>
inline vec_t<T> load_part(const T* p, int n, T pad) {
  T b[kLanes<T>];
  for (int i = 0; i < kLanes<T>; ++i) b[i] = i < n ? p[i] : pad;
  return load(b);
}
template <typename T>
inline void store_part(T* p, vec_t<T> v, int n) {
  T b[kLanes<T>];
  store(b, v);
  for (int i = 0; i < n; ++i) p[i] = b[i];
}
// Bitwise blend rather than `?:` on vectors: both GCC and Clang accept it in C++.
template <typename T>
inline vec_t<T> select(ivec_t<T> m, vec_t<T> a, vec_t<T> b) {
  return (vec_t<T>)((m & (ivec_t<T>)a) | (~m & (ivec_t<T>)b));
}
template <typename T>
inline vec_t<T> vmax(vec_t<T> a, vec_t<T> b) {
  return select<T>(a > b, a, b);
}
template <typename T>
inline ivec_t<T> first_lanes(int n) {  // lanes [0, n) set
  ivec_t<T> idx;
  for (int i = 0; i < kLanes<T>; ++i) idx[i] = i;
  return idx < n;
}
template <typename T>
inline T hsum(vec_t<T> v) {
  T s = 0;
  for (int i = 0; i < kLanes<T>; ++i) s += v[i];
  return s;
}
template <typename T>
inline T hmax(vec_t<T> v) {
  T m = v[0];
  for (int i = 1; i < kLanes<T>; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// exp(x) and exp(x) - 1 for x <= 0 (every exponent here is a log-probability or -2|x|).
// Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, then a polynomial in r: the float one
// (Cephes' expf coefficients) is within 1e-7 relative, the double one (Taylor to r^13) within
// 2 ulp. Results below the smallest normal flush to 0 and NaN propagates.
template <typename T>
struct ExpConsts;
template <>
struct ExpConsts<float> {
  static constexpr float lo = -104.0f, nmin = -127.0f, magic = 12582912.0f;  // 1.5 * 2^23
  static constexpr float log2e = 1.44269504088896341f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  static constexpr int bias = 127, mant = 23;
};
template <>
struct ExpConsts<double> {
  static constexpr double lo = -746.0, nmin = -1023.0, magic = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double log2e = 1.4426950408889634074, ln2_hi = 6.93147180369123816490e-01,
                          ln2_lo = 1.90821492927058770002e-10;
  static constexpr int bias = 1023, mant = 52;
};

// Returns (2^n, r) with x = n ln2 + r.
template <typename T>
inline void exp_reduce(vec_t<T> x, vec_t<T>& scale, vec_t<T>& r) {
  using C = ExpConsts<T>;
  x = select<T>(x < C::lo, splat<T>(C::lo), x);
  vec_t<T> n = (x * C::log2e + C::magic) - C::magic;  // round to nearest without a libm call
  n = select<T>(n < C::nmin, splat<T>(C::nmin), n);  // 2^n = 0 below: flush to zero
  r = x - n * C::ln2_hi;
  r = r - n * C::ln2_lo;
  ivec_t<T> bits = (__builtin_convertvector(n, ivec_t<T>) + C::bias) << C::mant;
  scale = (vec_t<T>)bits;
}

// (exp(r) - 1 - r) / r^2
inline vec_t<float> exp_poly(vec_t<float> r) {
  vec_t<float> p = splat(1.9875691500E-4f);
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  return p * r + 5.0000001201E-1f;
}
inline vec_t<double> exp_poly(vec_t<double> r) {
  // 1/k! for k = 13 .. 2
  vec_t<double> p = splat(1.6059043836821614599e-10);
  p = p * r + 2.0876756987868098979e-9;
  p = p * r + 2.5052108385441718775e-8;
  p = p * r + 2.7557319223985890653e-7;
  p = p * r + 2.7557319223985890653e-6;
  p = p * r + 2.4801587301587301587e-5;
  p = p * r + 1.9841269841269841270e-4;
  p = p * r + 1.3888888888888888889e-3;
  p = p * r + 8.3333333333333333333e-3;
  p = p * r + 4.1666666666666666667e-2;
  p = p * r + 1.6666666666666666667e-1;
  return p * r + 0.5;
}

template <typename T>
inline vec_t<T> vexp(vec_t<T> x) {
  vec_t<T> scale, r;
  exp_reduce<T>(x, scale, r);
  return (exp_poly(r) * r * r + r + T(1)) * scale;
}

template <typename T>
inline vec_t<T> vexpm1(vec_t<T> x) {  // accurate near 0, where exp(x) - 1 would cancel
  vec_t<T> scale, r;
  exp_reduce<T>(x, scale, r);
  vec_t<T> q = exp_poly(r) * r * r + r;  // exp(r) - 1
  return q * scale + (scale - T(1));
}

template <typename T>
inline vec_t<T> vtanh(vec_t<T> x) {
  // tanh|x| = -m / (m + 2) with m = expm1(-2|x|) in (-1, 0]: no overflow, no cancellation.
  const ivec_t<T> sign = (ivec_t<T>)splat<T>(T(-0.0));
  vec_t<T> ax = (vec_t<T>)((ivec_t<T>)x & ~sign);
  vec_t<T> m = vexpm1<T>(ax * T(-2));
  vec_t<T> t = -m / (m + T(2));
  return (vec_t<T>)((ivec_t<T>)t | ((ivec_t<T>)x & sign));
}

// x - m for a row's max m, with -inf (a masked logit) raised to the lowest finite value, so that
// exp gives exactly 0 and 0 * (x - m) is 0, not NaN. NaN stays NaN (the comparison is false).
template <typename T>
inline vec_t<T> shifted(vec_t<T> x, T m) {
  const T lowest = std::numeric_limits<T>::lowest();
  vec_t<T> d = x - m;
  return select<T>(d < lowest, splat<T>(lowest), d);
}

// check_block has already limited the dtype to these two.
template <typename F>
void dispatch(at::ScalarType t, F&& f) {
  if (t == at::kDouble) {
    f(double{});
  } else {
    f(float{});
  }
}

enum KlMode : int64_t { kNoKl = 0, kForwardKl = 1, kReverseKl = 2 };

// z = softcap(x) / T. cap == 0: no softcap.
template <typename T, bool CAP>
inline vec_t<T> transform(vec_t<T> x, T inv_temp, T cap, T inv_cap) {
  if (CAP) return vtanh<T>(x * inv_cap) * (cap * inv_temp);
  return x * inv_temp;
}

// dz/dx of z = s tanh(x / s) / T: (1 - tanh^2(x / s)) / T = 4 e / ((1 + e)^2 T), e = exp(-2|x| / s).
// From the raw logit, to a few ulps relative; recovered from z, whose tanh is within an ulp of
// +-1 near saturation, it would keep an absolute error of a few ulps of 1, most of its value there.
template <typename T>
inline vec_t<T> softcap_slope(vec_t<T> x, T minus_two_inv_cap, T four_inv_temp) {
  const ivec_t<T> sign = (ivec_t<T>)splat<T>(T(-0.0));
  vec_t<T> ax = (vec_t<T>)((ivec_t<T>)x & ~sign);
  vec_t<T> e = vexp<T>(ax * minus_two_inv_cap);  // in (0, 1]: flushes to 0 far out, as the slope should
  vec_t<T> d = e + T(1);
  return e * four_inv_temp / (d * d);
}

struct Options {
  double inv_temp;
  double cap;  // 0: no softcap
  int64_t kl_mode;
};

// --------------------------------------------------------------------------------------------
// stats
// --------------------------------------------------------------------------------------------

// Rows of the output of `stats`.
// log S (and log S') are kept apart from the max: probabilities are exp((z - max) - log S). Folded
// into lse = max + log S they would carry lse's rounding, half an ulp of the logits' magnitude.
enum StatRow : int64_t { kLse = 0, kLogp, kEntropy, kRowMax, kRefLse, kKl, kLogS, kRefMax, kRefLogS, kNumStats };

template <typename T, bool CAP, bool TRANSFORM, int KL, bool KEEP_EXP>
void stats_rows(T* z, int64_t ldz, T* zq, int64_t ldq, T* slope, int64_t lds, const int64_t* y, int64_t V,
                const Options& o, T* out, int64_t n, int64_t begin, int64_t end) {
  constexpr int W = kLanes<T>;
  const T inv_temp = T(o.inv_temp), cap = T(o.cap), inv_cap = CAP ? T(1) / T(o.cap) : T(0);
  const T m2_inv_cap = T(-2) * inv_cap, four_inv_temp = T(4) * inv_temp;
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t full = V - V % W;
  const int tail = static_cast<int>(V - full);
  const ivec_t<T> tail_mask = first_lanes<T>(tail);
  for (int64_t i = begin; i < end; ++i) {
    T* zr = z + i * ldz;
    T* qr = KL ? zq + i * ldq : nullptr;
    T* sr = CAP && slope ? slope + i * lds : nullptr;
    const int64_t target = y[i];
    TORCH_CHECK(target >= 0 && target < V, "psft_native.stats: target ", target, " out of range [0, ", V, ")");

    // pass 1: the transform, in place, and the row maxima
    vec_t<T> mx = splat(ninf), mq = splat(ninf);
    for (int64_t v = 0; v < full; v += W) {
      vec_t<T> x = load(zr + v);
      if (CAP && sr) store(sr + v, softcap_slope<T>(x, m2_inv_cap, four_inv_temp));
      if (TRANSFORM) store(zr + v, x = transform<T, CAP>(x, inv_temp, cap, inv_cap));
      mx = vmax<T>(mx, x);
      if (KL) {
        vec_t<T> xq = load(qr + v);
        if (TRANSFORM) store(qr + v, xq = transform<T, CAP>(xq, inv_temp, cap, inv_cap));
        mq = vmax<T>(mq, xq);
      }
    }
    if (tail) {
      vec_t<T> x = load_part(zr + full, tail, T(0));
      if (CAP && sr) store_part(sr + full, softcap_slope<T>(x, m2_inv_cap, four_inv_temp), tail);
      if (TRANSFORM) store_part(zr + full, x = transform<T, CAP>(x, inv_temp, cap, inv_cap), tail);
      mx = vmax<T>(mx, select<T>(tail_mask, x, splat(ninf)));
      if (KL) {
        vec_t<T> xq = load_part(qr + full, tail, T(0));
        if (TRANSFORM) store_part(qr + full, xq = transform<T, CAP>(xq, inv_temp, cap, inv_cap), tail);
        mq = vmax<T>(mq, select<T>(tail_mask, xq, splat(ninf)));
      }
    }
    const T m = hmax<T>(mx), m_q = KL ? hmax<T>(mq) : T(0);
    const T z_target = zr[target];

    // pass 2: shifted logits d = z - max (their exps sum to S), so H = log S - sum(e d) / S
    // and the KL sums use d - d' instead of z - z' (no large common offset to cancel).
    vec_t<T> s{}, sd{}, sq{}, sk{};
    auto step = [&](vec_t<T> x, vec_t<T> xq, vec_t<T>& e, bool masked) {
      vec_t<T> d = shifted<T>(x, m);
      e = vexp<T>(d);
      vec_t<T> ed = e * d, eq{}, kterm{};
      if (KL) {
        vec_t<T> dq = shifted<T>(xq, m_q);
        eq = vexp<T>(dq);
        kterm = KL == kForwardKl ? eq * (dq - d) : e * (d - dq);
      }
      if (masked) {
        const vec_t<T> zero{};
        s += select<T>(tail_mask, e, zero);
        sd += select<T>(tail_mask, ed, zero);
        if (KL) {
          sq += select<T>(tail_mask, eq, zero);
          sk += select<T>(tail_mask, kterm, zero);
        }
      } else {
        s += e;
        sd += ed;
        if (KL) {
          sq += eq;
          sk += kterm;
        }
      }
    };
    for (int64_t v = 0; v < full; v += W) {
      vec_t<T> e;
      step(load(zr + v), KL ? load(qr + v) : vec_t<T>{}, e, false);
      if (KEEP_EXP) store(zr + v, e);
    }
    if (tail) {
      vec_t<T> e;
      step(load_part(zr + full, tail, m), KL ? load_part(qr + full, tail, m_q) : vec_t<T>{}, e, true);
      if (KEEP_EXP) store_part(zr + full, e, tail);
    }
    const T S = hsum<T>(s), log_s = std::log(S);
    const T lse = m + log_s;
    // E'[y] = e_y - S makes the plain gradient a row scaling: g (onehot - p) / T = a E' with
    // a = -g / (S T), so the caller pushes it through the GEMMs without forming it.
    if (KEEP_EXP) zr[target] -= S;
    out[kLse * n + i] = lse;
    out[kLogp * n + i] = (z_target - m) - log_s;
    out[kEntropy * n + i] = log_s - hsum<T>(sd) / S;
    out[kRowMax * n + i] = m;
    out[kLogS * n + i] = log_s;
    if (KL) {
      const T Sq = hsum<T>(sq), log_sq = std::log(Sq);
      out[kRefLse * n + i] = m_q + log_sq;
      out[kKl * n + i] = KL == kForwardKl ? hsum<T>(sk) / Sq - log_sq + log_s : hsum<T>(sk) / S - log_s + log_sq;
      out[kRefMax * n + i] = m_q;
      out[kRefLogS * n + i] = log_sq;
    } else {
      out[kRefLse * n + i] = 0;
      out[kKl * n + i] = 0;
      out[kRefMax * n + i] = 0;
      out[kRefLogS * n + i] = 0;
    }
  }
}

template <typename T, bool CAP, bool TRANSFORM, int KL, bool KEEP_EXP>
void stats_typed(const at::Tensor& z, const std::optional<at::Tensor>& zq, const std::optional<at::Tensor>& slope,
                 const at::Tensor& y, const Options& o, at::Tensor& out) {
  const int64_t n = z.size(0), V = z.size(1);
  T* zp = z.data_ptr<T>();
  T* qp = KL ? zq->data_ptr<T>() : nullptr;
  T* sp = slope.has_value() ? slope->data_ptr<T>() : nullptr;
  const int64_t ldz = z.stride(0), ldq = KL ? zq->stride(0) : 0, lds = sp ? slope->stride(0) : 0;
  const int64_t* yp = y.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    stats_rows<T, CAP, TRANSFORM, KL, KEEP_EXP>(zp, ldz, qp, ldq, sp, lds, yp, V, o, op, n, b, e);
  });
}

void check_block(const at::Tensor& z, const char* name) {
  TORCH_CHECK(z.device().is_cpu(), "psft_native: ", name, " must be on the CPU");
  TORCH_CHECK(z.dim() == 2 && z.stride(1) == 1, "psft_native: ", name, " must be 2-D with unit column stride");
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble, "psft_native: ", name,
              " must be float32 or float64, got ", z.scalar_type());
}

void check_rows(const at::Tensor& z, const at::Tensor& y, const std::optional<at::Tensor>& zq) {
  check_block(z, "z");
  TORCH_CHECK(y.scalar_type() == at::kLong && y.dim() == 1 && y.size(0) == z.size(0) && y.is_contiguous(),
              "psft_native: targets must be a contiguous int64 vector with one entry per row");
  if (zq.has_value()) {
    check_block(*zq, "zq");
    TORCH_CHECK(zq->sizes() == z.sizes() && zq->scalar_type() == z.scalar_type(),
                "psft_native: zq must match z in shape and dtype");
  }
}

template <typename T, bool CAP, bool TRANSFORM>
void stats_kl(const at::Tensor& z, const std::optional<at::Tensor>& zq, const std::optional<at::Tensor>& slope,
              const at::Tensor& y, const Options& o, bool keep_exp, at::Tensor& out) {
  if (o.kl_mode == kForwardKl) return stats_typed<T, CAP, TRANSFORM, kForwardKl, false>(z, zq, slope, y, o, out);
  if (o.kl_mode == kReverseKl) return stats_typed<T, CAP, TRANSFORM, kReverseKl, false>(z, zq, slope, y, o, out);
  if (keep_exp) return stats_typed<T, CAP, TRANSFORM, kNoKl, true>(z, zq, slope, y, o, out);
  stats_typed<T, CAP, TRANSFORM, kNoKl, false>(z, zq, slope, y, o, out);
}

// `slope`, where given, must be a block like z (it is only written with a softcap).
void check_slope(const std::optional<at::Tensor>& slope, const at::Tensor& z, const char* op) {
  if (!slope.has_value()) return;
  check_block(*slope, "slope");
  TORCH_CHECK(slope->sizes() == z.sizes() && slope->scalar_type() == z.scalar_type(), "psft_native.", op,
              ": slope must match z in shape and dtype");
}

at::Tensor stats(at::Tensor z, const at::Tensor& targets, std::optional<at::Tensor> zq, double inv_temperature,
                 double softcap, int64_t kl_mode, bool keep_exp, std::optional<at::Tensor> slope) {
  check_rows(z, targets, zq);
  check_slope(slope, z, "stats");
  TORCH_CHECK(kl_mode >= kNoKl && kl_mode <= kReverseKl, "psft_native.stats: bad kl_mode ", kl_mode);
  TORCH_CHECK((kl_mode != kNoKl) == zq.has_value(), "psft_native.stats: zq is needed exactly when kl_mode != 0");
  TORCH_CHECK(!keep_exp || (kl_mode == kNoKl && softcap == 0.0),
              "psft_native.stats: keep_exp is for rows without softcap or KL");
  at::Tensor out = at::empty({kNumStats, z.size(0)}, z.options());
  if (z.size(0) == 0) return out;
  TORCH_CHECK(z.size(1) > 0, "psft_native.stats: empty vocabulary");
  const Options o{inv_temperature, softcap, kl_mode};
  const bool transform = softcap != 0.0 || inv_temperature != 1.0;
  dispatch(z.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    if (softcap != 0.0) {
      stats_kl<scalar_t, true, true>(z, zq, slope, targets, o, keep_exp, out);
    } else if (transform) {
      stats_kl<scalar_t, false, true>(z, zq, slope, targets, o, keep_exp, out);
    } else {
      stats_kl<scalar_t, false, false>(z, zq, slope, targets, o, keep_exp, out);
    }
  });
  return out;
}

// --------------------------------------------------------------------------------------------
// dlogits
// --------------------------------------------------------------------------------------------

struct RowCoefs {
  const void* g;  // each: (n,) or null (zero for every row)
  const void* e;
  const void* k;
};

// dl/dx of one row, over z (transformed logits) in place; with CAP, dz/dx is `slope`.
template <typename T, bool CAP, int KL, bool ENT>
void dlogits_rows(T* z, int64_t ldz, const T* zq, int64_t ldq, const T* slope, int64_t lds, const int64_t* y,
                  int64_t V, const Options& o, const T* st, const RowCoefs& c, int64_t n, int64_t begin,
                  int64_t end) {
  constexpr int W = kLanes<T>;
  const T inv_temp = T(o.inv_temp);
  const int64_t full = V - V % W;
  const int tail = static_cast<int>(V - full);
  const T* gs = static_cast<const T*>(c.g);
  const T* es = static_cast<const T*>(c.e);
  const T* ks = static_cast<const T*>(c.k);
  for (int64_t i = begin; i < end; ++i) {
    T* zr = z + i * ldz;
    const T* qr = KL ? zq + i * ldq : nullptr;
    const T* sr = CAP ? slope + i * lds : nullptr;
    const int64_t target = y[i];
    // -1: the target lies in another shard of the vocabulary (vocab_parallel): no one-hot term here.
    TORCH_CHECK(target >= -1 && target < V, "psft_native.dlogits: target ", target, " out of range [-1, ", V, ")");
    const T m = st[kRowMax * n + i], log_s = st[kLogS * n + i], H = st[kEntropy * n + i];
    const T m_q = st[kRefMax * n + i], log_sq = st[kRefLogS * n + i], kl = st[kKl * n + i];
    const T g = gs ? gs[i] : T(0), e = ENT ? es[i] : T(0), k = KL ? ks[i] : T(0);
    auto grad = [&](vec_t<T> x, vec_t<T> xq, vec_t<T> dzdx) {
      vec_t<T> lp = shifted<T>(x, m) - log_s;  // log p = (z - max) - log S (StatRow)
      vec_t<T> p = vexp<T>(lp);
      vec_t<T> d = p * (-g);
      if (ENT) d -= (e * p) * (lp + H);  // e dH/dz = -e p (log p + H)
      if (KL) {
        vec_t<T> lq = shifted<T>(xq, m_q) - log_sq;
        if (KL == kForwardKl) d += k * (p - vexp<T>(lq));  // k (p - q)
        if (KL == kReverseKl) d += (k * p) * (lp - lq - kl);  // k p (log p - log q - KL)
      }
      return CAP ? d * dzdx : d * inv_temp;
    };
    for (int64_t v = 0; v < full; v += W) {
      store(zr + v, grad(load(zr + v), KL ? load(qr + v) : vec_t<T>{}, CAP ? load(sr + v) : vec_t<T>{}));
    }
    if (tail) {
      vec_t<T> d = grad(load_part(zr + full, tail, m), KL ? load_part(qr + full, tail, m_q) : vec_t<T>{},
                        CAP ? load_part(sr + full, tail, T(0)) : vec_t<T>{});
      store_part(zr + full, d, tail);
    }
    if (target >= 0) zr[target] += g * (CAP ? sr[target] : inv_temp);  // the onehot term, same chain rule
  }
}

template <typename T, bool CAP, int KL, bool ENT>
void dlogits_typed(at::Tensor& z, const std::optional<at::Tensor>& zq, const std::optional<at::Tensor>& slope,
                   const at::Tensor& y, const Options& o, const at::Tensor& st, const RowCoefs& c) {
  const int64_t n = z.size(0), V = z.size(1);
  T* zp = z.data_ptr<T>();
  const T* qp = KL ? zq->data_ptr<T>() : nullptr;
  const T* sp = CAP ? slope->data_ptr<T>() : nullptr;
  const int64_t ldz = z.stride(0), ldq = KL ? zq->stride(0) : 0, lds = CAP ? slope->stride(0) : 0;
  const int64_t* yp = y.data_ptr<int64_t>();
  const T* stp = st.data_ptr<T>();
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    dlogits_rows<T, CAP, KL, ENT>(zp, ldz, qp, ldq, sp, lds, yp, V, o, stp, c, n, b, e);
  });
}

template <typename T, bool CAP>
void dlogits_kl(at::Tensor& z, const std::optional<at::Tensor>& zq, const std::optional<at::Tensor>& slope,
                const at::Tensor& y, const Options& o, const at::Tensor& st, const RowCoefs& c) {
  const bool ent = c.e != nullptr;
  // A KL mode without a KL coefficient (ASFT with kl_coef = 0) drops the term.
  const int64_t kl = c.k != nullptr ? o.kl_mode : kNoKl;
  if (kl == kForwardKl) {
    ent ? dlogits_typed<T, CAP, kForwardKl, true>(z, zq, slope, y, o, st, c)
        : dlogits_typed<T, CAP, kForwardKl, false>(z, zq, slope, y, o, st, c);
  } else if (kl == kReverseKl) {
    ent ? dlogits_typed<T, CAP, kReverseKl, true>(z, zq, slope, y, o, st, c)
        : dlogits_typed<T, CAP, kReverseKl, false>(z, zq, slope, y, o, st, c);
  } else {
    ent ? dlogits_typed<T, CAP, kNoKl, true>(z, zq, slope, y, o, st, c)
        : dlogits_typed<T, CAP, kNoKl, false>(z, zq, slope, y, o, st, c);
  }
}

const void* coef_ptr(const std::optional<at::Tensor>& c, const at::Tensor& z, const char* name) {
  if (!c.has_value()) return nullptr;
  TORCH_CHECK(c->dim() == 1 && c->size(0) == z.size(0) && c->is_contiguous() && c->scalar_type() == z.scalar_type(),
              "psft_native.dlogits: ", name, " must be a contiguous vector like z's rows, in z's dtype");
  return c->data_ptr();
}

void dlogits(at::Tensor z, const at::Tensor& targets, const std::optional<at::Tensor>& zq, const at::Tensor& stats,
             const std::optional<at::Tensor>& g, const std::optional<at::Tensor>& e,
             const std::optional<at::Tensor>& k, double inv_temperature, double softcap, int64_t kl_mode,
             const std::optional<at::Tensor>& slope) {
  check_rows(z, targets, zq);
  check_slope(slope, z, "dlogits");
  TORCH_CHECK(softcap == 0.0 || slope.has_value(),
              "psft_native.dlogits: a softcap needs its slope (from stats or transform_)");
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == kNumStats && stats.size(1) == z.size(0) && stats.is_contiguous() &&
                  stats.scalar_type() == z.scalar_type(),
              "psft_native.dlogits: stats must be the (", kNumStats, ", n) output of stats()");
  const RowCoefs c{coef_ptr(g, z, "g"), coef_ptr(e, z, "e"), coef_ptr(k, z, "k")};
  TORCH_CHECK(c.k == nullptr || zq.has_value(), "psft_native.dlogits: a KL coefficient needs zq");
  const Options o{inv_temperature, softcap, kl_mode};
  if (z.size(0) == 0) return;
  dispatch(z.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    softcap != 0.0 ? dlogits_kl<scalar_t, true>(z, zq, slope, targets, o, stats, c)
                   : dlogits_kl<scalar_t, false>(z, zq, slope, targets, o, stats, c);
  });
}

// --------------------------------------------------------------------------------------------
// transform, compact
// --------------------------------------------------------------------------------------------

template <typename T, bool CAP>
void transform_typed(at::Tensor& x, double inv_temperature, double softcap, const std::optional<at::Tensor>& slope) {
  constexpr int W = kLanes<T>;
  const int64_t n = x.size(0), V = x.size(1), ld = x.stride(0);
  const T inv_temp = T(inv_temperature), cap = T(softcap), inv_cap = CAP ? T(1) / T(softcap) : T(0);
  const T m2_inv_cap = T(-2) * inv_cap, four_inv_temp = T(4) * inv_temp;
  const int64_t full = V - V % W;
  const int tail = static_cast<int>(V - full);
  T* xp = x.data_ptr<T>();
  T* sp = CAP && slope.has_value() ? slope->data_ptr<T>() : nullptr;
  const int64_t lds = sp ? slope->stride(0) : 0;
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      T* r = xp + i * ld;
      T* sr = sp ? sp + i * lds : nullptr;
      for (int64_t v = 0; v < full; v += W) {
        vec_t<T> u = load(r + v);
        if (sr) store(sr + v, softcap_slope<T>(u, m2_inv_cap, four_inv_temp));
        store(r + v, transform<T, CAP>(u, inv_temp, cap, inv_cap));
      }
      if (tail) {
        vec_t<T> u = load_part(r + full, tail, T(0));
        if (sr) store_part(sr + full, softcap_slope<T>(u, m2_inv_cap, four_inv_temp), tail);
        store_part(r + full, transform<T, CAP>(u, inv_temp, cap, inv_cap), tail);
      }
    }
  });
}

void transform_(at::Tensor x, double inv_temperature, double softcap, std::optional<at::Tensor> slope) {
  check_block(x, "x");
  check_slope(slope, x, "transform_");
  if (x.size(0) == 0 || (softcap == 0.0 && inv_temperature == 1.0)) return;
  dispatch(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    softcap != 0.0 ? transform_typed<scalar_t, true>(x, inv_temperature, softcap, slope)
                   : transform_typed<scalar_t, false>(x, inv_temperature, softcap, slope);
  });
}

// x[dst[j]] <- x[src[j]]: the active rows behind a block's first m rows fill the holes that its
// inactive (PSFT-clipped) rows leave there, so the GEMMs read m rows. One row copy per hole, not a
// shift of every row. All dst rows precede all src rows, so no copy reads a row already written.
void move_rows(at::Tensor x, const at::Tensor& dst, const at::Tensor& src) {
  check_block(x, "x");
  for (const at::Tensor* t : {&dst, &src}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->is_contiguous(),
                "psft_native.move_rows: dst and src must be contiguous int64 vectors");
  }
  TORCH_CHECK(dst.size(0) == src.size(0), "psft_native.move_rows: dst has ", dst.size(0), " rows, src ", src.size(0));
  const int64_t m = dst.size(0), n = x.size(0), V = x.size(1), ld = x.stride(0);
  const int64_t* dp = dst.data_ptr<int64_t>();
  const int64_t* sp = src.data_ptr<int64_t>();
  for (int64_t j = 0; j < m; ++j) {
    TORCH_CHECK(dp[j] >= 0 && sp[j] < n && (j == 0 || (dp[j] > dp[j - 1] && sp[j] > sp[j - 1])) && dp[m - 1] < sp[0],
                "psft_native.move_rows: dst and src must be ascending row indices, every dst row before every src row");
  }
  const int64_t bytes = x.element_size();
  char* base = static_cast<char*>(x.data_ptr());
  at::parallel_for(0, m, 1, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) std::memcpy(base + dp[j] * ld * bytes, base + sp[j] * ld * bytes, V * bytes);
  });
}

}  // namespace

TORCH_LIBRARY(psft_native, m) {
  m.def(
      "stats(Tensor(a!) z, Tensor targets, Tensor(b!)? zq, float inv_temperature, float softcap, int kl_mode, "
      "bool keep_exp, Tensor(c!)? slope=None) -> Tensor");
  m.def(
      "dlogits(Tensor(a!) z, Tensor targets, Tensor? zq, Tensor stats, Tensor? g, Tensor? e, Tensor? k, "
      "float inv_temperature, float softcap, int kl_mode, Tensor? slope=None) -> ()");
  m.def("transform_(Tensor(a!) x, float inv_temperature, float softcap, Tensor(b!)? slope=None) -> ()");
  m.def("move_rows(Tensor(a!) x, Tensor dst, Tensor src) -> ()");
}

TORCH_LIBRARY_IMPL(psft_native, CPU, m) {
  m.impl("stats", &stats);
  m.impl("dlogits", &dlogits);
  m.impl("transform_", &transform_);
  m.impl("move_rows", &move_rows);
}
