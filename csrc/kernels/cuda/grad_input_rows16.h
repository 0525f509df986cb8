// grad_input of a stride-1 convolution from a float16 / bfloat16 channels_last
// gradient at its output, on Hopper's warpgroup MMAs (grad_input_rows16.cu):
// the backward's data gradient where cuDNN's took 4-5x its memory time.
#pragma once

#include <ATen/core/Tensor.h>

namespace fused_conv::cuda {

// True when grad_input_rows16 covers the configuration: an sm_90a build on a
// compute capability 9 device, float16 / bfloat16, channels_last input and
// gradient (16-byte aligned), groups 1, stride 1, dilation 1, padding <= k - 1,
// C_in % 8 == 0, C_out % 16 == 0, input width >= 64, and the weights and the
// gradient's row ring within the shared memory budget. Off with
// FUSED_CONV_FORWARD_KERNEL=tile, like the other 16-bit row-kernel passes.
bool grad_input_rows16_supports(const at::Tensor& grad_conv_out, const at::Tensor& input,
                                const at::Tensor& weight, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// The gradient of conv(input; weight) with respect to its input, given
// grad_conv_out (channels_last, the input's dtype), on the current stream: a
// new channels_last tensor of the input's shape and dtype. The weight may have
// any strides (staged by them). Requires grad_input_rows16_supports.
at::Tensor grad_input_rows16(const at::Tensor& grad_conv_out, const at::Tensor& input,
                             const at::Tensor& weight, at::IntArrayRef padding);

}  // namespace fused_conv::cuda
