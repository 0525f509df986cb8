// grad_input of a stride-1 convolution for float16 / bfloat16 channels_last
// tensors on Hopper (sm_90a): a stride-1 convolution of the output gradient g,
// padded by p = k - 1 - pad, with the flipped weights,
//   dX[n][ih][iw][ci] = sum_{r, q, c} g[n][ih - p_h + r][iw - p_w + q][c]
//                                     * W[c][ci][kh - 1 - r][kw - 1 - q],
// g zero outside its rows and columns.
//
// GEMM per group of kGroupRows = R input rows and 64-pixel column tile, with
// the pixels as the MMA's M (the 8 input channels of a block are too few for
// M = 64) and the R rows' 8 channels side by side as N = 8R:
//   dX^T(64 pixels x (R rows x 8 channels))
//     = sum over the group's R + kh - 1 g rows j, taps q, chunk pairs:
//       G_j(64 x 16) * B_j(16 x 8R),
// where B_j's column block rho (output row rho of the group) holds the
// flipped weights of tap row r = j - rho, or zeros where j - rho is not a tap
// row. A g row is thus read from shared memory once per group instead of once
// per output row, and each MMA is m64n32k16 instead of m64n8k16: half the
// MMAs of one output row at a time, whose issue rate bounded that version
// (0.16 ms on the reference problem's backward; cuDNN 0.34).
//
// B_j without a copy per j: W' is staged per k-step (q, chunk pair) as a run
// of 2R + kh - 2 blocks of 16 x 8 values, block m = W'(tap row R + kh - 2 - m)
// for R - 1 <= m <= R + kh - 2 and zeros elsewhere. N-groups of 8 lie one
// block apart (the descriptor's stride byte offset), so B_j is the 4 blocks
// from m = R + kh - 2 - j: column block rho reads tap row j - rho.
//
// Operand A as in the forward's 16-bit row kernel (conv_rows16.cu): g's rows
// are copied verbatim by 16-byte cp.async into a ring of rows laid out
// [chunk p][column][8 channels], so the core matrix of (tap q, chunk p) for
// pixels j..j+7 is the 128 contiguous bytes at (the ring row, chunk p, column
// j + q). A k16-step pairs chunks p and p + 1 (C_out % 16 == 0): leading byte
// offset = one chunk plane, the next 8 pixels 128 bytes further.
//
// A block is one warpgroup, persistent over work items (8-channel block, image,
// segment of kSegmentRows input rows, column tile). Within an item it walks the
// row groups in order. The ring holds 2R + kh - 1 g rows: a group's window of
// R + kh - 1 and the next group's R new rows, whose copies fly while the group
// computes. Nothing output-sized but dX itself is written; no atomics.
#include "kernels/cuda/grad_input_rows16.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels/cuda/conv_rows.h"
#include "kernels/cuda/tf32_mma.cuh"
#include "kernels/cuda/tile_launch.cuh"
#include "kernels/cuda/wgmma_16bit.cuh"

