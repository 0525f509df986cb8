// The backward's reductions from patch moments (the reference problem's
// training backward: C_in = 8, 3x3, C_out = 64).
//
// With X[p][k] the patch of output pixel p (k = ci*9 + tap, zero padding) and
// y = X W^T the convolution without bias, every sum the backward needs is
// linear in g or quadratic in X:
//   sum_p g*(y - ctr)   = W . (sum_p g X) - ctr * sum g
//   sum_p (y - ctr)     = W . (sum_p X)   - M * ctr
//   grad_weight[c][k]   = sum_p g_hat X_k  with g_hat = A*g + C*(y - ctr) + D
//                       = A (sum g X)_k + C ((W G)_k - ctr (sum X)_k) + D (sum X)_k,
//   G = sum_p X X^T (72 x 72).
// So one pass over g and x that accumulates Gw = sum g X (64 x 72), G, sum X and
// sum g replaces both passes that recomputed y (the sums, then the weight
// gradient of g_hat), and a float64 finalize forms the rest. X is shifted by
// one sample value of x per input channel (x[0][ci][H/2][W/2]) before the
// products, so that G and Gw hold deviations, not raw values: a large common
// offset in x (or in y) would otherwise cancel in float32 (the "shifted data"
// variance formula); y - ctr = W . X~ - ctr' with ctr' = ctr - W . shift.
//
// Tiling: a persistent block of 8 warps takes 128 consecutive output pixels of
// one image per tile (flattened h*w, so no width is wasted). It stages g for all
// 64 channels (64 x 128 floats) and the input rows under the tile (8 channels,
// rows + 2 halo rows, in rows of kRowW words: 4 zero columns on the left, so
// that the copies stay 16-byte aligned, then w <= 128 columns and zeros) through
// a 2-deep cp.async ring. After a tile lands, one pass splits its shifted x
// rows into TF32 big and small planes and builds a table of each pixel's
// offset, so the MMA loop only loads (at compile-time tap offsets). Per k8 step (8 pixels)
// the products are m16n8k8 MMAs (3xTF32):
//   Gw: A = g (16 channels x 8 pixels), B = X of one tap (8 pixels x 8 ci):
//       warp w < 4 owns channel block w for all 9 taps (9 fragments);
//   G:  A = X of two taps (16 rows (ci, tap) x 8 pixels), B = X of one tap:
//       the tap pairs a <= b only (G is symmetric), 25 fragments over warps
//       4..7 (7, 6, 6, 6 fragments; training only), which also sum X.
// The X fragment of a tap is the same registers as A or B (row/col = ci,
// k = pixel), so no im2col matrix is formed. Accumulators start fresh every 4
// k-steps (the tensor core's float32 accumulation truncates; 12 MMAs per
// accumulator keep that below 1e-6) and are added into running float32 sums;
// sum g and sum X run in float64. Each block writes one float64 record; a
// fixed-order reduction and the finalize follow.
#include "kernels/cuda/grad_moments.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "kernels/cuda/grad_coefficients.cuh"
#include "kernels/cuda/grad_moments_record.cuh"
#include "kernels/cuda/grad_moments_rows.h"
#include "kernels/cuda/tf32_mma.cuh"
#include "kernels/cuda/tile_launch.cuh"

namespace fused_conv::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kPixels = 128;  // per tile: 16 k8 steps
constexpr int kKSteps = kPixels / 8;
constexpr int kFreshSteps = 4;  // k-steps per fresh accumulator
// Words between the channel rows of the staged g tile (= 4 mod 32): an A
// fragment load (8 channels x 4 pixels) hits 32 different banks.
constexpr int kGStride = kPixels + 4;
using moments::kCo;  // output channels: 4 m16 blocks
using moments::kCx;  // input channels: one n8 fragment
using moments::kK;   // 72 patch columns, k = ci*9 + tap
using moments::kTaps;
constexpr int kLeft = 4;    // zero columns left of a staged row (>= padding 2)
constexpr int kMaxW = 128;  // input width: a staged row holds kLeft + w + 3
constexpr int kRowW = 136;  // words per staged row (a multiple of 4)
static_assert(kLeft + kMaxW + 3 < kRowW && kRowW % 4 == 0, "a staged row holds every tap");
// The float64 record of one block (grad_moments_record.cuh).
using moments::kRecG;
using moments::kRecGw;
using moments::kRecord;
using moments::kRecS;
using moments::kRecSumG;

