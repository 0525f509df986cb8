// grad_input of a stride-1 3x3 convolution, reusing each gradient value for all
// nine taps (the reference problem's data gradient: C_out = 64 -> C_in = 8).
//
// With stride 1 and dilation 1,
//   dX[ci][ih][iw] = sum_{kr,kq} Z[(kr,kq,ci)][ih + pad_h - kr][iw + pad_w - kq],
//   Z[(kr,kq,ci)][oh][ow] = sum_c W[c][ci][kr][kq] * g[c][oh][ow],
// so Z is a GEMM per pixel of g (M = pixels, N = 9 taps x 8 input channels = 72,
// K = C_out) and dX sums nine shifted columns of it. The plain-convolution form
// (TileMode::kConv) gathers every g value nine times and feeds each gather to
// only N = 8 output channels; here each value is loaded and 3xTF32-split once
// and feeds 72 columns, and the tap sums are cheap shared-memory reads.
//
// Tiling: a block of 8 warps owns an output tile of 8 rows x 32 columns of one
// image. It needs g on the tile's halo, 10 x 34 pixels = 340 rows of the GEMM:
// on sm_90a two warpgroups with three wgmma.m64n72k8 blocks each (384 rows),
// elsewhere 22 mma.sync m16 fragments (warp w takes w, w + 8, w + 16). g is
// staged in 16-channel slices (two k8 steps) through a 3-deep cp.async ring; a
// staging thread owns one (row, vector) position for all 16 channels. A halo row is
// copied in aligned vectors of kVec = 4, 2 or 1 floats from the aligned column
// at or before the halo's first: the widest kVec that divides the width of g
// (and its address), so that every vector is wholly inside the image or wholly
// padding (the reference problem's 126 columns take 8-byte copies).
// After the last slice the accumulators (Z on the halo) go to shared memory
// and warp w sums the taps for output row w, one column per lane, for each
// input channel: coalesced 128-byte stores. The weights, pre-split into TF32
// big/small parts (wgmma's K-major layout or mma fragment order), stay in
// shared memory for the whole persistent launch. Shared memory: ring 81 KB +
// Z 100 KB + weights 36 KB, so one block per multiprocessor.
#include "kernels/cuda/grad_input_taps.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "kernels/cuda/tf32_mma.cuh"
#include "kernels/cuda/tile_launch.cuh"
#include "kernels/cuda/wgmma_tf32.cuh"

