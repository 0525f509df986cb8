// The backward's patch moments (grad_moments.h; the math at the top of
// grad_moments.cu), row-tiled for Hopper's warpgroup MMAs.
//
// With the pixels as K, every sum is a GEMM over the patch matrix X (rows =
// pixels, columns n = tap*8 + ci, shifted per input channel):
//   Gw = g X      (M = 64 output channels, N = 72): A = g, B = X;
//   G  = X^T X    (72 x 72): A = rows of X^T, B = X.
// wgmma needs both shared-memory operands K-major in 8-row x 16-byte core
// matrices. X's column n at 4 consecutive pixels is 16 bytes of the input row
// under them, shifted by the tap's column offset q, so the kernel stages every
// input row three times (q = 0, 1, 2) as X~[row][q][pixel group j][ci][4]:
// the core matrix (tap (r, q), group j) of an output row oh is then 128
// contiguous bytes at ((oh + r)*3 + q, j), and consecutive taps lie a constant
// 8*slots words apart (t = 3r + q): one descriptor covers all nine taps
// (stride byte offset), the two 4-pixel halves of a k-step 128 bytes apart
// (leading byte offset). That needs the 8 pixels of a k-step in one output row:
// a tile is whole output rows of `slots` = W_out rounded up to 8 pixel slots
// (128 slots per tile), the slots past W_out hold zeros in X~ and g.
//
// A block of two warpgroups per multiprocessor, persistent over tiles:
//   warpgroup 0: Gw as wgmma.m64n72k8 with A = g from registers (3xTF32: the
//     g tile is split in registers, X~ is staged as big and small planes) and
//     sum g;
//   warpgroup 1 (training): G as wgmma.m64n72k8 with A = the X~ rows of taps
//     1..8 (64 rows) and B = all 72 columns, plus wgmma.m64n8k8 with A = taps
//     0..7 and B = tap 0 (the block G[tap 0][tap 0] the first one misses),
//     both from shared memory; and sum X from per-row sums that the staging
//     pass takes.
// Each tile: g and the raw input rows arrive through a 2-deep cp.async ring;
// all warps convert the raw rows into X~ (minus the shift, split into TF32
// big/small, zero past W_out); then both warpgroups issue their MMAs, four
// k-steps per fresh accumulator (the tensor core's float32 accumulation
// truncates), added into running float32 sums. Elsewhere than sm_90a the same
// products run as mma.sync m16n8k8 with fragments read from X~. The record
// written per block is that of grad_moments_record.cuh.
#include "kernels/cuda/grad_moments_rows.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "kernels/cuda/grad_moments_record.cuh"
#include "kernels/cuda/tf32_mma.cuh"
#include "kernels/cuda/tile_launch.cuh"
#include "kernels/cuda/wgmma_tf32.cuh"

