// The correction R of grad_input (grad_input_correction.h): conv_transpose of
// the part C*(y - ctr) + D of g_hat, computed from the input x instead of
// from a written g_hat.
//
// R[ci][ih][iw] = sum_{t valid} ( sum_{t', ci'} V[(ci,t)][(ci',t')] *
//                                   x~[ci'][ih - kr + kr'][iw - kq + kq'] + e[ci][t] ),
// t = (kr, kq) valid when the output pixel (ih + pad_h - kr, iw + pad_w - kq)
// exists. Away from the border every t is valid and the double sum collapses
// to a 5x5 convolution with K[ci'][d][ci] = sum_{t' - t = d} V[(ci,t)][(ci',t')]
// (200 products per output channel instead of 648); a border pixel subtracts
// the invalid taps' terms from that. x~ is centred by the shift; V, e and K
// are rounded from float64 once.
//
// Kernels: one block per input channel forms V, e, K and the shifts in
// float64 (correction_terms_kernel); a persistent grid adds the collapsed
// convolution (tensor cores, 3xTF32) and e for all taps to every pixel
// (grad_input_correction_kernel); a thread per border pixel then backs out
// the taps that fall outside the output (grad_input_border_kernel, float32
// FMAs), so the main kernel has no border branches.
#include "kernels/cuda/grad_input_correction.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "kernels/cuda/grad_coefficients.cuh"
#include "kernels/cuda/grad_moments.h"
#include "kernels/cuda/tf32_mma.cuh"
#include "kernels/cuda/tile_launch.cuh"