struct MomentShape {
  int64_t n, tiles;
  int c_g, h_g, w_g, plane_g;  // g: channels, size, pixels per image plane
  int c_x, h, w;               // x
  int pad_h, pad_w;
  int tiles_per_image;
  int rows;         // staged input rows per tile: the rows under 128 pixels + 2
  int plane_raw;    // words between the raw staged planes: rows * kRowW
  int plane_split;  // words between the planes of split x (big, then small): = 4 (mod 32)
  int stage_floats;
};

// Shared memory: the ring (2 x [g tile | raw x rows]), the split x planes
// (kCx big, then kCx small), the pixel table, the shifts.
size_t smem_bytes(const MomentShape& s) {
  return sizeof(float) * (2 * static_cast<size_t>(s.stage_floats) +
                          2 * kCx * static_cast<size_t>(s.plane_split) + kCx) +
         sizeof(int) * kPixels;
}

// The per-channel shift of X: one sample of x (the centre of image 0).
__device__ __forceinline__ float shift_of(const float* x, const MomentShape& s, int ci) {
  return ci < s.c_x ? x[(static_cast<int64_t>(ci) * s.h + s.h / 2) * s.w + s.w / 2] : 0.f;
}

// Copies tile `tile`'s g (channels < c_g, pixels past the plane as zeros) and
// x rows (rows outside the image and columns past w as zeros) into a ring
// stage. Channels of g past c_g and the left zero columns are never written.
template <int kVec>
__device__ __noinline__ void stage_tile(const float* __restrict__ g, const float* __restrict__ x,
                                        const MomentShape& s, int64_t tile, float* dst) {
  const int64_t n = tile / s.tiles_per_image;
  const int p0 = static_cast<int>(tile - n * s.tiles_per_image) * kPixels;
  constexpr int kGVecs = kPixels / kVec;
  const float* gn = g + n * s.c_g * s.plane_g;
  for (int i = threadIdx.x; i < s.c_g * kGVecs; i += kThreads) {
    const int c = i / kGVecs, p = p0 + (i % kGVecs) * kVec;
    const bool valid = p < s.plane_g;  // plane_g % kVec == 0: a vector is all in or all out
    cp_async_vec<kVec>(dst + c * kGStride + p - p0, valid ? gn + c * s.plane_g + p : g, valid);
  }
  float* xd = dst + kCo * kGStride;
  const int ih0 = p0 / s.w_g - s.pad_h;
  constexpr int kXVecs = kMaxW / kVec;
  for (int i = threadIdx.x; i < s.c_x * s.rows * kXVecs; i += kThreads) {
    const int v = i % kXVecs, plane_row = i / kXVecs;
    const int ci = plane_row / s.rows, r = plane_row - ci * s.rows;
    const int ih = ih0 + r, iw = v * kVec;
    // w % kVec == 0: a vector is all in or all out
    const bool valid = static_cast<unsigned>(ih) < static_cast<unsigned>(s.h) && iw < s.w;
    const float* src = valid ? x + ((n * s.c_x + ci) * s.h + ih) * s.w + iw : x;
    cp_async_vec<kVec>(xd + ci * s.plane_raw + r * kRowW + kLeft + iw, src, valid);
  }
  cp_async_commit();
}

