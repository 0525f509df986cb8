// Deterministic per-channel sums over a dense NCHW / NHWC tensor, in double.
//
// Reproducibility: each channel's values are cut into fixed chunks that do not
// depend on the number of threads; every chunk is summed sequentially into its
// own partial sums, and the partials are merged in chunk order. The result is
// therefore bitwise the same for any thread count.
//
// Threads: at::parallel_for splits the chunks over libtorch's intra-op threads
// only when this code is compiled with OpenMP (-fopenmp, like libtorch
// itself); without it the same chunks run sequentially, with the same result.
//
// A Visitor supplies the summed terms (K of them per value):
//   NCHW: void run(int64_t c, int64_t offset, int64_t length, double* acc) const
//         adds the terms of `length` consecutive values of channel c starting
//         at element `offset` into acc[0..K).
//   NHWC: void rows(int64_t offset, int64_t n_rows, double* acc) const
//         adds the terms of `n_rows` rows of C values starting at element
//         `offset` into acc[k * C + c].
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "kernels/cpu/dense_channels.h"

namespace fused_conv::cpu {

// Values per chunk: big enough to amortise the per-chunk bookkeeping, small
// enough that typical outputs give many more chunks than threads.
constexpr int64_t kChunkValues = 16384;
// Chunks per task at least, so small tensors stay on the calling thread.
constexpr int64_t kMinChunksPerTask = 2;

// Sums in double of each visited term; returns [K][C] (term-major).
template <int K, typename Visitor>
std::vector<double> per_channel_sums(const DenseChannels& d, const Visitor& visit) {
  const int64_t channels = d.channels;
  std::vector<double> result(static_cast<size_t>(K * channels), 0.0);
  if (d.numel() == 0) return result;

  if (!d.channels_last) {
    // Chunk j of channel c covers that channel's values [j, j+1) * kChunkValues
    // in (n, h, w) order: runs of up to H*W consecutive elements.
    const int64_t count = d.count();
    const int64_t chunks = (count + kChunkValues - 1) / kChunkValues;
    std::vector<double> partial(static_cast<size_t>(channels * chunks * K), 0.0);
    at::parallel_for(0, channels * chunks, kMinChunksPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t c = unit / chunks;
        int64_t v = (unit % chunks) * kChunkValues;
        const int64_t v_end = std::min(count, v + kChunkValues);
        double* acc = partial.data() + unit * K;
        while (v < v_end) {
          const int64_t n = v / d.plane, p = v % d.plane;
          const int64_t length = std::min(v_end - v, d.plane - p);
          visit.run(c, (n * channels + c) * d.plane + p, length, acc);
          v += length;
        }
      }
    });
    for (int64_t c = 0; c < channels; ++c) {
      for (int64_t j = 0; j < chunks; ++j) {
        for (int k = 0; k < K; ++k) result[k * channels + c] += partial[(c * chunks + j) * K + k];
      }
    }
    return result;
  }

  // NHWC: chunk j covers rows [j, j+1) * rows_per_chunk; its partials are [K][C].
  const int64_t rows = d.rows();
  const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkValues / channels);
  const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  const int64_t stride = K * channels;
  std::vector<double> partial(static_cast<size_t>(chunks * stride), 0.0);
  at::parallel_for(0, chunks, kMinChunksPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t first = j * rows_per_chunk;
      const int64_t n_rows = std::min(rows - first, rows_per_chunk);
      visit.rows(first * channels, n_rows, partial.data() + j * stride);
    }
  });
  for (int64_t j = 0; j < chunks; ++j) {
    for (int64_t i = 0; i < stride; ++i) result[i] += partial[j * stride + i];
  }
  return result;
}

}  // namespace fused_conv::cpu
