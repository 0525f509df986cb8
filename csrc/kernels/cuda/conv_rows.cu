// The forward as one warpgroup MMA chain per output row, both operands in
// shared memory (Hopper, sm_90a; float32, stride 1), for two passes:
// statistics (per-channel Chan summaries of conv(x), nothing written) and
// apply (out = a[c]*conv(x) + d[c], the BN + scale fold, NCHW).
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
// halves once per strip (the tile kernel splits each gathered element per tap).
// The two k-halves of a k-step are planes 2p and 2p+1 (leading byte offset =
// one plane), consecutive 8-pixel groups 128 bytes apart (stride byte offset).
// W is staged the same way: [k-step][k-half][channel][4].
//
// 3xTF32: D += Wb*Xb + Wb*Xs + Ws*Xb (tf32_mma.cuh): 3 MMAs per k-step, 27 for
// the reference problem's 3x3 x 8 channels, issued back to back.
//
// A warpgroup is persistent over strips of `rows` output rows of one image and
// one column tile. The strip's input rows (with halo) arrive raw, in the plane
// layout, by cp.async; the warpgroup's threads split them into the big/small
// planes (one 16-byte load and two 16-byte stores per 4 channels), then per
// output row the warpgroup issues the MMA chain, waits, and folds the row into
// per-channel Chan statistics, or (apply) writes it through a per-warp
// shared-memory transpose so that each store instruction covers 256 contiguous
// bytes of one channel row. Where the shared memory allows (the reference
// problem: 209 KB), a block is three warpgroups sharing one copy of the split
// weights, each with its own strips, planes and a one-strip raw buffer (the next
// strip is copied once the current one is split): 12 warps per multiprocessor,
// so that one warpgroup's split and epilogue run under the others' MMAs. Else a
// block is one warpgroup with a 2-deep raw ring two strips ahead, two blocks per
// multiprocessor (8 warps; the only form before the thirteenth session).
#include "kernels/cuda/conv_rows.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "kernels/cuda/dependent_launch.cuh"
#include "kernels/cuda/rows_statistics.cuh"
#include "kernels/cuda/tf32_mma.cuh"
#include "kernels/cuda/tile_launch.cuh"
#include "kernels/cuda/wgmma_tf32.cuh"