namespace fused_conv::cuda {
namespace {

using moments::kCo;
using moments::kCx;
using moments::kK;
using moments::kRecG;
using moments::kRecGw;
using moments::kRecord;
using moments::kRecS;
using moments::kRecSumG;
using moments::kTaps;

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kPix = 128;       // pixel slots per tile: at most 16 k-steps
constexpr int kFreshSteps = 4;  // k-steps per fresh accumulator
// Words between the staged g channels (= 4 mod 32): an A fragment load (8
// channels x 4 pixels) hits 32 distinct banks.
constexpr int kGS = kPix + 4;
constexpr int kLeft = 4;   // a staged raw row holds input column iw at word kLeft + iw
constexpr int kParts = 4;  // the pixel groups of one (row, q) are converted by 4 warps
// Rows-kernel shared memory stays below this (W_out <= 128: about 170 KB).
constexpr int kMaxSmem = 176 * 1024;

struct RowShape {
  int64_t n, tiles;
  int c_g, h_g, w_g, plane_g;
  int c_x, h, w, pad_h, pad_w;
  int slots;        // pixel slots per output row: W_out rounded up to 8
  int rows;         // output rows per tile: kPix / slots
  int tiles_h;      // tiles per image
  int raw_row;      // words per staged raw input row
  int raw_plane;    // words between the staged input channels (= 4 mod 32)
  int xt_row;       // words of X~ per (input row, q): slots * 8
  int xt_words;     // words per X~ term (big or small): (rows + 2) * 3 * xt_row
  int stage_words;  // one ring stage: the g tile [64][kGS], then the raw rows
};

// Shared memory: the ring, X~ big then small, the conversion's row sums
// [(rows + 2) * 3][kParts][kCx], the shifts, the k-step table (kPix / 8 int2).
size_t smem_bytes(const RowShape& s) {
  return sizeof(float) *
             (2 * static_cast<size_t>(s.stage_words) + 2 * static_cast<size_t>(s.xt_words) +
              static_cast<size_t>(s.rows + 2) * 3 * kParts * kCx + kCx) +
         sizeof(int2) * (kPix / 8);
}

// Visits this thread's indices i = threadIdx.x + kThreads*m of a 3-digit space
// (outer, mid < e1, inner < e2) by carries instead of divisions: the start and
// the step are divided once per call.
struct Walk3 {
  int outer, mid, inner;
  int d_outer, d_mid, d_inner;
  int e1, e2;
  __device__ Walk3(int extent1, int extent2) : e1(extent1), e2(extent2) {
    const int block = e1 * e2;
    outer = threadIdx.x / block;
    mid = (threadIdx.x / e2) % e1;
    inner = threadIdx.x % e2;
    d_outer = kThreads / block;
    d_mid = (kThreads / e2) % e1;
    d_inner = kThreads % e2;
  }
  __device__ void next() {
    inner += d_inner;
    mid += d_mid;
    outer += d_outer;
    if (inner >= e2) {
      inner -= e2;
      ++mid;
    }
    if (mid >= e1) {
      mid -= e1;
      ++outer;
    }
  }
};

// Copies tile `tile`'s g rows (slot ri*slots + p; zeros past W_out and past the
// image's last row) and its rows + 2 input rows (zeros outside the image) into
// a ring stage. Channels past C_out / C_in and the raw rows' margins are never
// written (zeroed once). The g copies: thread t owns item t % per_c of the tile
// (a (row, pixel) pair; per_c <= kPix / kVec <= kThreads / 2) in the channels
// t / per_c + m * c_step, so its source and destination advance by constants.
// Inlined, so that the shape is read from the kernel's parameters (a reference
// into a non-inlined function put it in local memory, reloaded per copy).
template <int kVec>
__device__ __forceinline__ void stage_rows(const float* __restrict__ g, const float* __restrict__ x,
                                           const RowShape& s, int64_t tile, float* dst) {
  const int64_t n = tile / s.tiles_h;
  const int oh0 = static_cast<int>(tile - n * s.tiles_h) * s.rows;
  const int per_row = s.slots / kVec, per_c = s.rows * per_row, c_step = kThreads / per_c;
  const int c0 = threadIdx.x / per_c, item = threadIdx.x - c0 * per_c;
  if (c0 < c_step) {
    const int ri = item / per_row, p = (item - ri * per_row) * kVec;
    const int oh = oh0 + ri;
    const bool valid = oh < s.h_g && p < s.w_g;  // w_g % kVec == 0: all in or all out
    const float* src = valid ? g + (n * s.c_g + c0) * s.plane_g + oh * s.w_g + p : g;
    const int64_t src_step = valid ? static_cast<int64_t>(c_step) * s.plane_g : 0;
    float* d = dst + c0 * kGS + ri * s.slots + p;
    for (int c = c0; c < s.c_g; c += c_step, src += src_step, d += c_step * kGS) {
      cp_async_vec<kVec>(d, src, valid);
    }
  }
  float* xd = dst + kCo * kGS;
  const float* xn = x + n * s.c_x * static_cast<int64_t>(s.h) * s.w;
  for (Walk3 it(s.rows + 2, s.w / kVec); it.outer < s.c_x; it.next()) {  // (ci, rr, iw / kVec)
    const int ci = it.outer, rr = it.mid, iw = it.inner * kVec;
    const int ih = oh0 - s.pad_h + rr;
    const bool valid = ih >= 0 && ih < s.h;
    const float* src = valid ? xn + (ci * s.h + ih) * s.w + iw : x;
    cp_async_vec<kVec>(xd + ci * s.raw_plane + rr * s.raw_row + kLeft + iw, src, valid);
  }
  cp_async_commit();
}

// X~[rr][q][j][ci][e] = x[ci][row rr][4j + e + q - pad_w] - shift[ci] (the
// padding holds -shift, as in grad_moments.cu), zero for pixel slots past
// W_out; split into TF32 big and small planes. Warp unit u = (rr*3 + q, part)
// converts a quarter of the row's groups, lane (ci, e) one word of each core
// matrix: the loads hit banks 4ci + e (raw_plane = 4 mod 32), the stores are
// 32 consecutive words. sums[u][ci] = the unit's sum of X~ (in a fixed order).
__device__ __forceinline__ void convert_rows(const RowShape& s, const float* raw,
                                             const float* shift, float* xt_big, float* xt_small,
                                             float* sums) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, ci = lane / 4, e = lane % 4;
  const float sh = shift[ci];
  const int groups = s.slots / 4, per_part = (groups + kParts - 1) / kParts;
  const int units = (s.rows + 2) * 3 * kParts;
  for (int u = warp; u < units; u += kWarps) {
    const int task = u / kParts, part = u - task * kParts;  // task = rr*3 + q
    const int rr = task / 3, q = task - 3 * rr;
    const int j0 = part * per_part, j1 = min(j0 + per_part, groups);
    const float* src = raw + ci * s.raw_plane + rr * s.raw_row + kLeft + q - s.pad_w + e;
    float* big_dst = xt_big + task * s.xt_row + ci * 4 + e;
    float* small_dst = xt_small + task * s.xt_row + ci * 4 + e;
    float sum = 0.f;
    // At most kPix / 4 / kParts groups per unit: unrolled and predicated, no
    // loop branches (ncu: the runtime-bounded loop's branches were a tenth of
    // the conversion's samples).
#pragma unroll
    for (int jj = 0; jj < kPix / 4 / kParts; ++jj) {
      const int j = j0 + jj;
      if (j < j1) {
        const float v = 4 * j + e < s.w_g ? src[4 * j] - sh : 0.f;
        uint32_t big, small;
        split_tf32(v, big, small);
        big_dst[32 * j] = __uint_as_float(big);
        small_dst[32 * j] = __uint_as_float(small);
        sum += v;
      }
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    if (e == 0) sums[u * kCx + ci] = sum;
  }
  fence_proxy_async_shared();  // X~ is wgmma's shared-memory operand
}

#if !FUSED_CONV_WGMMA
// X~ word of tap t, k-half kc, channel ci, element e at k-step offset xo.
__device__ __forceinline__ int xt_word(const RowShape& s, int xo, int t, int kc, int ci, int e) {
  return xo + t * s.xt_row + kc * 32 + ci * 4 + e;
}
#endif

// The persistent loop of one warp. kGwRole: warpgroup 0 (Gw, sum g); else
// warpgroup 1 (G, sum X; idle unless kGram). All warps stage, convert and meet
// at the same barriers.
template <int kVec, bool kGwRole, bool kGram>
__device__ void rows_loop(const float* __restrict__ g, const float* __restrict__ x,
                          double* __restrict__ partials, const RowShape& s, float* ring,
                          float* xt_big, float* xt_small, float* sums, const float* shift,
                          const int2* step_off) {
  constexpr bool kComputes = kGwRole || kGram;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wq = warp % 4;  // the warp's 16 rows of the warpgroup's m64 block
  const int fg = lane / 4, ft = lane % 4;
  // Gw rows 16wq + fg (+ 8) x 72 columns (warpgroup 0), or G rows taps 1 + 2wq
  // (+ 1) x 72 columns (warpgroup 1); d0..d3 as an m16n8 fragment.
  float run[kTaps][4], run0[4];  // run0: G rows taps 2wq (+ 1) x column tap 0
#pragma unroll
  for (int j = 0; j < kTaps; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) run[j][i] = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) run0[i] = 0.f;
  double run_sum_g[2] = {0, 0}, run_sum_x = 0;
  // sum X: warpgroup 1's thread t1 < 72 owns column n = t1 = tap*8 + ci.
  const int t1 = threadIdx.x - 128, sx_tap = t1 / kCx, sx_ci = t1 % kCx;
#if FUSED_CONV_WGMMA
  // Descriptors of X~ (K-major, no swizzle): taps xt_row words apart (stride),
  // k-halves 128 bytes apart (leading); a k-step adds its word offset / 4.
  const uint64_t desc_big = wgmma_desc_k_major(xt_big, 128, s.xt_row * 4);
  const uint64_t desc_small = wgmma_desc_k_major(xt_small, 128, s.xt_row * 4);
#endif

