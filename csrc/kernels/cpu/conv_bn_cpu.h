// The CPU kernels of conv_bn_train and conv_bn_backward: at::convolution
// (oneDNN) for the convolution and its backward, and this directory's own
// deterministic per-channel loops for everything BatchNorm. conv_bn_eval and
// update_running_stats_ use the ATen implementation as it is (one folded
// convolution; C_out-sized work). float16 / bfloat16 inputs go to the ATen
// implementation too (its reductions upcast).
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

namespace fused_conv::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bn_train(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    double eps, const std::optional<at::Tensor>& scale_tensor, double scale, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_backward(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const at::Tensor& mean, const at::Tensor& invstd,
    const std::optional<at::Tensor>& scale_tensor, double scale, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool training,
    std::array<bool, 2> input_weight_mask);

}  // namespace fused_conv::cpu