namespace fused_conv::cuda {
namespace {

constexpr int kTapWarps = 8;
constexpr int kTapThreads = kTapWarps * 32;
constexpr int kOutRows = kTapWarps;  // output rows per tile: one per warp in the tap sums
constexpr int kOutCols = 32;         // output columns per tile: one per lane
constexpr int kHaloRows = kOutRows + 2;
constexpr int kHaloCols = kOutCols + 2;
constexpr int kHaloPixels = kHaloRows * kHaloCols;                // 340 GEMM rows
constexpr int kMFrags = (kHaloPixels + 15) / 16;                  // 22 m16 fragments
constexpr int kMPerWarp = (kMFrags + kTapWarps - 1) / kTapWarps;  // 3
constexpr int kStagedCols = 40;  // room for the 34 halo columns after an alignment offset <= 3
// Vectors per staged row: enough for col_off + 34 columns at the largest col_off.
template <int kVec>
constexpr int kVecsPerRow = kVec == 4   ? 10
                            : kVec == 2 ? 18
                                        : 34;
constexpr int kSlice = 16;  // channels of g per ring stage: two k8 steps
constexpr int kStages = 3;
// Channel planes of a stage 424 words apart (= 8 mod 32): the A fragment's
// lanes (8 pixels x 4 channels) hit 32 different banks.
constexpr int kPlaneStride = 424;
constexpr int kStageFloats = kSlice * kPlaneStride;
constexpr int kCx = 8;           // input channels the N columns cover
constexpr int kTaps = 9;         // 3x3: one n8 fragment per tap
constexpr int kN = kTaps * kCx;  // 72
// Z is [n][pixel], rows 356 words apart (= 4 mod 32): the accumulator stores
// (8 pixels x 4 even columns per instruction) are conflict-free.
constexpr int kZStride = 356;
constexpr int kMaxSlices = 4;  // C_out <= 64: the weights fit next to ring and Z
constexpr int kMaxKSteps = kMaxSlices * kSlice / 8;

constexpr size_t kSmemBytes = sizeof(float) * (kStages * kStageFloats + kN * kZStride) +
                              sizeof(uint4) * kMaxKSteps * kTaps * 32;
static_assert(kMFrags * 16 <= kZStride, "Z rows hold every GEMM row");
static_assert(2 * kMPerWarp * 64 >= kHaloPixels, "two warpgroups' m64 blocks cover the halo");
static_assert(kSmemBytes <= 227 * 1024, "one block per multiprocessor");
static_assert(4 * kVecsPerRow<4> >= 3 + kHaloCols && 2 * kVecsPerRow<2> >= 1 + kHaloCols &&
                  kVecsPerRow<1> >= kHaloCols,
              "a staged row covers the halo after the alignment offset");
static_assert(4 * kVecsPerRow<4> <= kStagedCols && 2 * kVecsPerRow<2> <= kStagedCols,
              "staged rows fit their shared-memory rows");

struct TapShape {
  int64_t n, tiles;
  int c_g, h_g, w_g;  // g: the conv output's channels and size
  int c_x, h, w;      // grad_input: the conv input's channels and size
  int pad_h, pad_w;
  int col_off;  // halo column 0 within the staged row (kVec-aligned start)
  int tiles_h, tiles_w, slices;
};

struct TapTile {
  int64_t n;
  int ih0, iw0;
};

__device__ __forceinline__ TapTile tap_tile(const TapShape& s, int64_t tile) {
  TapTile t;
  const int64_t rows = tile / s.tiles_w;
  t.iw0 = static_cast<int>(tile - rows * s.tiles_w) * kOutCols;
  t.n = rows / s.tiles_h;
  t.ih0 = static_cast<int>(rows - t.n * s.tiles_h) * kOutRows;
  return t;
}

// Stages channels [slice*16, slice*16 + 16) of g on the tile's halo: rows
// ih0 + pad_h - 2 + (0..9), columns from the aligned iw0 + pad_w - 2 - col_off.
// A thread owns one (row, vector) position and copies it for all 16 channels:
// the bounds and the address are worked out once per position, and each copy
// costs a pointer step. With fewer positions than threads (kVec = 4: 100,
// kVec = 2: 180) the last threads copy (in the mma.sync loop warps 6 and 7
// hold the fewest m16 fragments; with wgmma all warps do equal MMA work).
template <int kVec>
__device__ __forceinline__ void stage_slice(const float* __restrict__ g, const TapShape& s,
                                            const TapTile& t, int slice, float* dst) {
  constexpr int kRowVecs = kVecsPerRow<kVec>;
  constexpr int kPositions = kHaloRows * kRowVecs;
  constexpr int kFirst = kPositions >= kTapThreads ? 0 : kTapThreads - kPositions;
  const int oh0 = t.ih0 + s.pad_h - 2;
  const int ow0 = t.iw0 + s.pad_w - 2 - s.col_off;
  const int plane = s.h_g * s.w_g;
  const int channels = min(kSlice, s.c_g - slice * kSlice);  // the last slice's tail
  const float* img = g + (t.n * s.c_g + slice * kSlice) * plane;
  for (int p = static_cast<int>(threadIdx.x) - kFirst; p >= 0 && p < kPositions; p += kTapThreads) {
    const int row = p / kRowVecs, vec = p - (p / kRowVecs) * kRowVecs;
    const int oh = oh0 + row, ow = ow0 + kVec * vec;
    const bool inside = static_cast<unsigned>(oh) < static_cast<unsigned>(s.h_g) &&
                        static_cast<unsigned>(ow) < static_cast<unsigned>(s.w_g);
    const float* src = inside ? img + oh * s.w_g + ow : g;
    float* d = dst + row * kStagedCols + kVec * vec;
#pragma unroll
    for (int c = 0; c < kSlice; ++c) {
      const bool valid = inside && c < channels;
      cp_async_vec<kVec>(d + c * kPlaneStride, valid ? src + c * plane : g, valid);
    }
  }
  cp_async_commit();
}

// The GEMM rows (halo pixels) of this thread's accumulator fragment j: rows
// frag_row + fg and + fg + 8, as in an m16n8 fragment.
#if FUSED_CONV_WGMMA
// wgmma: warpgroup wg (warps 4wg..4wg+3) owns the m64 blocks wg, wg + 2 and
// wg + 4 (6 blocks, 384 rows of which 340 are the halo); warp w holds rows
// 16*(w % 4)..+15 of each block.
__device__ __forceinline__ int frag_row(int warp, int j) {
  return (warp / 4 + 2 * j) * 64 + (warp % 4) * 16;
}
__device__ __forceinline__ bool frag_live(int, int) { return true; }
#else
// mma.sync: 22 m16 fragments, warp w owns w, w + 8 and w + 16 (warps 6 and 7
// only two).
__device__ __forceinline__ int frag_row(int warp, int j) { return (warp + kTapWarps * j) * 16; }
__device__ __forceinline__ bool frag_live(int warp, int j) {
  return warp + kTapWarps * j < kMFrags;
}
#endif

template <int kVec>
__global__ void __launch_bounds__(kTapThreads, 1)
    grad_input_taps_kernel(const float* __restrict__ g, const float* __restrict__ w,
                           float* __restrict__ out, TapShape s) {
  extern __shared__ uint4 smem_u4[];
  float* ring = reinterpret_cast<float*>(smem_u4);
  float* z = ring + kStages * kStageFloats;
  uint4* b_frags = reinterpret_cast<uint4*>(z + kN * kZStride);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int fg = lane / 4, ft = lane % 4;  // mma fragment row group / thread in group
  const int k_steps = s.slices * (kSlice / 8);
  // B[k = c][n = (kr*3 + kq)*8 + ci] = W[c][ci][kr][kq] (0 past C_out / C_in),
  // split into TF32 big and small parts.
  auto weight_at = [&](int c, int n) -> float {
    const int tap = n / kCx, ci = n % kCx;
    return c < s.c_g && ci < s.c_x ? w[(c * s.c_x + ci) * kTaps + tap] : 0.f;
  };
#if FUSED_CONV_WGMMA
  // K-major without swizzle (wgmma_tf32.cuh): word i of a term's array is
  // k-step i / (8*kN), k-half, column n, k % 4; the big array, then the small.
  float* b_words_sm = reinterpret_cast<float*>(b_frags);
  const int b_words = k_steps * kN * 8;
  for (int i = threadIdx.x; i < b_words; i += kTapThreads) {
    const int ks = i / (kN * 8), kc = (i / (kN * 4)) & 1;
    uint32_t big, small;
    split_tf32(weight_at(ks * 8 + kc * 4 + (i & 3), (i % (kN * 4)) >> 2), big, small);
    b_words_sm[i] = __uint_as_float(big);
    b_words_sm[b_words + i] = __uint_as_float(small);
  }
  const uint64_t desc_big = wgmma_desc_k_major(b_words_sm, kN * 16, 128);
  const uint64_t desc_small = desc_big + ((b_words * 4) >> 4);
#else
  // mma.sync fragment order: {b0 big, b1 big, b0 small, b1 small} per (k-step, tap, lane).
  for (int i = threadIdx.x; i < k_steps * kTaps * 32; i += kTapThreads) {
    const int l = i % 32, tap = (i / 32) % kTaps, ks = i / (32 * kTaps);
    const int n = tap * kCx + l / 4, c0 = ks * 8 + l % 4;
    uint4 b;
    split_tf32(weight_at(c0, n), b.x, b.z);
    split_tf32(weight_at(c0 + 4, n), b.y, b.w);
    b_frags[i] = b;
  }
#endif

  // This thread's A rows as word offsets in a channel plane; rows past the
  // halo read word 0 (their Z rows are never stored).
  int a_off[kMPerWarp][2];
#pragma unroll
  for (int j = 0; j < kMPerWarp; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = frag_row(warp, j) + fg + 8 * h;
      a_off[j][h] = m < kHaloPixels ? (m / kHaloCols) * kStagedCols + m % kHaloCols + s.col_off : 0;
    }
  }

