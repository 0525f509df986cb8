// The fused conv tile kernel: an implicit GEMM on tensor cores with a BatchNorm
// epilogue. See docs/DESIGN.md ("CUDA forward kernels") for the whole picture.
//
// GEMM view: M = output pixels, N = output channels, K = C_in*kh*kw.
// Tiling: a block of 4 warps owns a tile of 4 output rows x 32 output columns
// of one image (warp w = row w, two m16 fragments of 16 columns) times a block
// of kBN = 8*kNT output channels (grid.y walks the channel blocks). The block
// is persistent: it stages its weight slice once (already split into TF32
// big/small parts, laid out for the MMA: wgmma's shared-memory B operand on
// sm_90a, mma.sync fragment order elsewhere), then loops over pixel tiles. Each
// tile's input patch with halo, C_in x in_tile_h x in_tile_w, is staged in a
// ring of shared buffers ahead of the tile that computes.
// The A operand is gathered straight from that patch (implicit im2col through
// a per-k offset table), so nothing but the input is read and nothing but the
// output (or, in the statistics pass, C_out-sized partials) is written.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "kernels/cuda/tf32_mma.cuh"
#include "kernels/cuda/wgmma_tf32.cuh"

namespace fused_conv::cuda {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTileH = kWarps;  // output rows per tile: one per warp
constexpr int kTileW = 32;      // output columns per tile: two m16 fragments

struct ConvShape {
  int64_t n, tiles;  // batch and pixel tiles (n * tiles_h * tiles_w)
  // Per-image sizes are int32: the host only takes shapes whose per-image input
  // and output have fewer than 2^31 elements; batch offsets are int64.
  int c_in, h, w, c_out, h_out, w_out;
  int kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  bool channels_last;        // input and output layout (NHWC) else NCHW
  int in_tile_h, in_tile_w;  // the input patch (with halo) one output tile needs
  int k, k_steps;            // K = c_in*kh*kw and the k8 steps of the whole GEMM
  int tiles_h, tiles_w;
  // Input channels per staged patch. chunks = 1 (c_chunk = c_in, k_steps =
  // ceil(K / 8)) stages all channels at once; wider inputs (the backward's
  // grad_input: C_out channels of g_hat) walk c_chunk-channel slices of the
  // patch, one slice per buffer of the ring, with the accumulators carried over
  // (c_chunk*kh*kw a multiple of 8, k_steps = chunks*chunk_k_steps; GEMM order
  // k = (chunk, kr*kw + kq, ci mod c_chunk)). Only TileMode::kConv has chunks > 1.
  int c_chunk, chunks, chunk_k_steps;
};

// A per-channel parameter or statistic as the module holds it: float32,
// float16 or bfloat16, contiguous (the host makes a float32 copy of anything
// else). Read in its own dtype, so a 16-bit conv bias or BatchNorm needs no
// cast launch per call; the conversion to float is exact.
enum class ParamType : int { kFloat32, kFloat16, kBFloat16 };
struct ParamPtr {
  const void* data = nullptr;  // null: absent
  ParamType type = ParamType::kFloat32;
};
__device__ __forceinline__ float load_param(const ParamPtr& p, int64_t i) {
  if (p.type == ParamType::kFloat32) return static_cast<const float*>(p.data)[i];
  // 16-bit: a bfloat16 is the top half of its float; a float16 converts.
  const uint16_t bits = static_cast<const uint16_t*>(p.data)[i];
  return p.type == ParamType::kBFloat16 ? __uint_as_float(static_cast<uint32_t>(bits) << 16)
                                        : __half2float(__ushort_as_half(bits));
}

// Per-channel epilogue out = a[c]*conv(x)[c] + d[c] with
//   a = s*gamma*invstd,  d = s*beta + a*(bias - mean).
struct BnFold {
  ParamPtr bias;           // conv bias, or absent
  ParamPtr gamma;          // absent for affine=False
  ParamPtr beta;           // absent for affine=False
  ParamPtr mean;           // running mean (eval) or batch mean of conv+bias (train)
  ParamPtr var_or_invstd;  // running var (eval) or batch invstd (train)
  bool is_invstd;
  float eps;
  ParamPtr scale_tensor;  // one element, or absent
  float scale;
};

// The fold's (a, d) of channel c < C_out, from the per-channel tensors (no
// host sync: every launch recomputes them from device memory).
__device__ __forceinline__ void bn_fold_coefficients(const BnFold& f, int64_t c, float& a,
                                                     float& d) {
  const float sc = f.scale * (f.scale_tensor.data ? load_param(f.scale_tensor, 0) : 1.f);
  const float v = load_param(f.var_or_invstd, c);
  const float invstd = f.is_invstd ? v : 1.f / sqrtf(v + f.eps);
  const float gamma = f.gamma.data ? load_param(f.gamma, c) : 1.f;
  const float beta = f.beta.data ? load_param(f.beta, c) : 0.f;
  const float bias = f.bias.data ? load_param(f.bias, c) : 0.f;
  a = sc * gamma * invstd;
  d = sc * beta + a * (bias - load_param(f.mean, c));
}

// What one launch computes from y = conv(x) (without the conv bias).
enum class TileMode : int {
  kApply,      // out = a[c]*y + d[c]: the BN + scale epilogue (forward)
  kStats,      // per-block (count, mean, M2) of y (training forward, pass 1)
  kGradStats,  // per-block sums of g, g*(y - ctr), y - ctr (backward, pass 1)
  kGradOut,    // out = A[c]*g + C[c]*(y - ctr) + D[c], the gradient at the conv
               // output (training backward, pass 2)
  kGradOutW,   // kGradOut (out may be null: not written) plus per-block partials
               // of the weight gradient sum_p g_hat[c][p] * x(p, k)
  kConv,       // out = y, over the input's channel slices (ConvShape::chunks):
               // the backward's grad_input (grad_input_tile.cu)
};

// Weight-gradient GEMM of kGradOutW, per tile: M = the block's kBN channels
// (m16 fragments), N = K (n8 fragments, the conv's k-steps), reduced over the
// tile's kTileH*kTileW pixels (k8 steps). Warp w owns m16 fragment
// w / warps_per_m and n8 fragments w % warps_per_m + warps_per_m*i for
// i < kDwFrags; the host only fuses shapes whose K fits (weight_grad_fusable).
// All kDwFrags fragments are computed (fragments past K read valid patch words
// and are not written): a fixed count keeps the loads and MMAs of different
// fragments free to interleave. 9 fits the reference problem's K = 72 exactly.
constexpr int kDwFrags = 9;
// Words between channel rows of the staged g_hat tile: = 4 (mod 32), so an A
// fragment load (8 channels g x 4 pixels t) hits 32 distinct banks.
constexpr int kGhatStride = kTileH * kTileW + 4;

// The backward's inputs beyond x and w, all per channel [C_out] in float32
// except grad. ctr = mean - bias centres y on the saved statistics, so the
// sums of g*(y - ctr) do not cancel; A, C, D come from finalize_grad_kernel.
struct GradTerms {
  const void* grad;  // grad_out, in the input's dtype and memory format
  const float* center;
  const float* coef_g;  // A
  const float* coef_y;  // C
  const float* coef_1;  // D
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

// Two adjacent output elements (the pointer is aligned to the pair).
__device__ __forceinline__ void store_pair(float* dst, float v0, float v1) {
  __stcs(reinterpret_cast<float2*>(dst), make_float2(v0, v1));
}
__device__ __forceinline__ void store_pair(__half* dst, float v0, float v1) {
  *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(v0, v1);
}
__device__ __forceinline__ void store_pair(__nv_bfloat16* dst, float v0, float v1) {
  *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(v0, v1);
}

// Rounding of the gradient at the conv output to float16 / bfloat16, unbiased:
// grad_out itself holds 16-bit values, so g_hat = A*g + ... takes few distinct
// values per channel and round-to-nearest would make the same error on all
// elements of a value; summed over N*H*W elements by the weight gradient, such
// errors add up instead of cancelling (a bias that grows with the batch).
// Stochastic rounding with a fixed hash of the element offset as the random
// source makes the errors zero-mean and independent, and stays deterministic.
__device__ __forceinline__ uint32_t mix32(uint32_t h) {  // an integer hash (murmur3-style)
  h *= 0x9E3779B1u;
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  return h;
}
__device__ __forceinline__ uint32_t mix_bits(int64_t i) {
  return mix32(static_cast<uint32_t>(i) ^ (static_cast<uint32_t>(i >> 32) * 0x27D4EB2Du));
}
// Adding uniform random bits r below the kept mantissa and truncating rounds
// the magnitude up with probability equal to the dropped fraction: E[result] =
// v. bfloat16 keeps the top 16 bits of a float (r's low 16 bits are used);
// float16 (normal range) keeps 10 of the 23 mantissa bits (r's low 13).
// Outside float16's normal range: round to nearest.
template <typename T>
__device__ __forceinline__ T round_with_bits(float v, uint32_t r) {
  const uint32_t bits = __float_as_uint(v);
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    // An infinity's low 16 bits are zero, so the add cannot carry out of them;
    // a NaN could carry into the sign bit, so it becomes the canonical NaN.
    const uint32_t rounded = (bits + (r & 0xFFFFu)) >> 16;
    return __ushort_as_bfloat16(static_cast<unsigned short>(v != v ? 0x7FC0u : rounded));
  } else {
    const float a = fabsf(v);
    if (!(a >= 6.103515625e-05f && a < 65504.f)) return from_float<T>(v);
    return __float2half_rz(__uint_as_float(bits + (r & 0x1FFFu)));
  }
}
// The element at offset i, its random bits hashed from i.
template <typename T>
__device__ __forceinline__ T round_unbiased(float v, int64_t i) {
  return round_with_bits<T>(v, mix_bits(i));
}

// Shared-memory layout, in floats; identical on host (size) and device (carving).
template <int kNT, int kSplit>
struct SmemLayout {
  static constexpr int kBN = 8 * kNT;
  static constexpr int kBVec = kSplit >= 2 ? 4 : 2;  // {b0,b1[,b0_small,b1_small]} per lane
  // Patch buffers in the ring: float32 patches (3xTF32) are copied kStages-1 tiles
  // ahead by cp.async, enough to cover load latency under the output's write
  // traffic; fp16/bf16 patches are staged through registers one tile ahead.
  static constexpr int kStages = kSplit == 3 ? 4 : 2;
  // kConv's ring (one 8-channel slice per buffer): 2 deep, so that 4 blocks fit
  // per SM next to the weights of all slices (4 x 53 KB for the reference problem).
  static constexpr int kSlicedStages = 2;
  int b_frag, k_off, coef_a, coef_d, coef_c, coef_e, stat_n, stat_mean, stat_m2, stat_x, in_tile;
  int g_hat;         // kGradOutW: the tile's g_hat, [kBN][kGhatStride] floats
  int plane_stride;  // words between channel planes of the patch: = 8 (mod 32)
  int tile_stride;   // words between the patch buffers of the ring
  int total;
  __host__ __device__ SmemLayout(const ConvShape& s, bool weight_grad, bool sliced = false) {
    b_frag = 0;
    k_off = b_frag + s.k_steps * kNT * 32 * kBVec;
    coef_a = k_off + s.chunk_k_steps * 8;
    coef_d = coef_a + kBN;
    coef_c = coef_d + kBN;
    coef_e = coef_c + kBN;
    stat_n = coef_e + kBN;
    stat_mean = stat_n + kWarps;
    stat_m2 = stat_mean + kWarps * kBN;
    stat_x = stat_m2 + kWarps * kBN;
    in_tile = (stat_x + kWarps * kBN + 3) & ~3;
    const int plane = s.in_tile_h * s.in_tile_w;
    plane_stride = plane + ((8 - plane) % 32 + 32) % 32;
    tile_stride = (s.c_chunk * plane_stride + 3) & ~3;
    g_hat = in_tile + (sliced ? kSlicedStages : kStages) * tile_stride;
    total = g_hat + (weight_grad ? kBN * kGhatStride : 0);
  }
};

struct TileCoord {
  int64_t n;
  int oh0, ow0;
};

__device__ __forceinline__ TileCoord tile_coord(const ConvShape& s, int64_t tile) {
  const int64_t rows = tile / s.tiles_w;
  TileCoord c;
  c.ow0 = static_cast<int>(tile - rows * s.tiles_w) * kTileW;
  c.n = rows / s.tiles_h;
  c.oh0 = static_cast<int>(rows - c.n * s.tiles_h) * kTileH;
  return c;
}

// Walks this thread's elements of the staged patch, i = threadIdx.x + kThreads*m,
// in the order of the input's memory so that a warp reads contiguous addresses:
// (ci, ih, iw) for NCHW, (ih, iw, ci) for NHWC. Three counters (outer, mid, inner)
// advance by carries instead of divisions; the patch geometry is the same for
// every tile, so the start and the step are computed once per block.
struct PatchWalk {
  int e1, e2;                   // extents of mid and inner
  int outer, mid, inner;        // start
  int d_outer, d_mid, d_inner;  // step of kThreads elements
  __device__ PatchWalk(const ConvShape& s) {
    e1 = s.channels_last ? s.in_tile_w : s.in_tile_h;
    e2 = s.channels_last ? s.c_chunk : s.in_tile_w;
    outer = threadIdx.x / (e1 * e2);
    mid = (threadIdx.x / e2) % e1;
    inner = threadIdx.x % e2;
    d_outer = kThreads / (e1 * e2);
    d_mid = (kThreads / e2) % e1;
    d_inner = kThreads % e2;
  }
};

// Visits this thread's patch elements of channel slice `chunk`: fn(m, dst, src,
// inside) with m the element's ordinal for this thread, dst its shared-memory
// index ([ci][ih][iw] with ci inside the slice, channel planes plane_stride
// words apart), src its offset in the image and inside = false for padding and
// for channels past c_in (the last slice's tail).
template <typename Fn>
__device__ __forceinline__ void for_each_patch_element(const ConvShape& s, const PatchWalk& walk,
                                                       const TileCoord& tc, int chunk,
                                                       int plane_stride, Fn&& fn) {
  const int gh0 = tc.oh0 * s.stride_h - s.pad_h;
  const int gw0 = tc.ow0 * s.stride_w - s.pad_w;
  const int c0 = chunk * s.c_chunk;
  const int elems = s.c_chunk * s.in_tile_h * s.in_tile_w;
  int outer = walk.outer, mid = walk.mid, inner = walk.inner;
  int m = 0;
  for (int i = threadIdx.x; i < elems; i += kThreads, ++m) {
    const int ci = s.channels_last ? inner : outer;
    const int ih = s.channels_last ? outer : mid;
    const int iw = s.channels_last ? mid : inner;
    const int gh = gh0 + ih, gw = gw0 + iw, gc = c0 + ci;
    const bool inside = static_cast<unsigned>(gh) < static_cast<unsigned>(s.h) &&
                        static_cast<unsigned>(gw) < static_cast<unsigned>(s.w) && gc < s.c_in;
    const int src = !inside           ? 0
                    : s.channels_last ? (gh * s.w + gw) * s.c_in + gc
                                      : (gc * s.h + gh) * s.w + gw;
    fn(m, ci * plane_stride + ih * s.in_tile_w + iw, src, inside);
    inner += walk.d_inner;
    mid += walk.d_mid;
    outer += walk.d_outer;
    if (inner >= walk.e2) {
      inner -= walk.e2;
      ++mid;
    }
    if (mid >= walk.e1) {
      mid -= walk.e1;
      ++outer;
    }
  }
}

// Staging of the next tile's patch while the current one computes.
//   float: cp.async straight into the other shared buffer (zero-fill = padding);
//   fp16/bf16: loads into registers before the compute, converted and stored to
//   shared memory after it (elements past kRegs per thread are stored directly).
template <typename T>
struct PatchStager {
  static constexpr int kRegs = sizeof(T) == 4 ? 1 : 16;
  T regs[kRegs];

