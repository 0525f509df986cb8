// The CUDA fallback forwards (conv_bn_fallback.h). Same math and numerics as
// the device-generic ATen path (kernels/common/conv_bn_aten_forward.cpp), with
// its chains of [C]-sized ATen ops replaced by one launch each.
#include "kernels/cuda/conv_bn_fallback.h"

#include <ATen/ATen.h>

#include <cmath>

#include "kernels/common/bn_fold.h"
#include "kernels/common/conv_call.h"
#include "kernels/cuda/bn_fold_cuda.h"

namespace fused_conv::cuda {

at::Tensor fallback_conv_bn_eval(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& bn_weight,
                                 const std::optional<at::Tensor>& bn_bias,
                                 const at::Tensor& running_mean, const at::Tensor& running_var,
                                 double eps, const std::optional<at::Tensor>& scale_tensor,
                                 double scale, const ConvParams& conv, const ConvBnGeometry& g) {
  const FoldedConv folded =
      fold_into_conv_cuda(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps,
                          scale_tensor, scale, g.stats_dtype, g.memory_format);
  return conv_forward(input, folded.weight, folded.bias, conv, g.memory_format);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fallback_conv_bn_train(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    double eps, const std::optional<at::Tensor>& scale_tensor, double scale, const ConvParams& conv,
    const ConvBnGeometry& g) {
  const auto stats_options = input.options().dtype(g.stats_dtype);
  at::Tensor out = conv_forward(input, weight, bias, conv, g.memory_format);
  if (g.count == 0) {  // no values: mean 0, var 0 (what an empty batch contributes)
    return {out, at::zeros({g.out_channels}, stats_options),
            at::full({g.out_channels}, 1.0 / std::sqrt(eps), stats_options)};
  }
  // PyTorch's own BatchNorm statistics kernel: Welford in float32 (float64 for
  // float64) straight from the output in its dtype and layout (no upcast copy),
  // giving the batch mean and 1/sqrt(biased var + eps) in the statistics dtype.
  const auto [mean, invstd] = at::batch_norm_stats(out, eps);
  const BatchAffine affine =
      batch_affine_cuda(mean, invstd, bn_weight, bn_bias, scale_tensor, scale);
  at::addcmul_out(out, per_channel_view(affine.d), out, per_channel_view(affine.a));
  return {out, mean, invstd};
}

}  // namespace fused_conv::cuda