// After a stage landed: its x rows minus the shift, split into TF32 big and
// small planes (a warp per plane row), and per pixel the word offset of its tap
// (0, 0) in a plane (pixels past the image plane point at the zero block after
// the rows, 2*kRowW + 3 words). Separate big and small planes let every MMA
// operand load straight into its register (no moves).
__device__ __noinline__ void prepare_tile(const MomentShape& s, int64_t tile, const float* raw_x,
                                          const float* shift, float* split, int* table) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int plane_row = warp; plane_row < s.c_x * s.rows; plane_row += kWarps) {
    const int ci = plane_row / s.rows, r = plane_row - ci * s.rows;
    const float* src = raw_x + ci * s.plane_raw + r * kRowW;
    float* big_dst = split + ci * s.plane_split + r * kRowW;
    float* small_dst = big_dst + kCx * s.plane_split;
    const float sh = shift[ci];
    for (int j = lane; j < kRowW; j += 32) {
      uint32_t big, small;
      split_tf32(src[j] - sh, big, small);
      big_dst[j] = __uint_as_float(big);
      small_dst[j] = __uint_as_float(small);
    }
  }
  const int64_t n = tile / s.tiles_per_image;
  const int p0 = static_cast<int>(tile - n * s.tiles_per_image) * kPixels;
  const int oh0 = p0 / s.w_g;
  for (int i = threadIdx.x; i < kPixels; i += kThreads) {
    const int p = p0 + i, oh = p / s.w_g, ow = p - oh * s.w_g;
    table[i] = p < s.plane_g ? (oh - oh0) * kRowW + ow + kLeft - s.pad_w : s.plane_raw;
  }
}

__device__ __forceinline__ uint32_t bits(float v) { return __float_as_uint(v); }

constexpr int tap_offset(int tap) { return (tap / 3) * kRowW + tap % 3; }

// The warp roles. kRole 0: a Gw channel block (warps 0..3, 9 fragments).
// kRole 1..4: 6 or 7 of the 25 G fragments (a, b): rows (ci, a) and (ci, a + 1)
// for a = 0, 2, 4, 6 (and the lone row tap a = 8), columns (ci', b), b >= a.
// Warps w and w + 4 share a scheduler: 27 + 21 or 27 + 18 MMAs per k-step.
constexpr int kGFragCount[5] = {0, 7, 6, 6, 6};
constexpr int kFirstTap[5] = {0, 0, 0, 2, 4};  // taps a role loads: kFirstTap..8
// Fragment f's row tap a (column = false) or column tap b (column = true), one
// hexadecimal digit per fragment (f = 0 lowest): rows {0 x7}, {0,0,2,2,2,2},
// {2,2,2,4,4,4}, {4,4,6,6,6,8}; columns {0..6}, {7,8,2,3,4,5}, {6,7,8,4,5,6},
// {7,8,6,7,8,8}.
__host__ __device__ constexpr int g_frag_tap(int role, int f, bool column) {
  constexpr unsigned kRows[5] = {0u, 0u, 0x222200u, 0x444222u, 0x866644u};
  constexpr unsigned kCols[5] = {0u, 0x6543210u, 0x543287u, 0x654876u, 0x887687u};
  return static_cast<int>(((column ? kCols[role] : kRows[role]) >> (4 * f)) & 15u);
}