namespace fused_conv::cuda {
namespace {

constexpr int kCx = 8;      // input channels (grad_moments_supports: C_in <= 8)
constexpr int kMaxCg = 64;  // output channels (grad_moments_supports: C_out <= 64)
constexpr int kTaps = 9;
constexpr int kK = kCx * kTaps;  // k = ci*9 + t
constexpr int kOffsets = 25;     // d = (dr, dq) in [-2, 2]^2, d = (dr + 2)*5 + dq + 2
// The collapsed convolution on tensor cores: per offset d one m16n8k8 k-step
// (K = the 8 input channels ci', N = the 8 output channels ci).
constexpr int kWarps = 8;  // a warp per input row of the tile
constexpr int kRows = kWarps;
constexpr int kMTiles = 4;  // m16 tiles per warp: 64 consecutive pixels of its row
constexpr int kCols = 16 * kMTiles;
constexpr int kBlockThreads = 32 * kWarps;
// x~ on the tile's halo, [ci'][row][col]: 2 rows above and below, 4 columns
// left (16-byte copies stay aligned) and 4 right. The plane stride is 24 mod
// 32 words, so an A fragment's lanes (pixel g, channel t) read banks
// g + 24 t + const: all distinct.
constexpr int kHaloLeft = 4;
constexpr int kHaloRows = kRows + 4, kHaloCols = kCols + 2 * kHaloLeft;
constexpr int kPlane = kHaloRows * kHaloCols + (24 - kHaloRows * kHaloCols % 32 + 32) % 32;
static_assert(kPlane % 32 == 24 && kPlane >= kHaloRows * kHaloCols, "conflict-free A reads");
static_assert(kPlane % 4 == 0 && kHaloCols % 4 == 0, "16-byte aligned halo rows");
// Dynamic shared memory of the main kernel: the split K, then two x~ stages.
constexpr size_t kCorrectionSmem = sizeof(uint4) * kOffsets * 32 + sizeof(float) * 2 * kCx * kPlane;
// The terms buffer: V as [t][(ci', t')][ci] and e as [t][ci] (the border
// kernel reads 8 ci as two float4), e summed over the taps [ci], shift [ci'],
// K [ci'][d][ci] (8 x 25 x 8).
constexpr int kTermV = 0, kTermE = kK * kK, kTermEAll = kTermE + kK, kTermShift = kTermEAll + kCx,
              kTermK5 = kTermShift + kCx, kTermWords = kTermK5 + kCx * kOffsets * kCx;
static_assert(kTermK5 % 4 == 0, "K is read as float4");
// Border runs: up to kSeg pixels along one edge line, staged with 2 pixels of
// halo each side of the line and at both ends.
constexpr int kSeg = 128, kBoxLong = kSeg + 4, kBoxShort = 5;

struct CorrectionShape {
  int64_t n, tiles;
  int c_g, c_x, h, w, h_g, w_g, pad_h, pad_w, tiles_h, tiles_w;
  // Border pixels (those with a tap outside the output): full rows at the top
  // and bottom, then the side columns of the rows between.
  int top, bottom, left, right;
  // grad_input_border_kernel's runs per image: runs_w per border row, runs_h
  // per side column.
  int runs_w, runs_h, runs;
};

// V, e, K and the shifts in float64, one block per input channel ci (rows
// (ci, t) of V): ctr'_c = ctr_c - W_c . shift, V[k][k'] = sum_c C_c W[c][k]
// W[c][k'], e[k] = sum_c W[c][k] (D_c - C_c ctr'_c), K[ci'][d][ci] =
// sum_{t, t + d a tap} V[(ci, t)][(ci', t + d)]; zero past C_in.
__global__ void __launch_bounds__(256)
    correction_terms_kernel(const float* __restrict__ w, const float* __restrict__ x,
                            const float* __restrict__ rows, const float* __restrict__ center,
                            CorrectionShape s, float* __restrict__ terms) {
  __shared__ double shift[kCx];
  __shared__ double ctr[kMaxCg];
  __shared__ double v_rows[kTaps * kK];
  __shared__ double e_taps[kTaps];
  const int ci = blockIdx.x;
  const int k_cols = s.c_x * kTaps;
  if (threadIdx.x < kCx) {
    const int c = threadIdx.x;
    shift[c] = c < s.c_x ? x[(static_cast<int64_t>(c) * s.h + s.h / 2) * s.w + s.w / 2] : 0.0;
    if (ci == 0) terms[kTermShift + c] = static_cast<float>(shift[c]);
  }
  __syncthreads();
  const float* coef_y = rows + kCoefY * s.c_g;
  const float* coef_1 = rows + kCoef1 * s.c_g;
  for (int c = threadIdx.x; c < s.c_g; c += blockDim.x) {
    double dot = 0;
    for (int k = 0; k < k_cols; ++k)
      dot += static_cast<double>(w[c * k_cols + k]) * shift[k / kTaps];
    ctr[c] = center[c] - dot;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kTaps * kK; i += blockDim.x) {
    const int k = ci * kTaps + i / kK, k2 = i % kK;
    double v = 0;
    if (ci < s.c_x && k2 < k_cols) {
      for (int c = 0; c < s.c_g; ++c) {
        v += static_cast<double>(coef_y[c]) * w[c * k_cols + k] * w[c * k_cols + k2];
      }
    }
    v_rows[i] = v;
    terms[kTermV + ((i / kK) * kK + k2) * kCx + ci] = static_cast<float>(v);
  }
  if (threadIdx.x < kTaps) {
    const int k = ci * kTaps + threadIdx.x;
    double e = 0;
    if (ci < s.c_x) {
      for (int c = 0; c < s.c_g; ++c) {
        e += static_cast<double>(w[c * k_cols + k]) * (coef_1[c] - coef_y[c] * ctr[c]);
      }
    }
    e_taps[threadIdx.x] = e;
    terms[kTermE + threadIdx.x * kCx + ci] = static_cast<float>(e);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double sum = 0;
    for (int t = 0; t < kTaps; ++t) sum += e_taps[t];
    terms[kTermEAll + ci] = static_cast<float>(sum);
  }
  for (int i = threadIdx.x; i < kCx * kOffsets; i += blockDim.x) {
    const int ci2 = i / kOffsets, d = i % kOffsets;
    const int dr = d / 5 - 2, dq = d % 5 - 2;
    double sum = 0;
    for (int t = 0; t < kTaps; ++t) {
      const int kr2 = t / 3 + dr, kq2 = t % 3 + dq;
      if (kr2 >= 0 && kr2 < 3 && kq2 >= 0 && kq2 < 3) {
        sum += v_rows[t * kK + ci2 * kTaps + kr2 * 3 + kq2];
      }
    }
    terms[kTermK5 + i * kCx + ci] = static_cast<float>(sum);
  }
}

// Every tap counted valid: R += K * x~ + sum_t e, as an implicit GEMM on
// tensor cores (3xTF32): M = pixels, N = the 8 output channels, K = 25 offsets
// x 8 input channels, one k-step per offset d = (dr, dq), whose A fragment is
// x~ read at the pixel + d (no im2col). A persistent grid of 8-warp blocks; a
// tile is 8 input rows x 64 columns of one image, a warp one row (4 m16
// tiles). K is split into TF32 big/small once per block and kept in fragment
// order (a uint4 per lane and offset). x~ is staged on the tile's 12 x 72 halo
// (columns from 4 left of the tile, so that 16-byte copies stay aligned; x -
// shift inside the image, -shift outside: the zero padding of x) in a 2-deep
// ring: the next tile's copies fly while this tile computes. Each lane loads
// its grad_input values into the running sums before the MMAs, so the
// read-modify-write's loads are in flight under them (ncu, one buffer and the
// loads after the MMAs: 60% of the samples in the staging and the epilogue).
// Accumulators restart every 5 k-steps (one dr) and are added into running
// float32 sums: tensor-core accumulation truncates. No atomics.
template <int kVec>
__device__ __forceinline__ void stage_halo(const float* __restrict__ x, const CorrectionShape& s,
                                           int64_t tile, float* xs) {
  const int64_t rows_done = tile / s.tiles_w;
  const int iw0 = static_cast<int>(tile - rows_done * s.tiles_w) * kCols;
  const int64_t n = rows_done / s.tiles_h;
  const int ih0 = static_cast<int>(rows_done - n * s.tiles_h) * kRows;
  const int64_t plane = static_cast<int64_t>(s.h) * s.w;
  const float* xn = x + n * s.c_x * plane;
  constexpr int kRowVecs = kHaloCols / kVec;
  for (int i = threadIdx.x; i < s.c_x * kHaloRows * kRowVecs; i += kBlockThreads) {
    const int row = i / kRowVecs, cc = (i - row * kRowVecs) * kVec;
    const int ci = row / kHaloRows, rr = row - ci * kHaloRows;
    const int ih = ih0 - 2 + rr, iw = iw0 - kHaloLeft + cc;
    // w % kVec == 0 and iw0 % 4 == 0: a vector is all inside or all outside.
    const bool inside = ih >= 0 && ih < s.h && iw >= 0 && iw < s.w;
    const float* src = inside ? xn + ci * plane + static_cast<int64_t>(ih) * s.w + iw : xn;
    cp_async_vec<kVec>(xs + ci * kPlane + rr * kHaloCols + cc, src, inside);
  }
  cp_async_commit();
}

// After this thread's copies landed: x~ = staged - shift on the elements it
// copied itself (the same index walk as stage_halo), so no barrier is needed
// between the copies and the subtraction.
template <int kVec>
__device__ __forceinline__ void subtract_shift(const CorrectionShape& s, const float* shift,
                                               float* xs) {
  constexpr int kRowVecs = kHaloCols / kVec;
  for (int i = threadIdx.x; i < s.c_x * kHaloRows * kRowVecs; i += kBlockThreads) {
    const int row = i / kRowVecs, ci = row / kHaloRows;
    float* v = xs + ci * kPlane + (row - ci * kHaloRows) * kHaloCols + (i - row * kRowVecs) * kVec;
#pragma unroll
    for (int j = 0; j < kVec; ++j) v[j] -= shift[ci];
  }
}

template <int kVec>
__global__ void __launch_bounds__(kBlockThreads, 3)
    grad_input_correction_kernel(const float* __restrict__ x, const float* __restrict__ terms,
                                 float* __restrict__ grad_input, CorrectionShape s) {
  extern __shared__ uint4 smem_u4[];
  uint4* kb = smem_u4;  // [d][lane]: (big b0, big b1, small b0, small b1)
  float* ring = reinterpret_cast<float*>(kb + kOffsets * 32);  // 2 x [ci'][row][col]
  __shared__ float e_all[kCx];
  __shared__ float shift[kCx];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  for (int i = threadIdx.x; i < kOffsets * 32; i += kBlockThreads) {
    // b0 = B[k = t][n = g] = K[ci' = t][d][ci = g], b1 = K[t + 4][d][g]
    const int d = i / 32, gg = (i % 32) / 4, tt = i % 4;
    uint32_t big0, small0, big1, small1;
    split_tf32(terms[kTermK5 + (tt * kOffsets + d) * kCx + gg], big0, small0);
    split_tf32(terms[kTermK5 + ((tt + 4) * kOffsets + d) * kCx + gg], big1, small1);
    kb[i] = make_uint4(big0, big1, small0, small1);
  }
  if (threadIdx.x < kCx) {
    e_all[threadIdx.x] = terms[kTermEAll + threadIdx.x];
    shift[threadIdx.x] = terms[kTermShift + threadIdx.x];
  }
  // Planes past C_in stay zero in both stages (their K rows are zero; 0 *
  // garbage may be NaN).
  for (int i = threadIdx.x; i < 2 * kCx * kPlane; i += kBlockThreads) {
    if ((i % (kCx * kPlane)) >= s.c_x * kPlane) ring[i] = 0.f;
  }
  __syncthreads();

  const int64_t plane = static_cast<int64_t>(s.h) * s.w;
  if (blockIdx.x < s.tiles) stage_halo<kVec>(x, s, blockIdx.x, ring);
  int64_t iter = 0;
  for (int64_t tile = blockIdx.x; tile < s.tiles; tile += gridDim.x, ++iter) {
    float* xs = ring + (iter % 2) * (kCx * kPlane);
    cp_async_wait<0>();
    subtract_shift<kVec>(s, shift, xs);
    // This tile's x~ is complete, and every warp is done with the other stage.
    __syncthreads();
    if (tile + gridDim.x < s.tiles) {
      stage_halo<kVec>(x, s, tile + gridDim.x, ring + ((iter + 1) % 2) * (kCx * kPlane));
    }
    const int64_t rows_done = tile / s.tiles_w;
    const int iw0 = static_cast<int>(tile - rows_done * s.tiles_w) * kCols;
    const int64_t n = rows_done / s.tiles_h;
    const int ih = static_cast<int>(rows_done - n * s.tiles_h) * kRows + warp;
    if (ih >= s.h) continue;  // warp-uniform
    float* out = grad_input + n * s.c_x * plane + static_cast<int64_t>(ih) * s.w;
    const int ci0 = 2 * t, ci1 = 2 * t + 1;
    // d0..d3: (pixel g, ci 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1);
    // started at grad_input + sum_t e.
    float run[kMTiles][4];
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int iw = iw0 + 16 * m + g + 8 * half;
        const bool in = iw < s.w;
        run[m][2 * half] = e_all[ci0] + (in && ci0 < s.c_x ? out[ci0 * plane + iw] : 0.f);
        run[m][2 * half + 1] = e_all[ci1] + (in && ci1 < s.c_x ? out[ci1 * plane + iw] : 0.f);
      }
    }
    // a0 = A[g][t] = x~[ci' = t] at pixel g + d; a1: pixel g + 8; a2, a3: ci' = t + 4
    const float* xw = xs + t * kPlane + warp * kHaloCols + (kHaloLeft - 2) + g;
#pragma unroll 1
    for (int dr = 0; dr < 5; ++dr) {
      float acc[kMTiles][4] = {};
#pragma unroll
      for (int dq = 0; dq < 5; ++dq) {
        const uint4 b = kb[(dr * 5 + dq) * 32 + lane];
#pragma unroll
        for (int m = 0; m < kMTiles; ++m) {
          const float* p = xw + dr * kHaloCols + 16 * m + dq;
          uint32_t a_big[4], a_small[4];
          split_tf32(p[0], a_big[0], a_small[0]);
          split_tf32(p[8], a_big[1], a_small[1]);
          split_tf32(p[4 * kPlane], a_big[2], a_small[2]);
          split_tf32(p[4 * kPlane + 8], a_big[3], a_small[3]);
          mma_tf32(acc[m], a_big, b.z, b.w);    // big x small
          mma_tf32(acc[m], a_small, b.x, b.y);  // small x big
          mma_tf32(acc[m], a_big, b.x, b.y);    // big x big
        }
      }
#pragma unroll
      for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
        for (int i = 0; i < 4; ++i) run[m][i] += acc[m][i];
      }
    }
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int iw = iw0 + 16 * m + g + 8 * half;
        if (iw >= s.w) continue;
        if (ci0 < s.c_x) out[ci0 * plane + iw] = run[m][2 * half];
        if (ci1 < s.c_x) out[ci1 * plane + iw] = run[m][2 * half + 1];
      }
    }
  }
}

