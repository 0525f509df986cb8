// The eval and training forwards of conv_bn_aten.h.
#include <ATen/ATen.h>

#include <cmath>

#include "kernels/common/bn_fold.h"
#include "kernels/common/conv_bn_aten.h"
#include "kernels/common/conv_bn_checks.h"
#include "kernels/common/conv_call.h"

namespace fused_conv::aten_impl {

at::Tensor conv_bn_eval(const at::Tensor& input, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& bn_weight,
                        const std::optional<at::Tensor>& bn_bias, const at::Tensor& running_mean,
                        const at::Tensor& running_var, double eps,
                        const std::optional<at::Tensor>& scale_tensor, double scale,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                        int64_t groups) {
  const ConvParams conv{stride, padding, dilation, groups};
  const ConvBnGeometry g = check_eval_args(input, weight, bias, bn_weight, bn_bias, running_mean,
                                           running_var, eps, scale_tensor, conv);
  // With fixed statistics the whole op is affine in conv(x): fold it into the
  // conv's weight and bias ([C_out]-sized work) and run one convolution.
  const at::Tensor mean = running_mean.to(g.stats_dtype);
  const at::Tensor invstd = invstd_from_var(running_var, eps, g.stats_dtype);
  const at::Tensor s = effective_scale(scale_tensor, scale, g.stats_dtype, input.device());
  const BnScaleAffine affine = bn_scale_affine(mean, invstd, bn_weight, bn_bias, s);
  const FoldedConv folded = fold_into_conv(weight, bias, mean, affine, g.memory_format);
  return conv_forward(input, folded.weight, folded.bias, conv, g.memory_format);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bn_train(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    double eps, const std::optional<at::Tensor>& scale_tensor, double scale, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvParams conv{stride, padding, dilation, groups};
  const ConvBnGeometry g =
      check_train_args(input, weight, bias, bn_weight, bn_bias, eps, scale_tensor, conv);
  const auto stats_options = input.options().dtype(g.stats_dtype);

  // y = conv(x) + b, written into the output buffer and normalised there.
  at::Tensor out = conv_forward(input, weight, bias, conv, g.memory_format);
  if (g.count == 0) {  // no values: mean 0, var 0 (what an empty batch contributes)
    return {out, at::zeros({g.out_channels}, stats_options),
            at::full({g.out_channels}, 1.0 / std::sqrt(eps), stats_options)};
  }

  // Per-channel batch statistics accumulated in the statistics dtype: float16 /
  // bfloat16 outputs are upcast first (the one extra output-sized tensor), as
  // their own precision cannot hold a sum over N*H_out*W_out values. var_mean
  // is a Welford reduction, free of the E[y^2] - E[y]^2 cancellation.
  const auto [var, mean] = at::var_mean(out.to(g.stats_dtype), {0, 2, 3}, /*correction=*/0,
                                        /*keepdim=*/false);
  const at::Tensor invstd = invstd_from_var(var, eps, g.stats_dtype);

  // out = a * y + d in one in-place pass (a, d in the statistics dtype).
  const at::Tensor s = effective_scale(scale_tensor, scale, g.stats_dtype, input.device());
  const BnScaleAffine affine = bn_scale_affine(mean, invstd, bn_weight, bn_bias, s);
  at::addcmul_out(out, per_channel_view(affine.d), out, per_channel_view(affine.a));
  return {out, mean, invstd};
}

}  // namespace fused_conv::aten_impl
