// Fused CUDA backward of conv -> BatchNorm -> scale, built on the tile kernel.
// Callers check tile_kernel_supports() (conv_bn_forward.h) and a float32
// statistics dtype first, and use the ATen path otherwise.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

namespace fused_conv::cuda {

// Same contract as the conv_bn_backward op (csrc/bindings/op_schemas.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
tile_conv_bn_backward(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& bn_weight,
                      const std::optional<at::Tensor>& bn_bias, const at::Tensor& mean,
                      const at::Tensor& invstd, const std::optional<at::Tensor>& scale_tensor,
                      double scale, at::IntArrayRef stride, at::IntArrayRef padding,
                      at::IntArrayRef dilation, bool training,
                      std::array<bool, 2> input_weight_mask);

}  // namespace fused_conv::cuda
