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
// the invalid taps' terms from that. Float32 FMAs: x~ is centred by the
// shift, V and e are rounded from float64 once.
//
// Kernels: one block per input channel forms V, e, K and the shifts in
// float64 (correction_terms_kernel); a persistent grid adds the collapsed
// convolution and e for all taps to every pixel, 4 pixels x 8 channels per
// thread (grad_input_correction_kernel); a thread per border pixel then backs
// out the taps that fall outside the output (grad_input_border_kernel), so the
// main kernel has no border branches.
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

constexpr int kCx = 8;  // input channels (grad_moments_supports: C_in <= 8)
constexpr int kMaxCg = 64;  // output channels (grad_moments_supports: C_out <= 64)
constexpr int kTaps = 9;
constexpr int kK = kCx * kTaps;  // k = ci*9 + t
constexpr int kOffsets = 25;     // d = (dr, dq) in [-2, 2]^2, d = (dr + 2)*5 + dq + 2
constexpr int kRows = 6;         // output rows per tile: one warp each
constexpr int kPix = 4;          // consecutive pixels of a row per thread
constexpr int kCols = 32 * kPix;
constexpr int kBlockThreads = 32 * kRows;
// x~ on the tile's halo: 2 pixels each side; the row length keeps each thread's
// 8-pixel window 16-byte aligned (two float4 reads).
constexpr int kHaloRows = kRows + 4, kHaloCols = kCols + 4;
constexpr int kPlane = kHaloRows * kHaloCols;
static_assert(kHaloCols % 4 == 0 && kPlane % 4 == 0, "float4 windows");
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
  bool vector;  // grad_input rows are float4-aligned (width % 4 == 0, aligned base)
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
    for (int k = 0; k < k_cols; ++k) dot += static_cast<double>(w[c * k_cols + k]) * shift[k / kTaps];
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