// x~ on a border run's box of kRowsBox x kColsBox pixels from (h0, w0), all
// input channels ([ci][row][col]; compile-time sizes: no runtime divisions).
template <int kRowsBox, int kColsBox>
__device__ __forceinline__ void stage_box(float* box, const float* __restrict__ xn,
                                          const float* shift, const CorrectionShape& s, int h0,
                                          int w0) {
  const int64_t plane = static_cast<int64_t>(s.h) * s.w;
  for (int i = threadIdx.x; i < s.c_x * kRowsBox * kColsBox; i += kSeg) {
    const int ci = i / (kRowsBox * kColsBox), rr = (i / kColsBox) % kRowsBox, cc = i % kColsBox;
    const int ih = h0 + rr, iw = w0 + cc;
    const bool inside = ih >= 0 && ih < s.h && iw >= 0 && iw < s.w;
    box[i] =
        (inside ? __ldg(xn + ci * plane + static_cast<int64_t>(ih) * s.w + iw) : 0.f) - shift[ci];
  }
}

// The taps of border pixels that fall outside the output: their V terms and
// e back out of what grad_input_correction_kernel added. A block takes a run
// of up to 128 border pixels along one edge line (a row of the top or bottom
// rows, or a column of the side columns between them), a thread one pixel, so
// a warp's pixels share their invalid taps (but at the corners). x~ is staged
// on the run's 5 x 132 box, V and e as the terms buffer holds them.
__global__ void __launch_bounds__(kSeg)
    grad_input_border_kernel(const float* __restrict__ x, const float* __restrict__ terms,
                             float* __restrict__ grad_input, CorrectionShape s) {
  __shared__ __align__(16) float vt[kTaps * kK * kCx];
  __shared__ float et[kTaps * kCx];
  __shared__ float box[kCx * kBoxLong * kBoxShort];
  __shared__ float shift[kCx];
  for (int i = threadIdx.x; i < kTaps * kK * kCx; i += kSeg) vt[i] = terms[kTermV + i];
  for (int i = threadIdx.x; i < kTaps * kCx; i += kSeg) et[i] = terms[kTermE + i];
  if (threadIdx.x < kCx) shift[threadIdx.x] = terms[kTermShift + threadIdx.x];
  const int64_t plane = static_cast<int64_t>(s.h) * s.w;
  const int row_runs = (s.top + s.bottom) * s.runs_w;
  for (int64_t block = blockIdx.x; block < s.n * s.runs; block += gridDim.x) {
    const int64_t n = block / s.runs;
    const int run = static_cast<int>(block - n * s.runs);
    // The run's pixels are (line, start + i) for a row run, (start + i, line) for a column run.
    bool row_run;
    int line, start, len;
    if (run < row_runs) {
      const int r = run / s.runs_w;
      row_run = true;
      line = r < s.top ? r : s.h - s.bottom + (r - s.top);
      start = (run % s.runs_w) * kSeg;
      len = min(kSeg, s.w - start);
    } else {
      const int c = (run - row_runs) / s.runs_h;
      row_run = false;
      line = c < s.left ? c : s.w - s.right + (c - s.left);
      start = s.top + ((run - row_runs) % s.runs_h) * kSeg;
      len = min(kSeg, s.h - s.bottom - start);
    }
    const int box_rows = row_run ? kBoxShort : kBoxLong, box_cols = row_run ? kBoxLong : kBoxShort;
    const int box_h0 = (row_run ? line : start) - 2, box_w0 = (row_run ? start : line) - 2;
    const float* xn = x + n * s.c_x * plane;
    __syncthreads();  // the previous run's box is read; vt and shift are staged
    if (row_run) {
      stage_box<kBoxShort, kBoxLong>(box, xn, shift, s, box_h0, box_w0);
    } else {
      stage_box<kBoxLong, kBoxShort>(box, xn, shift, s, box_h0, box_w0);
    }
    __syncthreads();
    if (threadIdx.x >= len) continue;
    const int ih = row_run ? line : start + threadIdx.x;
    const int iw = row_run ? start + threadIdx.x : line;
    // The pixel's invalid taps (bit t = kr*3 + kq): only those are walked
    // (3 for a border row or column with padding 1, 5 at a corner).
    unsigned invalid = 0;
#pragma unroll
    for (int t = 0; t < kTaps; ++t) {
      const int oh = ih + s.pad_h - t / 3, ow = iw + s.pad_w - t % 3;
      if (oh < 0 || oh >= s.h_g || ow < 0 || ow >= s.w_g) invalid |= 1u << t;
    }
    float acc[kCx] = {};
    while (invalid != 0) {
      const int t = __ffs(invalid) - 1;
      invalid &= invalid - 1;
      const int kr = t / 3, kq = t % 3;
#pragma unroll
      for (int ci = 0; ci < kCx; ++ci) acc[ci] -= et[t * kCx + ci];
      for (int ci2 = 0; ci2 < s.c_x; ++ci2) {
        // x~ at (ih - kr + kr', iw - kq + kq')
        const float* xp = box + (ci2 * box_rows + ih - kr - box_h0) * box_cols + iw - kq - box_w0;
        const float* vp = vt + (t * kK + ci2 * kTaps) * kCx;
#pragma unroll
        for (int t2 = 0; t2 < kTaps; ++t2) {
          const float xv = xp[(t2 / 3) * box_cols + t2 % 3];
          const float4 va = *reinterpret_cast<const float4*>(vp + t2 * kCx);
          const float4 vb = *reinterpret_cast<const float4*>(vp + t2 * kCx + 4);
          const float v[kCx] = {va.x, va.y, va.z, va.w, vb.x, vb.y, vb.z, vb.w};
#pragma unroll
          for (int ci = 0; ci < kCx; ++ci) acc[ci] = fmaf(-v[ci], xv, acc[ci]);
        }
      }
    }
    float* out = grad_input + n * s.c_x * plane + static_cast<int64_t>(ih) * s.w + iw;
#pragma unroll
    for (int ci = 0; ci < kCx; ++ci) {
      if (ci < s.c_x) out[ci * plane] += acc[ci];
    }
  }
}

}  // namespace