namespace fused_conv::cuda {
namespace {

constexpr int kThreads = 128;  // one warpgroup
constexpr int kCo = kRowsChannels;
constexpr int kPix = kRowsPixels;
constexpr int kMaxKSteps = 32;
// At most this much shared memory per block: two blocks per multiprocessor
// (the reference problem takes 104 KB).
constexpr size_t kMaxSmem = 111 * 1024;
// The NCHW output epilogue's per-warp transpose: 8 channel rows of 64 pixels,
// rows 72 words apart so that the quads' 8-byte writes (channel g, pixels
// 8j + 2t) fall in distinct banks per half-warp.
constexpr int kStageRow = 72;
constexpr int kStageWords = 4 * 8 * kStageRow;  // 4 warps
// Output rows per strip: the halo rows are staged (kh-1)*dil_h extra times per
// strip, and a taller strip costs shared memory, so fewer blocks per SM.
constexpr int kDefaultRows = 2;
[[maybe_unused]] constexpr int kMinWidth = 64;  // narrower rows waste most of the 128-pixel MMA
// A block computes 64 channels whatever C_out is: at C_out = 16 and 32 the tile
// kernel was faster (H200, bench group `rows`: eval 0.183 / 0.251 ms against
// 0.258 / 0.260), so those stay there.
[[maybe_unused]] constexpr int kMinChannels = 32;

struct RowsShape : RowStrips {
  int pairs;         // ceil(C_in / 8): k-steps per tap
  int k_steps;       // kh*kw*pairs
  int items;         // 4-channel items of a strip: 2*pairs*staged_rows*staged_w
  int x_words;       // 4*items: one staged strip (raw, big or small)
  int w_words;       // one split term of the staged weights
  bool vec4;         // NHWC: 16-byte copies of 4 channels
  bool pair_stores;  // W_out even: 8-byte stores of pixel pairs
};

// Raw ring slots per warpgroup: a block of one warpgroup copies two strips
// ahead; with three warpgroups (sharing the weights) only one slot each fits,
// so the next strip is copied once the current one is split.
constexpr int raw_slots(int groups) { return groups == 1 ? 2 : 1; }

// One warpgroup's region: the split strip (big, small), its raw ring, its
// warps' output stages (apply), in floats.
size_t group_words(const RowsShape& r, bool apply, int groups) {
  return static_cast<size_t>(2 + raw_slots(groups)) * r.x_words + (apply ? kStageWords : 0);
}

// Weights (big, small) shared by the block's warpgroups, the k-step table,
// then each warpgroup's region.
size_t smem_bytes(const RowsShape& r, bool apply, int groups) {
  return (2 * static_cast<size_t>(r.w_words) + groups * group_words(r, apply, groups)) *
             sizeof(float) +
         kMaxKSteps * sizeof(int);
}

RowsShape make_rows_shape(const ConvShape& s, int rows) {
  RowsShape r{};
  static_cast<RowStrips&>(r) = make_row_strips(s, rows);
  r.pairs = (s.c_in + 7) / 8;
  r.k_steps = s.kh * s.kw * r.pairs;
  r.items = 2 * r.pairs * r.staged_rows * r.staged_w;
  r.x_words = 4 * r.items;
  r.w_words = r.k_steps * 8 * kCo;
  return r;
}

#if FUSED_CONV_WGMMA
// Issues the copies of one strip's input rows ih0.. and columns iw0.. of image
// n into `raw` in the plane layout [plane][row][column][4 channels] (zeros
// outside the image and past C_in: cp.async's zero fill). Item i = 4 channels
// of one (row, column); NCHW: consecutive threads take consecutive columns (4
// coalesced 4-byte copies each), NHWC: consecutive planes of a pixel, then
// pixels (one 16-byte copy where the channels allow it).
template <bool kChannelsLast>
__device__ __forceinline__ void copy_strip(const float* __restrict__ x, const RowsShape& s,
                                           int64_t n, int ih0, int iw0, float* raw, int tid) {
  const int planes = 2 * s.pairs;
  const float* img = x + n * (static_cast<int64_t>(s.c_in) * s.h * s.w);
  const int plane_in = s.h * s.w;
  // Item i's (plane, staged row, column), advanced by carries as i steps by
  // kThreads (integer division per item was a third of the kernel's
  // instructions): NCHW walks columns, rows, planes; NHWC planes, columns, rows.
  // kThreads < staged_w, so one carry per digit and step suffices.
  int pl, sr, px;
  if constexpr (kChannelsLast) {
    pl = tid % planes;
    px = tid / planes;
    sr = 0;
  } else {
    px = tid;
    sr = 0;
    pl = 0;
  }
  for (int i = tid; i < s.items; i += kThreads) {
    const int ih = ih0 + sr, iw = iw0 + px, c0 = 4 * pl;
    const bool inside = static_cast<unsigned>(ih) < static_cast<unsigned>(s.h) &&
                        static_cast<unsigned>(iw) < static_cast<unsigned>(s.w);
    float* dst = raw + ((pl * s.staged_rows + sr) * s.staged_w + px) * 4;
    if constexpr (kChannelsLast) {
      const float* src = inside ? img + (static_cast<int64_t>(ih) * s.w + iw) * s.c_in + c0 : img;
      if (s.vec4) {
        cp_async_vec<4>(dst, src, inside && c0 < s.c_in);
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const bool ok = inside && c0 + e < s.c_in;
          cp_async_f32(dst + e, ok ? src + e : img, ok);
        }
      }
      pl += kThreads % planes;
      px += kThreads / planes;
      if (pl >= planes) pl -= planes, ++px;
      if (px >= s.staged_w) px -= s.staged_w, ++sr;
    } else {
      const float* src = inside ? img + static_cast<int64_t>(c0) * plane_in + ih * s.w + iw : img;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool ok = inside && c0 + e < s.c_in;
        cp_async_f32(dst + e, ok ? src + static_cast<int64_t>(e) * plane_in : img, ok);
      }
      px += kThreads;
      if (px >= s.staged_w) px -= s.staged_w, ++sr;
      if (sr >= s.staged_rows) sr -= s.staged_rows, ++pl;
    }
  }
}
#endif