  __device__ __forceinline__ void issue(const T* __restrict__ x, const ConvShape& s,
                                        const PatchWalk& walk, const TileCoord& tc, int chunk,
                                        int plane_stride, float* dst) {
    const T* img = x + tc.n * s.c_in * s.h * s.w;
    for_each_patch_element(
        s, walk, tc, chunk, plane_stride, [&](int m, int d, int src, bool inside) {
          if constexpr (sizeof(T) == 4) {
            cp_async_f32(dst + d, reinterpret_cast<const float*>(img + src), inside);
          } else {
            const T v = inside ? img[src] : from_float<T>(0.f);
            if (m < kRegs) {
              regs[m] = v;
            } else {
              dst[d] = to_float(v);
            }
          }
        });
    cp_async_commit();
  }

  // Completes the staging issued for the buffer `dst` (a no-op for float, whose
  // copies complete through cp.async.wait_group).
  __device__ __forceinline__ void finish(const ConvShape& s, const PatchWalk& walk,
                                         const TileCoord& tc, int chunk, int plane_stride,
                                         float* dst) {
    if constexpr (sizeof(T) != 4) {
      for_each_patch_element(s, walk, tc, chunk, plane_stride, [&](int m, int d, int, bool) {
        if (m < kRegs) dst[d] = to_float(regs[m]);
      });
    }
  }
};

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

// Grad-out loads: each element is read once per pass and the tensor is larger
// than L2, so float32 loads stream past the cache.
__device__ __forceinline__ float load_grad(const float* p) { return __ldcs(p); }
__device__ __forceinline__ float load_grad(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_grad(const __nv_bfloat16* p) { return __bfloat162float(*p); }

// kMode (TileMode):
//   kApply    : writes out = a[c]*y + d[c] (a, d from the BnFold).
//   kConv     : writes out = y (a = 1, d = 0), summing y over s.chunks slices.
//   kStats    : writes per-block (count, mean, M2) of y per channel to
//               partials[grid.y][grid.x][kBN][3].
//   kGradStats: writes per-block (sum g, sum g*(y - ctr), sum (y - ctr)) per
//               channel to partials[grid.y][grid.x][kBN][3].
//   kGradOut  : writes out = A[c]*g + C[c]*(y - ctr) + D[c].
//   kGradOutW : kGradOut (unless out is null), and writes the block's weight-gradient
//               partials sum g_hat[c][p] * x(p, k) to partials[grid.y][grid.x][kBN][K8]
//               (K8 = 8*k_steps, GEMM order k = (kr*kw + kq)*c_in + ci).
// kSplit: 3 = 3xTF32 (float32-accurate), 1 = one TF32 MMA (exact for fp16/bf16).
template <typename T, int kNT, int kSplit, TileMode kMode>
__global__ void __launch_bounds__(kThreads, kMode == TileMode::kGradOutW ? 2
                                            : kMode == TileMode::kConv   ? (kNT <= 2 ? 4 : 3)
                                            : (kMode != TileMode::kApply || kSplit == 3) ? 3
                                                                                         : 4)
    conv_tile_kernel(const T* __restrict__ x, const T* __restrict__ w, ConvShape s, BnFold f,
                     GradTerms gt, T* __restrict__ out, float* __restrict__ partials) {
  constexpr bool kStats = kMode == TileMode::kStats;
  constexpr bool kGradStats = kMode == TileMode::kGradStats;
  constexpr bool kWeightGrad = kMode == TileMode::kGradOutW;
  constexpr bool kGradOut = kMode == TileMode::kGradOut || kWeightGrad;
  // Only kConv walks channel slices: elsewhere chunks = 1 is known at compile
  // time, so the accumulators are dead between tiles (no register pressure).
  constexpr bool kChunked = kMode == TileMode::kConv;
  constexpr bool kPlainEpilogue = kMode == TileMode::kApply || kChunked;
  const int chunks = kChunked ? s.chunks : 1;
  using L = SmemLayout<kNT, kSplit>;
  constexpr int kBN = L::kBN;
  constexpr int kBVec = L::kBVec;
  extern __shared__ __align__(16) float smem[];
  const L lay(s, kWeightGrad, kChunked);
  float* b_frag = smem + lay.b_frag;
  int* k_off = reinterpret_cast<int*>(smem + lay.k_off);
  float* coef_a = smem + lay.coef_a;
  float* coef_d = smem + lay.coef_d;
  float* coef_c = smem + lay.coef_c;
  float* coef_e = smem + lay.coef_e;
  float* patches = smem + lay.in_tile;
  float* g_hat = smem + lay.g_hat;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int c_base = blockIdx.y * kBN;

  // ---- prologue: the weights, split into TF32 terms, in the MMA's operand layout ----
  // Weight k of channel n, zero past K and C_out. GEMM order k = (chunk, kr*kw + kq,
  // ci mod c_chunk) (one chunk: (kr*kw + kq)*c_in + ci); the weight's memory order is
  // (ci, kr, kq).
  const int taps = s.kh * s.kw, chunk_k = s.c_chunk * taps;
  auto weight_at = [&](int n, int k) -> float {
    const int chunk = k / chunk_k, r = k % chunk_k;
    const int ci = chunk * s.c_chunk + r % s.c_chunk, rq = r / s.c_chunk;
    if (chunk >= chunks || ci >= s.c_in || n >= s.c_out) return 0.f;
    return to_float(w[static_cast<int64_t>(n) * s.k + ci * taps + rq]);
  };
#if FUSED_CONV_WGMMA
  // wgmma: one K-major array per term (big, then small), laid out as
  // wgmma_tf32.cuh describes: word i is k-step i / (8*kBN), k-half, channel, k % 4.
  const int b_words = s.k_steps * kBN * 8;
  for (int i = threadIdx.x; i < b_words; i += kThreads) {
    const int ks = i / (kBN * 8), kc = (i / (kBN * 4)) & 1;
    const float v = weight_at(c_base + ((i % (kBN * 4)) >> 2), ks * 8 + kc * 4 + (i & 3));
    if constexpr (kSplit >= 2) {
      uint32_t big, small;
      split_tf32(v, big, small);
      b_frag[i] = __uint_as_float(big);
      b_frag[b_words + i] = __uint_as_float(small);
    } else {
      b_frag[i] = __uint_as_float(to_tf32(v));
    }
  }
#else
  // mma.sync: fragment order (b0 = B[t][g], b1 = B[t+4][g]), one 16-byte load per n8 fragment.
  for (int i = threadIdx.x; i < s.k_steps * kNT * 32; i += kThreads) {
    const int fl = i & 31, j = (i >> 5) % kNT, ks = (i >> 5) / kNT;
    const int n = c_base + j * 8 + (fl >> 2);
    const float v[2] = {weight_at(n, ks * 8 + (fl & 3)), weight_at(n, ks * 8 + (fl & 3) + 4)};
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
#endif
  // k (within a chunk) -> offset of (kr, kq, ci) inside the staged patch. With ci
  // fastest in k and a channel-plane stride of 8 (mod 32) words, the four k of one
  // A load (t) hit banks 8 apart while g walks 8 consecutive ones: conflict-free
  // for c_chunk >= 4. Padded k (>= K) meets zero weights; offset 0 keeps the
  // product finite.
  for (int k = threadIdx.x; k < s.chunk_k_steps * 8; k += kThreads) {
    int off = 0;
    if (k < chunk_k) {
      const int ci = k % s.c_chunk, rq = k / s.c_chunk;
      off = ci * lay.plane_stride + (rq / s.kw) * s.dil_h * s.in_tile_w + (rq % s.kw) * s.dil_w;
    }
    k_off[k] = off;
  }
  if ((kGradStats || kGradOut) && threadIdx.x < kBN) {
    // coef_a = ctr; kGradOut: coef_d = A, coef_c = C, coef_e = D.
    const int c = c_base + threadIdx.x;
    const bool ok = c < s.c_out;
    coef_a[threadIdx.x] = ok ? gt.center[c] : 0.f;
    if (kGradOut) {
      coef_d[threadIdx.x] = ok ? gt.coef_g[c] : 0.f;
      coef_c[threadIdx.x] = ok ? gt.coef_y[c] : 0.f;
      coef_e[threadIdx.x] = ok ? gt.coef_1[c] : 0.f;
    }
  }
  if (kPlainEpilogue && threadIdx.x < kBN) {
    const int c = c_base + threadIdx.x;
    float a = 0.f, d = 0.f;
    if (c < s.c_out && kChunked) {
      a = 1.f;
    } else if (c < s.c_out) {
      bn_fold_coefficients(f, c, a, d);
    }
    coef_a[threadIdx.x] = a;
    coef_d[threadIdx.x] = d;
  }

  // Patch offsets of this thread's four pixels: columns g, g+8, g+16, g+24 of row `warp`.
  int pix[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) pix[q] = warp * s.stride_h * s.in_tile_w + (g + 8 * q) * s.stride_w;

  // Statistics of this thread's channel slots (c = 8j + 2t + p) over its pixels:
  // a running (count, mean, M2) per slot, merged tile by tile (Chan et al.).
  float st_n = 0.f;
  float st_mean[kNT][2], st_m2[kNT][2];
  if constexpr (kStats) {
#pragma unroll
    for (int j = 0; j < kNT; ++j) st_mean[j][0] = st_mean[j][1] = st_m2[j][0] = st_m2[j][1] = 0.f;
  }
  // Backward sums of this thread's channel slots: g, g*(y - ctr), y - ctr.
  // Plain float32 sums over a few hundred values each; the block and grid
  // merges happen in fixed orders (finalize in float64).
  float gs_g[kNT][2], gs_gy[kNT][2], gs_y[kNT][2];
  if constexpr (kGradStats) {
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int p = 0; p < 2; ++p) gs_g[j][p] = gs_gy[j][p] = gs_y[j][p] = 0.f;
  }
  const T* __restrict__ grad = static_cast<const T*>(gt.grad);

  // kGradOutW: this warp's weight-gradient fragments, accumulated over all its tiles.
  constexpr int kWarpsPerM = kBN >= 16 ? kWarps / (kBN / 16) : kWarps;  // (kBN = 8: unused)
  const int dw_m = warp / kWarpsPerM, dw_n0 = warp % kWarpsPerM;
  float dw[kDwFrags][4];
  if constexpr (kWeightGrad) {
#pragma unroll
    for (int i = 0; i < kDwFrags; ++i) dw[i][0] = dw[i][1] = dw[i][2] = dw[i][3] = 0.f;
  }

  const PatchWalk walk(s);
  PatchStager<T> stager;
  constexpr int kStages = kChunked ? L::kSlicedStages : L::kStages;
  // Work items: (tile, channel slice) pairs, slices fastest; this block's tiles
  // are blockIdx.x + i*gridDim.x. Each item fills one buffer of the ring and is
  // one cp.async commit group (possibly empty past the last item).
  struct WorkItem {
    int64_t tile;
    int chunk;
  };
  auto advance = [&](WorkItem& i) {
    if (++i.chunk == chunks) {
      i.chunk = 0;
      i.tile += gridDim.x;
    }
  };
  WorkItem fetch{blockIdx.x, 0};  // the next item to stage
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st, advance(fetch)) {
    float* buf = patches + st * lay.tile_stride;
    if (fetch.tile < s.tiles) {
      const TileCoord tc = tile_coord(s, fetch.tile);
      stager.issue(x, s, walk, tc, fetch.chunk, lay.plane_stride, buf);
      stager.finish(s, walk, tc, fetch.chunk, lay.plane_stride, buf);
    } else {
      cp_async_commit();
    }
  }

  float acc[2][kNT][4];  // carried across a tile's channel slices
  int stage = 0;
  for (WorkItem item{blockIdx.x, 0}; item.tile < s.tiles;
       advance(item), stage = stage + 1 == kStages ? 0 : stage + 1) {
    const int64_t tile = item.tile;
    const WorkItem next = fetch;  // kStages - 1 items ahead
    advance(fetch);
    float* next_patch = patches + (stage == 0 ? kStages - 1 : stage - 1) * lay.tile_stride;
    if (next.tile < s.tiles) {
      stager.issue(x, s, walk, tile_coord(s, next.tile), next.chunk, lay.plane_stride, next_patch);
    } else {
      cp_async_commit();  // keep one group per iteration for the wait below
    }
    cp_async_wait<kStages - 1>();  // this item's copies have landed; later ones may fly
    __syncthreads();

    const float* patch = patches + stage * lay.tile_stride;
    if (!kChunked || item.chunk == 0) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int j = 0; j < kNT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mt][j][e] = 0.f;
    }
    // This slice's k-steps: local ks (k_off) is global k-step kb + ks (weights).
    const int cks = kChunked ? s.chunk_k_steps : s.k_steps;
    const int kb = kChunked ? item.chunk * cks : 0;

