// The four fused_conv ops built only from ATen calls, so they run on any
// device ATen supports. They are the CUDA kernels until the fast kernels of
// csrc/kernels/cuda/*.cu take over, and then the fallback those kernels
// dispatch to outside their reach; the CPU kernels use the eval forward and
// the running-statistics update as they are.
//
// Each function has the signature of its op (csrc/bindings/op_schemas.cpp),
// validates its arguments (kernels/common/conv_bn_checks.h), runs on the
// current stream of the tensors' device (the caller sets the device guard),
// and never reads device memory from the host (no synchronisation).
// Statistics are accumulated in float32 (float64 for float64 inputs).
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

namespace fused_conv::aten_impl {

// out = s * (gamma * (conv(x) + b - running_mean) / sqrt(running_var + eps) + beta),
// as one convolution with BN and scale folded into its weight and bias.
at::Tensor conv_bn_eval(const at::Tensor& input, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& bn_weight,
                        const std::optional<at::Tensor>& bn_bias, const at::Tensor& running_mean,
                        const at::Tensor& running_var, double eps,
                        const std::optional<at::Tensor>& scale_tensor, double scale,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                        int64_t groups);

// Batch statistics over N * H_out * W_out (biased variance). Returns
// (out, mean, invstd); mean includes the conv bias.
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bn_train(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    double eps, const std::optional<at::Tensor>& scale_tensor, double scale, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// nn.BatchNorm2d's running-statistics update, in place (C_out-sized work).
void update_running_stats_(const at::Tensor& running_mean, const at::Tensor& running_var,
                           const at::Tensor& mean, const at::Tensor& invstd,
                           const std::optional<at::Tensor>& num_batches_tracked,
                           std::optional<double> momentum, double eps, int64_t count);

// Returns (grad_input, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias,
// grad_scale); see the schema's comment for which are empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_backward(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const at::Tensor& mean, const at::Tensor& invstd,
    const std::optional<at::Tensor>& scale_tensor, double scale, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool training,
    std::array<bool, 2> input_weight_mask);

}  // namespace fused_conv::aten_impl