// kApply = false: per-block (count, mean, M2) of conv(x) per channel into
// partials[blockIdx.y][gridDim.x][64][3].
// kApply = true: out = a[c]*conv(x) + d[c] (the BN + scale fold, f), NCHW.
//
// kGroups warpgroups per block (1 or 3) share the staged weights; each runs the
// strips of its own unit (blockIdx.x * kGroups + its index, then + gridDim.x *
// kGroups, ...) in its own region of shared memory, synchronising on a named
// barrier of its own. Three warpgroups put 12 warps on a multiprocessor where
// two one-warpgroup blocks (two copies of the weights) put 8.
template <bool kChannelsLast, bool kApply, int kGroups>
__global__ void __launch_bounds__(kThreads* kGroups)
    conv_rows_kernel(const float* __restrict__ x, const float* __restrict__ w, RowsShape s,
                     BnFold f, float* __restrict__ partials, float* __restrict__ out) {
  static_assert(!(kApply && kChannelsLast), "the NHWC normalise pass stays on the tile kernel");
  static_assert(kGroups == 1 || kGroups == 3, "one or three warpgroups per block");
#if FUSED_CONV_WGMMA
  constexpr int kRaw = raw_slots(kGroups);
  // Warpgroup and warp indices broadcast from lane 0: warp-uniform to the
  // compiler, so that no branch near the wgmmas looks divergent (ptxas would
  // serialize them).
  const int wg = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x / kThreads), 0);
  const int warp = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x >> 5) & 3, 0);
  const int tid = threadIdx.x - wg * kThreads;  // within the warpgroup
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  extern __shared__ __align__(128) float smem[];
  float* w_big = smem;
  float* w_small = w_big + s.w_words;
  int* step_b = reinterpret_cast<int*>(w_small + s.w_words);
  float* x_big = reinterpret_cast<float*>(step_b + kMaxKSteps) +
                 wg * (static_cast<size_t>(2 + kRaw) * s.x_words + (kApply ? kStageWords : 0));
  float* x_small = x_big + s.x_words;
  float* raw_ring = x_small + s.x_words;  // [kRaw][x_words]
  float* stage = raw_ring + kRaw * s.x_words + warp * 8 * kStageRow;
  // The warpgroup's barrier (barrier 0 is __syncthreads').
  const auto group_sync = [&]() {
    if constexpr (kGroups == 1) {
      __syncthreads();
    } else {
      asm volatile("bar.sync %0, %1;\n" ::"r"(1 + wg), "n"(kThreads) : "memory");
    }
  };

  const int c_base = blockIdx.y * kCo;
  const int taps = s.kh * s.kw;
  const int64_t unit = static_cast<int64_t>(blockIdx.x) * kGroups + wg;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kGroups;

  const auto copy = [&](int64_t strip, float* raw) {
    const int64_t row_tile = strip / s.tiles_w;
    const int ow0 = static_cast<int>(strip - row_tile * s.tiles_w) * kPix;
    const int64_t n = row_tile / s.strips_h;
    const int oh0 = static_cast<int>(row_tile - n * s.strips_h) * s.rows;
    copy_strip<kChannelsLast>(x, s, n, oh0 - s.pad_h, ow0 - s.pad_w, raw, tid);
  };
  // Every block of this persistent grid is resident from the start, so the
  // next kernel may be scheduled into the places our blocks leave
  // (dependent_launch.cuh).
  let_next_kernel_start();
  // The first kRaw strips' copies fly while the weights are split. One commit
  // per strip slot, empty or not, keeps the group count uniform.