// The persistent loop of one warp (all warps run it, with their role's
// fragments, and meet at the same barriers).
template <int kVec, int kRole, bool kGram>
__device__ void moments_loop(const float* __restrict__ g, const float* __restrict__ x,
                             double* __restrict__ partials, const MomentShape& s, float* ring,
                             float* split, int* table, const float* shift) {
  constexpr bool kComputes = kRole == 0 || kGram;
  constexpr int kFrags = kRole == 0 ? kTaps : kGFragCount[kRole];
  constexpr int kTap0 = kFirstTap[kRole];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int fg = lane / 4, ft = lane % 4;  // fragment row group / thread in group
  const int cb = warp;                     // role 0: channel block
  // sum X (training only): G role r sums the taps [kSumLo, kSumHi): {0,1}, {2,3,4},
  // {5,6}, {7,8} (a compile-time share next to its 18 or 21 MMAs per k-step).
  constexpr int kSumLo = kRole == 1 ? 0 : kRole == 2 ? 2 : kRole == 3 ? 5 : kRole == 4 ? 7 : 0;
  constexpr int kSumHi = kRole == 1 ? 2 : kRole == 2 ? 5 : kRole == 3 ? 7 : kRole == 4 ? 9 : 0;

  float run[kFrags][4];
  double run_sum_g[2] = {0, 0}, run_sum_x[kTaps];
#pragma unroll
  for (int j = 0; j < kFrags; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) run[j][e] = 0.f;
#pragma unroll
  for (int t = 0; t < kTaps; ++t) run_sum_x[t] = 0;

  const int64_t my_tiles =
      s.tiles > blockIdx.x ? (s.tiles - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
  if (my_tiles > 0) stage_tile<kVec>(g, x, s, blockIdx.x, ring);
  for (int64_t iter = 0; iter < my_tiles; ++iter) {
    const int64_t tile = blockIdx.x + iter * gridDim.x;
    const float* stage = ring + (iter % 2) * s.stage_floats;
    cp_async_wait<0>();
    __syncthreads();  // the tile landed; every warp is done with the previous one
    if (iter + 1 < my_tiles) {
      stage_tile<kVec>(g, x, s, tile + gridDim.x, ring + ((iter + 1) % 2) * s.stage_floats);
    }
    prepare_tile(s, tile, stage + kCo * kGStride, shift, split, table);
    __syncthreads();
    if constexpr (kComputes) {
      const float* gs = stage + (16 * cb + fg) * kGStride + ft;
      const float* xb = split + fg * s.plane_split;  // the lane's input channel ci = fg
      const float* xsm = xb + kCx * s.plane_split;
      float sum_g[2] = {0.f, 0.f}, sum_x[kTaps];
#pragma unroll
      for (int t = 0; t < kTaps; ++t) sum_x[t] = 0.f;
      for (int ks0 = 0; ks0 < kKSteps; ks0 += kFreshSteps) {
        float acc[kFrags][4];
#pragma unroll
        for (int j = 0; j < kFrags; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
#pragma unroll
        for (int ks = ks0; ks < ks0 + kFreshSteps; ++ks) {
          // X of the taps at pixels p = 8ks + ft and p + 4: B fragments (b0, b1)
          // or halves of A fragments.
          const int o0 = table[8 * ks + ft], o1 = table[8 * ks + ft + 4];
          float xv[kTaps][2], xw[kTaps][2];  // big, small
#pragma unroll
          for (int t = kTap0; t < kTaps; ++t) {
            xv[t][0] = xb[o0 + tap_offset(t)];
            xv[t][1] = xb[o1 + tap_offset(t)];
            xw[t][0] = xsm[o0 + tap_offset(t)];
            xw[t][1] = xsm[o1 + tap_offset(t)];
          }
          if constexpr (kRole == 0) {
            // A = g: a0 = g[c][p], a1 = g[c + 8][p], a2 = g[c][p + 4], a3 = g[c + 8][p + 4].
            const float gv[4] = {gs[8 * ks], gs[8 * kGStride + 8 * ks], gs[8 * ks + 4],
                                 gs[8 * kGStride + 8 * ks + 4]};
            uint32_t a_big[4], a_small[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) split_tf32(gv[e], a_big[e], a_small[e]);
            sum_g[0] += gv[0] + gv[2];
            sum_g[1] += gv[1] + gv[3];
            // 3xTF32, product-major: nine independent accumulators between the
            // dependent MMAs of one.
#pragma unroll
            for (int t = 0; t < kTaps; ++t) {
              mma_tf32(acc[t], a_small, bits(xv[t][0]), bits(xv[t][1]));
            }
#pragma unroll
            for (int t = 0; t < kTaps; ++t) mma_tf32(acc[t], a_big, bits(xw[t][0]), bits(xw[t][1]));
#pragma unroll
            for (int t = 0; t < kTaps; ++t) mma_tf32(acc[t], a_big, bits(xv[t][0]), bits(xv[t][1]));
          } else {
#pragma unroll
            for (int t = kSumLo; t < kSumHi; ++t) {
              sum_x[t] += (xv[t][0] + xv[t][1]) + (xw[t][0] + xw[t][1]);
            }
            // A: a0 = X[p][(ci, a)], a1 = X[p][(ci, a + 1)] (zero past tap 8),
            // a2/a3 the same at p + 4; B = X[.][(ci', b)]. Product-major.
            uint32_t ab[kFrags][4], as[kFrags][4];
#pragma unroll
            for (int f = 0; f < kFrags; ++f) {
              const int a = g_frag_tap(kRole, f, false);
              const int a1 = a + 1 < kTaps ? a + 1 : a;
              const bool pair = a + 1 < kTaps;
              ab[f][0] = bits(xv[a][0]);
              ab[f][1] = pair ? bits(xv[a1][0]) : 0u;
              ab[f][2] = bits(xv[a][1]);
              ab[f][3] = pair ? bits(xv[a1][1]) : 0u;
              as[f][0] = bits(xw[a][0]);
              as[f][1] = pair ? bits(xw[a1][0]) : 0u;
              as[f][2] = bits(xw[a][1]);
              as[f][3] = pair ? bits(xw[a1][1]) : 0u;
            }
#pragma unroll
            for (int f = 0; f < kFrags; ++f) {
              const int b = g_frag_tap(kRole, f, true);
              mma_tf32(acc[f], as[f], bits(xv[b][0]), bits(xv[b][1]));
            }
#pragma unroll
            for (int f = 0; f < kFrags; ++f) {
              const int b = g_frag_tap(kRole, f, true);
              mma_tf32(acc[f], ab[f], bits(xw[b][0]), bits(xw[b][1]));
            }
#pragma unroll
            for (int f = 0; f < kFrags; ++f) {
              const int b = g_frag_tap(kRole, f, true);
              mma_tf32(acc[f], ab[f], bits(xv[b][0]), bits(xv[b][1]));
            }
          }
        }
#pragma unroll
        for (int j = 0; j < kFrags; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) run[j][e] += acc[j][e];
      }
      run_sum_g[0] += sum_g[0];
      run_sum_g[1] += sum_g[1];
#pragma unroll
      for (int t = 0; t < kTaps; ++t) run_sum_x[t] += sum_x[t];
    }
  }
  cp_async_wait<0>();
  if constexpr (!kComputes) return;

  // The block's record. d0 = D[fg][2ft], d1 = D[fg][2ft + 1], d2/d3 = row fg + 8.
  double* rec = partials + static_cast<int64_t>(blockIdx.x) * kRecord;
  // Sums over the four lanes of a row group, in a fixed order.
  auto quad_sum = [](double v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
  };
  if constexpr (kRole == 0) {
    const int c = 16 * cb + fg;
#pragma unroll
    for (int t = 0; t < kTaps; ++t) {
      rec[kRecGw + c * kK + (2 * ft) * kTaps + t] = run[t][0];
      rec[kRecGw + c * kK + (2 * ft + 1) * kTaps + t] = run[t][1];
      rec[kRecGw + (c + 8) * kK + (2 * ft) * kTaps + t] = run[t][2];
      rec[kRecGw + (c + 8) * kK + (2 * ft + 1) * kTaps + t] = run[t][3];
    }
    const double sg0 = quad_sum(run_sum_g[0]), sg1 = quad_sum(run_sum_g[1]);
    if (ft == 0) {
      rec[kRecSumG + c] = sg0;
      rec[kRecSumG + c + 8] = sg1;
    }
  } else {
#pragma unroll
    for (int f = 0; f < kFrags; ++f) {
      const int a = g_frag_tap(kRole, f, false), b = g_frag_tap(kRole, f, true);
      const int row = fg * kTaps + a, col = (2 * ft) * kTaps + b;
      rec[kRecG + row * kK + col] = run[f][0];
      rec[kRecG + row * kK + col + kTaps] = run[f][1];
      if (a + 1 < kTaps) {
        rec[kRecG + (row + 1) * kK + col] = run[f][2];
        rec[kRecG + (row + 1) * kK + col + kTaps] = run[f][3];
      }
    }
#pragma unroll
    for (int t = kSumLo; t < kSumHi; ++t) {
      const double sx = quad_sum(run_sum_x[t]);
      if (ft == 0) rec[kRecS + fg * kTaps + t] = sx;
    }
  }
}

template <int kVec, bool kGram>
__global__ void __launch_bounds__(kThreads, 1)
    grad_moments_kernel(const float* __restrict__ g, const float* __restrict__ x,
                        double* __restrict__ partials, MomentShape s) {
  extern __shared__ uint4 smem_u4[];
  float* ring = reinterpret_cast<float*>(smem_u4);
  float* split = ring + 2 * s.stage_floats;
  float* shift = split + 2 * kCx * s.plane_split;
  int* table = reinterpret_cast<int*>(shift + kCx);
  // Zeros that are never overwritten: g channels past c_g, the left columns
  // and unused planes of the raw rows, the split planes' zero blocks and planes
  // past c_x.
  for (int i = threadIdx.x; i < 2 * s.stage_floats + 2 * kCx * s.plane_split; i += kThreads) {
    ring[i] = 0.f;
  }
  if (threadIdx.x < kCx) shift[threadIdx.x] = shift_of(x, s, threadIdx.x);
  __syncthreads();

  switch (threadIdx.x / 32) {
    case 4:
      moments_loop<kVec, 1, kGram>(g, x, partials, s, ring, split, table, shift);
      break;
    case 5:
      moments_loop<kVec, 2, kGram>(g, x, partials, s, ring, split, table, shift);
      break;
    case 6:
      moments_loop<kVec, 3, kGram>(g, x, partials, s, ring, split, table, shift);
      break;
    case 7:
      moments_loop<kVec, 4, kGram>(g, x, partials, s, ring, split, table, shift);
      break;
    default:
      moments_loop<kVec, 0, kGram>(g, x, partials, s, ring, split, table, shift);
  }
}

// total[e] = sum over the blocks (in order, float64) of record entry e; G
// entries below the tap diagonal are read from their mirror (computed ones).
__global__ void reduce_moments_kernel(const double* __restrict__ partials, int blocks, bool gram,
                                      double* __restrict__ total) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= kRecord) return;
  int src = e;
  if (!gram && e >= kRecG && e < kRecSumG) {  // G and sum X: training only
    total[e] = 0;
    return;
  }
  if (e >= kRecG && e < kRecS) {
    const int row = (e - kRecG) / kK, col = (e - kRecG) % kK;
    if (row % kTaps > col % kTaps) src = kRecG + col * kK + row;
  }
  double sum = 0;
  for (int b = 0; b < blocks; ++b) sum += partials[static_cast<int64_t>(b) * kRecord + src];
  total[e] = sum;
}

