#include "kernels/cpu/simd_loops.h"

#include <cstring>

// One body per loop (a template, inlined), cloned per ISA by the exported
// overloads below. Reductions keep explicit lanes in a fixed order, which the
// compiler maps onto SIMD registers without reassociating: the same sums on
// every ISA and thread count.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FUSED_CONV_ISA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
// No a * b + c -> fma contraction: the FMA-capable clones would round
// differently from the baseline one.
#pragma GCC optimize("fp-contract=off")
#else
#define FUSED_CONV_ISA_CLONES
#endif

#if defined(__GNUC__)
#define FUSED_CONV_ALWAYS_INLINE inline __attribute__((always_inline))
#define FUSED_CONV_RESTRICT __restrict__
#else
#define FUSED_CONV_ALWAYS_INLINE inline
#define FUSED_CONV_RESTRICT
#endif

namespace fused_conv::cpu::simd {
namespace {

// Eight double lanes. With GCC / Clang a vector-extension type: element-wise
// arithmetic that each clone maps onto its registers (4 SSE2, 2 AVX2 or 1
// AVX-512 register), always with the same per-lane operations.
#if defined(__GNUC__)
// The helpers taking / returning Lanes are always inlined in this file, so the
// "64-byte vector return changes the ABI" note does not concern them.
#pragma GCC diagnostic ignored "-Wpsabi"
using Lanes = double __attribute__((vector_size(64)));
using FloatLanes = float __attribute__((vector_size(32)));

FUSED_CONV_ALWAYS_INLINE Lanes load_lanes(const double* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
FUSED_CONV_ALWAYS_INLINE Lanes load_lanes(const float* p) {
  FloatLanes v;
  std::memcpy(&v, p, sizeof(v));
  return __builtin_convertvector(v, Lanes);
}
#else
struct Lanes {
  double v[8] = {};
  double& operator[](int i) { return v[i]; }
  double operator[](int i) const { return v[i]; }
  friend Lanes operator+(Lanes a, const Lanes& b) {
    for (int i = 0; i < 8; ++i) a.v[i] += b.v[i];
    return a;
  }
  friend Lanes operator-(Lanes a, double b) {
    for (int i = 0; i < 8; ++i) a.v[i] -= b;
    return a;
  }
  friend Lanes operator*(Lanes a, const Lanes& b) {
    for (int i = 0; i < 8; ++i) a.v[i] *= b.v[i];
    return a;
  }
  Lanes& operator+=(const Lanes& b) { return *this = *this + b; }
};
template <typename T>
Lanes load_lanes(const T* p) {
  Lanes v;
  for (int i = 0; i < 8; ++i) v.v[i] = static_cast<double>(p[i]);
  return v;
}
#endif
constexpr int64_t kLanes = 8;

// Pairwise sum of the eight lanes, in a fixed order.
FUSED_CONV_ALWAYS_INLINE double fold_lanes(const Lanes& v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

// The run reductions keep two independent lane sets (16 partial sums) to
// hide the add latency, then one set of 8, then a scalar tail: a fixed
// association for any ISA.
template <typename T>
FUSED_CONV_ALWAYS_INLINE double sum_run_impl(const T* FUSED_CONV_RESTRICT p, int64_t n) {
  Lanes a = {}, b = {};
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    a += load_lanes(p + i);
    b += load_lanes(p + i + kLanes);
  }
  if (i + kLanes <= n) {
    a += load_lanes(p + i);
    i += kLanes;
  }
  double tail = 0.0;
  for (; i < n; ++i) tail += static_cast<double>(p[i]);
  return fold_lanes(a + b) + tail;
}

template <typename T>
FUSED_CONV_ALWAYS_INLINE double squared_deviation_run_impl(const T* FUSED_CONV_RESTRICT p,
                                                           int64_t n, double mean) {
  Lanes a = {}, b = {};
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    const Lanes da = load_lanes(p + i) - mean;
    const Lanes db = load_lanes(p + i + kLanes) - mean;
    a += da * da;
    b += db * db;
  }
  if (i + kLanes <= n) {
    const Lanes da = load_lanes(p + i) - mean;
    a += da * da;
    i += kLanes;
  }
  double tail = 0.0;
  for (; i < n; ++i) {
    const double dev = static_cast<double>(p[i]) - mean;
    tail += dev * dev;
  }
  return fold_lanes(a + b) + tail;
}

template <typename T>
FUSED_CONV_ALWAYS_INLINE void grad_sums_run_impl(const T* FUSED_CONV_RESTRICT y,
                                                 const T* FUSED_CONV_RESTRICT g, int64_t n,
                                                 double mean, double* acc) {
  Lanes sg = {}, sgc = {}, sc = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const Lanes gv = load_lanes(g + i);
    const Lanes cv = load_lanes(y + i) - mean;
    sg += gv;
    sgc += gv * cv;
    sc += cv;
  }
  double tg = 0.0, tgc = 0.0, tc = 0.0;
  for (; i < n; ++i) {
    const double gv = static_cast<double>(g[i]);
    const double cv = static_cast<double>(y[i]) - mean;
    tg += gv;
    tgc += gv * cv;
    tc += cv;
  }
  acc[0] += fold_lanes(sg) + tg;
  acc[1] += fold_lanes(sgc) + tgc;
  acc[2] += fold_lanes(sc) + tc;
}

template <typename T>
FUSED_CONV_ALWAYS_INLINE void sum_rows_impl(const T* FUSED_CONV_RESTRICT p, int64_t rows,
                                            int64_t channels, double* FUSED_CONV_RESTRICT acc) {
  for (int64_t r = 0; r < rows; ++r, p += channels) {
    for (int64_t c = 0; c < channels; ++c) acc[c] += static_cast<double>(p[c]);
  }
}

template <typename T>
FUSED_CONV_ALWAYS_INLINE void squared_deviation_rows_impl(const T* FUSED_CONV_RESTRICT p,
                                                          int64_t rows, int64_t channels,
                                                          const double* FUSED_CONV_RESTRICT mean,
                                                          double* FUSED_CONV_RESTRICT acc) {
  for (int64_t r = 0; r < rows; ++r, p += channels) {
    for (int64_t c = 0; c < channels; ++c) {
      const double dev = static_cast<double>(p[c]) - mean[c];
      acc[c] += dev * dev;
    }
  }
}

template <typename T>
FUSED_CONV_ALWAYS_INLINE void grad_sums_rows_impl(const T* FUSED_CONV_RESTRICT y,
                                                  const T* FUSED_CONV_RESTRICT g, int64_t rows,
                                                  int64_t channels,
                                                  const double* FUSED_CONV_RESTRICT mean,
                                                  double* FUSED_CONV_RESTRICT acc) {
  double* FUSED_CONV_RESTRICT sg = acc;
  double* FUSED_CONV_RESTRICT sgc = acc + channels;
  double* FUSED_CONV_RESTRICT sc = acc + 2 * channels;
  for (int64_t r = 0; r < rows; ++r, y += channels, g += channels) {
    for (int64_t c = 0; c < channels; ++c) {
      const double gv = static_cast<double>(g[c]);
      const double cv = static_cast<double>(y[c]) - mean[c];
      sg[c] += gv;
      sgc[c] += gv * cv;
      sc[c] += cv;
    }
  }
}

template <typename T>
FUSED_CONV_ALWAYS_INLINE void affine_run_impl(T* FUSED_CONV_RESTRICT p, int64_t n, T shift, T mul,
                                              T add) {
  for (int64_t i = 0; i < n; ++i) p[i] = (p[i] - shift) * mul + add;
}

template <typename T>
FUSED_CONV_ALWAYS_INLINE void affine_rows_impl(T* FUSED_CONV_RESTRICT p, int64_t rows,
                                               int64_t channels, const T* FUSED_CONV_RESTRICT shift,
                                               const T* FUSED_CONV_RESTRICT mul,
                                               const T* FUSED_CONV_RESTRICT add) {
  for (int64_t r = 0; r < rows; ++r, p += channels) {
    for (int64_t c = 0; c < channels; ++c) p[c] = (p[c] - shift[c]) * mul[c] + add[c];
  }
}

template <typename T>
FUSED_CONV_ALWAYS_INLINE void grad_conv_out_run_impl(T* FUSED_CONV_RESTRICT y,
                                                     const T* FUSED_CONV_RESTRICT g, int64_t n,
                                                     T mean, T k, T q, T r) {
  for (int64_t i = 0; i < n; ++i) y[i] = k * g[i] + q * (y[i] - mean) + r;
}

template <typename T>
FUSED_CONV_ALWAYS_INLINE void grad_conv_out_rows_impl(
    T* FUSED_CONV_RESTRICT y, const T* FUSED_CONV_RESTRICT g, int64_t rows, int64_t channels,
    const T* FUSED_CONV_RESTRICT mean, const T* FUSED_CONV_RESTRICT k,
    const T* FUSED_CONV_RESTRICT q, const T* FUSED_CONV_RESTRICT r) {
  for (int64_t row = 0; row < rows; ++row, y += channels, g += channels) {
    for (int64_t c = 0; c < channels; ++c) y[c] = k[c] * g[c] + q[c] * (y[c] - mean[c]) + r[c];
  }
}

}  // namespace

