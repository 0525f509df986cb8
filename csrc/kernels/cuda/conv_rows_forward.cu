// The forward convolution as one warpgroup MMA chain per output row, both
// operands in shared memory (Hopper, sm_90a; float32, stride 1).
//
// GEMM per output row oh and 128-pixel column tile:
//   D(64 output channels x 128 pixels) = W(64 x K) * X(K x 128),
//   K = (tap t = r*kw + q, input channel ci), one k-step = 8 channels of a tap.
// wgmma reads float32 (TF32) operands from shared memory only K-major, in core
// matrices of 8 rows x 16 bytes (4 values of K) that are 128 contiguous bytes.
// The kernel stages the input as planes of 4 channels, [plane][row][column][4],
// so the core matrix (tap (r, q), channels 4p..4p+3, pixels j..j+7) is the 128
// bytes at (plane p, staged row oh - oh0 + r*dil_h, column j + q*dil_w): another
// tap is another start address of the same descriptor. No im2col is built, the
// MMAs gather nothing, and each input element is split into TF32 big/small
// halves once (the tile kernel splits each gathered element again per tap).
// The two k-halves of a k-step are planes 2p and 2p+1 (leading byte offset =
// one plane), consecutive 8-pixel groups 128 bytes apart (stride byte offset).
// W is staged the same way: [k-step][k-half][channel][4].
//
// 3xTF32: D += Wb*Xb + Wb*Xs + Ws*Xb (tf32_mma.cuh): 3 MMAs per k-step, 27 for
// the reference problem's 3x3 x 8 channels, all issued back to back.
//
// A block is one warpgroup, persistent over strips of `rows` output rows of one
// image and one column tile: stage the strip's input rows (with halo), then per
// output row issue the MMA chain, wait, and run the epilogue (normalise and
// store, or fold the row into per-channel Chan statistics). Two to three
// blocks share a multiprocessor, so one block's staging and epilogue run under
// another's MMAs.
#include "kernels/cuda/conv_rows_forward.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "kernels/cuda/tf32_mma.cuh"
#include "kernels/cuda/tile_launch.cuh"
#include "kernels/cuda/wgmma_tf32.cuh"