void add_grad_input_correction(at::Tensor& grad_input, const at::Tensor& input,
                               const at::Tensor& weight, const at::Tensor& rows,
                               const at::Tensor& center, at::IntArrayRef padding) {
  c10::cuda::CUDAGuard guard(input.device());
  const int64_t unit[2] = {1, 1};
  TORCH_CHECK(grad_moments_supports(input, weight, unit, padding, unit, 1),
              "fused_conv: grad_input correction outside grad_moments' reach");
  TORCH_CHECK(grad_input.scalar_type() == at::kFloat && grad_input.sizes() == input.sizes() &&
                  grad_input.is_contiguous(),
              "fused_conv: grad_input correction expected a contiguous float32 grad_input of "
              "shape ",
              input.sizes(), ", got ", grad_input.scalar_type(), " ", grad_input.sizes());
  const at::Tensor x = input.contiguous();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  CorrectionShape s{};
  s.n = x.size(0);
  s.c_g = static_cast<int>(w.size(0));
  s.c_x = static_cast<int>(x.size(1));
  s.h = static_cast<int>(x.size(2));
  s.w = static_cast<int>(x.size(3));
  s.pad_h = static_cast<int>(padding[0]);
  s.pad_w = static_cast<int>(padding[1]);
  s.h_g = s.h + 2 * s.pad_h - 2;
  s.w_g = s.w + 2 * s.pad_w - 2;
  s.tiles_h = (s.h + kRows - 1) / kRows;
  s.tiles_w = (s.w + kCols - 1) / kCols;
  s.tiles = s.n * s.tiles_h * s.tiles_w;
  // Output pixel oh = ih + pad - kr exists for every kr in 0..2 unless
  // ih < 2 - pad or ih >= h + pad - 2 (padding <= 2).
  s.top = std::min(2 - s.pad_h, s.h);
  s.bottom = std::min(2 - s.pad_h, s.h - s.top);
  s.left = std::min(2 - s.pad_w, s.w);
  s.right = std::min(2 - s.pad_w, s.w - s.left);
  const int mid = s.h - s.top - s.bottom;
  s.runs_w = (s.w + kSeg - 1) / kSeg;
  s.runs_h = (mid + kSeg - 1) / kSeg;
  s.runs = (s.top + s.bottom) * s.runs_w + (s.left + s.right) * s.runs_h;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor terms = at::empty({kTermWords}, x.options());
  correction_terms_kernel<<<kCx, 256, 0, stream>>>(
      w.const_data_ptr<float>(), x.const_data_ptr<float>(), rows.const_data_ptr<float>(),
      center.const_data_ptr<float>(), s, terms.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // 16-byte halo copies when every row starts 16-byte aligned.
  const bool vec4 = s.w % 4 == 0 && reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 == 0;
  const auto kernel = vec4 ? grad_input_correction_kernel<4> : grad_input_correction_kernel<1>;
  allow_dynamic_smem(reinterpret_cast<const void*>(kernel), kCorrectionSmem);
  // Persistent: one wave of resident blocks (3 of 8 warps and 68 KB per
  // multiprocessor on sm_90).
  const int per_sm = std::max(
      resident_blocks_per_sm(reinterpret_cast<const void*>(kernel), kBlockThreads, kCorrectionSmem),
      1);
  const int grid = static_cast<int>(
      std::clamp<int64_t>(s.tiles, 1, int64_t{per_sm} * multiprocessors(input.get_device())));
  kernel<<<grid, kBlockThreads, kCorrectionSmem, stream>>>(x.const_data_ptr<float>(),
                                                           terms.const_data_ptr<float>(),
                                                           grad_input.mutable_data_ptr<float>(), s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (s.runs > 0) {
    // Persistent: the runs of all images (512 for the reference problem) in one wave.
    const int border_grid = static_cast<int>(
        std::clamp<int64_t>(s.n * s.runs, 1, int64_t{4} * multiprocessors(input.get_device())));
    grad_input_border_kernel<<<border_grid, kSeg, 0, stream>>>(
        x.const_data_ptr<float>(), terms.const_data_ptr<float>(),
        grad_input.mutable_data_ptr<float>(), s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace fused_conv::cuda
