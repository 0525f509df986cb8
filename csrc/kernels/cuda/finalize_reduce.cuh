// The block-wide reduction of the finalize kernels (conv_bn_forward.cu,
// conv_bn_backward.cu): one block of kFinalizeWarps warps per channel reduces
// that channel's per-block partials, three float64 values each, in a fixed
// order, so that the statistics and sums are bitwise reproducible run to run:
// thread t folds partials t, t + 256, ... in turn; a shuffle tree folds each
// warp's lanes; thread 0 folds the warps' results in warp order.
// One warp per channel took 0.011 ms (Chan merges) and 0.004 ms (sums) on the
// reference problem (~400-530 partials: each lane a chain of ~15 folds, each
// waiting on its load); here a thread folds at most a few.
#pragma once

namespace fused_conv::cuda {

constexpr int kFinalizeWarps = 8;
constexpr int kFinalizeThreads = 32 * kFinalizeWarps;

// v: this thread's partial (after its own loop over partials threadIdx.x,
// threadIdx.x + kFinalizeThreads, ...); fold(v, other) folds `other` into v.
// Returns true in thread 0, whose v then holds the block's result. Every
// thread of the block must call it (it synchronises the block).
template <typename Fold>
__device__ __forceinline__ bool finalize_reduce(double (&v)[3], Fold fold) {
  __shared__ double warp_values[kFinalizeWarps][3];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int offset = 16; offset > 0; offset >>= 1) {
    double other[3];
    for (int i = 0; i < 3; ++i) other[i] = __shfl_down_sync(0xffffffffu, v[i], offset);
    if (lane < offset) fold(v, other);
  }
  if (lane == 0) {
    for (int i = 0; i < 3; ++i) warp_values[warp][i] = v[i];
  }
  __syncthreads();
  if (threadIdx.x != 0) return false;
  for (int w = 1; w < kFinalizeWarps; ++w) fold(v, warp_values[w]);
  return true;
}

}  // namespace fused_conv::cuda