namespace fused_conv::cuda {
namespace {

constexpr int kThreads = 128;  // one warpgroup
constexpr int kWarpsPerBlock = kThreads / 32;
// Words between the rows of a warp's 8 x 32 epilogue tile: = 8 (mod 32), so the
// 8-byte writes of 8 channels x 4 lanes hit distinct banks per half-warp.
constexpr int kEpiStride = 40;
constexpr int kCo = kRowsChannels;
constexpr int kPix = 128;  // output pixels per MMA (wgmma N)
constexpr int kMaxKSteps = 32;
// At most this much shared memory per block: two blocks per multiprocessor
// (the reference problem takes 106 KB).
constexpr size_t kMaxSmem = 110 * 1024;
// Output rows per strip: the halo rows are staged (kh-1)*dil_h extra times per
// strip, and a taller strip costs shared memory, so fewer blocks per SM.
constexpr int kDefaultRows = 2;
constexpr int kMinWidth = 64;  // narrower rows waste most of the 128-pixel MMA

struct RowsShape {
  int64_t n, strips;
  int c_in, h, w, c_out, h_out, w_out;
  int kh, kw, pad_h, pad_w, dil_h, dil_w;
  int pairs;    // ceil(C_in / 8): k-steps per tap
  int k_steps;  // kh*kw*pairs
  int rows, strips_h, tiles_w;
  int staged_rows, staged_w;  // rows + (kh-1)*dil_h; 128 + (kw-1)*dil_w
  int x_words;                // one split term of the staged input
  int w_words;                // one split term of the staged weights
  bool vec4;                  // NHWC: 16-byte loads of 4 channels
};

// Weights (big, small), then two strip buffers of staged input (big, small):
// the next strip is staged while the current one's MMAs run; the k-step table;
// the NCHW epilogue's per-warp transpose tiles.
size_t smem_bytes(const RowsShape& r) {
  return (2 * static_cast<size_t>(r.w_words) + 4 * static_cast<size_t>(r.x_words)) *
             sizeof(float) +
         kMaxKSteps * sizeof(int) + kWarpsPerBlock * 8 * kEpiStride * sizeof(float);
}

RowsShape make_rows_shape(const ConvShape& s, int rows) {
  RowsShape r{};
  r.n = s.n;
  r.c_in = s.c_in;
  r.h = s.h;
  r.w = s.w;
  r.c_out = s.c_out;
  r.h_out = s.h_out;
  r.w_out = s.w_out;
  r.kh = s.kh;
  r.kw = s.kw;
  r.pad_h = s.pad_h;
  r.pad_w = s.pad_w;
  r.dil_h = s.dil_h;
  r.dil_w = s.dil_w;
  r.pairs = (s.c_in + 7) / 8;
  r.k_steps = s.kh * s.kw * r.pairs;
  r.rows = rows;
  r.strips_h = (s.h_out + rows - 1) / rows;
  r.tiles_w = (s.w_out + kPix - 1) / kPix;
  r.strips = s.n * r.strips_h * r.tiles_w;
  r.staged_rows = rows + (s.kh - 1) * s.dil_h;
  r.staged_w = kPix + (s.kw - 1) * s.dil_w;
  r.x_words = 2 * r.pairs * r.staged_rows * r.staged_w * 4;
  r.w_words = r.k_steps * 8 * kCo;
  return r;
}

int rows_per_strip() {
  const char* v = std::getenv("FUSED_CONV_ROWS_PER_STRIP");
  const int rows = v != nullptr ? std::atoi(v) : 0;
  return rows >= 1 && rows <= 16 ? rows : kDefaultRows;
}

#if FUSED_CONV_WGMMA
// Stages input rows ih0.. (staged_rows of them) and columns iw0.. (staged_w)
// of image n as [plane][row][column][4 channels], split into TF32 big and small
// halves; zeros outside the image and past C_in. NCHW: consecutive threads take
// consecutive columns (each of its 4 channel loads is coalesced); NHWC:
// consecutive planes of a pixel, then pixels (the image's memory order).
template <bool kChannelsLast>
__device__ __forceinline__ void stage_strip(const float* __restrict__ x, const RowsShape& s,
                                            int64_t n, int ih0, int iw0, float* x_big,
                                            float* x_small) {
  const int planes = 2 * s.pairs;
  const int items = planes * s.staged_rows * s.staged_w;
  const int64_t image = static_cast<int64_t>(s.c_in) * s.h * s.w;
  const float* img = x + n * image;
  const int plane_in = s.h * s.w;
  // kBatch items per thread in flight: all their loads are issued before the
  // first split (one item at a time would wait out a load latency per item).
  // The loop bounds are warp-uniform: the staging runs between a wgmma commit
  // and its wait, where a divergent branch makes ptxas serialize the MMAs.
  constexpr int kBatch = 8;
  for (int base = 0; base < items; base += kBatch * kThreads) {
    float v[kBatch][4];
    int dst[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int i = base + u * kThreads + static_cast<int>(threadIdx.x);
      int pl, sr, px;
      if constexpr (kChannelsLast) {
        pl = i % planes;
        const int rest = i / planes;
        px = rest % s.staged_w;
        sr = rest / s.staged_w;
      } else {
        px = i % s.staged_w;
        const int rest = i / s.staged_w;
        sr = rest % s.staged_rows;
        pl = rest / s.staged_rows;
      }
      const int ih = ih0 + sr, iw = iw0 + px, c0 = 4 * pl;
      const bool inside = i < items && static_cast<unsigned>(ih) < static_cast<unsigned>(s.h) &&
                          static_cast<unsigned>(iw) < static_cast<unsigned>(s.w);
      dst[u] = i < items ? ((pl * s.staged_rows + sr) * s.staged_w + px) * 4 : -1;
      if constexpr (kChannelsLast) {
        const float* src = img + (static_cast<int64_t>(ih) * s.w + iw) * s.c_in + c0;
        if (s.vec4 && inside && c0 < s.c_in) {
          const float4 q = __ldg(reinterpret_cast<const float4*>(src));
          v[u][0] = q.x;
          v[u][1] = q.y;
          v[u][2] = q.z;
          v[u][3] = q.w;
        } else {
#pragma unroll
          for (int e = 0; e < 4; ++e) v[u][e] = inside && c0 + e < s.c_in ? __ldg(src + e) : 0.f;
        }
      } else {
        const float* src = img + static_cast<int64_t>(c0) * plane_in + ih * s.w + iw;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          v[u][e] = inside && c0 + e < s.c_in ? __ldg(src + e * plane_in) : 0.f;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      uint4 big, small;
      split_tf32(v[u][0], big.x, small.x);
      split_tf32(v[u][1], big.y, small.y);
      split_tf32(v[u][2], big.z, small.z);
      split_tf32(v[u][3], big.w, small.w);
      if (dst[u] >= 0) {
        *reinterpret_cast<uint4*>(x_big + dst[u]) = big;
        *reinterpret_cast<uint4*>(x_small + dst[u]) = small;
      }
    }
  }
}
#endif

// kStats: per-block (count, mean, M2) of conv(x) per channel into
// partials[blockIdx.y][gridDim.x][64][3]; else out = a[c]*conv(x) + d[c].
template <bool kStats, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads, 2)
    conv_rows_kernel(const float* __restrict__ x, const float* __restrict__ w, RowsShape s,
                     BnFold f, float* __restrict__ out, float* __restrict__ partials) {
#if FUSED_CONV_WGMMA
  extern __shared__ __align__(128) float smem[];
  float* w_big = smem;
  float* w_small = w_big + s.w_words;
  float* x_buf = w_small + s.w_words;  // [2 strips][big, small][x_words]
  int* step_b = reinterpret_cast<int*>(x_buf + 4 * s.x_words);
  float* epi_buf = reinterpret_cast<float*>(step_b + kMaxKSteps);  // [warp][8][kEpiStride]

  // Warp index broadcast from lane 0: warp-uniform to the compiler, so that no
  // branch near the wgmmas looks divergent (ptxas would serialize them).
  const int warp = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x >> 5), 0);
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int c_base = blockIdx.y * kCo;
  const int taps = s.kh * s.kw;