    // The A values of k-step ks+1 are loaded while ks runs its MMAs.
    auto load_a = [&](int ks, float (&v)[2][4]) {
      const int ko0 = k_off[ks * 8 + t], ko1 = k_off[ks * 8 + t + 4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        v[mt][0] = patch[pix[2 * mt] + ko0];
        v[mt][1] = patch[pix[2 * mt + 1] + ko0];
        v[mt][2] = patch[pix[2 * mt] + ko1];
        v[mt][3] = patch[pix[2 * mt + 1] + ko1];
      }
    };
    float a_val[2][4];
    load_a(0, a_val);
#if FUSED_CONV_WGMMA
    // Per k-step: split the gathered A (registers), then 2 (m64 halves: this
    // warp's columns g, g+8 | g+16, g+24) x kSplit wgmmas against the staged
    // weights, small terms first. A alternates between two register sets so the
    // warps split step ks+1 while step ks's MMAs run: wait_group<1> after each
    // commit retires step ks-1, the last reader of the set step ks+1 overwrites.
    // The register operands of an MMA in flight must keep their registers until
    // the wait that retires it: wgmma_fence_operand after that wait keeps them
    // live (without it the compiler may load the next A into them; seen on
    // fp16/bf16, where A needs no conversion instruction).
    wgmma_fence_accumulators(acc);
    wgmma_fence();  // the zeroed accumulators
    {
      const uint64_t desc_big = wgmma_desc_k_major(b_frag, kBN * 16, 128);
      const uint64_t desc_small = desc_big + ((b_words * 4) >> 4);
      uint32_t a_big[2][2][4], a_small[2][2][4];  // [register set][m64 half][fragment]
      auto mma_step = [&](int ks, uint32_t (&big)[2][4], uint32_t (&small)[2][4]) {
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if constexpr (kSplit == 3) {
              split_tf32(a_val[mt][e], big[mt][e], small[mt][e]);
            } else {
              big[mt][e] = __float_as_uint(a_val[mt][e]);  // fp16/bf16 values: exact in TF32
            }
          }
        }
        load_a(ks + 1 < cks ? ks + 1 : ks, a_val);
        wgmma_fence();
        const uint64_t step = static_cast<uint64_t>(kb + ks) * ((kBN * 32) >> 4);  // bytes >> 4
        if constexpr (kSplit == 3) {
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) wgmma_tf32<kNT>(acc[mt], small[mt], desc_big + step);
        }
        if constexpr (kSplit >= 2) {
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) wgmma_tf32<kNT>(acc[mt], big[mt], desc_small + step);
        }
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) wgmma_tf32<kNT>(acc[mt], big[mt], desc_big + step);
        wgmma_commit();
        wgmma_wait<1>();
      };
      auto retire = [&](uint32_t (&big)[2][4], uint32_t (&small)[2][4]) {
        wgmma_fence_operands(big);
        if constexpr (kSplit >= 2) wgmma_fence_operands(small);
      };
