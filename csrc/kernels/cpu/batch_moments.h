// Per-channel batch mean and biased variance of a dense CPU tensor.
#pragma once

#include <vector>

#include "kernels/cpu/dense_channels.h"

namespace fused_conv::cpu {

struct ChannelMoments {
  std::vector<double> mean;
  std::vector<double> var;  // biased: divided by the count N*H*W
};

// Two passes, both accumulated in double: the mean, then the sum of squared
// deviations from it (no E[y^2] - E[y]^2 cancellation). Deterministic for any
// thread count (see per_channel_sums.h). T is float or double; d.count() > 0.
template <typename T>
ChannelMoments channel_moments(const T* data, const DenseChannels& d);

}  // namespace fused_conv::cpu