  const int64_t my_tiles =
      s.tiles > blockIdx.x ? (s.tiles - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
  if (my_tiles > 0) stage_rows<kVec>(g, x, s, blockIdx.x, ring);
  for (int64_t iter = 0; iter < my_tiles; ++iter) {
    const int64_t tile = blockIdx.x + iter * gridDim.x;
    const float* stage = ring + (iter % 2) * s.stage_words;
    cp_async_wait<0>();
    // The tile landed; every warp is done with the other stage and with X~
    // (each warpgroup retired its MMAs before this barrier).
    __syncthreads();
    if (iter + 1 < my_tiles) {
      stage_rows<kVec>(g, x, s, tile + gridDim.x, ring + ((iter + 1) % 2) * s.stage_words);
    }
    convert_rows(s, stage + kCo * kGS, shift, xt_big, xt_small, sums);
    __syncthreads();
    if constexpr (!kComputes) continue;
    const int64_t n = tile / s.tiles_h;
    const int oh0 = static_cast<int>(tile - n * s.tiles_h) * s.rows;
    const int rows_valid = min(s.rows, s.h_g - oh0);
    const int k_steps = rows_valid * (s.slots / 8);
    if constexpr (!kGwRole) {
      if (t1 < kK) {  // sum X of column (tap, ci) over the tile's valid rows
        const int r = sx_tap / 3, q = sx_tap % 3;
        float sx = 0.f;
        for (int ri = 0; ri < rows_valid; ++ri)
#pragma unroll
          for (int part = 0; part < kParts; ++part)
            sx += sums[(((ri + r) * 3 + q) * kParts + part) * kCx + sx_ci];
        run_sum_x += sx;
      }
    }
    const float* gs = stage + (16 * wq + fg) * kGS + ft;  // warpgroup 0's A rows
    float sum_g[2] = {0.f, 0.f};
    for (int ks0 = 0; ks0 < k_steps; ks0 += kFreshSteps) {
      float acc[kTaps][4], acc0[1][4];
      // Fresh accumulators: zeros, except warpgroup 0 on sm_90a, whose first
      // MMA of the group ignores them (scale-d = 0).
      if (!(FUSED_CONV_WGMMA && kGwRole)) {
#pragma unroll
        for (int j = 0; j < kTaps; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[j][i] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) acc0[0][i] = 0.f;
#if FUSED_CONV_WGMMA
      uint32_t a_big[kFreshSteps][4], a_small[kFreshSteps][4];
      if constexpr (kGwRole) {
        // A = g (the step's 8 pixels): loaded and split for the 4 k-steps first;
        // the registers stay untouched until the wait below.
#pragma unroll
        for (int f = 0; f < kFreshSteps; ++f) {
          const int col = step_off[min(ks0 + f, k_steps - 1)].y;
          const float gv[4] = {gs[col], gs[8 * kGS + col], gs[col + 4], gs[8 * kGS + col + 4]};
#pragma unroll
          for (int i = 0; i < 4; ++i) split_tf32(gv[i], a_big[f][i], a_small[f][i]);
          if (ks0 + f < k_steps) {
            sum_g[0] += gv[0] + gv[2];
            sum_g[1] += gv[1] + gv[3];
          }
        }
      }
      wgmma_fence();
#pragma unroll
      for (int f = 0; f < kFreshSteps; ++f) {
        const int ks = ks0 + f;
        if (ks >= k_steps) break;       // warpgroup-uniform
        const int xo = step_off[ks].x;  // tap 0, k-half 0
        const uint64_t b_big = desc_big + xo / 4, b_small = desc_small + xo / 4;
        if constexpr (kGwRole) {
          if (f == 0) {  // unrolled: f is a constant
            wgmma_tf32_first_n72(acc, a_small[f], b_big);
          } else {
            wgmma_tf32<9>(acc, a_small[f], b_big);
          }
          wgmma_tf32<9>(acc, a_big[f], b_small);
          wgmma_tf32<9>(acc, a_big[f], b_big);
        } else {
          const uint64_t a1_big = b_big + s.xt_row / 4, a1_small = b_small + s.xt_row / 4;
          wgmma_tf32_ss<9>(acc, a1_small, b_big);  // rows taps 1..8
          wgmma_tf32_ss<9>(acc, a1_big, b_small);
          wgmma_tf32_ss<9>(acc, a1_big, b_big);
          wgmma_tf32_ss<1>(acc0, b_small, b_big);  // rows taps 0..7 x column tap 0
          wgmma_tf32_ss<1>(acc0, b_big, b_small);
          wgmma_tf32_ss<1>(acc0, b_big, b_big);
        }
      }
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_fence_accumulators(acc);
      wgmma_fence_accumulators(acc0);
      if constexpr (kGwRole) {
        wgmma_fence_operands(a_big);
        wgmma_fence_operands(a_small);
      }
#else
      for (int ks = ks0; ks < min(ks0 + kFreshSteps, k_steps); ++ks) {
        const int xo = step_off[ks].x;
        uint32_t a_big[4], a_small[4];
        if constexpr (kGwRole) {
          const int col = step_off[ks].y;
          const float gv[4] = {gs[col], gs[8 * kGS + col], gs[col + 4], gs[8 * kGS + col + 4]};
#pragma unroll
          for (int i = 0; i < 4; ++i) split_tf32(gv[i], a_big[i], a_small[i]);
          sum_g[0] += gv[0] + gv[2];
          sum_g[1] += gv[1] + gv[3];
        } else {
          // a0 = A[fg][ft]: row tap 1 + 2wq, channel fg; a1: tap 2 + 2wq; a2, a3: k-half 1.
          const int t = 1 + 2 * wq;
          const int w0 = xt_word(s, xo, t, 0, fg, ft), w1 = xt_word(s, xo, t + 1, 0, fg, ft);
          const int idx[4] = {w0, w1, w0 + 32, w1 + 32};
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            a_big[i] = __float_as_uint(xt_big[idx[i]]);
            a_small[i] = __float_as_uint(xt_small[idx[i]]);
          }
        }
        // B[k][n] of tap j: b0 = (k = ft, ci = fg), b1 = (k = ft + 4, ci = fg).
#pragma unroll
        for (int j = 0; j < kTaps; ++j) {
          const int wb = xt_word(s, xo, j, 0, fg, ft);
          const uint32_t bb0 = __float_as_uint(xt_big[wb]), bb1 = __float_as_uint(xt_big[wb + 32]);
          const uint32_t bs0 = __float_as_uint(xt_small[wb]),
                         bs1 = __float_as_uint(xt_small[wb + 32]);
          mma_tf32(acc[j], a_small, bb0, bb1);
          mma_tf32(acc[j], a_big, bs0, bs1);
          mma_tf32(acc[j], a_big, bb0, bb1);
          if (!kGwRole && j == 0) {
            // rows taps 2wq (+ 1) x column tap 0
            const int v0 = xt_word(s, xo, 2 * wq, 0, fg, ft);
            const int v1 = xt_word(s, xo, 2 * wq + 1, 0, fg, ft);
            const int idx[4] = {v0, v1, v0 + 32, v1 + 32};
            uint32_t c_big[4], c_small[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              c_big[i] = __float_as_uint(xt_big[idx[i]]);
              c_small[i] = __float_as_uint(xt_small[idx[i]]);
            }
            mma_tf32(acc0[0], c_small, bb0, bb1);
            mma_tf32(acc0[0], c_big, bs0, bs1);
            mma_tf32(acc0[0], c_big, bb0, bb1);
          }
        }
      }
#endif
#pragma unroll
      for (int j = 0; j < kTaps; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) run[j][i] += acc[j][i];
#pragma unroll
      for (int i = 0; i < 4; ++i) run0[i] += acc0[0][i];
    }
    run_sum_g[0] += sum_g[0];
    run_sum_g[1] += sum_g[1];
  }
  cp_async_wait<0>();
  if constexpr (!kComputes) return;

  // The block's record (grad_moments_record.cuh; patch column k = ci*9 + tap).
  double* rec = partials + static_cast<int64_t>(blockIdx.x) * kRecord;
  if constexpr (kGwRole) {
    const int c = 16 * wq + fg;
#pragma unroll
    for (int j = 0; j < kTaps; ++j) {
#pragma unroll
      for (int e2 = 0; e2 < 2; ++e2) {
        const int k = (2 * ft + e2) * kTaps + j;
        rec[kRecGw + c * kK + k] = run[j][e2];
        rec[kRecGw + (c + 8) * kK + k] = run[j][2 + e2];
      }
    }
    // Sums over the four lanes of a row group, in a fixed order.
    double sg0 = run_sum_g[0], sg1 = run_sum_g[1];
    sg0 += __shfl_xor_sync(0xffffffffu, sg0, 1);
    sg0 += __shfl_xor_sync(0xffffffffu, sg0, 2);
    sg1 += __shfl_xor_sync(0xffffffffu, sg1, 1);
    sg1 += __shfl_xor_sync(0xffffffffu, sg1, 2);
    if (ft == 0) {
      rec[kRecSumG + c] = sg0;
      rec[kRecSumG + c + 8] = sg1;
    }
  } else {
    // G rows (ci = fg, tap a) x columns (ci' = 2ft + e2, tap b): the entries
    // with a <= b in place; those with b = 0 < a as their mirror (0, a), which
    // nothing else writes; G[tap 0][tap 0] from run0 (warp 0's rows fg).
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int a = 1 + 2 * wq + h;
#pragma unroll
      for (int b = 0; b < kTaps; ++b) {
#pragma unroll
        for (int e2 = 0; e2 < 2; ++e2) {
          const int ci2 = 2 * ft + e2;
          const float v = run[b][2 * h + e2];
          if (a <= b) {
            rec[kRecG + (fg * kTaps + a) * kK + ci2 * kTaps + b] = v;
          } else if (b == 0) {
            rec[kRecG + (ci2 * kTaps) * kK + fg * kTaps + a] = v;
          }
        }
      }
    }
    if (wq == 0) {
#pragma unroll
      for (int e2 = 0; e2 < 2; ++e2)
        rec[kRecG + (fg * kTaps) * kK + (2 * ft + e2) * kTaps] = run0[e2];
    }
    if (t1 < kK) rec[kRecS + sx_ci * kTaps + sx_tap] = run_sum_x;
  }
}

template <int kVec, bool kGram>
__global__ void __launch_bounds__(kThreads, 1)
    grad_moments_rows_kernel(const float* __restrict__ g, const float* __restrict__ x,
                             double* __restrict__ partials, RowShape s) {
  extern __shared__ uint4 smem_u4[];
  float* ring = reinterpret_cast<float*>(smem_u4);
  float* xt_big = ring + 2 * s.stage_words;
  float* xt_small = xt_big + s.xt_words;
  float* sums = xt_small + s.xt_words;
  float* shift = sums + (s.rows + 2) * 3 * kParts * kCx;
  int2* step_off = reinterpret_cast<int2*>(shift + kCx);
  // Zeros never overwritten: g channels past C_out, the raw rows' margins and
  // channels past C_in.
  for (int i = threadIdx.x; i < 2 * s.stage_words; i += kThreads) ring[i] = 0.f;
  // The per-channel shift: one sample of x (the centre of image 0), as the
  // finalize assumes (grad_moments.cu, shift_of).
  if (threadIdx.x < kCx) {
    const int ci = threadIdx.x;
    shift[ci] = ci < s.c_x ? x[(static_cast<int64_t>(ci) * s.h + s.h / 2) * s.w + s.w / 2] : 0.f;
  }
  // Per k-step ks (8 pixel slots of output row ri = ks / steps_per_row): the X~
  // word of tap 0, k-half 0, and the g slot column. Tabulated once, so that the
  // MMA loops do no division (ncu: ~20 instructions per k-step before).
  if (threadIdx.x < kPix / 8) {
    const int ks = threadIdx.x, steps_per_row = s.slots / 8;
    const int ri = ks / steps_per_row, j = ks - ri * steps_per_row;
    step_off[ks] = make_int2(ri * 3 * s.xt_row + 64 * j, ri * s.slots + 8 * j);
  }
  __syncthreads();
  // The warpgroup index, broadcast from lane 0 so that the compiler sees it
  // warp-uniform (a branch on threadIdx.x alone counts as divergent, and ptxas
  // then serializes the wgmmas inside it).
  const int warpgroup = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x / 128), 0);
  if (warpgroup == 0) {
    rows_loop<kVec, true, kGram>(g, x, partials, s, ring, xt_big, xt_small, sums, shift, step_off);
  } else {
    rows_loop<kVec, false, kGram>(g, x, partials, s, ring, xt_big, xt_small, sums, shift, step_off);
  }
}