  // Weights split into TF32 halves, word (ks, k-half kc, channel co, e): the
  // k-step's core matrices of 8 channels 128 bytes apart, k-halves 1 KB apart.
  for (int i = threadIdx.x; i < s.w_words; i += kThreads) {
    const int ks = i / (8 * kCo), kc = (i / (4 * kCo)) & 1, co = (i >> 2) & (kCo - 1), e = i & 3;
    const int tap = ks / s.pairs, ci = (ks - tap * s.pairs) * 8 + kc * 4 + e, c = c_base + co;
    const float v =
        ci < s.c_in && c < s.c_out ? w[(static_cast<int64_t>(c) * s.c_in + ci) * taps + tap] : 0.f;
    uint32_t big, small;
    split_tf32(v, big, small);
    w_big[i] = __uint_as_float(big);
    w_small[i] = __uint_as_float(small);
  }
  // Per k-step, the X start (in 16-byte descriptor units) relative to the
  // output row's: plane 2*pp, staged row r*dil_h, column q*dil_w.
  const int plane_bytes = s.staged_rows * s.staged_w * 16;
  if (threadIdx.x < s.k_steps) {
    const int ks = threadIdx.x, tap = ks / s.pairs, pp = ks - tap * s.pairs;
    const int r = tap / s.kw, q = tap - r * s.kw;
    step_b[ks] = (2 * pp * plane_bytes + (r * s.dil_h * s.staged_w + q * s.dil_w) * 16) >> 4;
  }

