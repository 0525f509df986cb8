#include "kernels/common/bn_fold.h"

#include <ATen/ATen.h>

namespace fused_conv {

at::Tensor effective_scale(const std::optional<at::Tensor>& scale_tensor, double scale,
                           at::ScalarType stats_dtype, at::Device device) {
  if (scale_tensor.has_value() && scale_tensor->defined()) {
    // reshape({}) of a one-element tensor is a view; mul by a Scalar stays on device.
    return scale_tensor->reshape({}).to(stats_dtype).mul(scale);
  }
  return at::scalar_tensor(scale, at::TensorOptions().dtype(stats_dtype).device(device));
}

at::Tensor bn_weight_or_ones(const std::optional<at::Tensor>& bn_weight, int64_t channels,
                             at::ScalarType stats_dtype, at::Device device) {
  if (bn_weight.has_value() && bn_weight->defined()) return bn_weight->to(stats_dtype);
  return at::ones({channels}, at::TensorOptions().dtype(stats_dtype).device(device));
}

at::Tensor bn_bias_or_zeros(const std::optional<at::Tensor>& bn_bias, int64_t channels,
                            at::ScalarType stats_dtype, at::Device device) {
  if (bn_bias.has_value() && bn_bias->defined()) return bn_bias->to(stats_dtype);
  return at::zeros({channels}, at::TensorOptions().dtype(stats_dtype).device(device));
}

at::Tensor invstd_from_var(const at::Tensor& var, double eps, at::ScalarType stats_dtype) {
  return at::rsqrt(var.to(stats_dtype).add(eps));
}

BnScaleAffine bn_scale_affine(const at::Tensor& mean, const at::Tensor& invstd,
                              const std::optional<at::Tensor>& bn_weight,
                              const std::optional<at::Tensor>& bn_bias, const at::Tensor& s) {
  const auto dtype = mean.scalar_type();
  const int64_t channels = mean.size(0);
  const auto device = mean.device();
  BnScaleAffine affine;
  affine.a = bn_weight_or_ones(bn_weight, channels, dtype, device).mul(invstd).mul_(s);
  affine.scaled_beta = bn_bias_or_zeros(bn_bias, channels, dtype, device).mul(s);
  affine.d = affine.scaled_beta - affine.a * mean;
  return affine;
}

FoldedConv fold_into_conv(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const at::Tensor& mean, const BnScaleAffine& affine,
                          at::MemoryFormat memory_format) {
  const auto stats_dtype = mean.scalar_type();
  const auto dtype = weight.scalar_type();
  FoldedConv folded;
  folded.weight =
      weight.to(stats_dtype).mul(affine.a.view({-1, 1, 1, 1})).to(dtype).contiguous(memory_format);
  const at::Tensor centred =
      (bias.has_value() && bias->defined()) ? bias->to(stats_dtype).sub(mean) : mean.neg();
  folded.bias = at::addcmul(affine.scaled_beta, affine.a, centred).to(dtype);
  return folded;
}

at::Tensor per_channel_view(const at::Tensor& t) { return t.view({1, -1, 1, 1}); }

}  // namespace fused_conv