#pragma unroll
  for (int i = 0; i < kRaw; ++i) {
    if (unit + i * step < s.strips) copy(unit + i * step, raw_ring + i * s.x_words);
    cp_async_commit();
  }

  // Weights split into TF32 halves, word (ks, k-half kc, channel co, e): the
  // k-step's core matrices of 8 channels 128 bytes apart, k-halves 1 KB apart.
  for (int i = threadIdx.x; i < s.w_words; i += kThreads * kGroups) {
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
  if constexpr (kGroups > 1) {
    // The weights and the table, written by all warpgroups, visible to every
    // warpgroup's wgmma (one warpgroup: the loop's first fence and barrier).
    fence_proxy_async_shared();
    __syncthreads();
  }

  const uint64_t a_big = wgmma_desc_k_major(w_big, 4 * kCo * 4, 128);
  const uint64_t a_small = wgmma_desc_k_major(w_small, 4 * kCo * 4, 128);
  const uint64_t b_big = wgmma_desc_k_major(x_big, plane_bytes, 128);
  const uint64_t b_small = wgmma_desc_k_major(x_small, plane_bytes, 128);
  constexpr int kAStep = 8 * kCo * 4 >> 4;  // one k-step of W, descriptor units
  const int row_step = s.staged_w;          // one staged row: staged_w*16 bytes

  // Running (count, mean, M2) of this thread's channels c_base + 16*warp + g
  // (accumulators d[j][0..1]) and + 8 (d[j][2..3]); pixels 8j + 2t (+1).
  RowStatistics stats;
  // Not initialised: a row's first MMA has scale-d = 0 (ks == 0), and zeroing
  // instructions near the MMAs would make ptxas serialize them (C7515).
  float acc[16][4];

  // kApply: the fold of this thread's two channels (0 past C_out: not stored).
  const int c_mine = c_base + 16 * warp + g;
  float fa[2] = {0.f, 0.f}, fd[2] = {0.f, 0.f};
  if constexpr (kApply) {
    // Launched as a dependent of finalize_stats_kernel, everything above read
    // only the op's inputs x and w; the fold reads its statistics.
    wait_for_previous_kernel();
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      if (c_mine + 8 * p < s.c_out) bn_fold_coefficients(f, c_mine + 8 * p, fa[p], fd[p]);
    }
  }

  int slot = 0;
  for (int64_t strip = unit; strip < s.strips; strip += step) {
    const int64_t row_tile = strip / s.tiles_w;
    const int ow0 = static_cast<int>(strip - row_tile * s.tiles_w) * kPix;
    const int64_t n = row_tile / s.strips_h;
    const int oh0 = static_cast<int>(row_tile - n * s.strips_h) * s.rows;
    float* raw = raw_ring + slot * s.x_words;
    // This strip's copies (all but the newest kRaw - 1 groups) have landed for
    // this thread; the barrier makes the warpgroup's visible, and each of its
    // warps has retired the previous strip's MMAs (wait_group 0 per row), so
    // the planes are free.
    cp_async_wait<kRaw - 1>();
    group_sync();
    for (int i = tid; i < s.items; i += kThreads) {
      const float4 v = reinterpret_cast<const float4*>(raw)[i];
      uint4 big, small;
      split_tf32(v.x, big.x, small.x);
      split_tf32(v.y, big.y, small.y);
      split_tf32(v.z, big.z, small.z);
      split_tf32(v.w, big.w, small.w);
      reinterpret_cast<uint4*>(x_big)[i] = big;
      reinterpret_cast<uint4*>(x_small)[i] = small;
    }
    fence_proxy_async_shared();  // the split planes, visible to wgmma
    group_sync();                // ... and this raw slot free for the strip kRaw ahead
    if (strip + kRaw * step < s.strips) copy(strip + kRaw * step, raw);
    cp_async_commit();
    slot = slot == kRaw - 1 ? 0 : slot + 1;

    const int rows = min(s.rows, s.h_out - oh0);
    const int lim = s.w_out - ow0;  // valid pixels of the tile (may exceed 128)
    float valid[16][2], cnt, inv;   // the statistics' pixel weights
    row_pixel_weights(lim, t, valid, cnt, inv);
    for (int r = 0; r < rows; ++r) {
      wgmma_fence();
      for (int ks = 0; ks < s.k_steps; ++ks) {
        const uint32_t b_off = r * row_step + step_b[ks], a_off = ks * kAStep;
        wgmma_tf32_ss_n128(acc, a_big + a_off, b_big + b_off, ks);
        wgmma_tf32_ss_n128(acc, a_big + a_off, b_small + b_off, 1);
        wgmma_tf32_ss_n128(acc, a_small + a_off, b_big + b_off, 1);
      }
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_fence_accumulators(acc);

      if constexpr (kApply) {
        // Thread (g, t) holds channels c_mine (+8) at pixels 8j + 2t (+1): a
        // direct store would touch 8 channel rows per instruction, which backs
        // up the LSU (ncu: the stores' source registers stall the FFMAs). So
        // through this warp's stage, 8 channel rows x 64 pixels at a time, and
        // each store instruction writes 256 contiguous bytes of one row.
        const int64_t plane = static_cast<int64_t>(s.h_out) * s.w_out;
#pragma unroll
        for (int p = 0; p < 2; ++p) {
          const int c0 = c_base + 16 * warp + 8 * p;  // the stage's row 0
          const int c_rows = min(8, s.c_out - c0);    // warp-uniform
          float* row0 = out + ((n * s.c_out + c0) * s.h_out + oh0 + r) * s.w_out + ow0;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
#pragma unroll
            for (int jj = 0; jj < 8; ++jj) {
              const int j = 8 * h + jj;
              *reinterpret_cast<float2*>(stage + g * kStageRow + 8 * jj + 2 * t) = make_float2(
                  fmaf(fa[p], acc[j][2 * p], fd[p]), fmaf(fa[p], acc[j][2 * p + 1], fd[p]));
            }
            __syncwarp();
            // W_out even: lim is even, so a pixel pair is whole or outside.
            const int px = 64 * h + 2 * lane;
            if (s.pair_stores) {
              if (px < lim) {
#pragma unroll
                for (int k = 0; k < 8; ++k) {
                  if (k < c_rows) {
                    *reinterpret_cast<float2*>(row0 + k * plane + px) =
                        *reinterpret_cast<const float2*>(stage + k * kStageRow + 2 * lane);
                  }
                }
              }
            } else {
#pragma unroll
              for (int k = 0; k < 8; ++k) {
                const float2 v = *reinterpret_cast<const float2*>(stage + k * kStageRow + 2 * lane);
                if (k < c_rows && px < lim) row0[k * plane + px] = v.x;
                if (k < c_rows && px + 1 < lim) row0[k * plane + px + 1] = v.y;
              }
            }
            __syncwarp();
          }
        }
        continue;
      }

      stats.add_row(acc, valid, cnt, inv);
    }
  }
  cp_async_wait<0>();  // no copy outlives the block (the last slots are empty groups)

  if (!kApply) stats.write_unit(partials, unit, step, warp, g, t);
