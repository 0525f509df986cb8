// at::convolution / at::convolution_backward with the memory formats of the
// contract: the output and grad_input in the input's suggested format,
// grad_weight contiguous.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <utility>

#include "kernels/common/conv_bn_checks.h"

namespace fused_conv {

// conv(input; weight) + bias, in `memory_format`. The weight is laid out in
// that format first: backends pick channels_last output when either the input
// or the weight is channels_last (cuDNN, oneDNN), and a [C_out, C_in/g, kh, kw]
// copy is cheap next to an output-sized one.
at::Tensor conv_forward(const at::Tensor& input, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const ConvParams& conv,
                        at::MemoryFormat memory_format);

// Gradients of conv(input; weight) given the gradient of its output, for the
// entries of `input_weight_mask`; a masked-out gradient is an empty [0]
// tensor. grad_input is in `memory_format`, grad_weight contiguous.
std::pair<at::Tensor, at::Tensor> conv_backward(const at::Tensor& grad_conv_out,
                                                const at::Tensor& input, const at::Tensor& weight,
                                                const ConvParams& conv,
                                                at::MemoryFormat memory_format,
                                                std::array<bool, 2> input_weight_mask);

}  // namespace fused_conv
