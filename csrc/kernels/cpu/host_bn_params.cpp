#include "kernels/cpu/host_bn_params.h"

#include "kernels/common/bn_fold.h"
#include "kernels/cpu/host_vectors.h"

namespace fused_conv::cpu {

HostBnParams host_bn_params(const std::optional<at::Tensor>& bn_weight,
                            const std::optional<at::Tensor>& bn_bias,
                            const std::optional<at::Tensor>& scale_tensor, double scale,
                            int64_t channels) {
  const at::Device cpu(at::kCPU);
  HostBnParams p;
  p.scale = to_host_doubles(effective_scale(scale_tensor, scale, at::kDouble, cpu))[0];
  p.gamma = to_host_doubles(bn_weight_or_ones(bn_weight, channels, at::kDouble, cpu));
  p.beta = to_host_doubles(bn_bias_or_zeros(bn_bias, channels, at::kDouble, cpu));
  return p;
}

}  // namespace fused_conv::cpu
