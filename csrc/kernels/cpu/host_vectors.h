// Between small [C] CPU tensors and host vectors, for the CPU kernels'
// per-channel coefficients (these are CPU tensors: reading them is no sync).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace fused_conv::cpu {

// The values of a CPU tensor (any floating dtype and strides) as doubles.
std::vector<double> to_host_doubles(const at::Tensor& t);

// A [size] CPU tensor of `dtype` holding `values`.
at::Tensor from_host_doubles(const std::vector<double>& values, at::ScalarType dtype);

template <typename T>
std::vector<T> cast_to(const std::vector<double>& values) {
  return std::vector<T>(values.begin(), values.end());
}

}  // namespace fused_conv::cpu