// ---- the exported, ISA-cloned overloads -------------------------------------

#define FUSED_CONV_FOR_FLOAT_TYPES(DEFINE) DEFINE(float) DEFINE(double)

#define FUSED_CONV_DEFINE_LOOPS(T)                                                                \
  FUSED_CONV_ISA_CLONES double sum_run(const T* p, int64_t n) { return sum_run_impl(p, n); }      \
  FUSED_CONV_ISA_CLONES double squared_deviation_run(const T* p, int64_t n, double mean) {        \
    return squared_deviation_run_impl(p, n, mean);                                                \
  }                                                                                               \
  FUSED_CONV_ISA_CLONES void grad_sums_run(const T* y, const T* g, int64_t n, double mean,        \
                                           double* acc) {                                         \
    grad_sums_run_impl(y, g, n, mean, acc);                                                       \
  }                                                                                               \
  FUSED_CONV_ISA_CLONES void sum_rows(const T* p, int64_t rows, int64_t channels, double* acc) {  \
    sum_rows_impl(p, rows, channels, acc);                                                        \
  }                                                                                               \
  FUSED_CONV_ISA_CLONES void squared_deviation_rows(const T* p, int64_t rows, int64_t channels,   \
                                                    const double* mean, double* acc) {            \
    squared_deviation_rows_impl(p, rows, channels, mean, acc);                                    \
  }                                                                                               \
  FUSED_CONV_ISA_CLONES void grad_sums_rows(const T* y, const T* g, int64_t rows,                 \
                                            int64_t channels, const double* mean, double* acc) {  \
    grad_sums_rows_impl(y, g, rows, channels, mean, acc);                                         \
  }                                                                                               \
  FUSED_CONV_ISA_CLONES void affine_run(T* p, int64_t n, T shift, T mul, T add) {                 \
    affine_run_impl(p, n, shift, mul, add);                                                       \
  }                                                                                               \
  FUSED_CONV_ISA_CLONES void affine_rows(T* p, int64_t rows, int64_t channels, const T* shift,    \
                                         const T* mul, const T* add) {                            \
    affine_rows_impl(p, rows, channels, shift, mul, add);                                         \
  }                                                                                               \
  FUSED_CONV_ISA_CLONES void grad_conv_out_run(T* y, const T* g, int64_t n, T mean, T k, T q,     \
                                               T r) {                                             \
    grad_conv_out_run_impl(y, g, n, mean, k, q, r);                                               \
  }                                                                                               \
  FUSED_CONV_ISA_CLONES void grad_conv_out_rows(T* y, const T* g, int64_t rows, int64_t channels, \
                                                const T* mean, const T* k, const T* q,            \
                                                const T* r) {                                     \
    grad_conv_out_rows_impl(y, g, rows, channels, mean, k, q, r);                                 \
  }

FUSED_CONV_FOR_FLOAT_TYPES(FUSED_CONV_DEFINE_LOOPS)

}  // namespace fused_conv::cpu::simd