#else
  // Not compiled for sm_90a: conv_rows_stats_supports() never selects this kernel.
  __trap();
#endif
}

// Three warpgroups per block where their shared memory fits one block per
// multiprocessor, else one (two blocks per multiprocessor, kMaxSmem each).
int rows_groups(const RowsShape& r, bool apply, int device) {
  return smem_bytes(r, apply, 3) <= static_cast<size_t>(max_shared_memory_per_block(device)) ? 3
                                                                                             : 1;
}

// Launches (or, dry_run, sizes) the kernel; returns the number of units
// (warpgroups with their own strips and statistics partials): grid x groups.
// dependent: launched as a programmatic dependent of the stream's previous
// kernel (conv_rows_apply, conv_rows.h).
template <bool kChannelsLast, bool kApply>
int launch_rows(const RowsShape& r, const float* x, const float* w, const BnFold& f,
                float* partials, float* out, bool dry_run, bool dependent = false) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const auto launch = [&](auto groups_tag) {
    constexpr int kGroups = decltype(groups_tag)::value;
    auto kernel = conv_rows_kernel<kChannelsLast, kApply, kGroups>;
    const size_t smem = smem_bytes(r, kApply, kGroups);
    const int grid_x = row_kernel_grid(reinterpret_cast<const void*>(kernel), kThreads * kGroups,
                                       smem, r.c_out, (r.strips + kGroups - 1) / kGroups);
    if (!dry_run) {
      const dim3 grid(grid_x, static_cast<unsigned>((r.c_out + kCo - 1) / kCo));
      launch_kernel(dependent, kernel, grid, kThreads * kGroups, smem,
                    c10::cuda::getCurrentCUDAStream(), x, w, r, f, partials, out);
    }
    return grid_x * kGroups;
  };
  return rows_groups(r, kApply, device) == 3 ? launch(std::integral_constant<int, 3>{})
                                             : launch(std::integral_constant<int, 1>{});
}

// Whether the shape's k-steps and shared memory (kApply: with the output
// stage) fit the row kernel: three warpgroups in one block, or one in each of
// two blocks per multiprocessor.
bool rows_fit(const ConvShape& s, bool apply, int device) {
  const RowsShape r = make_rows_shape(s, rows_per_strip(kDefaultRows));
  const size_t one = smem_bytes(r, apply, 1);
  return r.k_steps <= kMaxKSteps &&
         (rows_groups(r, apply, device) == 3 ||
          (one <= kMaxSmem && one <= static_cast<size_t>(max_shared_memory_per_block(device))));
}

