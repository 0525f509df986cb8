// CPU backward: recompute y = conv(x) + b, one fused pass for the per-channel
// sums, one pass turning y into g_hat in place, then the convolution's
// backward (oneDNN). The math is spelled out in
// kernels/common/conv_bn_aten_backward.cpp; here, with sums over the M values
// of a channel and x_hat = (y - mean) * invstd,
//   g_hat = k * g + q * (y - mean) + r,   k = s * gamma * invstd,
//   training: q = -k * invstd * sum(g * x_hat') / M,  r = -k * sum(g) / M - q * delta
//             (x_hat' = x_hat recentred on the exact mean of y, mean + delta;
//             see there why), and grad_bias = 0;
//   eval:     q = r = 0.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "kernels/common/conv_bn_aten.h"
#include "kernels/common/conv_bn_checks.h"
#include "kernels/common/conv_call.h"
#include "kernels/cpu/conv_bn_cpu.h"
#include "kernels/cpu/grad_passes.h"
#include "kernels/cpu/host_bn_params.h"
#include "kernels/cpu/host_vectors.h"

namespace fused_conv::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_backward(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const at::Tensor& mean, const at::Tensor& invstd,
    const std::optional<at::Tensor>& scale_tensor, double scale, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool training,
    std::array<bool, 2> input_weight_mask) {
  const ConvParams conv{stride, padding, dilation, groups};
  const ConvBnGeometry g = check_backward_args(grad_out, input, weight, bias, bn_weight, bn_bias,
                                               mean, invstd, scale_tensor, conv);
  const auto dtype = input.scalar_type();
  if (g.count == 0 || (dtype != at::kFloat && dtype != at::kDouble)) {
    return aten_impl::conv_bn_backward(grad_out, input, weight, bias, bn_weight, bn_bias, mean,
                                       invstd, scale_tensor, scale, stride, padding, dilation,
                                       groups, training, input_weight_mask);
  }

  // y, then g in y's memory order (a copy only for other layouts, e.g. an
  // expanded gradient).
  at::Tensor y = conv_forward(input, weight, bias, conv, g.memory_format);
  const DenseChannels d = dense_channels_of(y);
  const at::Tensor grad = grad_out.contiguous(d.memory_format());
  const HostBnParams bn = host_bn_params(bn_weight, bn_bias, scale_tensor, scale, d.channels);
  const std::vector<double> mean_h = to_host_doubles(mean);
  const std::vector<double> invstd_h = to_host_doubles(invstd);

  GradSums sums;
  AT_DISPATCH_FLOATING_TYPES(dtype, "fused_conv_cpu_conv_bn_backward", [&] {
    sums = grad_sums<scalar_t>(y.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(), d,
                               mean_h);
  });

  const int64_t channels = d.channels;
  const double inv_count = 1.0 / static_cast<double>(g.count);
  std::vector<double> k(channels), q(channels, 0.0), r(channels, 0.0);
  std::vector<double> sum_g_xhat(channels), grad_bias(channels), grad_gamma(channels),
      grad_beta(channels);
  double grad_scale = 0.0;
  for (int64_t c = 0; c < channels; ++c) {
    k[c] = bn.scale * bn.gamma[c] * invstd_h[c];
    if (training) {
      const double delta = sums.centred[c] * inv_count;  // exact mean of y - given mean
      sum_g_xhat[c] = invstd_h[c] * (sums.g_centred[c] - delta * sums.g[c]);
      q[c] = -k[c] * invstd_h[c] * sum_g_xhat[c] * inv_count;
      r[c] = -k[c] * sums.g[c] * inv_count - q[c] * delta;
      grad_bias[c] = 0.0;
    } else {
      sum_g_xhat[c] = invstd_h[c] * sums.g_centred[c];
      grad_bias[c] = k[c] * sums.g[c];
    }
    grad_gamma[c] = bn.scale * sum_g_xhat[c];
    grad_beta[c] = bn.scale * sums.g[c];
    grad_scale += bn.gamma[c] * sum_g_xhat[c] + bn.beta[c] * sums.g[c];  // channel order: fixed
  }

  if (input_weight_mask[0] || input_weight_mask[1]) {  // g_hat only feeds the conv backward
    AT_DISPATCH_FLOATING_TYPES(dtype, "fused_conv_cpu_conv_bn_backward", [&] {
      const GradConvOutCoefficients<scalar_t> coef{cast_to<scalar_t>(mean_h), cast_to<scalar_t>(k),
                                                   cast_to<scalar_t>(q), cast_to<scalar_t>(r)};
      form_grad_conv_out_(y.mutable_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(), d, coef);
    });
  }
  auto [grad_input, grad_weight] =
      conv_backward(y, input, weight, conv, g.memory_format, input_weight_mask);

  const auto sdt = g.stats_dtype;
  return {grad_input,
          grad_weight,
          from_host_doubles(grad_bias, sdt),
          from_host_doubles(grad_gamma, sdt),
          from_host_doubles(grad_beta, sdt),
          from_host_doubles({grad_scale}, sdt).reshape({})};
}

}  // namespace fused_conv::cpu
