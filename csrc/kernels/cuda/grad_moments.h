// The backward's per-channel sums and weight gradient from moments of the
// input patches, without recomputing the convolution (the math:
// docs/DESIGN.md, "Backward").
#pragma once

#include <ATen/core/Tensor.h>

#include <utility>

namespace fused_conv::cuda {

// True when grad_moments covers the configuration: float32 NCHW, 3x3, stride 1,
// dilation 1, groups 1, padding 0..2, C_in <= 8, C_out <= 64, per-image sizes
// below 2^31 elements, and a few input rows of every channel fit in shared
// memory next to a 128-pixel tile of grad_out (Hopper-class devices; very wide
// images do not fit).
bool grad_moments_supports(const at::Tensor& input, const at::Tensor& weight,
                           at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t groups);

// One pass over grad_out (g, float32) and the input x: with X the patch matrix
// of x (zero padding) shifted per input channel, the sums sum g, sum g*X and
// (in training) sum X and sum X X^T, reduced in float64 in a fixed order. From
// them, with the saved statistics (center = mean - conv bias, invstd) and
// k = scale*gamma*invstd per channel:
//   first  = the [kGradRows, C_out] float32 rows of grad_coefficients.cuh;
//   second = grad_weight (float32, the weight's shape) if want_weight_grad,
//            else undefined.
// On the current stream; requires grad_moments_supports.
std::pair<at::Tensor, at::Tensor> grad_moments(const at::Tensor& grad_out, const at::Tensor& input,
                                               const at::Tensor& weight, const at::Tensor& center,
                                               const at::Tensor& invstd, const at::Tensor& k,
                                               at::IntArrayRef padding, bool training,
                                               bool want_weight_grad);

}  // namespace fused_conv::cuda