#pragma unroll 1
      for (int ks = 0; ks < cks; ks += 2) {
        mma_step(ks, a_big[0], a_small[0]);
        retire(a_big[1], a_small[1]);  // step ks-1's set
        if (ks + 1 < cks) {
          mma_step(ks + 1, a_big[1], a_small[1]);
          retire(a_big[0], a_small[0]);  // step ks's set
        }
      }
      wgmma_wait<0>();
      retire(a_big[0], a_small[0]);
      retire(a_big[1], a_small[1]);
      wgmma_fence_accumulators(acc);
    }
#else
#pragma unroll 1
    for (int ks = 0; ks < cks; ++ks) {
      uint32_t a_big[2][4], a_small[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if constexpr (kSplit == 3) {
            split_tf32(a_val[mt][e], a_big[mt][e], a_small[mt][e]);
          } else {
            a_big[mt][e] = to_tf32(a_val[mt][e]);
          }
        }
      }
      load_a(ks + 1 < cks ? ks + 1 : ks, a_val);
      const float* bk = b_frag + ((kb + ks) * kNT * 32 + lane) * kBVec;
      // Term-major order over groups of up to 4 n8 fragments: 8 independent
      // accumulators separate two MMAs into the same one, hiding MMA latency.
      constexpr int kGroup = kNT < 4 ? kNT : 4;
