// In-place per-channel elementwise passes over a dense NCHW / NHWC tensor,
// parallel over fixed element ranges (each output value depends only on its
// own inputs, so any split gives the same result). As in per_channel_sums.h,
// the split runs in parallel when compiled with OpenMP (-fopenmp).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>

#include "kernels/cpu/dense_channels.h"

namespace fused_conv::cpu {

// Elements per task at least, so small tensors stay on the calling thread.
constexpr int64_t kMinElementsPerTask = 32768;

// Calls map.run(c, offset, length) on runs of one channel (NCHW), or
// map.rows(offset, n_rows) on whole rows of C values (NHWC); together they
// cover every element exactly once.
template <typename Map>
void for_each_channel_run(const DenseChannels& d, const Map& map) {
  if (d.numel() == 0) return;
  if (!d.channels_last) {
    at::parallel_for(0, d.numel(), kMinElementsPerTask, [&](int64_t begin, int64_t end) {
      int64_t i = begin;
      while (i < end) {
        const int64_t plane_index = i / d.plane;  // n * C + c
        const int64_t length = std::min(end, (plane_index + 1) * d.plane) - i;
        map.run(plane_index % d.channels, i, length);
        i += length;
      }
    });
    return;
  }
  const int64_t min_rows = std::max<int64_t>(1, kMinElementsPerTask / d.channels);
  at::parallel_for(0, d.rows(), min_rows,
                   [&](int64_t begin, int64_t end) { map.rows(begin * d.channels, end - begin); });
}

}  // namespace fused_conv::cpu
