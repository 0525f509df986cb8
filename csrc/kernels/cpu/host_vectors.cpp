#include "kernels/cpu/host_vectors.h"

#include <ATen/ATen.h>

#include <algorithm>

namespace fused_conv::cpu {

std::vector<double> to_host_doubles(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.device().is_cpu(), "fused_conv: expected a CPU tensor, got ", t.device());
  const at::Tensor dense = t.to(at::kDouble).contiguous();
  const double* p = dense.const_data_ptr<double>();
  return std::vector<double>(p, p + dense.numel());
}

at::Tensor from_host_doubles(const std::vector<double>& values, at::ScalarType dtype) {
  at::Tensor t = at::empty({static_cast<int64_t>(values.size())}, at::kDouble);
  std::copy(values.begin(), values.end(), t.mutable_data_ptr<double>());
  return t.to(dtype);
}

}  // namespace fused_conv::cpu
