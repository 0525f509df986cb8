// grad_input of a stride-1 convolution from the gradient at its output, on the
// tile kernel (the math and the dispatch: docs/DESIGN.md, "Backward").
#pragma once

#include <ATen/core/Tensor.h>

namespace fused_conv::cuda {

// True when tile_grad_input covers the configuration: float32, stride 1,
// groups 1, padding <= dilation*(k - 1) in both dimensions, per-image sizes
// below 2^31 elements and a shared-memory footprint within budget. Otherwise
// cuDNN's convolution backward (data) computes grad_input.
bool grad_input_tile_supports(const at::Tensor& input, const at::Tensor& weight,
                              at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t groups);

// The gradient of conv(input; weight) with respect to its input, given
// grad_conv_out (the gradient at the conv output, in the input's memory format)
// on the current stream; in the input's dtype and memory format.
// Requires grad_input_tile_supports.
at::Tensor tile_grad_input(const at::Tensor& grad_conv_out, const at::Tensor& input,
                           const at::Tensor& weight, at::IntArrayRef padding,
                           at::IntArrayRef dilation);

}  // namespace fused_conv::cuda
