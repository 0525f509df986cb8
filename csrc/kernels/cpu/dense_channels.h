// The memory order of a dense [N, C, H, W] CPU tensor as the per-channel
// loops walk it: NCHW (each channel is N runs of H*W values) or NHWC /
// channels_last (each row of C values holds one value of every channel).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fused_conv::cpu {

struct DenseChannels {
  int64_t batch = 0;     // N
  int64_t channels = 0;  // C
  int64_t plane = 0;     // H * W
  bool channels_last = false;

  int64_t numel() const { return batch * channels * plane; }
  // Values per channel, N * H * W (the BN statistics' count).
  int64_t count() const { return batch * plane; }
  // NHWC: rows of `channels` values, one per (n, h, w).
  int64_t rows() const { return batch * plane; }
  at::MemoryFormat memory_format() const {
    return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  }
};

// The order of `t`, which must be dense in one of the two. When both hold
// (size-1 dims make them the same memory walk) NCHW is chosen, except for
// H*W == 1, where its runs would be single values and rows of C are better.
inline DenseChannels dense_channels_of(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.dim() == 4);
  DenseChannels d;
  d.batch = t.size(0);
  d.channels = t.size(1);
  d.plane = t.size(2) * t.size(3);
  const bool nchw = t.is_contiguous();
  const bool nhwc = t.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_INTERNAL_ASSERT(
      nchw || nhwc, "fused_conv: expected a dense NCHW or NHWC tensor, got strides ", t.strides());
  d.channels_last = !nchw || (nhwc && d.plane == 1);
  return d;
}

}  // namespace fused_conv::cpu