// One block of 128 threads per output channel c; thread k < 72 owns patch
// column k. The math is that of finalize_grad_kernel (conv_bn_backward.cu) with
// the sums taken from the moments (see the top of this file), in float64.
constexpr int kFinalizeThreads = 128;
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_moments_kernel(const double* __restrict__ total, const float* __restrict__ w,
                            const float* __restrict__ x, MomentShape s,
                            const float* __restrict__ center, const float* __restrict__ invstd,
                            const float* __restrict__ k, double count, bool training,
                            float* __restrict__ rows, float* __restrict__ grad_weight) {
  __shared__ double red[3][kFinalizeThreads];
  __shared__ double w_row[kK];
  __shared__ double coef[5];
  const int c = blockIdx.x, tid = threadIdx.x;
  const int k_cols = s.c_x * kTaps;  // the weight's columns: k = ci*9 + tap
  const bool live = tid < k_cols;
  const double wk = live ? w[c * k_cols + tid] : 0.0;
  const double shift = live ? shift_of(x, s, tid / kTaps) : 0.0;
  const double gw = live ? total[kRecGw + c * kK + tid] : 0.0;
  const double sx = live ? total[kRecS + tid] : 0.0;
  if (tid < kK) w_row[tid] = wk;
  red[0][tid] = wk * gw;
  red[1][tid] = wk * sx;
  red[2][tid] = wk * shift;
  __syncthreads();
  for (int half = kFinalizeThreads / 2; half > 0; half /= 2) {
    if (tid < half) {
#pragma unroll
      for (int r = 0; r < 3; ++r) red[r][tid] += red[r][tid + half];
    }
    __syncthreads();
  }
  if (tid == 0) {
    const double sg = total[kRecSumG + c];
    const double ctr = center[c] - red[2][0];   // y - ctr = W . X~ - ctr'
    const double sgy = red[0][0] - ctr * sg;    // sum g*(y - ctr)
    const double sy = red[1][0] - count * ctr;  // sum (y - ctr)
    const GradCoefficients coefs = grad_coefficients(sg, sgy, sy, invstd[c], k[c], count, training);
    store_grad_rows(rows, gridDim.x, c, sg, coefs);
    coef[0] = coefs.a;
    coef[1] = coefs.cy;
    coef[2] = coefs.c1;
    coef[3] = ctr;
    coef[4] = coefs.a * sg + coefs.cy * sy + coefs.c1 * count;  // sum g_hat
  }
  __syncthreads();
  if (grad_weight == nullptr || !live) return;
  // sum_p g_hat X_k = sum g_hat X~_k + shift_k * sum g_hat.
  double wg = 0;
  if (training) {
    for (int j = 0; j < k_cols; ++j) wg += w_row[j] * total[kRecG + j * kK + tid];
  }
  grad_weight[c * k_cols + tid] = static_cast<float>(coef[0] * gw + coef[1] * (wg - coef[3] * sx) +
                                                     coef[2] * sx + shift * coef[4]);
}