template <int kVec, bool kGram>
void launch_rows(const RowShape& s, const at::Tensor& g, const at::Tensor& x, double* partials,
                 int grid) {
  auto kernel = grad_moments_rows_kernel<kVec, kGram>;
  const size_t bytes = smem_bytes(s);
  allow_dynamic_smem(reinterpret_cast<const void*>(kernel), bytes);
  kernel<<<grid, kThreads, bytes, c10::cuda::getCurrentCUDAStream()>>>(
      g.const_data_ptr<float>(), x.const_data_ptr<float>(), partials, s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int round_up(int v, int m) { return (v + m - 1) / m * m; }

}  // namespace

bool grad_moments_rows_supports(int device, int64_t out_width) {
  if (out_width > kPix) return false;
  const char* choice = std::getenv("FUSED_CONV_MOMENTS_KERNEL");
  if (choice != nullptr && std::strcmp(choice, "flat") == 0) return false;
  return compute_capability_major(device) == 9 && max_shared_memory_per_block(device) >= kMaxSmem;
}

at::Tensor grad_moments_rows(const at::Tensor& g, const at::Tensor& x, int pad_h, int pad_w,
                             bool gram) {
  RowShape s{};
  s.n = x.size(0);
  s.c_x = static_cast<int>(x.size(1));
  s.h = static_cast<int>(x.size(2));
  s.w = static_cast<int>(x.size(3));
  s.c_g = static_cast<int>(g.size(1));
  s.h_g = static_cast<int>(g.size(2));
  s.w_g = static_cast<int>(g.size(3));
  s.plane_g = s.h_g * s.w_g;
  s.pad_h = pad_h;
  s.pad_w = pad_w;
  TORCH_CHECK(s.c_x <= kCx && s.c_g <= kCo && s.w_g >= 1 && s.w_g <= kPix && s.h_g >= 1,
              "fused_conv: grad_moments_rows got C_in ", s.c_x, ", C_out ", s.c_g,
              ", output width ", s.w_g, " (expected C_in <= 8, C_out <= 64, width 1..128)");
  s.slots = round_up(s.w_g, 8);
  s.rows = kPix / s.slots;
  s.tiles_h = (s.h_g + s.rows - 1) / s.rows;
  s.tiles = s.n * s.tiles_h;
  // A raw row holds columns kLeft - 2 .. slots + 5 (pixel + q - pad_w + kLeft)
  // and the image's w columns from kLeft.
  s.raw_row = round_up(std::max(s.slots + 6, s.w + kLeft), 4);
  const int plane = (s.rows + 2) * s.raw_row;
  s.raw_plane = plane + ((4 - plane) % 32 + 32) % 32;
  s.xt_row = s.slots * 8;
  s.xt_words = (s.rows + 2) * 3 * s.xt_row;
  s.stage_words = round_up(kCo * kGS + kCx * s.raw_plane, 32);
  const int device = x.get_device();
  TORCH_CHECK(smem_bytes(s) <= static_cast<size_t>(max_shared_memory_per_block(device)),
              "fused_conv: grad_moments_rows needs ", smem_bytes(s), " bytes of shared memory");
  const auto aligned = [](const at::Tensor& t, int bytes) {
    return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % bytes == 0;
  };
  const int vec = s.w_g % 4 == 0 && s.w % 4 == 0 && aligned(g, 16) && aligned(x, 16) ? 4
                  : s.w_g % 2 == 0 && s.w % 2 == 0 && aligned(g, 8) && aligned(x, 8) ? 2
                                                                                     : 1;
  const int grid = static_cast<int>(std::clamp<int64_t>(s.tiles, 1, multiprocessors(device)));
  at::Tensor partials = at::empty({grid, kRecord}, x.options().dtype(at::kDouble));
  double* p = partials.mutable_data_ptr<double>();
  if (vec == 4) {
    gram ? launch_rows<4, true>(s, g, x, p, grid) : launch_rows<4, false>(s, g, x, p, grid);
  } else if (vec == 2) {
    gram ? launch_rows<2, true>(s, g, x, p, grid) : launch_rows<2, false>(s, g, x, p, grid);
  } else {
    gram ? launch_rows<1, true>(s, g, x, p, grid) : launch_rows<1, false>(s, g, x, p, grid);
  }
  return partials;
}

}  // namespace fused_conv::cuda