#pragma unroll
      for (int j0 = 0; j0 < kNT; j0 += kGroup) {
        uint32_t b[kGroup][4];
#pragma unroll
        for (int jj = 0; jj < kGroup; ++jj) {
          if constexpr (kBVec == 4) {
            const float4 bv = *reinterpret_cast<const float4*>(bk + (j0 + jj) * 32 * 4);
            b[jj][0] = __float_as_uint(bv.x);
            b[jj][1] = __float_as_uint(bv.y);
            b[jj][2] = __float_as_uint(bv.z);
            b[jj][3] = __float_as_uint(bv.w);
          } else {
            const float2 bv = *reinterpret_cast<const float2*>(bk + (j0 + jj) * 32 * 2);
            b[jj][0] = __float_as_uint(bv.x);
            b[jj][1] = __float_as_uint(bv.y);
          }
        }
        // Small terms first: they are the least significant.
        if constexpr (kSplit == 3) {
#pragma unroll
          for (int jj = 0; jj < kGroup; ++jj)
#pragma unroll
            for (int mt = 0; mt < 2; ++mt)
              mma_tf32(acc[mt][j0 + jj], a_small[mt], b[jj][0], b[jj][1]);
        }
        if constexpr (kSplit >= 2) {
#pragma unroll
          for (int jj = 0; jj < kGroup; ++jj)
#pragma unroll
            for (int mt = 0; mt < 2; ++mt)
              mma_tf32(acc[mt][j0 + jj], a_big[mt], b[jj][2], b[jj][3]);
        }
#pragma unroll
        for (int jj = 0; jj < kGroup; ++jj)
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) mma_tf32(acc[mt][j0 + jj], a_big[mt], b[jj][0], b[jj][1]);
      }
    }