namespace fused_conv::cuda {
namespace {

constexpr int kThreads = 128;                   // one warpgroup
constexpr int kPix = 64;                        // pixels per column tile (M = 64)
constexpr int kGroupRows = 4;                   // R: input rows per MMA group (N = 8R = 32)
constexpr int kSegmentRows = 32;                // input rows per work item
constexpr int kChunkBytes = 16;                 // 8 channels of one pixel
constexpr int kBlockBytes = 2 * 8 * 16;         // one W' block: two k-halves of 8 x 16 bytes
[[maybe_unused]] constexpr int kMinWidth = 64;  // narrower rows waste most of the MMA
[[maybe_unused]] constexpr size_t kMaxSmem = 113 * 1024;  // two blocks per multiprocessor

struct Dgrad16Shape {
  int64_t n, items;
  int c_in, c_out;       // the forward convolution's: dX has c_in channels, g c_out
  int h, w;              // dX (the forward's input)
  int g_h, g_w;          // g (the forward's output)
  int kh, kw, p_h, p_w;  // p = k - 1 - pad: g's padding in this convolution
  int planes;            // c_out / 8 chunks per g pixel
  int k_steps;           // kw * planes / 2: (tap column, chunk pair)
  int blocks;            // 2R + kh - 2 W' blocks per k-step
  int segments, tiles_w, c_blocks;
  int staged_w;  // 64 + kw - 1 columns per ring row
  int plane_bytes, row_bytes, ring_rows;
  WeightStrides ws;  // of the weight as given
};

size_t smem_bytes(const Dgrad16Shape& s) {
  return static_cast<size_t>(s.k_steps) * s.blocks * kBlockBytes +
         static_cast<size_t>(s.ring_rows) * s.row_bytes;
}

Dgrad16Shape make_dgrad16_shape(const at::Tensor& g, const at::Tensor& input,
                                const at::Tensor& weight, at::IntArrayRef padding) {
  Dgrad16Shape s{};
  s.n = input.size(0);
  s.c_in = static_cast<int>(input.size(1));
  s.h = static_cast<int>(input.size(2));
  s.w = static_cast<int>(input.size(3));
  s.c_out = static_cast<int>(weight.size(0));
  s.kh = static_cast<int>(weight.size(2));
  s.kw = static_cast<int>(weight.size(3));
  s.g_h = static_cast<int>(g.size(2));
  s.g_w = static_cast<int>(g.size(3));
  s.p_h = s.kh - 1 - static_cast<int>(padding[0]);
  s.p_w = s.kw - 1 - static_cast<int>(padding[1]);
  s.planes = s.c_out / 8;
  s.k_steps = s.kw * s.planes / 2;
  s.blocks = 2 * kGroupRows + s.kh - 2;
  s.segments = (s.h + kSegmentRows - 1) / kSegmentRows;
  s.tiles_w = (s.w + kPix - 1) / kPix;
  s.c_blocks = (s.c_in + 7) / 8;
  s.items = static_cast<int64_t>(s.c_blocks) * s.n * s.segments * s.tiles_w;
  s.staged_w = kPix + s.kw - 1;
  s.plane_bytes = s.staged_w * kChunkBytes;
  s.row_bytes = s.planes * s.plane_bytes;
  s.ring_rows = 2 * kGroupRows + s.kh - 1;
  s.ws = weight_strides(weight);
  return s;
}

#if FUSED_CONV_WGMMA
// Issues the 16-byte copies of g row `gr` of image n, columns gw0.., into the
// ring row at `dst` ([chunk][column][8 channels], zeros outside g). Item order:
// chunk, column (consecutive threads read consecutive 16-byte pieces of the
// NHWC row), advanced by carries. planes and staged_w are compile-time
// constants in the unrolled kernels.
template <typename T>
__device__ __forceinline__ void copy_g_row(const T* __restrict__ g, const Dgrad16Shape& s,
                                           int planes, int staged_w, int64_t n, int gr, int gw0,
                                           uint32_t dst) {
  const bool row_inside = static_cast<unsigned>(gr) < static_cast<unsigned>(s.g_h);
  const T* row = g + (n * s.g_h + (row_inside ? gr : 0)) * static_cast<int64_t>(s.g_w) * s.c_out;
  if (kThreads % planes == 0) {
    // Each thread keeps one chunk and steps by whole columns: one offset
    // increment per copy (the general loop below spends ~25 instructions).
    const int pl = threadIdx.x % planes, step = kThreads / planes;
    int col = threadIdx.x / planes;
    int64_t off = (row - g) + static_cast<int64_t>(gw0 + col) * s.c_out + 8 * pl;
    uint32_t d = dst + (pl * staged_w + col) * kChunkBytes;
    for (; col < staged_w; col += step) {
      const bool inside =
          row_inside && static_cast<unsigned>(gw0 + col) < static_cast<unsigned>(s.g_w);
      cp_async_16(d, inside ? g + off : g, inside);
      off += static_cast<int64_t>(step) * s.c_out;
      d += step * kChunkBytes;
    }
    return;
  }
  int pl = threadIdx.x % planes, col = threadIdx.x / planes;
  for (int i = threadIdx.x; i < planes * staged_w; i += kThreads) {
    const int gc = gw0 + col;
    const bool inside = row_inside && static_cast<unsigned>(gc) < static_cast<unsigned>(s.g_w);
    const T* src = inside ? row + static_cast<int64_t>(gc) * s.c_out + 8 * pl : g;
    cp_async_16(dst + (pl * staged_w + col) * kChunkBytes, src, inside);
    pl += kThreads % planes;
    col += kThreads / planes;
    if (pl >= planes) pl -= planes, ++col;
  }
}

#endif

// KH, KW, PAIRS > 0 fix the kernel size and C_out / 16 at compile time, so
// that the MMA loop unrolls into straight-line wgmmas with constant descriptor
// offsets; 0 takes them from the shape. A runtime loop around the wgmmas makes
// ptxas insert a warpgroup.arrive every few MMAs (C7519), which serialises
// them on their latency (measured: 0.32 ms against 0.16 unrolled).
template <typename T, int KH, int KW, int PAIRS>
__global__ void __launch_bounds__(kThreads)
    grad_input_rows16_kernel(const T* __restrict__ g, const T* __restrict__ w, Dgrad16Shape s,
                             T* __restrict__ dx) {
#if FUSED_CONV_WGMMA
  constexpr int R = kGroupRows;
  extern __shared__ __align__(128) unsigned char smem[];
  const int kh = KH > 0 ? KH : s.kh, kw = KW > 0 ? KW : s.kw;
  const int pairs = PAIRS > 0 ? PAIRS : s.planes / 2, planes = 2 * pairs;
  const int window = R + kh - 1, ring_rows = 2 * R + kh - 1;
  const int blocks = 2 * R + kh - 2, k_steps = kw * pairs;
  const int staged_w = KW > 0 ? kPix + KW - 1 : s.staged_w;
  const int plane_bytes = staged_w * kChunkBytes, row_bytes = planes * plane_bytes;
  unsigned char* w_s = smem;
  unsigned char* ring = w_s + k_steps * blocks * kBlockBytes;
  const uint32_t ring_addr = static_cast<uint32_t>(__cvta_generic_to_shared(ring));
  // Warp index broadcast from lane 0: warp-uniform to the compiler, so that no
  // branch near the wgmmas looks divergent (ptxas would serialize them).
  const int warp = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x >> 5), 0);
  const int lane = threadIdx.x & 31, g8 = lane >> 2, t = lane & 3;
  // B: k-halves 128 bytes apart (leading), N-groups of 8 one block apart (stride).
  const uint64_t b_desc0 = wgmma_desc_k_major(w_s, 128, kBlockBytes);
  int staged_cb = -1;
  // acc[rho][e]: output row rho of the group, pixels 16w + g8 (+8 for e >= 2),
  // input channels 2t, 2t + 1 of the block. Not initialised: the first MMA
  // has scale-d = 0, and zeroing instructions near the MMAs would make ptxas
  // serialize them (C7515).
  float acc[R][4];