std::optional<MomentShape> make_moment_shape(const at::Tensor& input, const at::Tensor& weight,
                                             at::IntArrayRef stride, at::IntArrayRef padding,
                                             at::IntArrayRef dilation, int64_t groups) {
  if (input.scalar_type() != at::kFloat || input.dim() != 4 || weight.dim() != 4 || groups != 1 ||
      stride[0] != 1 || stride[1] != 1 || dilation[0] != 1 || dilation[1] != 1 ||
      weight.size(2) != 3 || weight.size(3) != 3 || padding[0] < 0 || padding[0] > 2 ||
      padding[1] < 0 || padding[1] > 2 || input.numel() == 0 || !input.is_cuda() ||
      input.suggest_memory_format() != at::MemoryFormat::Contiguous) {
    return std::nullopt;
  }
  const int64_t c_x = input.size(1), h = input.size(2), w = input.size(3);
  const int64_t c_g = weight.size(0);
  const int64_t h_g = h + 2 * padding[0] - 2, w_g = w + 2 * padding[1] - 2;
  constexpr int64_t kInt32 = int64_t{1} << 31;
  if (c_x > kCx || c_g > kCo || h_g <= 0 || w_g <= 0 || c_g * h_g * w_g >= kInt32 ||
      c_x * h * w >= kInt32 || w > kMaxW) {
    return std::nullopt;
  }
  MomentShape s{};
  s.n = input.size(0);
  s.c_g = static_cast<int>(c_g);
  s.h_g = static_cast<int>(h_g);
  s.w_g = static_cast<int>(w_g);
  s.plane_g = static_cast<int>(h_g * w_g);
  s.c_x = static_cast<int>(c_x);
  s.h = static_cast<int>(h);
  s.w = static_cast<int>(w);
  s.pad_h = static_cast<int>(padding[0]);
  s.pad_w = static_cast<int>(padding[1]);
  s.tiles_per_image = (s.plane_g + kPixels - 1) / kPixels;
  s.tiles = s.n * s.tiles_per_image;
  // 128 consecutive pixels touch at most (127 / w_g) + 2 output rows; each
  // needs the input rows under it and two more.
  s.rows = (kPixels - 1) / s.w_g + 4;
  s.plane_raw = s.rows * kRowW;
  const int plane_words = s.plane_raw + 2 * kRowW + 3;  // + the zero block
  s.plane_split = plane_words + ((4 - plane_words) % 32 + 32) % 32;
  s.stage_floats = kCo * kGStride + kCx * s.plane_raw;
  if (smem_bytes(s) > static_cast<size_t>(max_shared_memory_per_block(input.get_device()))) {
    return std::nullopt;
  }
  return s;
}

