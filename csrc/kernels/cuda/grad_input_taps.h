// grad_input of a stride-1 3x3 convolution by tap reuse: each value of the
// gradient at the conv output is multiplied by the weights of all nine taps at
// once, and the shifted per-tap products are summed from shared memory (the
// math and the tiling: docs/DESIGN.md, "Backward").
#pragma once

#include <ATen/core/Tensor.h>

namespace fused_conv::cuda {

// True when grad_input_taps covers the configuration: float32 NCHW, 3x3, stride
// 1, dilation 1, groups 1, padding 0..2 in each dimension, C_in <= 8,
// C_out <= 64 (the weights stay in shared memory next to the staged gradient
// and the per-tap products: 216 KB, so Hopper-class devices) and per-image sizes
// below 2^31 elements. Elsewhere the general tile kernel (grad_input_tile.cu) or
// cuDNN computes grad_input.
bool grad_input_taps_supports(const at::Tensor& input, const at::Tensor& weight,
                              at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t groups);

// The gradient of conv(input; weight) with respect to its input from
// grad_conv_out (the gradient at the conv output, float32), on the current
// stream. Requires grad_input_taps_supports.
at::Tensor grad_input_taps(const at::Tensor& grad_conv_out, const at::Tensor& input,
                           const at::Tensor& weight, at::IntArrayRef padding);

}  // namespace fused_conv::cuda