  for (int64_t item = blockIdx.x; item < s.items; item += gridDim.x) {
    int64_t rest = item;
    const int tile = static_cast<int>(rest % s.tiles_w);
    rest /= s.tiles_w;
    const int seg = static_cast<int>(rest % s.segments);
    rest /= s.segments;
    const int64_t n = rest % s.n;
    const int cb = static_cast<int>(rest / s.n);
    const int ih0 = seg * kSegmentRows, rows = min(kSegmentRows, s.h - ih0);
    const int groups = (rows + R - 1) / R;
    const int iw0 = tile * kPix;
    const int first = ih0 - s.p_h;  // g row of relative row 0: the first group's first
    const int gw0 = iw0 - s.p_w;    // g column of ring column 0
    // Relative g row j lives in ring slot j % ring_rows; every row a group's
    // MMAs read is copied (zeros outside g), also past the segment's last
    // row: a zero weight block times a stale NaN would still be NaN.
    const auto copy_row = [&](int j) {
      copy_g_row(g, s, planes, staged_w, n, first + j, gw0,
                 ring_addr + (j % ring_rows) * row_bytes);
    };

    if (cb != staged_cb) {
      // W' element (k-step ks = (q, pair pp), block m, k-half kc, input
      // channel ci, e): chunk 8p + e with p = 2pp + kc, of tap row
      // r = R + kh - 2 - m (zeros outside 0..kh-1) at the flipped tap;
      // zeros past C_in.
      T* w_t = reinterpret_cast<T*>(w_s);
      for (int i = threadIdx.x; i < k_steps * blocks * 128; i += kThreads) {
        const int e = i & 7, ci = 8 * cb + ((i >> 3) & 7), kc = (i >> 6) & 1, blk = i >> 7;
        const int ks = blk / blocks, m = blk - ks * blocks;
        const int q = ks / pairs, p = 2 * (ks - q * pairs) + kc, r = R + kh - 2 - m;
        const bool live = ci < s.c_in && r >= 0 && r < kh;
        w_t[i] = live ? w[(8 * p + e) * s.ws.co +
                          (ci * s.ws.ci + (kh - 1 - r) * s.ws.r + (kw - 1 - q) * s.ws.q)]
                      : from_float<T>(0.f);
      }
      staged_cb = cb;  // made visible to wgmma by the first group's fence and barrier
    }
    for (int j = 0; j < window; ++j) copy_row(j);  // the first group's window
    cp_async_commit();

    for (int k = 0; k < groups; ++k) {
      // This group's window has landed for this thread; the fence hands it
      // (and the staged W') to the async proxy; the barrier makes everyone's
      // visible, and every warp has retired group k - 1's MMAs, so that
      // group's first R slots may be refilled with group k + 1's new rows.
      cp_async_wait<0>();
      fence_proxy_async_shared();
      __syncthreads();
      if (k + 1 < groups) {
        for (int jj = 0; jj < R; ++jj) copy_row(R * (k + 1) + kh - 1 + jj);
      }
      cp_async_commit();

      wgmma_fence();
#pragma unroll
      for (int j = 0; j < window; ++j) {
        // The descriptor of g row j's first core matrix; the others are
        // constant offsets from it (16-byte units; no carry out of the 14-bit
        // address field: every address lies inside shared memory).
        const int slot = (R * k + j) % ring_rows;
        const uint64_t row_desc = desc_at(ring_addr + slot * row_bytes, plane_bytes, 128);
#pragma unroll
        for (int q = 0; q < kw; ++q) {
#pragma unroll
          for (int pp = 0; pp < pairs; ++pp) {
            const int ks = q * pairs + pp;
            const uint32_t a_off = (2 * pp * plane_bytes + q * kChunkBytes) >> 4;
            const uint32_t b_off = (ks * blocks + (R + kh - 2 - j)) * (kBlockBytes >> 4);
            wgmma_16bit_ss_n32<T>(acc, row_desc + a_off, b_desc0 + b_off, j + q + pp);
          }
        }
      }
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_fence_accumulators(acc);

      // A 4-byte store per (row, pixel): a quad covers a pixel's 8 channels
      // (16 bytes), a warp 8 consecutive pixels.
      const int ci = 8 * cb + 2 * t;
      if (ci < s.c_in) {
#pragma unroll
        for (int rho = 0; rho < R; ++rho) {
          const int i = R * k + rho;
          if (i >= rows) break;
          T* out_row = dx + ((n * s.h + ih0 + i) * static_cast<int64_t>(s.w) + iw0) * s.c_in + ci;
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int px = 16 * warp + g8 + 8 * e;
            if (iw0 + px < s.w) {
              *reinterpret_cast<uint32_t*>(out_row + static_cast<int64_t>(px) * s.c_in) =
                  pack_pair<T>(acc[rho][2 * e], acc[rho][2 * e + 1]);
            }
          }
        }
      }
    }
    // No copy outlives the item, and every warp is past its last MMAs before
    // the next item's copies and weights overwrite what they read.
    cp_async_wait<0>();
    __syncthreads();
  }
