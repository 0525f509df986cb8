#include "kernels/common/conv_call.h"

#include <ATen/ATen.h>

namespace fused_conv {
namespace {

constexpr std::array<int64_t, 2> kNoOutputPadding{0, 0};

}  // namespace

at::Tensor conv_forward(const at::Tensor& input, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const ConvParams& conv,
                        at::MemoryFormat memory_format) {
  const at::Tensor out =
      at::convolution(input, weight.contiguous(memory_format), bias, conv.stride, conv.padding,
                      conv.dilation, /*transposed=*/false, kNoOutputPadding, conv.groups);
  // A no-op unless a backend chose another layout (e.g. one without
  // channels_last support).
  return out.contiguous(memory_format);
}

std::pair<at::Tensor, at::Tensor> conv_backward(const at::Tensor& grad_conv_out,
                                                const at::Tensor& input, const at::Tensor& weight,
                                                const ConvParams& conv,
                                                at::MemoryFormat memory_format,
                                                std::array<bool, 2> input_weight_mask) {
  const auto [want_input, want_weight] = input_weight_mask;
  at::Tensor grad_input, grad_weight;
  if (want_input || want_weight) {
    std::tie(grad_input, grad_weight, std::ignore) = at::convolution_backward(
        grad_conv_out, input, weight.contiguous(memory_format), /*bias_sizes=*/std::nullopt,
        conv.stride, conv.padding, conv.dilation, /*transposed=*/false, kNoOutputPadding,
        conv.groups, {want_input, want_weight, false});
  }
  grad_input = want_input ? grad_input.contiguous(memory_format) : at::empty({0}, input.options());
  grad_weight = want_weight ? grad_weight.contiguous() : at::empty({0}, weight.options());
  return {std::move(grad_input), std::move(grad_weight)};
}

}  // namespace fused_conv