  // This thread's accumulator rows: channels c0 (d[j][0..1]) and c0 + 8
  // (d[j][2..3]); columns 8j + 2t and 8j + 2t + 1 of the pixel tile.
  const int c0 = c_base + 16 * warp + g;
  float fa[2] = {0.f, 0.f}, fd[2] = {0.f, 0.f};
  if constexpr (!kStats) {
    const float sc = f.scale * (f.scale_tensor ? *f.scale_tensor : 1.f);
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      const int c = c0 + 8 * p;
      if (c < s.c_out) {
        const float invstd =
            f.is_invstd ? f.var_or_invstd[c] : 1.f / sqrtf(f.var_or_invstd[c] + f.eps);
        const float gamma = f.gamma ? f.gamma[c] : 1.f;
        const float beta = f.beta ? f.beta[c] : 0.f;
        const float bias = f.bias ? f.bias[c] : 0.f;
        fa[p] = sc * gamma * invstd;
        fd[p] = sc * beta + fa[p] * (bias - f.mean[c]);
      }
    }
  }
  const uint64_t a_big = wgmma_desc_k_major(w_big, 4 * kCo * 4, 128);
  const uint64_t a_small = wgmma_desc_k_major(w_small, 4 * kCo * 4, 128);
  const uint64_t b_base = wgmma_desc_k_major(x_buf, plane_bytes, 128);
  const uint32_t b_term = s.x_words * 4 >> 4;  // big -> small, descriptor units
  constexpr int kAStep = 8 * kCo * 4 >> 4;  // one k-step of W, descriptor units
  const int row_step = s.staged_w;          // one staged row: staged_w*16 bytes

  // Strip coordinates: image n, first output row oh0, first output column ow0,
  // and its number of output rows (the image's last strip may be shorter).
  struct StripPos {
    int64_t n;
    int oh0, ow0, rows;
  };
  const auto strip_at = [&](int64_t strip) {
    StripPos p;
    const int64_t row_tile = strip / s.tiles_w;
    p.ow0 = static_cast<int>(strip - row_tile * s.tiles_w) * kPix;
    p.n = row_tile / s.strips_h;
    p.oh0 = static_cast<int>(row_tile - p.n * s.strips_h) * s.rows;
    p.rows = min(s.rows, s.h_out - p.oh0);
    return p;
  };
  const auto stage = [&](int64_t strip, int buf) {
    const StripPos p = strip_at(strip);
    float* big = x_buf + 2 * buf * s.x_words;
    stage_strip<kChannelsLast>(x, s, p.n, p.oh0 - s.pad_h, p.ow0 - s.pad_w, big,
                               big + s.x_words);
  };
  // One output row's MMA chain (3xTF32: 3 MMAs per k-step) into d, committed.
  const auto issue = [&](float(&d)[16][4], int buf, int r) {
    const uint64_t b_big = b_base + buf * 2 * b_term, b_small = b_big + b_term;
    wgmma_fence();
    for (int ks = 0; ks < s.k_steps; ++ks) {
      const uint32_t b_off = r * row_step + step_b[ks], a_off = ks * kAStep;
      wgmma_tf32_ss_n128(d, a_big + a_off, b_big + b_off, ks);
      wgmma_tf32_ss_n128(d, a_big + a_off, b_small + b_off, 1);
      wgmma_tf32_ss_n128(d, a_small + a_off, b_big + b_off, 1);
    }
    wgmma_commit();
  };

  float st_n = 0.f, st_mean[2] = {0.f, 0.f}, st_m2[2] = {0.f, 0.f};
  const bool pair_stores = !kChannelsLast && s.w_out % 2 == 0;
  float* epi = epi_buf + warp * 8 * kEpiStride;  // this warp's 8 x 32 output staging
  // Row r of strip p from the retired accumulators d: normalise and store, or
  // fold into the running statistics.
  const auto epilogue = [&](float(&d)[16][4], const StripPos& p, int r) {
    const int oh = p.oh0 + r;
    const int lim = s.w_out - p.ow0;  // valid pixels of the tile (may exceed 128)
    if constexpr (kStats) {
      // The row's mean and M2 per channel over its valid pixels (the 4 lanes t
      // of a quad share the channels), Chan-merged into the running ones.
      float cnt = 0.f;
#pragma unroll
      for (int j = 0; j < 16; ++j)
        cnt += (8 * j + 2 * t < lim ? 1.f : 0.f) + (8 * j + 2 * t + 1 < lim ? 1.f : 0.f);
      cnt += __shfl_xor_sync(0xffffffffu, cnt, 1);
      cnt += __shfl_xor_sync(0xffffffffu, cnt, 2);
      const float inv = 1.f / cnt, n_new = st_n + cnt;
      const float frac = cnt / n_new, cross = st_n * frac;
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
          sum += 8 * j + 2 * t < lim ? d[j][2 * q] : 0.f;
          sum += 8 * j + 2 * t + 1 < lim ? d[j][2 * q + 1] : 0.f;
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const float m = sum * inv;
        float m2 = 0.f;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
          const float d0 = d[j][2 * q] - m, d1 = d[j][2 * q + 1] - m;
          m2 += 8 * j + 2 * t < lim ? d0 * d0 : 0.f;
          m2 += 8 * j + 2 * t + 1 < lim ? d1 * d1 : 0.f;
        }
        m2 += __shfl_xor_sync(0xffffffffu, m2, 1);
        m2 += __shfl_xor_sync(0xffffffffu, m2, 2);
        const float delta = m - st_mean[q];
        st_mean[q] += delta * frac;
        st_m2[q] += m2 + delta * delta * cross;
      }
      st_n = n_new;
    } else if constexpr (kChannelsLast) {
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const int c = c0 + 8 * q;
        if (c >= s.c_out) continue;
        float* dst =
            out + ((p.n * s.h_out + oh) * static_cast<int64_t>(s.w_out) + p.ow0 + 2 * t) * s.c_out +
            c;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
          const int px = 8 * j + 2 * t;
          if (px < lim)
            __stcs(dst + static_cast<int64_t>(8 * j) * s.c_out, fmaf(fa[q], d[j][2 * q], fd[q]));
          if (px + 1 < lim)
            __stcs(dst + static_cast<int64_t>(8 * j + 1) * s.c_out,
                   fmaf(fa[q], d[j][2 * q + 1], fd[q]));
        }
      }
    } else {
      // NCHW through shared memory, 8 channels x 32 pixels at a time: a quad
      // holds 8 pixels of a channel per register pair, so direct stores would
      // write 8 channel rows x 32 bytes per instruction; after the transpose a
      // warp writes 2 channel rows x 128 contiguous bytes.
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const int row_c0 = c_base + 16 * warp + 8 * q;  // channel of staging row 0
#pragma unroll
        for (int k = 0; k < 4; ++k) {
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) {
            const int j = 4 * k + jj;
            *reinterpret_cast<float2*>(epi + g * kEpiStride + 8 * jj + 2 * t) =
                make_float2(fmaf(fa[q], d[j][2 * q], fd[q]), fmaf(fa[q], d[j][2 * q + 1], fd[q]));
          }
          __syncwarp();
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int row = 2 * i + (lane >> 4), px = 2 * (lane & 15), c = row_c0 + row;
            const float2 v = *reinterpret_cast<const float2*>(epi + row * kEpiStride + px);
            const int gp = 32 * k + px;  // pixel within the tile
            if (c < s.c_out) {
              float* dst = out + ((p.n * s.c_out + c) * s.h_out + oh) * static_cast<int64_t>(s.w_out) +
                           p.ow0 + gp;
              if (pair_stores && gp + 1 < lim) {
                store_pair(dst, v.x, v.y);
              } else {
                if (gp < lim) __stcs(dst, v.x);
                if (gp + 1 < lim) __stcs(dst + 1, v.y);
              }
            }
          }
          __syncwarp();
        }
      }
    }
  };

  // Software pipeline over this block's rows (strips blockIdx.x, + gridDim.x,
  // ...; strip j's staged input in buffer j % 2): the next row's MMAs are
  // issued before the current row's epilogue, into the other accumulator set,
  // so the epilogue runs under them. A strip is staged while the strip before
  // it computes, right after that one's first MMAs were issued.
  // Not initialised: a row's first MMA has scale-d = 0 (ks == 0), and zeroing
  // instructions near the pipeline would make ptxas serialize the MMAs.
  float acc0[16][4], acc1[16][4];
  const int64_t step = gridDim.x;
  int64_t strip = blockIdx.x;
  if (strip < s.strips) {
    stage(strip, 0);
    if (strip + step < s.strips) stage(strip + step, 1);
  }
  fence_proxy_async_shared();  // the generic-proxy stores, visible to wgmma
  __syncthreads();
  if (strip < s.strips) {
    StripPos cur = strip_at(strip);
    int r = 0, buf = 0;
    issue(acc0, 0, 0);
    // One row: issue the next row into `next`, retire `now`, run its epilogue.
    // Returns false after the block's last row.
    const auto advance = [&](float(&now)[16][4], float(&next)[16][4]) {
      const bool last_in_strip = r + 1 == cur.rows;
      const int64_t next_strip = last_in_strip ? strip + step : strip;
      const bool more = next_strip < s.strips;
      if (more) {
        if (last_in_strip) {
          fence_proxy_async_shared();  // the next strip's staging (every thread's)
          __syncthreads();
        }
        issue(next, last_in_strip ? buf ^ 1 : buf, last_in_strip ? 0 : r + 1);
        wgmma_wait<1>();
      } else {
        wgmma_wait<0>();
      }
      wgmma_fence_accumulators(now);
      epilogue(now, cur, r);
      if (!more) return false;
      if (last_in_strip) {
        // Every warp has retired this strip's MMAs: its buffer takes the strip
        // after the next one, staged under the next strip's first MMAs.
        __syncthreads();
        if (next_strip + step < s.strips) stage(next_strip + step, buf);
        strip = next_strip;
        cur = strip_at(strip);
        buf ^= 1;
        r = 0;
      } else {
        ++r;
      }
      return true;
    };
    while (advance(acc0, acc1) && advance(acc1, acc0)) {
    }
  }

  if constexpr (kStats) {
    if (t == 0) {
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        float* dst = partials + ((static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * kCo +
                                 16 * warp + g + 8 * p) *
                                    3;
        dst[0] = st_n;
        dst[1] = st_mean[p];
        dst[2] = st_m2[p];
      }
    }
  }