#else
  // Not compiled for sm_90a: grad_input_rows16_supports() never selects this kernel.
  __trap();
#endif
}

template <typename T, int KH, int KW, int PAIRS>
void launch_unrolled(const Dgrad16Shape& s, const at::Tensor& g, const at::Tensor& w,
                     at::Tensor& dx) {
  auto kernel = grad_input_rows16_kernel<T, KH, KW, PAIRS>;
  const size_t smem = smem_bytes(s);
  allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
  const int per_sm =
      std::max(resident_blocks_per_sm(reinterpret_cast<const void*>(kernel), kThreads, smem), 1);
  const int64_t grid = std::clamp<int64_t>(
      static_cast<int64_t>(per_sm) * multiprocessors(g.get_device()), 1, s.items);
  const T* gp = reinterpret_cast<const T*>(g.const_data_ptr());
  const T* wp = reinterpret_cast<const T*>(w.const_data_ptr());
  kernel<<<static_cast<unsigned>(grid), kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      gp, wp, s, reinterpret_cast<T*>(dx.mutable_data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// 3x3 kernels with C_out = 64 (the reference problem) or 32 run fully
// unrolled; C_out = 128 and more does not fit the shared memory budget.
// Everything else takes the kernel with runtime loops.
template <typename T>
void launch(const Dgrad16Shape& s, const at::Tensor& g, const at::Tensor& w, at::Tensor& dx) {
  if (s.kh == 3 && s.kw == 3 && s.planes == 8) {
    launch_unrolled<T, 3, 3, 4>(s, g, w, dx);
  } else if (s.kh == 3 && s.kw == 3 && s.planes == 4) {
    launch_unrolled<T, 3, 3, 2>(s, g, w, dx);
  } else {
    launch_unrolled<T, 0, 0, 0>(s, g, w, dx);
  }
}

}  // namespace

bool grad_input_rows16_supports(const at::Tensor& grad_conv_out, const at::Tensor& input,
                                const at::Tensor& weight, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
#ifndef FUSED_CONV_BUILT_SM90A
  (void)grad_conv_out, (void)input, (void)weight, (void)stride, (void)padding, (void)dilation,
      (void)groups;
  return false;  // no sm_90a code in this build (setup.py defines the macro)
#else
  if (std::strcmp(forward_kernel_choice(), "tile") == 0) return false;
  const at::ScalarType dtype = input.scalar_type();
  if ((dtype != at::kHalf && dtype != at::kBFloat16) || grad_conv_out.scalar_type() != dtype ||
      weight.scalar_type() != dtype || !input.is_cuda() || input.dim() != 4 || weight.dim() != 4 ||
      grad_conv_out.dim() != 4 || groups != 1 || stride.size() != 2 || padding.size() != 2 ||
      dilation.size() != 2 || stride[0] != 1 || stride[1] != 1 || dilation[0] != 1 ||
      dilation[1] != 1) {
    return false;
  }
  const int64_t kh = weight.size(2), kw = weight.size(3);
  const int64_t g_h = input.size(2) + 2 * padding[0] - kh + 1;
  const int64_t g_w = input.size(3) + 2 * padding[1] - kw + 1;
  if (padding[0] < 0 || padding[1] < 0 || padding[0] > kh - 1 || padding[1] > kw - 1 ||
      input.size(1) % 8 != 0 || weight.size(1) != input.size(1) || weight.size(0) % 16 != 0 ||
      input.size(3) < kMinWidth || input.numel() == 0 ||
      weight.numel() >= (int64_t{1} << 31) ||  // 32-bit weight offsets (WeightStrides)
      grad_conv_out.sizes() != at::IntArrayRef{input.size(0), weight.size(0), g_h, g_w} ||
      !input.is_contiguous(at::MemoryFormat::ChannelsLast) ||
      !grad_conv_out.is_contiguous(at::MemoryFormat::ChannelsLast) ||
      reinterpret_cast<uintptr_t>(grad_conv_out.const_data_ptr()) % 16 != 0) {
    return false;
  }
  const int device = input.get_device();
  if (compute_capability_major(device) != 9) return false;
  const size_t bytes = smem_bytes(make_dgrad16_shape(grad_conv_out, input, weight, padding));
  return bytes <= kMaxSmem && bytes <= static_cast<size_t>(max_shared_memory_per_block(device));
#endif
}

at::Tensor grad_input_rows16(const at::Tensor& grad_conv_out, const at::Tensor& input,
                             const at::Tensor& weight, at::IntArrayRef padding) {
  c10::cuda::CUDAGuard guard(input.device());
  const int64_t unit[2] = {1, 1};
  TORCH_CHECK(grad_input_rows16_supports(grad_conv_out, input, weight, unit, padding, unit, 1),
              "fused_conv: grad_input outside the 16-bit row kernel's reach");
  const at::Tensor w = strided_weight(weight);
  const Dgrad16Shape s = make_dgrad16_shape(grad_conv_out, input, w, padding);
  at::Tensor dx =
      at::empty(input.sizes(), input.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (input.scalar_type() == at::kBFloat16) {
    launch<__nv_bfloat16>(s, grad_conv_out, w, dx);
  } else {
    launch<__half>(s, grad_conv_out, w, dx);
  }
  return dx;
}

}  // namespace fused_conv::cuda