  const int64_t my_tiles =
      s.tiles > blockIdx.x ? (s.tiles - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
  // The ring carries (tile, slice) items; the producer runs kStages - 1 items
  // ahead and advances by increments (a tile is decoded once, not per item).
  int64_t p_iter = 0;
  int p_slice = 0, p_slot = 0;
  TapTile p_tile = tap_tile(s, blockIdx.x);
  auto stage_next = [&] {
    if (p_iter < my_tiles) {
      stage_slice<kVec>(g, s, p_tile, p_slice, ring + p_slot * kStageFloats);
      if (++p_slice == s.slices) {
        p_slice = 0;
        if (++p_iter < my_tiles) p_tile = tap_tile(s, blockIdx.x + p_iter * gridDim.x);
      }
    } else {
      cp_async_commit();  // an empty group keeps the wait_group count uniform
    }
    p_slot = p_slot + 1 == kStages ? 0 : p_slot + 1;
  };
  for (int p = 0; p < kStages - 1; ++p) stage_next();

  float acc[kMPerWarp][kTaps][4];
#pragma unroll
  for (int j = 0; j < kMPerWarp; ++j)
#pragma unroll
    for (int t = 0; t < kTaps; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[j][t][e] = 0.f;
  // A of a k-step, split: [half of the slice][fragment][a0..a3]. a0 = A[fg][ft],
  // a1 = A[fg+8][ft], a2 = A[fg][ft+4], a3 = A[fg+8][ft+4].
  uint32_t a_big[2][kMPerWarp][4], a_small[2][kMPerWarp][4];
  auto load_a = [&](const float* plane, int half) {
#pragma unroll
    for (int j = 0; j < kMPerWarp; ++j) {
      if (frag_live(warp, j)) {
        split_tf32(plane[a_off[j][0]], a_big[half][j][0], a_small[half][j][0]);
        split_tf32(plane[a_off[j][1]], a_big[half][j][1], a_small[half][j][1]);
        split_tf32(plane[4 * kPlaneStride + a_off[j][0]], a_big[half][j][2], a_small[half][j][2]);
        split_tf32(plane[4 * kPlaneStride + a_off[j][1]], a_big[half][j][3], a_small[half][j][3]);
      }
    }
  };
#if FUSED_CONV_WGMMA
  wgmma_fence_accumulators(acc);
#endif

  int c_slot = 0;
  TapTile c_tile = tap_tile(s, blockIdx.x);
  for (int64_t iter = 0; iter < my_tiles; ++iter) {
    for (int slice = 0; slice < s.slices; ++slice) {
      cp_async_wait<kStages - 2>();
      __syncthreads();  // the slice landed for all threads; the slot staged next is free
      stage_next();
      const float* a_src = ring + c_slot * kStageFloats;
      c_slot = c_slot + 1 == kStages ? 0 : c_slot + 1;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        load_a(a_src + (half * 8 + ft) * kPlaneStride, half);
#if FUSED_CONV_WGMMA
        // 3 blocks x 3 products (small terms first) per k-step, one commit
        // group. The two halves use the two A register sets: the wait_group<1>
        // after this commit retires the other half's group, and the fence
        // keeps its A registers from being reused before that.
        wgmma_fence();
        const uint64_t step = static_cast<uint64_t>(slice * 2 + half) * ((kN * 32) >> 4);
#pragma unroll
        for (int j = 0; j < kMPerWarp; ++j) {
          wgmma_tf32<kTaps>(acc[j], a_small[half][j], desc_big + step);
        }
#pragma unroll
        for (int j = 0; j < kMPerWarp; ++j) {
          wgmma_tf32<kTaps>(acc[j], a_big[half][j], desc_small + step);
        }
#pragma unroll
        for (int j = 0; j < kMPerWarp; ++j) {
          wgmma_tf32<kTaps>(acc[j], a_big[half][j], desc_big + step);
        }
        wgmma_commit();
        wgmma_wait<1>();
        wgmma_fence_operands(a_big[1 - half]);
        wgmma_fence_operands(a_small[1 - half]);
#else
        const uint4* b_step = b_frags + ((slice * 2 + half) * kTaps) * 32 + lane;
        uint4 b[kTaps];
#pragma unroll
        for (int t = 0; t < kTaps; ++t) b[t] = b_step[t * 32];
        // 3xTF32, small products first; product-major so that the 27 (or 18)
        // independent accumulators separate the dependent MMAs of one.
#pragma unroll
        for (int t = 0; t < kTaps; ++t)
#pragma unroll
          for (int j = 0; j < kMPerWarp; ++j)
            if (frag_live(warp, j)) mma_tf32(acc[j][t], a_small[half][j], b[t].x, b[t].y);
#pragma unroll
        for (int t = 0; t < kTaps; ++t)
#pragma unroll
          for (int j = 0; j < kMPerWarp; ++j)
            if (frag_live(warp, j)) mma_tf32(acc[j][t], a_big[half][j], b[t].z, b[t].w);
#pragma unroll
        for (int t = 0; t < kTaps; ++t)
#pragma unroll
          for (int j = 0; j < kMPerWarp; ++j)
            if (frag_live(warp, j)) mma_tf32(acc[j][t], a_big[half][j], b[t].x, b[t].y);
#endif
      }
    }
#if FUSED_CONV_WGMMA
    wgmma_wait<0>();
    wgmma_fence_operands(a_big[0]);
    wgmma_fence_operands(a_small[0]);
    wgmma_fence_operands(a_big[1]);
    wgmma_fence_operands(a_small[1]);
    wgmma_fence_accumulators(acc);
#endif

    // The tile's Z is complete: d0 = Z[row m][col 2ft], d1 = col 2ft + 1,
    // d2/d3 = row m + 8 (rows past the halo are not stored).
#pragma unroll
    for (int j = 0; j < kMPerWarp; ++j) {
      if (frag_live(warp, j)) {
        const int m = frag_row(warp, j) + fg;
#pragma unroll
        for (int t = 0; t < kTaps; ++t) {
          float* zc = z + (t * 8 + 2 * ft) * kZStride + m;
          if (m < kHaloPixels) {
            zc[0] = acc[j][t][0];
            zc[kZStride] = acc[j][t][1];
          }
          if (m + 8 < kHaloPixels) {
            zc[8] = acc[j][t][2];
            zc[kZStride + 8] = acc[j][t][3];
          }
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[j][t][e] = 0.f;
        }
      }
    }
#if FUSED_CONV_WGMMA
    wgmma_fence_accumulators(acc);
#endif
    __syncthreads();
    // Output row ih0 + warp, column iw0 + lane: the pixel at halo (warp + 2 - kr,
    // lane + 2 - kq) receives through tap (kr, kq). Z is rewritten only after the
    // next tile's first slice barrier, which every thread reaches after this.
    const TapTile tt = c_tile;
    if (iter + 1 < my_tiles) c_tile = tap_tile(s, blockIdx.x + (iter + 1) * gridDim.x);
    const int ih = tt.ih0 + warp, iw = tt.iw0 + lane;
    if (ih < s.h && iw < s.w) {
      float* dst = out + tt.n * s.c_x * s.h * s.w + ih * s.w + iw;
      const float* zp = z + (warp + 2) * kHaloCols + lane + 2;
      for (int ci = 0; ci < s.c_x; ++ci) {
        float sum = 0.f;
#pragma unroll
        for (int kr = 0; kr < 3; ++kr)
#pragma unroll
          for (int kq = 0; kq < 3; ++kq)
            sum += zp[((kr * 3 + kq) * kCx + ci) * kZStride - kr * kHaloCols - kq];
        dst[ci * s.h * s.w] = sum;
      }
    }
  }
  cp_async_wait<0>();  // no copy outlives the block
}

std::optional<TapShape> make_tap_shape(const at::Tensor& input, const at::Tensor& weight,
                                       at::IntArrayRef stride, at::IntArrayRef padding,
                                       at::IntArrayRef dilation, int64_t groups) {
  if (input.scalar_type() != at::kFloat || input.dim() != 4 || weight.dim() != 4 || groups != 1 ||
      stride[0] != 1 || stride[1] != 1 || dilation[0] != 1 || dilation[1] != 1 ||
      weight.size(2) != 3 || weight.size(3) != 3 || padding[0] < 0 || padding[0] > 2 ||
      padding[1] < 0 || padding[1] > 2 || input.numel() == 0 ||
      input.suggest_memory_format() != at::MemoryFormat::Contiguous || !input.is_cuda() ||
      // Hopper's 227 KB; not A100's 163 KB nor the 99 KB of sm_86 / sm_89.
      static_cast<size_t>(max_shared_memory_per_block(input.get_device())) < kSmemBytes) {
    return std::nullopt;
  }
  const int64_t c_x = input.size(1), h = input.size(2), w = input.size(3);
  const int64_t c_g = weight.size(0);
  const int64_t h_g = h + 2 * padding[0] - 2, w_g = w + 2 * padding[1] - 2;
  constexpr int64_t kInt32 = int64_t{1} << 31;
  if (c_x > kCx || c_g > kMaxSlices * kSlice || h_g <= 0 || w_g <= 0 || c_g * h_g * w_g >= kInt32 ||
      c_x * h * w >= kInt32) {
    return std::nullopt;
  }
  TapShape s{};
  s.n = input.size(0);
  s.c_g = static_cast<int>(c_g);
  s.h_g = static_cast<int>(h_g);
  s.w_g = static_cast<int>(w_g);
  s.c_x = static_cast<int>(c_x);
  s.h = static_cast<int>(h);
  s.w = static_cast<int>(w);
  s.pad_h = static_cast<int>(padding[0]);
  s.pad_w = static_cast<int>(padding[1]);
  s.tiles_h = (s.h + kOutRows - 1) / kOutRows;
  s.tiles_w = (s.w + kOutCols - 1) / kOutCols;
  s.tiles = s.n * s.tiles_h * s.tiles_w;
  s.slices = static_cast<int>((c_g + kSlice - 1) / kSlice);
  return s;
}

template <int kVec>
void launch(const TapShape& s, const at::Tensor& g, const at::Tensor& w, const at::Tensor& out) {
  auto kernel = grad_input_taps_kernel<kVec>;
  allow_dynamic_smem(reinterpret_cast<const void*>(kernel), kSmemBytes);
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  // Persistent: one block per multiprocessor (the shared memory allows no more).
  const int grid = static_cast<int>(std::clamp<int64_t>(s.tiles, 1, multiprocessors(device)));
  kernel<<<grid, kTapThreads, kSmemBytes, c10::cuda::getCurrentCUDAStream()>>>(
      g.const_data_ptr<float>(), w.const_data_ptr<float>(), out.mutable_data_ptr<float>(), s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

bool grad_input_taps_supports(const at::Tensor& input, const at::Tensor& weight,
                              at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t groups) {
  return make_tap_shape(input, weight, stride, padding, dilation, groups).has_value();
}

at::Tensor grad_input_taps(const at::Tensor& grad_conv_out, const at::Tensor& input,
                           const at::Tensor& weight, at::IntArrayRef padding) {
  const int64_t unit[2] = {1, 1};
  const auto shape = make_tap_shape(input, weight, unit, padding, unit, 1);
  TORCH_CHECK(shape.has_value(), "fused_conv: grad_input outside the tap kernel's reach");
  const TapShape& s = *shape;
  const at::Tensor g = grad_conv_out.contiguous();
  TORCH_CHECK(g.scalar_type() == at::kFloat && g.size(0) == s.n && g.size(1) == s.c_g &&
                  g.size(2) == s.h_g && g.size(3) == s.w_g,
              "fused_conv: grad_input_taps expected a float32 gradient of shape [", s.n, ", ",
              s.c_g, ", ", s.h_g, ", ", s.w_g, "], got ", g.scalar_type(), " ", g.sizes());
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  at::Tensor grad_input = at::empty(input.sizes(), input.options());
  // The widest copy every row start allows: rows are w_g floats apart.
  const auto address = reinterpret_cast<uintptr_t>(g.const_data_ptr());
  const int vec = s.w_g % 4 == 0 && address % 16 == 0  ? 4
                  : s.w_g % 2 == 0 && address % 8 == 0 ? 2
                                                       : 1;
  TapShape launched = s;
  // iw0 is a multiple of 32, so the halo's first column iw0 + pad_w - 2 sits
  // (pad_w - 2) mod vec columns past a vec-aligned one (the staged rows have
  // room for it: kVecsPerRow).
  launched.col_off = ((s.pad_w - 2) % vec + vec) % vec;
  switch (vec) {
    case 4:
      launch<4>(launched, g, w, grad_input);
      break;
    case 2:
      launch<2>(launched, g, w, grad_input);
      break;
    default:
      launch<1>(launched, g, w, grad_input);
  }
  return grad_input;
}

}  // namespace fused_conv::cuda