template <int kVec, bool kGram>
void launch_moments(const MomentShape& s, const at::Tensor& g, const at::Tensor& x,
                    double* partials, int grid) {
  auto kernel = grad_moments_kernel<kVec, kGram>;
  const size_t bytes = smem_bytes(s);
  allow_dynamic_smem(reinterpret_cast<const void*>(kernel), bytes);
  kernel<<<grid, kThreads, bytes, c10::cuda::getCurrentCUDAStream()>>>(
      g.const_data_ptr<float>(), x.const_data_ptr<float>(), partials, s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

bool grad_moments_supports(const at::Tensor& input, const at::Tensor& weight,
                           at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t groups) {
  return make_moment_shape(input, weight, stride, padding, dilation, groups).has_value();
}

std::pair<at::Tensor, at::Tensor> grad_moments(const at::Tensor& grad_out, const at::Tensor& input,
                                               const at::Tensor& weight, const at::Tensor& center,
                                               const at::Tensor& invstd, const at::Tensor& k,
                                               at::IntArrayRef padding, bool training,
                                               bool want_weight_grad) {
  c10::cuda::CUDAGuard guard(input.device());
  const int64_t unit[2] = {1, 1};
  const auto shape = make_moment_shape(input, weight, unit, padding, unit, 1);
  TORCH_CHECK(shape.has_value(), "fused_conv: configuration outside grad_moments' reach");
  const MomentShape& s = *shape;
  const at::Tensor g = grad_out.contiguous();
  TORCH_CHECK(g.scalar_type() == at::kFloat && g.size(0) == s.n && g.size(1) == s.c_g &&
                  g.size(2) == s.h_g && g.size(3) == s.w_g,
              "fused_conv: grad_moments expected a float32 gradient of shape [", s.n, ", ", s.c_g,
              ", ", s.h_g, ", ", s.w_g, "], got ", g.scalar_type(), " ", g.sizes());
  const at::Tensor x = input.contiguous();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const auto aligned = [](const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  };
  const bool vec4 = s.plane_g % 4 == 0 && s.w % 4 == 0 && aligned(g) && aligned(x);
  // Training needs sum X (the recentring delta) and G; the G warps compute both.
  const bool gram = training;
  const auto f64 = input.options().dtype(at::kDouble);
  at::Tensor partials;
  if (grad_moments_rows_supports(input.get_device(), s.w_g)) {
    partials = grad_moments_rows(g, x, s.pad_h, s.pad_w, gram);
  } else {
    const int blocks = static_cast<int>(
        std::clamp<int64_t>(s.tiles, 1, multiprocessors(input.get_device())));  // 1 block per SM
    partials = at::empty({blocks, kRecord}, f64);
    double* p = partials.mutable_data_ptr<double>();
    if (vec4) {
      gram ? launch_moments<4, true>(s, g, x, p, blocks)
           : launch_moments<4, false>(s, g, x, p, blocks);
    } else {
      gram ? launch_moments<1, true>(s, g, x, p, blocks)
           : launch_moments<1, false>(s, g, x, p, blocks);
    }
  }
  const int grid = static_cast<int>(partials.size(0));
  at::Tensor total = at::empty({kRecord}, f64);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kBlock = 256;
  reduce_moments_kernel<<<(kRecord + kBlock - 1) / kBlock, kBlock, 0, stream>>>(
      partials.const_data_ptr<double>(), grid, gram, total.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor rows = at::empty({kGradRows, s.c_g}, input.options());
  at::Tensor grad_weight;
  if (want_weight_grad) grad_weight = at::empty(weight.sizes(), input.options());
  const double count = static_cast<double>(s.n) * s.plane_g;
  finalize_moments_kernel<<<s.c_g, kFinalizeThreads, 0, stream>>>(
      total.const_data_ptr<double>(), w.const_data_ptr<float>(), x.const_data_ptr<float>(), s,
      center.const_data_ptr<float>(), invstd.const_data_ptr<float>(), k.const_data_ptr<float>(),
      count, training, rows.mutable_data_ptr<float>(),
      want_weight_grad ? grad_weight.mutable_data_ptr<float>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {rows, grad_weight};
}

}  // namespace fused_conv::cuda
