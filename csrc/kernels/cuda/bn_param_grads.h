// The backward's per-channel work before and after its passes over the data,
// one launch each. As ATen ops it was five launches before pass 1 and seven
// after the last pass; on the 16-bit step the host issued the first five while
// the GPU sat idle between the forward and the backward (benchmarks/NOTES.md,
// "Host side of the 16-bit step").
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fused_conv::cuda {

// Offsets into backward_channel_coefs' result, for C channels.
struct ChannelCoefs {
  at::Tensor all;     // float32 [2C + 1]: ctr, k, then s = scale * scale_tensor (or scale)
  at::Tensor center;  // [C] view: ctr = mean - bias (mean alone without a bias)
  at::Tensor k;       // [C] view: k = s * gamma * invstd
};

// mean / invstd: float32 [C]; bias (the conv's, any dtype), bn_weight (gamma)
// and scale_tensor may be absent; gamma = 1 then.
ChannelCoefs backward_channel_coefs(const at::Tensor& mean, const at::Tensor& invstd,
                                    const std::optional<at::Tensor>& bias,
                                    const std::optional<at::Tensor>& bn_weight,
                                    const std::optional<at::Tensor>& scale_tensor, double scale);

// From rows (the backward's [kGradRows, C] sums, grad_coefficients.cuh) and the
// coefficients, all float32:
//   grad_bias      = k * sum g in eval; 0 in training (the batch mean absorbs b)
//   grad_bn_weight = s * sum g*x_hat
//   grad_bn_bias   = s * sum g
//   grad_scale     = sum over channels of gamma * sum g*x_hat + beta * sum g
// (0-dim; summed in float64 in a fixed order).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_param_grads(
    const at::Tensor& rows, const ChannelCoefs& coefs, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, bool training);

}  // namespace fused_conv::cuda
