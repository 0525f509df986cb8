// The two passes of the CPU backward over the recomputed conv output y and
// the incoming gradient g (both dense, in the same order).
#pragma once

#include <vector>

#include "kernels/cpu/dense_channels.h"

namespace fused_conv::cpu {

// Per-channel sums, in double, deterministic (see per_channel_sums.h).
struct GradSums {
  std::vector<double> g;          // sum(g)
  std::vector<double> g_centred;  // sum(g * (y - mean))   = sum(g * x_hat) / invstd
  std::vector<double> centred;    // sum(y - mean)         = sum(x_hat) / invstd
};

// One fused pass computing the three sums. T is float or double.
template <typename T>
GradSums grad_sums(const T* y, const T* g, const DenseChannels& d, const std::vector<double>& mean);

// Per-channel coefficients of g_hat = k * g + q * (y - mean) + r, in the data type.
template <typename T>
struct GradConvOutCoefficients {
  std::vector<T> mean;
  std::vector<T> k;  // s * gamma * invstd
  std::vector<T> q;  // training: -k * invstd * sum(g * x_hat) / M; eval: 0
  std::vector<T> r;  // training: -k * sum(g) / M;                  eval: 0
};

// Overwrites y with g_hat, the gradient of the conv output (one pass).
template <typename T>
void form_grad_conv_out_(T* y, const T* g, const DenseChannels& d,
                         const GradConvOutCoefficients<T>& coef);

}  // namespace fused_conv::cpu