#else
  // Not compiled for sm_90a: conv_rows_supports() never selects this kernel.
  __trap();
#endif
}

template <bool kStats, bool kChannelsLast>
int launch_rows(const RowsShape& r, const float* x, const float* w, const BnFold& f, float* out,
                float* partials, bool dry_run) {
  auto kernel = conv_rows_kernel<kStats, kChannelsLast>;
  const void* entry = reinterpret_cast<const void*>(kernel);
  const size_t smem = smem_bytes(r);
  allow_dynamic_smem(entry, smem);
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const int64_t c_blocks = (r.c_out + kCo - 1) / kCo;
  // Persistent: one wave of resident blocks. The grid depends only on the
  // device and the shape, so the statistics' merge order is fixed.
  const int per_sm = std::max(resident_blocks_per_sm(entry, kThreads, smem), 1);
  const int grid_x = static_cast<int>(std::clamp<int64_t>(
      static_cast<int64_t>(per_sm) * multiprocessors(device) / c_blocks, 1, r.strips));
  if (!dry_run) {
    const dim3 grid(grid_x, static_cast<unsigned>(c_blocks));
    kernel<<<grid, kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(x, w, r, f, out, partials);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return grid_x;
}

template <bool kStats>
int run_rows(const RowsShape& r, bool channels_last, const at::Tensor& x, const at::Tensor& w,
             const BnFold& f, float* out, float* partials, bool dry_run) {
  const float* xp = x.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  return channels_last ? launch_rows<kStats, true>(r, xp, wp, f, out, partials, dry_run)
                       : launch_rows<kStats, false>(r, xp, wp, f, out, partials, dry_run);
}

RowsShape rows_shape_for(const ConvShape& s, const at::Tensor& x) {
  RowsShape r = make_rows_shape(s, rows_per_strip());
  r.vec4 = s.channels_last && s.c_in % 4 == 0 &&
           reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 == 0;
  return r;
}

}  // namespace

