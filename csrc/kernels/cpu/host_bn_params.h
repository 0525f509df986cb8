// The BN parameters and the effective scale of a CPU call as host numbers.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace fused_conv::cpu {

struct HostBnParams {
  double scale = 1.0;         // s = scale * scale_tensor (or scale)
  std::vector<double> gamma;  // ones when absent
  std::vector<double> beta;   // zeros when absent
};

HostBnParams host_bn_params(const std::optional<at::Tensor>& bn_weight,
                            const std::optional<at::Tensor>& bn_bias,
                            const std::optional<at::Tensor>& scale_tensor, double scale,
                            int64_t channels);

}  // namespace fused_conv::cpu