// Every tap counted valid: R += K * x~ + sum_t e. A persistent grid of
// 6-warp blocks; a tile is 6 input rows x 128 columns of one image, a warp one
// row, a thread 4 consecutive pixels x 8 input channels (32 accumulators, so
// each pair of broadcast float4 reads of K feeds 32 FMAs). x~ is staged on the
// tile's 10 x 132 halo (x - shift inside the image, -shift outside: the zero
// padding of x). Read-modify-write of grad_input, no atomics.
__global__ void __launch_bounds__(kBlockThreads)
    grad_input_correction_kernel(const float* __restrict__ x, const float* __restrict__ terms,
                                 float* __restrict__ grad_input, CorrectionShape s) {
  __shared__ __align__(16) float xs[kCx * kPlane];              // [ci'][row][col]
  __shared__ __align__(16) float k5[kCx * kOffsets * kCx];      // [ci'][d][ci]
  __shared__ float e_all[kCx];
  __shared__ float shift[kCx];
  for (int i = threadIdx.x; i < kCx * kOffsets * kCx; i += kBlockThreads) {
    k5[i] = terms[kTermK5 + i];
  }
  if (threadIdx.x < kCx) {
    e_all[threadIdx.x] = terms[kTermEAll + threadIdx.x];
    shift[threadIdx.x] = terms[kTermShift + threadIdx.x];
  }
  __syncthreads();

  const int r = threadIdx.x / 32, c0 = (threadIdx.x % 32) * kPix;
  const int64_t plane = static_cast<int64_t>(s.h) * s.w;
  for (int64_t tile = blockIdx.x; tile < s.tiles; tile += gridDim.x) {
    const int64_t rows_done = tile / s.tiles_w;
    const int iw0 = static_cast<int>(tile - rows_done * s.tiles_w) * kCols;
    const int64_t n = rows_done / s.tiles_h;
    const int ih0 = static_cast<int>(rows_done - n * s.tiles_h) * kRows;
    const float* xn = x + n * s.c_x * plane;
    // A warp per halo row (channel ci, row rr), its lanes along the row:
    // asynchronous copies (zero outside the image), so that a thread's ~70
    // loads are in flight together; then each thread subtracts the shift from
    // its own elements.
    for (int row = r; row < s.c_x * kHaloRows; row += kRows) {
      const int ci = row / kHaloRows, ih = ih0 - 2 + row % kHaloRows;
      const bool row_inside = ih >= 0 && ih < s.h;
      const float* src = xn + ci * plane + static_cast<int64_t>(ih) * s.w;
      for (int cc = threadIdx.x % 32; cc < kHaloCols; cc += 32) {
        const int iw = iw0 - 2 + cc;
        const bool inside = row_inside && iw >= 0 && iw < s.w;
        cp_async_f32(xs + row * kHaloCols + cc, inside ? src + iw : xn, inside);
      }
    }
    cp_async_commit();
    cp_async_wait<0>();
    for (int row = r; row < s.c_x * kHaloRows; row += kRows) {
      const float sh = shift[row / kHaloRows];
      for (int cc = threadIdx.x % 32; cc < kHaloCols; cc += 32) xs[row * kHaloCols + cc] -= sh;
    }
    __syncthreads();
    const int ih = ih0 + r, iw = iw0 + c0;
    if (ih < s.h && iw < s.w) {
      float acc[kPix][kCx];
#pragma unroll
      for (int j = 0; j < kPix; ++j) {
#pragma unroll
        for (int ci = 0; ci < kCx; ++ci) acc[j][ci] = e_all[ci];
      }
      for (int ci2 = 0; ci2 < s.c_x; ++ci2) {
#pragma unroll
        for (int dr = 0; dr < 5; ++dr) {
          // the window x~[ci'][ih + dr - 2][iw - 2 .. iw + 5]
          const float* xp = xs + ci2 * kPlane + (r + dr) * kHaloCols + c0;
          const float4 lo = *reinterpret_cast<const float4*>(xp);
          const float4 hi = *reinterpret_cast<const float4*>(xp + 4);
          const float xv[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
          for (int dq = 0; dq < 5; ++dq) {
            const float* kp = k5 + (ci2 * kOffsets + dr * 5 + dq) * kCx;
            const float4 ka = *reinterpret_cast<const float4*>(kp);
            const float4 kb = *reinterpret_cast<const float4*>(kp + 4);
            const float kv[kCx] = {ka.x, ka.y, ka.z, ka.w, kb.x, kb.y, kb.z, kb.w};
#pragma unroll
            for (int j = 0; j < kPix; ++j) {
#pragma unroll
              for (int ci = 0; ci < kCx; ++ci) acc[j][ci] = fmaf(kv[ci], xv[j + dq], acc[j][ci]);
            }
          }
        }
      }
      float* out = grad_input + n * s.c_x * plane + static_cast<int64_t>(ih) * s.w + iw;
#pragma unroll
      for (int ci = 0; ci < kCx; ++ci) {
        if (ci >= s.c_x) break;
        float* o = out + ci * plane;
        if (s.vector) {  // iw < w then means all 4 pixels are inside
          float4 v = *reinterpret_cast<float4*>(o);
          v.x += acc[0][ci];
          v.y += acc[1][ci];
          v.z += acc[2][ci];
          v.w += acc[3][ci];
          *reinterpret_cast<float4*>(o) = v;
        } else {
#pragma unroll
          for (int j = 0; j < kPix; ++j) {
            if (iw + j < s.w) o[j] += acc[j][ci];
          }
        }
      }
    }
    __syncthreads();  // xs is restaged for the next tile
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
    for (int i = threadIdx.x; i < s.c_x * kBoxLong * kBoxShort; i += kSeg) {
      const int ci = i / (kBoxLong * kBoxShort), rr = (i / box_cols) % box_rows, cc = i % box_cols;
      const int ih = box_h0 + rr, iw = box_w0 + cc;
      const bool inside = ih >= 0 && ih < s.h && iw >= 0 && iw < s.w;
      box[i] = (inside ? __ldg(xn + ci * plane + static_cast<int64_t>(ih) * s.w + iw) : 0.f) -
               shift[ci];
    }
    __syncthreads();
    if (threadIdx.x >= len) continue;
    const int ih = row_run ? line : start + threadIdx.x;
    const int iw = row_run ? start + threadIdx.x : line;
    float acc[kCx] = {};
    for (int t = 0; t < kTaps; ++t) {
      const int kr = t / 3, kq = t % 3;
      const int oh = ih + s.pad_h - kr, ow = iw + s.pad_w - kq;
      if (oh >= 0 && oh < s.h_g && ow >= 0 && ow < s.w_g) continue;
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
  s.vector = s.w % kPix == 0 &&
             reinterpret_cast<uintptr_t>(grad_input.const_data_ptr<float>()) % 16 == 0;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor terms = at::empty({kTermWords}, x.options());
  correction_terms_kernel<<<kCx, 256, 0, stream>>>(
      w.const_data_ptr<float>(), x.const_data_ptr<float>(), rows.const_data_ptr<float>(),
      center.const_data_ptr<float>(), s, terms.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Persistent: 4 blocks of 48 KB shared memory per multiprocessor.
  const int grid = static_cast<int>(
      std::clamp<int64_t>(s.tiles, 1, int64_t{4} * multiprocessors(input.get_device())));
  grad_input_correction_kernel<<<grid, kBlockThreads, 0, stream>>>(
      x.const_data_ptr<float>(), terms.const_data_ptr<float>(),
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