bool conv_rows_supports(const ConvShape& s, at::ScalarType dtype, int device) {
#ifndef FUSED_CONV_BUILT_SM90A
  (void)s, (void)dtype, (void)device;
  return false;  // no sm_90a code in this build (setup.py defines the macro)
#else
  const char* choice = std::getenv("FUSED_CONV_FORWARD_KERNEL");
  if (choice != nullptr && std::strcmp(choice, "tile") == 0) return false;
  if (dtype != at::kFloat || s.stride_h != 1 || s.stride_w != 1 || s.w_out < kMinWidth) {
    return false;
  }
  if (compute_capability_major(device) != 9) return false;
  const RowsShape r = make_rows_shape(s, rows_per_strip());
  const size_t bytes = smem_bytes(r);
  return r.k_steps <= kMaxKSteps && bytes <= kMaxSmem &&
         bytes <= static_cast<size_t>(max_shared_memory_per_block(device));
#endif
}

void conv_rows_apply(const ConvShape& s, const at::Tensor& x, const at::Tensor& w,
                     const BnFold& fold, const at::Tensor& out) {
  const RowsShape r = rows_shape_for(s, x);
  run_rows<false>(r, s.channels_last, x, w, fold, out.mutable_data_ptr<float>(), nullptr, false);
}

std::pair<at::Tensor, int> conv_rows_stats(const ConvShape& s, const at::Tensor& x,
                                           const at::Tensor& w) {
  const RowsShape r = rows_shape_for(s, x);
  const int grid_x = run_rows<true>(r, s.channels_last, x, w, BnFold{}, nullptr, nullptr, true);
  const int64_t c_blocks = (s.c_out + kCo - 1) / kCo;
  at::Tensor partials = at::empty({c_blocks, grid_x, kCo, 3}, x.options().dtype(at::kFloat));
  run_rows<true>(r, s.channels_last, x, w, BnFold{}, nullptr, partials.mutable_data_ptr<float>(),
                 false);
  return {partials, grid_x};
}

}  // namespace fused_conv::cuda
