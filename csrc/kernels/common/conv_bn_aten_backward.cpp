// The backward of conv_bn_aten.h.
//
// With g = grad_out, x_hat = (y - mean) * invstd, k = s * gamma * invstd and
// M = N * H_out * W_out values per channel (sums below are per channel):
//   grad_beta  = s * sum(g)              grad_gamma = s * sum(g * x_hat)
//   grad_s     = sum_c(gamma_c * sum(g * x_hat)_c + beta_c * sum(g)_c)
//   g_hat      = k * (g - sum(g)/M - x_hat * sum(g * x_hat)/M)   (training: mean
//                and invstd are functions of y)
//   g_hat      = k * g                                          (eval)
//   grad_bias  = sum(g_hat) = 0 (training: the batch mean absorbs any shift
//                of y, so the conv bias cannot change the output)
//                          = k * sum(g)                          (eval)
// and grad_input / grad_weight are the convolution's backward of g_hat.
//
// Training recentres x_hat on the exact mean of the recomputed y: the given
// mean is that mean rounded to the statistics dtype, and with float32 the
// rounding offset delta = sum(x_hat)/M, times invstd * sum(g * x_hat), would
// otherwise leak into every g_hat value (and into grad_bias) as a per-channel
// constant. With x_hat' = x_hat - delta:
//   sum(g * x_hat') = sum(g * x_hat) - delta * sum(g),
//   g_hat = k * (g - sum(g)/M - (x_hat - delta) * sum(g * x_hat')/M).
#include <ATen/ATen.h>

#include "kernels/common/bn_fold.h"
#include "kernels/common/conv_bn_aten.h"
#include "kernels/common/conv_bn_checks.h"
#include "kernels/common/conv_call.h"

namespace fused_conv::aten_impl {
namespace {

at::Tensor per_channel_sum(const at::Tensor& t) { return t.sum({0, 2, 3}); }

}  // namespace

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
  const auto sdt = g.stats_dtype;
  const auto device = input.device();
  const at::Tensor s = effective_scale(scale_tensor, scale, sdt, device);
  const at::Tensor gamma = bn_weight_or_ones(bn_weight, g.out_channels, sdt, device);
  const at::Tensor beta = bn_bias_or_zeros(bn_bias, g.out_channels, sdt, device);
  const at::Tensor k = gamma * invstd * s;

  at::Tensor sum_g, sum_g_xhat, grad_bias, grad_conv_out;
  if (g.count == 0) {  // nothing flows back: every gradient is zero
    sum_g = at::zeros({g.out_channels}, input.options().dtype(sdt));
    sum_g_xhat = at::zeros_like(sum_g);
    grad_bias = at::zeros_like(sum_g);
  } else {
    // x_hat from the recomputed conv output (both modes: grad_gamma needs it),
    // in the statistics dtype; for float32 / float64 the conv output buffer
    // itself is centred and scaled in place.
    at::Tensor xhat = conv_forward(input, weight, bias, conv, g.memory_format).to(sdt);
    xhat.sub_(per_channel_view(mean)).mul_(per_channel_view(invstd));
    const at::Tensor grad = grad_out.to(sdt);  // may alias grad_out: read only

    // The products g * x_hat go into `work`, which then becomes g_hat.
    at::Tensor work = at::empty_like(xhat);
    at::mul_out(work, grad, xhat);
    sum_g = per_channel_sum(grad);
    sum_g_xhat = per_channel_sum(work);
    const double inv_count = 1.0 / static_cast<double>(g.count);
    const bool need_grad_conv_out = input_weight_mask[0] || input_weight_mask[1];
    if (training) {
      const at::Tensor delta = per_channel_sum(xhat).mul_(inv_count);
      sum_g_xhat.sub_(delta * sum_g);
      grad_bias = at::zeros_like(sum_g);
      if (need_grad_conv_out) {
        const at::Tensor proj = sum_g_xhat * inv_count;  // sum(g * x_hat') / M
        at::mul_out(work, xhat, per_channel_view(proj));
        xhat.reset();
        at::sub_out(work, grad, work);
        // sum(g)/M - delta * proj: the per-channel constant of -g_hat / k
        work.sub_(per_channel_view(sum_g * inv_count - delta * proj)).mul_(per_channel_view(k));
      }
    } else {
      grad_bias = k * sum_g;
      if (need_grad_conv_out) {
        xhat.reset();
        at::mul_out(work, grad, per_channel_view(k));
      }
    }
    if (need_grad_conv_out) grad_conv_out = work.to(input.scalar_type());
  }

  at::Tensor grad_input, grad_weight;
  if (g.count == 0) {
    grad_input = input_weight_mask[0]
                     ? at::zeros(input.sizes(), input.options().memory_format(g.memory_format))
                     : at::empty({0}, input.options());
    grad_weight = input_weight_mask[1] ? at::zeros(weight.sizes(), weight.options())
                                       : at::empty({0}, weight.options());
  } else {
    std::tie(grad_input, grad_weight) =
        conv_backward(grad_conv_out, input, weight, conv, g.memory_format, input_weight_mask);
  }
  const at::Tensor grad_scale = (gamma * sum_g_xhat + beta * sum_g).sum();
  return {grad_input, grad_weight, grad_bias, s * sum_g_xhat, s * sum_g, grad_scale};
}

}  // namespace fused_conv::aten_impl
