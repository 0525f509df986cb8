// The in-place normalisation pass of the CPU training forward.
#pragma once

#include <vector>

#include "kernels/cpu/dense_channels.h"

namespace fused_conv::cpu {

// Per-channel coefficients of out = (y - shift) * mul + add, in the data type.
template <typename T>
struct ChannelAffine {
  std::vector<T> shift;  // the batch mean
  std::vector<T> mul;    // s * gamma * invstd
  std::vector<T> add;    // s * beta
};

// data = (data - shift[c]) * mul[c] + add[c], in place. Subtracting the mean
// before scaling keeps a large |mean| from cancelling after rounding.
template <typename T>
void apply_channel_affine_(T* data, const DenseChannels& d, const ChannelAffine<T>& affine);

}  // namespace fused_conv::cpu