#endif

    if (next.tile < s.tiles) {
      stager.finish(s, walk, tile_coord(s, next.tile), next.chunk, lay.plane_stride, next_patch);
    }
    if (kChunked && item.chunk + 1 < chunks) {
      __syncthreads();  // this item's buffer is refilled by a later prefetch
      continue;
    }

    // acc[q >> 1][j][(q & 1) * 2 + p] holds pixel column g + 8q, channel 8j + 2t + p.
    const TileCoord tc = tile_coord(s, tile);
    const int oh = tc.oh0 + warp;
    const bool row_ok = oh < s.h_out;
    bool col_ok[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) col_ok[q] = row_ok && tc.ow0 + g + 8 * q < s.w_out;

    if constexpr (kStats) {
      float k = 0.f;
#pragma unroll
      for (int q = 0; q < 4; ++q) k += col_ok[q] ? 1.f : 0.f;
      if (k > 0.f) {
        const float inv_k = 1.f / k;
        const float n_new = st_n + k;
        const float frac = k / n_new, cross = st_n * frac;
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
#pragma unroll
          for (int p = 0; p < 2; ++p) {
            float sum = 0.f;
#pragma unroll
            for (int q = 0; q < 4; ++q) sum += col_ok[q] ? acc[q >> 1][j][(q & 1) * 2 + p] : 0.f;
            const float m = sum * inv_k;
            float m2 = 0.f;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              const float dv = acc[q >> 1][j][(q & 1) * 2 + p] - m;
              m2 += col_ok[q] ? dv * dv : 0.f;
            }
            const float delta = m - st_mean[j][p];
            st_mean[j][p] += delta * frac;
            st_m2[j][p] += m2 + delta * delta * cross;
          }
        }
        st_n = n_new;
      }
    } else if constexpr (kGradStats) {
      if (row_ok) {
        // grad_out has the output's layout: the same offsets as the stores below.
        const int64_t plane = static_cast<int64_t>(s.h_out) * s.w_out;
        const int64_t pix0 = (tc.n * s.h_out + oh) * s.w_out + tc.ow0 + g;  // NHWC pixel
        const int64_t base0 = tc.n * s.c_out * plane + static_cast<int64_t>(oh) * s.w_out + tc.ow0 +
                              g;  // NCHW, channel 0
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
#pragma unroll
          for (int p = 0; p < 2; ++p) {
            const int c = j * 8 + 2 * t + p;
            if (c_base + c >= s.c_out) continue;
            const float ctr = coef_a[c];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              if (!col_ok[q]) continue;
              const int64_t off = s.channels_last ? (pix0 + 8 * q) * s.c_out + c_base + c
                                                  : base0 + (c_base + c) * plane + 8 * q;
              const float gv = load_grad(grad + off);
              const float yv = acc[q >> 1][j][(q & 1) * 2 + p] - ctr;
              gs_g[j][p] += gv;
              gs_gy[j][p] = fmaf(gv, yv, gs_gy[j][p]);
              gs_y[j][p] += yv;
            }
          }
        }
      }
    } else if constexpr (kPlainEpilogue) {
      // The forward's epilogue, kept specialised: per-row base pointers and no
      // per-element 64-bit offsets (the generic form below cost the eval kernel
      // about 30% on the reference problem).
      //
      // float32 NCHW: an accumulator fragment holds 8 pixels x 4 channels per
      // store (four 32-byte sectors in four rows), so the warp's 32 x kBN output
      // goes out through shared memory instead, 8 channels at a time: written
      // [channel][pixel] into this tile's patch buffer (free once every warp is
      // past the main loop; the ring refills it after the loop's closing
      // barrier), then read back along the row, so that each store instruction
      // writes two whole 32-pixel channel rows (8-byte stores: rows of an even
      // width start 8-byte aligned) or one (4-byte, odd widths).
      constexpr int kEpiStride = 36;  // words per staged channel row: writes hit banks 8t + g
      constexpr int kEpiWords = 8 * kEpiStride;  // per warp
      bool staged = false;
      if constexpr (sizeof(T) == 4) {
        staged = !s.channels_last && lay.tile_stride >= kWarps * kEpiWords;
      }
      if (staged) {
        __syncthreads();  // every warp is done reading this tile's patch
        if (row_ok) {
          float* st = patches + stage * lay.tile_stride + warp * kEpiWords;
          const int64_t plane = static_cast<int64_t>(s.h_out) * s.w_out;
          float* o = reinterpret_cast<float*>(out) + tc.n * s.c_out * plane +
                     static_cast<int64_t>(oh) * s.w_out + tc.ow0;
          const int cols = min(kTileW, s.w_out - tc.ow0);  // valid pixels of this row tile
          const bool pairs = (s.w_out & 1) == 0;           // then cols is even too
#pragma unroll
          for (int j = 0; j < kNT; ++j) {
#pragma unroll
            for (int p = 0; p < 2; ++p) {
              const float a = coef_a[j * 8 + 2 * t + p], d = coef_d[j * 8 + 2 * t + p];
#pragma unroll
              for (int q = 0; q < 4; ++q) {
                st[(2 * t + p) * kEpiStride + g + 8 * q] =
                    fmaf(a, acc[q >> 1][j][(q & 1) * 2 + p], d);
              }
            }
            __syncwarp();
            if (pairs) {
              // lane l, i < 4: channel 8j + 2i + l / 16, pixels 2 (l % 16) and + 1
#pragma unroll
              for (int i = 0; i < 4; ++i) {
                const int ch = 2 * i + (lane >> 4), px = 2 * (lane & 15);
                if (px < cols && c_base + j * 8 + ch < s.c_out) {
                  const float2 v = *reinterpret_cast<const float2*>(st + ch * kEpiStride + px);
                  __stcs(reinterpret_cast<float2*>(o + (c_base + j * 8 + ch) * plane + px), v);
                }
              }
            } else {
#pragma unroll
              for (int ch = 0; ch < 8; ++ch) {
                if (lane < cols && c_base + j * 8 + ch < s.c_out) {
                  __stcs(o + (c_base + j * 8 + ch) * plane + lane, st[ch * kEpiStride + lane]);
                }
              }
            }
            __syncwarp();  // the next 8 channels reuse the staging rows
          }
        }
      } else if (row_ok) {
        if (s.channels_last) {
          // A pixel's channels are contiguous: channels 2t and 2t+1 go out as one
          // 8-byte (fp32) or 4-byte (fp16/bf16) store when C_out is even (aligned).
          T* o = out + ((tc.n * s.h_out + oh) * s.w_out + tc.ow0 + g) * s.c_out + c_base;
          const bool paired = (s.c_out & 1) == 0;
#pragma unroll
          for (int j = 0; j < kNT; ++j) {
            const int c = j * 8 + 2 * t;
            if (c_base + c >= s.c_out) continue;
            const float a0 = coef_a[c], d0 = coef_d[c], a1 = coef_a[c + 1], d1 = coef_d[c + 1];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              if (!col_ok[q]) continue;
              const float v0 = fmaf(a0, acc[q >> 1][j][(q & 1) * 2], d0);
              const float v1 = fmaf(a1, acc[q >> 1][j][(q & 1) * 2 + 1], d1);
              T* dst = o + static_cast<int64_t>(8 * q) * s.c_out + c;
              if (paired) {
                store_pair(dst, v0, v1);
              } else {
                dst[0] = from_float<T>(v0);
                if (c_base + c + 1 < s.c_out) dst[1] = from_float<T>(v1);
              }
            }
          }
        } else {
          const int64_t plane = static_cast<int64_t>(s.h_out) * s.w_out;
          T* o = out + tc.n * s.c_out * plane + static_cast<int64_t>(oh) * s.w_out + tc.ow0 + g;
#pragma unroll
          for (int j = 0; j < kNT; ++j) {
#pragma unroll
            for (int p = 0; p < 2; ++p) {
              const int c = j * 8 + 2 * t + p;
              if (c_base + c >= s.c_out) continue;
              const float a = coef_a[c], d = coef_d[c];
              T* oc = o + (c_base + c) * plane;
#pragma unroll
              for (int q = 0; q < 4; ++q) {
                if (col_ok[q]) {
                  const float v = fmaf(a, acc[q >> 1][j][(q & 1) * 2 + p], d);
                  if constexpr (sizeof(T) == 4) {
                    __stcs(reinterpret_cast<float*>(oc) + 8 * q, v);  // streamed: never re-read
                  } else {
                    oc[8 * q] = from_float<T>(v);
                  }
                }
              }
            }
          }
        }
      }
    } else if (kWeightGrad && !row_ok) {
      // Rows past the output contribute nothing to the weight gradient.
#pragma unroll
      for (int j = 0; j < kNT; ++j)
#pragma unroll
        for (int p = 0; p < 2; ++p)
#pragma unroll
          for (int q = 0; q < 4; ++q)
            g_hat[(j * 8 + 2 * t + p) * kGhatStride + warp * kTileW + g + 8 * q] = 0.f;
    } else if (row_ok) {
      // kGradOut / kGradOutW. Element offsets (in out, and in grad_out, which has
      // the same layout) of channel slot c and pixel column g + 8q of this row.
      const int64_t plane = static_cast<int64_t>(s.h_out) * s.w_out;
      const int64_t pix0 = (tc.n * s.h_out + oh) * s.w_out + tc.ow0 + g;
      const int64_t base0 =
          tc.n * s.c_out * plane + static_cast<int64_t>(oh) * s.w_out + tc.ow0 + g;
      auto offset = [&](int c, int q) -> int64_t {
        return s.channels_last ? (pix0 + 8 * q) * s.c_out + c_base + c
                               : base0 + (c_base + c) * plane + 8 * q;
      };
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        const int c0 = j * 8 + 2 * t;  // slots c0 and c0 + 1
        bool ok[2][4];
#pragma unroll
        for (int p = 0; p < 2; ++p)
#pragma unroll
          for (int q = 0; q < 4; ++q) ok[p][q] = col_ok[q] && c_base + c0 + p < s.c_out;
        // The eight grad_out values of this slot pair are loaded together, ahead
        // of the stores (which the compiler may not move loads past).
        float gv[2][4];
#pragma unroll
        for (int p = 0; p < 2; ++p)
#pragma unroll
          for (int q = 0; q < 4; ++q)
            gv[p][q] = ok[p][q] ? load_grad(grad + offset(c0 + p, q)) : 0.f;
        float v[2][4];
#pragma unroll
        for (int p = 0; p < 2; ++p) {
          const int c = c0 + p;
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const float y = acc[q >> 1][j][(q & 1) * 2 + p];
            v[p][q] = fmaf(coef_d[c], gv[p][q], fmaf(coef_c[c], y - coef_a[c], coef_e[c]));
            if constexpr (kWeightGrad) {
              g_hat[c * kGhatStride + warp * kTileW + g + 8 * q] = ok[p][q] ? v[p][q] : 0.f;
            }
          }
        }
        if (kWeightGrad && out == nullptr) continue;  // only the weight gradient is wanted
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          if (s.channels_last && (s.c_out & 1) == 0) {
            // A pixel's channels are contiguous: slots c0, c0 + 1 go out as one
            // 8-byte (fp32) or 4-byte (fp16/bf16) store (aligned: C_out even).
            if (!ok[0][q]) continue;
            const int64_t off = offset(c0, q);
            if constexpr (std::is_same_v<T, __half>) {
              *reinterpret_cast<__half2*>(out + off) = __halves2half2(
                  round_unbiased<T>(v[0][q], off), round_unbiased<T>(v[1][q], off + 1));
            } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
              *reinterpret_cast<__nv_bfloat162*>(out + off) = __halves2bfloat162(
                  round_unbiased<T>(v[0][q], off), round_unbiased<T>(v[1][q], off + 1));
            } else {
              store_pair(out + off, v[0][q], v[1][q]);
            }
            continue;
          }
