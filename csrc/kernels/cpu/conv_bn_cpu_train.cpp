// CPU training forward: y = conv(x) + b into the output buffer (oneDNN), then
// two deterministic statistics passes and one in-place normalisation pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cmath>

#include "kernels/common/conv_bn_aten.h"
#include "kernels/common/conv_bn_checks.h"
#include "kernels/common/conv_call.h"
#include "kernels/cpu/batch_moments.h"
#include "kernels/cpu/channel_affine.h"
#include "kernels/cpu/conv_bn_cpu.h"
#include "kernels/cpu/host_bn_params.h"
#include "kernels/cpu/host_vectors.h"

namespace fused_conv::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bn_train(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    double eps, const std::optional<at::Tensor>& scale_tensor, double scale, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvParams conv{stride, padding, dilation, groups};
  const ConvBnGeometry g =
      check_train_args(input, weight, bias, bn_weight, bn_bias, eps, scale_tensor, conv);
  const auto dtype = input.scalar_type();
  if (g.count == 0 || (dtype != at::kFloat && dtype != at::kDouble)) {
    // Empty batches, and float16 / bfloat16 (upcast reductions), as ATen does them.
    return aten_impl::conv_bn_train(input, weight, bias, bn_weight, bn_bias, eps, scale_tensor,
                                    scale, stride, padding, dilation, groups);
  }

  at::Tensor out = conv_forward(input, weight, bias, conv, g.memory_format);
  const DenseChannels d = dense_channels_of(out);
  const HostBnParams bn = host_bn_params(bn_weight, bn_bias, scale_tensor, scale, d.channels);

  ChannelMoments moments;
  AT_DISPATCH_FLOATING_TYPES(dtype, "fused_conv_cpu_conv_bn_train", [&] {
    moments = channel_moments<scalar_t>(out.const_data_ptr<scalar_t>(), d);
  });
  std::vector<double> invstd(d.channels), mul(d.channels), add(d.channels);
  for (int64_t c = 0; c < d.channels; ++c) {
    invstd[c] = 1.0 / std::sqrt(moments.var[c] + eps);
    mul[c] = bn.scale * bn.gamma[c] * invstd[c];
    add[c] = bn.scale * bn.beta[c];
  }
  AT_DISPATCH_FLOATING_TYPES(dtype, "fused_conv_cpu_conv_bn_train", [&] {
    const ChannelAffine<scalar_t> affine{cast_to<scalar_t>(moments.mean), cast_to<scalar_t>(mul),
                                         cast_to<scalar_t>(add)};
    apply_channel_affine_(out.mutable_data_ptr<scalar_t>(), d, affine);
  });
  return {out, from_host_doubles(moments.mean, g.stats_dtype),
          from_host_doubles(invstd, g.stats_dtype)};
}

}  // namespace fused_conv::cpu
