// The fused conv tile kernel: an implicit GEMM on tensor cores with a BatchNorm
// epilogue. See docs/DESIGN.md ("CUDA forward kernels") for the whole picture.
//
// GEMM view: M = output pixels, N = output channels, K = C_in*kh*kw.
// Tiling: a block of 4 warps owns a tile of 4 output rows x 32 output columns
// of one image (warp w = row w, two m16 fragments of 16 columns) times a block
// of kBN = 8*kNT output channels (grid.y walks the channel blocks). The block
// is persistent: it stages its weight slice once (already split into TF32
// big/small parts and stored in MMA-fragment order, so one 16-byte shared load
// feeds one n8 fragment), then loops over pixel tiles. Each tile's input patch
// with halo, C_in x in_tile_h x in_tile_w, is copied to shared memory with
// cp.async into one of two buffers while the previous tile computes.
// The A operand is gathered straight from that patch (implicit im2col through
// a per-k offset table), so nothing but the input is read and nothing but the
// output (or, in the statistics pass, C_out-sized partials) is written.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/cuda/tf32_mma.cuh"

namespace fused_conv::cuda {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTileH = kWarps;  // output rows per tile: one per warp
constexpr int kTileW = 32;      // output columns per tile: two m16 fragments

struct ConvShape {
  int64_t n, c_in, h, w, c_out, h_out, w_out;
  int kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  bool channels_last;       // input and output layout (NHWC) else NCHW
  int in_tile_h, in_tile_w;  // the input patch (with halo) one output tile needs
  int k, k_steps;            // K = c_in*kh*kw and ceil(K / 8)
  int64_t tiles_h, tiles_w, tiles;  // pixel tiles; tiles = n*tiles_h*tiles_w
};

// Per-channel epilogue out = a[c]*conv(x)[c] + d[c] with
//   a = s*gamma*invstd,  d = s*beta + a*(bias - mean).
struct BnFold {
  const float* bias;           // conv bias, or null
  const float* gamma;          // null for affine=False
  const float* beta;           // null for affine=False
  const float* mean;           // running mean (eval) or batch mean of conv+bias (train)
  const float* var_or_invstd;  // running var (eval) or batch invstd (train)
  bool is_invstd;
  float eps;
  const float* scale_tensor;  // one element, or null
  float scale;
};

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Shared-memory layout, in floats; identical on host (size) and device (carving).
template <int kNT, int kSplit>
struct SmemLayout {
  static constexpr int kBN = 8 * kNT;
  static constexpr int kBVec = kSplit >= 2 ? 4 : 2;  // {b0,b1[,b0_small,b1_small]} per lane
  int b_frag, k_off, coef_a, coef_d, red, tile_mean, in_tile, tile_stride, total;
  __host__ __device__ SmemLayout(const ConvShape& s) {
    b_frag = 0;
    k_off = b_frag + s.k_steps * kNT * 32 * kBVec;
    coef_a = k_off + s.k_steps * 8;
    coef_d = coef_a + kBN;
    red = coef_d + kBN;
    tile_mean = red + kWarps * kBN;
    in_tile = tile_mean + kBN;
    tile_stride = (static_cast<int>(s.c_in) * s.in_tile_h * s.in_tile_w + 3) & ~3;
    total = in_tile + 2 * tile_stride;
  }
};

struct TileCoord {
  int64_t n;
  int64_t oh0, ow0;
};

__device__ __forceinline__ TileCoord tile_coord(const ConvShape& s, int64_t tile) {
  TileCoord c;
  const int64_t tw = tile % s.tiles_w;
  const int64_t rest = tile / s.tiles_w;
  c.oh0 = (rest % s.tiles_h) * kTileH;
  c.ow0 = tw * kTileW;
  c.n = rest / s.tiles_h;
  return c;
}

// Stages the input patch of one output tile (zeros outside the image = padding).
// NHWC walks channels fastest so that a warp reads contiguous global memory.
template <typename T>
__device__ __forceinline__ void load_patch(const T* __restrict__ x, const ConvShape& s,
                                           const TileCoord& tc, float* dst) {
  const int64_t ih0 = tc.oh0 * s.stride_h - s.pad_h;
  const int64_t iw0 = tc.ow0 * s.stride_w - s.pad_w;
  const int c_in = static_cast<int>(s.c_in);
  const int elems = c_in * s.in_tile_h * s.in_tile_w;
  for (int i = threadIdx.x; i < elems; i += kThreads) {
    int ci, ih, iw;
    if (s.channels_last) {
      ci = i % c_in;
      const int p = i / c_in;
      ih = p / s.in_tile_w;
      iw = p % s.in_tile_w;
    } else {
      iw = i % s.in_tile_w;
      const int r = i / s.in_tile_w;
      ih = r % s.in_tile_h;
      ci = r / s.in_tile_h;
    }
    const int64_t gh = ih0 + ih, gw = iw0 + iw;
    const bool inside = gh >= 0 && gh < s.h && gw >= 0 && gw < s.w;
    const int64_t src = !inside ? 0
                        : s.channels_last ? ((tc.n * s.h + gh) * s.w + gw) * s.c_in + ci
                                          : ((tc.n * s.c_in + ci) * s.h + gh) * s.w + gw;
    float* d = dst + (ci * s.in_tile_h + ih) * s.in_tile_w + iw;
    if constexpr (sizeof(T) == 4) {
      cp_async_f32(d, x + src, inside);
    } else {
      *d = inside ? to_float(x[src]) : 0.f;
    }
  }
}

// Chan et al.'s pairwise merge of (count, mean, M2) summaries.
template <typename F>
__device__ __forceinline__ void chan_merge(F& n, F& mean, F& m2, F nb, F mean_b, F m2_b) {
  const F total = n + nb;
  if (nb == F(0)) return;
  const F delta = mean_b - mean;
  const F frac = nb / total;
  mean += delta * frac;
  m2 += m2_b + delta * delta * n * frac;
  n = total;
}

// kStats = true : statistics pass; writes per-block (count, mean, M2) of conv(x)
//                 (without bias) per channel to partials[grid.y][grid.x][kBN][3].
// kStats = false: writes out = a[c]*conv(x) + d[c].
// kSplit: 3 = 3xTF32 (float32-accurate), 1 = one TF32 MMA (exact for fp16/bf16).
template <typename T, int kNT, int kSplit, bool kStats>
__global__ void __launch_bounds__(kThreads)
    conv_tile_kernel(const T* __restrict__ x, const T* __restrict__ w, ConvShape s, BnFold f,
                     T* __restrict__ out, float* __restrict__ partials) {
  using L = SmemLayout<kNT, kSplit>;
  constexpr int kBN = L::kBN;
  constexpr int kBVec = L::kBVec;
  extern __shared__ __align__(16) float smem[];
  const L lay(s);
  float* b_frag = smem + lay.b_frag;
  int* k_off = reinterpret_cast<int*>(smem + lay.k_off);
  float* coef_a = smem + lay.coef_a;
  float* coef_d = smem + lay.coef_d;
  float* red = smem + lay.red;
  float* tile_mean = smem + lay.tile_mean;
  float* patches = smem + lay.in_tile;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int64_t c_base = static_cast<int64_t>(blockIdx.y) * kBN;

  // ---- prologue: weights in fragment order (b0 = B[t][g], b1 = B[t+4][g]) ----
  for (int i = threadIdx.x; i < s.k_steps * kNT * 32; i += kThreads) {
    const int fl = i & 31, j = (i >> 5) % kNT, ks = (i >> 5) / kNT;
    const int64_t n = c_base + j * 8 + (fl >> 2);
    float v[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int k = ks * 8 + (fl & 3) + 4 * r;
      v[r] = (k < s.k && n < s.c_out) ? to_float(w[n * s.k + k]) : 0.f;
    }
    float* dst = b_frag + i * kBVec;
    if constexpr (kSplit >= 2) {
      uint32_t big, small;
      split_tf32(v[0], big, small);
      dst[0] = __uint_as_float(big);
      dst[2] = __uint_as_float(small);
      split_tf32(v[1], big, small);
      dst[1] = __uint_as_float(big);
      dst[3] = __uint_as_float(small);
    } else {
      dst[0] = __uint_as_float(to_tf32(v[0]));
      dst[1] = __uint_as_float(to_tf32(v[1]));
    }
  }
  // k -> offset of (ci, r, q) inside the staged patch. Padded k (>= K) meets zero
  // weights; pointing it at offset 0 keeps the product finite (0 * NaN = NaN).
  for (int k = threadIdx.x; k < s.k_steps * 8; k += kThreads) {
    int off = 0;
    if (k < s.k) {
      const int ci = k / (s.kh * s.kw), rq = k % (s.kh * s.kw);
      off = (ci * s.in_tile_h + (rq / s.kw) * s.dil_h) * s.in_tile_w + (rq % s.kw) * s.dil_w;
    }
    k_off[k] = off;
  }
  if (!kStats && threadIdx.x < kBN) {
    const int64_t c = c_base + threadIdx.x;
    float a = 0.f, d = 0.f;
    if (c < s.c_out) {
      const float sc = f.scale * (f.scale_tensor ? *f.scale_tensor : 1.f);
      const float invstd =
          f.is_invstd ? f.var_or_invstd[c] : 1.f / sqrtf(f.var_or_invstd[c] + f.eps);
      const float gamma = f.gamma ? f.gamma[c] : 1.f;
      const float beta = f.beta ? f.beta[c] : 0.f;
      const float bias = f.bias ? f.bias[c] : 0.f;
      a = sc * gamma * invstd;
      d = sc * beta + a * (bias - f.mean[c]);
    }
    coef_a[threadIdx.x] = a;
    coef_d[threadIdx.x] = d;
  }

  // Patch offsets of this thread's four pixels: columns g, g+8, g+16, g+24 of row `warp`.
  int pix[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) pix[q] = warp * s.stride_h * s.in_tile_w + (g + 8 * q) * s.stride_w;

  float run_n = 0.f, run_mean = 0.f, run_m2 = 0.f;  // statistics of channel threadIdx.x

  int64_t tile = blockIdx.x;
  if (tile < s.tiles) load_patch(x, s, tile_coord(s, tile), patches);
  cp_async_commit();

  for (int it = 0; tile < s.tiles; ++it, tile += gridDim.x) {
    const int64_t next = tile + gridDim.x;
    if (next < s.tiles) load_patch(x, s, tile_coord(s, next), patches + ((it + 1) & 1) * lay.tile_stride);
    cp_async_commit();
    cp_async_wait<1>();  // this tile's copies have landed (the next tile's may be in flight)
    __syncthreads();

    const float* patch = patches + (it & 1) * lay.tile_stride;
    float acc[2][kNT][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int j = 0; j < kNT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mt][j][e] = 0.f;

#pragma unroll 1
    for (int ks = 0; ks < s.k_steps; ++ks) {
      const int ko0 = k_off[ks * 8 + t], ko1 = k_off[ks * 8 + t + 4];
      uint32_t a_big[2][4], a_small[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const float v[4] = {patch[pix[2 * mt] + ko0], patch[pix[2 * mt + 1] + ko0],
                            patch[pix[2 * mt] + ko1], patch[pix[2 * mt + 1] + ko1]};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if constexpr (kSplit == 3) {
            split_tf32(v[e], a_big[mt][e], a_small[mt][e]);
          } else {
            a_big[mt][e] = to_tf32(v[e]);
          }
        }
      }
      const float* bk = b_frag + (ks * kNT * 32 + lane) * kBVec;
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        uint32_t b0, b1, s0 = 0, s1 = 0;
        if constexpr (kBVec == 4) {
          const float4 bv = *reinterpret_cast<const float4*>(bk + j * 32 * 4);
          b0 = __float_as_uint(bv.x);
          b1 = __float_as_uint(bv.y);
          s0 = __float_as_uint(bv.z);
          s1 = __float_as_uint(bv.w);
        } else {
          const float2 bv = *reinterpret_cast<const float2*>(bk + j * 32 * 2);
          b0 = __float_as_uint(bv.x);
          b1 = __float_as_uint(bv.y);
        }
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          // Small terms first: they are the least significant.
          if constexpr (kSplit == 3) mma_tf32(acc[mt][j], a_small[mt], b0, b1);
          if constexpr (kSplit >= 2) mma_tf32(acc[mt][j], a_big[mt], s0, s1);
          mma_tf32(acc[mt][j], a_big[mt], b0, b1);
        }
      }
    }

    const TileCoord tc = tile_coord(s, tile);
    const int64_t oh = tc.oh0 + warp;
    const bool row_ok = oh < s.h_out;
    bool col_ok[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) col_ok[q] = tc.ow0 + g + 8 * q < s.w_out;

    if constexpr (kStats) {
      // Two passes over the tile held in registers: the tile mean, then the sum of
      // squares about it; tiles then merge with Chan's formula (no cancellation).
      const int64_t rows = s.h_out - tc.oh0 < kTileH ? s.h_out - tc.oh0 : kTileH;
      const int64_t cols = s.w_out - tc.ow0 < kTileW ? s.w_out - tc.ow0 : kTileW;
      const float count = static_cast<float>(rows * cols);
#pragma unroll
      for (int pass = 0; pass < 2; ++pass) {
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
#pragma unroll
          for (int p = 0; p < 2; ++p) {
            const int c = j * 8 + 2 * t + p;
            const float centre = pass == 0 ? 0.f : tile_mean[c];
            float sum = 0.f;
#pragma unroll
            for (int q = 0; q < 4; ++q) {  // q = 2*mt + r: pixel column g + 8q
              const float v = acc[q >> 1][j][(q & 1) * 2 + p] - centre;
              if (row_ok && col_ok[q]) sum += pass == 0 ? v : v * v;
            }
            sum += __shfl_xor_sync(0xffffffffu, sum, 4);
            sum += __shfl_xor_sync(0xffffffffu, sum, 8);
            sum += __shfl_xor_sync(0xffffffffu, sum, 16);
            if (g == 0) red[warp * kBN + c] = sum;
          }
        }
        __syncthreads();
        if (threadIdx.x < kBN) {
          float total = 0.f;
#pragma unroll
          for (int wq = 0; wq < kWarps; ++wq) total += red[wq * kBN + threadIdx.x];
          if (pass == 0) {
            tile_mean[threadIdx.x] = total / count;
          } else {
            chan_merge(run_n, run_mean, run_m2, count, tile_mean[threadIdx.x], total);
          }
        }
        __syncthreads();
      }
    } else {
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
#pragma unroll
        for (int p = 0; p < 2; ++p) {
          const int c = j * 8 + 2 * t + p;
          const int64_t cg = c_base + c;
          if (cg >= s.c_out || !row_ok) continue;
          const float a = coef_a[c], d = coef_d[c];
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            if (!col_ok[q]) continue;
            const int64_t ow = tc.ow0 + g + 8 * q;
            const int64_t idx = s.channels_last
                                    ? ((tc.n * s.h_out + oh) * s.w_out + ow) * s.c_out + cg
                                    : ((tc.n * s.c_out + cg) * s.h_out + oh) * s.w_out + ow;
            const float v = fmaf(a, acc[q >> 1][j][(q & 1) * 2 + p], d);
            if constexpr (sizeof(T) == 4) {
              __stcs(reinterpret_cast<float*>(out) + idx, v);  // streamed: never re-read here
            } else {
              out[idx] = from_float<T>(v);
            }
          }
        }
      }
    }
    __syncthreads();  // the patch buffer of this tile is refilled by the next prefetch
  }
  cp_async_wait<0>();

  if constexpr (kStats) {
    if (threadIdx.x < kBN) {
      float* dst =
          partials + ((static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * kBN +
                      threadIdx.x) * 3;
      dst[0] = run_n;
      dst[1] = run_mean;
      dst[2] = run_m2;
    }
  }
}

}  // namespace fused_conv::cuda
