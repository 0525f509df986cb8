// The row kernels' training statistics (conv_rows.cu, conv_rows16.cu): per
// thread, a running (count, mean, M2) of its two channels over the output rows
// it has computed, Chan-merged row by row, then one summary per block.
//
// The accumulator layout is that of a warpgroup MMA with M = 64 output
// channels and N = 128 pixels: thread (g, t) of warp w holds channels
// 16w + g (acc[j][0..1]) and 16w + g + 8 (acc[j][2..3]) at pixels 8j + 2t, +1.
#pragma once

#include <cstdint>

namespace fused_conv::cuda {

// The strip's pixels 8j + 2t (+1) below `lim` as 1/0 weights (one FFMA per
// value instead of a compare and select per use), their count over the quad of
// lanes that shares the channels, and its inverse.
__device__ __forceinline__ void row_pixel_weights(int lim, int t, float (&valid)[16][2], float& cnt,
                                                  float& inv) {
  cnt = 0.f;
#pragma unroll
  for (int j = 0; j < 16; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      valid[j][e] = 8 * j + 2 * t + e < lim ? 1.f : 0.f;
      cnt += valid[j][e];
    }
  }
  cnt += __shfl_xor_sync(0xffffffffu, cnt, 1);
  cnt += __shfl_xor_sync(0xffffffffu, cnt, 2);
  inv = 1.f / cnt;
}

struct RowStatistics {
  float n = 0.f, mean[2] = {0.f, 0.f}, m2[2] = {0.f, 0.f};

  // Merges one row: its mean and M2 per channel over the valid pixels (the 4
  // lanes of a quad share the channels), then Chan et al.'s pairwise update
  // (delta = m_b - m_a, m = m_a + delta*n_b/n, M2 = M2_a + M2_b + delta^2*n_a*n_b/n).
  __device__ __forceinline__ void add_row(const float (&acc)[16][4], const float (&valid)[16][2],
                                          float cnt, float inv) {
    const float n_new = n + cnt;
    const float frac = cnt / n_new, cross = n * frac;
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        sum = fmaf(valid[j][0], acc[j][2 * p], sum);
        sum = fmaf(valid[j][1], acc[j][2 * p + 1], sum);
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const float m = sum * inv;
      float row_m2 = 0.f;
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        const float d0 = acc[j][2 * p] - m, d1 = acc[j][2 * p + 1] - m;
        row_m2 = fmaf(d0 * valid[j][0], d0, row_m2);
        row_m2 = fmaf(d1 * valid[j][1], d1, row_m2);
      }
      row_m2 += __shfl_xor_sync(0xffffffffu, row_m2, 1);
      row_m2 += __shfl_xor_sync(0xffffffffu, row_m2, 2);
      const float delta = m - mean[p];
      mean[p] += delta * frac;
      m2[p] += row_m2 + delta * delta * cross;
    }
    n = n_new;
  }

  // The block's summary of channels 16*warp + g (+8) into
  // partials[blockIdx.y][gridDim.x][64][3] (lane t == 0 of each quad writes).
  __device__ __forceinline__ void write(float* __restrict__ partials, int warp, int g,
                                        int t) const {
    write_unit(partials, blockIdx.x, gridDim.x, warp, g, t);
  }
  // The same for unit `unit` of `units` per channel block (a warpgroup of a
  // block of several): partials[blockIdx.y][units][64][3].
  __device__ __forceinline__ void write_unit(float* __restrict__ partials, int64_t unit,
                                             int64_t units, int warp, int g, int t) const {
    if (t != 0) return;
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      float* dst =
          partials +
          ((static_cast<int64_t>(blockIdx.y) * units + unit) * 64 + 16 * warp + g + 8 * p) * 3;
      dst[0] = n;
      dst[1] = mean[p];
      dst[2] = m2[p];
    }
  }
};

}  // namespace fused_conv::cuda