int run_rows_stats(const RowsShape& r, bool channels_last, const at::Tensor& x, const at::Tensor& w,
                   float* partials, bool dry_run) {
  const float* xp = x.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  return channels_last ? launch_rows<true, false>(r, xp, wp, BnFold{}, partials, nullptr, dry_run)
                       : launch_rows<false, false>(r, xp, wp, BnFold{}, partials, nullptr, dry_run);
}

RowsShape rows_shape_for(const ConvShape& s, const at::Tensor& x) {
  RowsShape r = make_rows_shape(s, rows_per_strip(kDefaultRows));
  r.vec4 = s.channels_last && s.c_in % 4 == 0 &&
           reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 == 0;
  return r;
}

}  // namespace

RowStrips make_row_strips(const ConvShape& s, int rows) {
  RowStrips r{};
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
  r.rows = rows;
  r.strips_h = (s.h_out + rows - 1) / rows;
  r.tiles_w = (s.w_out + kRowsPixels - 1) / kRowsPixels;
  r.strips = s.n * r.strips_h * r.tiles_w;
  r.staged_rows = rows + (s.kh - 1) * s.dil_h;
  r.staged_w = kRowsPixels + (s.kw - 1) * s.dil_w;
  return r;
}

int row_kernel_grid(const void* entry, int threads, size_t smem, int64_t c_out, int64_t strips) {
  allow_dynamic_smem(entry, smem);
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const int64_t c_blocks = (c_out + kRowsChannels - 1) / kRowsChannels;
  const int per_sm = std::max(resident_blocks_per_sm(entry, threads, smem), 1);
  return static_cast<int>(std::clamp<int64_t>(
      static_cast<int64_t>(per_sm) * multiprocessors(device) / c_blocks, 1, strips));
}

int rows_per_strip(int default_rows) {
  const char* v = std::getenv("FUSED_CONV_ROWS_PER_STRIP");
  const int rows = v != nullptr ? std::atoi(v) : 0;
  return rows >= 1 && rows <= 16 ? rows : default_rows;
}

const char* forward_kernel_choice() {
  const char* v = std::getenv("FUSED_CONV_FORWARD_KERNEL");
  return v != nullptr ? v : "";
}

bool conv_rows_stats_supports(const ConvShape& s, at::ScalarType dtype, int device) {
#ifndef FUSED_CONV_BUILT_SM90A
  (void)s, (void)dtype, (void)device;
  return false;  // no sm_90a code in this build (setup.py defines the macro)
#else
  if (std::strcmp(forward_kernel_choice(), "tile") == 0) return false;
  if (dtype != at::kFloat || s.stride_h != 1 || s.stride_w != 1 || s.w_out < kMinWidth ||
      s.c_out <= kMinChannels) {
    return false;
  }
  if (compute_capability_major(device) != 9) return false;
  return rows_fit(s, false, device);
#endif
}

bool conv_rows_apply_supports(const ConvShape& s, at::ScalarType dtype, int device) {
  return !s.channels_last && std::strcmp(forward_kernel_choice(), "rows-stats") != 0 &&
         conv_rows_stats_supports(s, dtype, device) && rows_fit(s, true, device);
}

std::pair<at::Tensor, int> conv_rows_stats(const ConvShape& s, const at::Tensor& x,
                                           const at::Tensor& w) {
  const RowsShape r = rows_shape_for(s, x);
  const int grid_x = run_rows_stats(r, s.channels_last, x, w, nullptr, true);
  const int64_t c_blocks = (s.c_out + kCo - 1) / kCo;
  at::Tensor partials = at::empty({c_blocks, grid_x, kCo, 3}, x.options().dtype(at::kFloat));
  run_rows_stats(r, s.channels_last, x, w, partials.mutable_data_ptr<float>(), false);
  return {partials, grid_x};
}

void conv_rows_apply(const ConvShape& s, const at::Tensor& x, const at::Tensor& w, const BnFold& f,
                     at::Tensor& out, bool dependent) {
  RowsShape r = rows_shape_for(s, x);
  float* o = out.mutable_data_ptr<float>();
  TORCH_CHECK(!s.channels_last, "fused_conv: the row kernel writes NCHW outputs only");
  r.pair_stores = s.w_out % 2 == 0 && reinterpret_cast<uintptr_t>(o) % 8 == 0;
  launch_rows<false, true>(r, x.const_data_ptr<float>(), w.const_data_ptr<float>(), f, nullptr, o,
                           false, dependent);
}

}  // namespace fused_conv::cuda