#pragma unroll
          for (int p = 0; p < 2; ++p) {
            if (!ok[p][q]) continue;
            const int64_t off = offset(c0 + p, q);
            if constexpr (sizeof(T) == 4) {
              __stcs(reinterpret_cast<float*>(out + off), v[p][q]);  // streamed: never re-read
            } else {
              out[off] = round_unbiased<T>(v[p][q], off);
            }
          }
        }
      }
    }

    if constexpr (kWeightGrad) {
      __syncthreads();  // g_hat of the whole tile is staged
      // A = g_hat [channel][pixel] (float32, split big + small), B = the patch
      // value of pixel p at GEMM index k (3xTF32 for float32; fp16/bf16 inputs are
      // exact in TF32, so two MMAs keep g_hat float32-accurate). The tile's 128
      // products go to fresh accumulators, added to the running ones with IEEE
      // float adds: tensor-core accumulation truncates, and its bias would grow
      // with the thousands of pixels a block sums.
      int ko[kDwFrags];
#pragma unroll
      for (int i = 0; i < kDwFrags; ++i) {
        const int nf = dw_n0 + kWarpsPerM * i;
        ko[i] = nf < s.k_steps ? k_off[nf * 8 + g] : 0;
      }
      float tw[kDwFrags][4];
#pragma unroll
      for (int i = 0; i < kDwFrags; ++i) tw[i][0] = tw[i][1] = tw[i][2] = tw[i][3] = 0.f;
      const float* gh_row = g_hat + (dw_m * 16 + g) * kGhatStride + t;
#pragma unroll 1
      for (int row = 0; row < kTileH; ++row) {
        const int row_off = row * s.stride_h * s.in_tile_w + t * s.stride_w;
#pragma unroll
        for (int cq = 0; cq < kTileW / 8; ++cq) {
          // Pixels (row, cq*8 + t) and (row, cq*8 + t + 4) of the tile.
          const float* gh = gh_row + row * kTileW + cq * 8;
          const float av[4] = {gh[0], gh[8 * kGhatStride], gh[4], gh[8 * kGhatStride + 4]};
          uint32_t a_big[4], a_small[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) split_tf32(av[e], a_big[e], a_small[e]);
          const float* p0 = patch + row_off + cq * 8 * s.stride_w;
          const float* p1 = p0 + 4 * s.stride_w;
          // All B values first, then the MMAs term-major (small terms first): the
          // kDwFrags accumulators are independent, so consecutive MMAs don't wait
          // on each other.
          uint32_t b_big[kDwFrags][2], b_small[kDwFrags][2];
#pragma unroll
          for (int i = 0; i < kDwFrags; ++i) {
            const float b0 = p0[ko[i]], b1 = p1[ko[i]];
            if constexpr (kSplit == 3) {
              split_tf32(b0, b_big[i][0], b_small[i][0]);
              split_tf32(b1, b_big[i][1], b_small[i][1]);
            } else {
              b_big[i][0] = __float_as_uint(b0);
              b_big[i][1] = __float_as_uint(b1);
            }
          }
#pragma unroll
          for (int i = 0; i < kDwFrags; ++i) mma_tf32(tw[i], a_small, b_big[i][0], b_big[i][1]);
          if constexpr (kSplit == 3) {
#pragma unroll
            for (int i = 0; i < kDwFrags; ++i) mma_tf32(tw[i], a_big, b_small[i][0], b_small[i][1]);
          }
#pragma unroll
          for (int i = 0; i < kDwFrags; ++i) mma_tf32(tw[i], a_big, b_big[i][0], b_big[i][1]);
        }
      }
#pragma unroll
      for (int i = 0; i < kDwFrags; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) dw[i][e] += tw[i][e];
    }
    __syncthreads();  // the patch buffer of this tile is refilled by the next prefetch
  }
  cp_async_wait<0>();

  if constexpr (kWeightGrad) {
    // d0, d1 = dW[dw_m*16 + g][nf*8 + 2t, +1]; d2, d3 = the same for channel + 8.
    const int k8 = s.k_steps * 8;
    float* dst = partials + (static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * kBN * k8;
#pragma unroll
    for (int i = 0; i < kDwFrags; ++i) {
      const int nf = dw_n0 + kWarpsPerM * i;
      if (nf >= s.k_steps) break;
      const int c = dw_m * 16 + g, k = nf * 8 + 2 * t;
      *reinterpret_cast<float2*>(dst + c * k8 + k) = make_float2(dw[i][0], dw[i][1]);
      *reinterpret_cast<float2*>(dst + (c + 8) * k8 + k) = make_float2(dw[i][2], dw[i][3]);
    }
  }

  if constexpr (kStats) {
    // Merge the slots across the 8 lanes (g) that share t, then across warps.
#pragma unroll
    for (int offset = 4; offset < 32; offset <<= 1) {
      const float nb = __shfl_xor_sync(0xffffffffu, st_n, offset);
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
#pragma unroll
        for (int p = 0; p < 2; ++p) {
          float n = st_n;
          const float mb = __shfl_xor_sync(0xffffffffu, st_mean[j][p], offset);
          const float m2b = __shfl_xor_sync(0xffffffffu, st_m2[j][p], offset);
          chan_merge(n, st_mean[j][p], st_m2[j][p], nb, mb, m2b);
        }
      }
      st_n += nb;
    }
    float* stat_n = smem + lay.stat_n;
    float* stat_mean = smem + lay.stat_mean;
    float* stat_m2 = smem + lay.stat_m2;
    if (g == 0) {
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
#pragma unroll
        for (int p = 0; p < 2; ++p) {
          stat_mean[warp * kBN + j * 8 + 2 * t + p] = st_mean[j][p];
          stat_m2[warp * kBN + j * 8 + 2 * t + p] = st_m2[j][p];
        }
      }
      if (t == 0) stat_n[warp] = st_n;
    }
    __syncthreads();
    if (threadIdx.x < kBN) {
      float n = 0.f, mean = 0.f, m2 = 0.f;
#pragma unroll
      for (int wq = 0; wq < kWarps; ++wq) {
        chan_merge(n, mean, m2, stat_n[wq], stat_mean[wq * kBN + threadIdx.x],
                   stat_m2[wq * kBN + threadIdx.x]);
      }
      float* dst =
          partials +
          ((static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * kBN + threadIdx.x) * 3;
      dst[0] = n;
      dst[1] = mean;
      dst[2] = m2;
    }
  }

  if constexpr (kGradStats) {
    // Butterfly sums over the 8 lanes (g) that share t, then the warps in order.
#pragma unroll
    for (int offset = 4; offset < 32; offset <<= 1) {
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
#pragma unroll
        for (int p = 0; p < 2; ++p) {
          gs_g[j][p] += __shfl_xor_sync(0xffffffffu, gs_g[j][p], offset);
          gs_gy[j][p] += __shfl_xor_sync(0xffffffffu, gs_gy[j][p], offset);
          gs_y[j][p] += __shfl_xor_sync(0xffffffffu, gs_y[j][p], offset);
        }
      }
    }
    float* sum_g = smem + lay.stat_mean;
    float* sum_gy = smem + lay.stat_m2;
    float* sum_y = smem + lay.stat_x;
    if (g == 0) {
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
#pragma unroll
        for (int p = 0; p < 2; ++p) {
          const int i = warp * kBN + j * 8 + 2 * t + p;
          sum_g[i] = gs_g[j][p];
          sum_gy[i] = gs_gy[j][p];
          sum_y[i] = gs_y[j][p];
        }
      }
    }
    __syncthreads();
    if (threadIdx.x < kBN) {
      float a = 0.f, b = 0.f, c = 0.f;
#pragma unroll
      for (int wq = 0; wq < kWarps; ++wq) {
        a += sum_g[wq * kBN + threadIdx.x];
        b += sum_gy[wq * kBN + threadIdx.x];
        c += sum_y[wq * kBN + threadIdx.x];
      }
      float* dst =
          partials +
          ((static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * kBN + threadIdx.x) * 3;
      dst[0] = a;
      dst[1] = b;
      dst[2] = c;
    }
  }
}

}  // namespace fused_conv::cuda
