// Argument checks shared by every device's kernels, and the convolution
// geometry they derive. Each op's kernel calls its check_*_args first, so a
// direct torch.ops.fused_conv.* call gets the same errors on every device.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>
#include <c10/core/ScalarType.h>

#include <array>
#include <optional>

namespace fused_conv {

// The convolution hyper-parameters exactly as the ops receive them (views of
// the op's arguments: valid for the duration of the call).
struct ConvParams {
  at::IntArrayRef stride;
  at::IntArrayRef padding;
  at::IntArrayRef dilation;
  int64_t groups;
};

// What the checks derive from the arguments.
struct ConvBnGeometry {
  int64_t batch = 0;         // N
  int64_t in_channels = 0;   // C_in
  int64_t out_channels = 0;  // C_out
  int64_t groups = 1;
  int64_t out_height = 0;  // H_out
  int64_t out_width = 0;   // W_out
  // Values per channel that the BN statistics run over: N * H_out * W_out.
  int64_t count = 0;
  // float32, or float64 for float64 inputs (see stats_dtype_for).
  at::ScalarType stats_dtype = at::kFloat;
  // Of the output (and of grad_input): channels_last when the input suggests it.
  at::MemoryFormat memory_format = at::MemoryFormat::Contiguous;

  std::array<int64_t, 4> output_sizes() const {
    return {batch, out_channels, out_height, out_width};
  }
};

// The dtype of the statistics, per-channel gradients and grad_scale.
at::ScalarType stats_dtype_for(at::ScalarType input_dtype);

// conv_bn_eval: input/weight/bias, BN parameters, scale_tensor, geometry, and
// the running statistics.
ConvBnGeometry check_eval_args(const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& bn_weight,
                               const std::optional<at::Tensor>& bn_bias,
                               const at::Tensor& running_mean, const at::Tensor& running_var,
                               double eps, const std::optional<at::Tensor>& scale_tensor,
                               const ConvParams& conv);

// conv_bn_train: as eval without running statistics, plus "more than one
// value per channel" (the batch variance of a single value is 0 and the
// normalised output would be meaningless; PyTorch refuses it too).
ConvBnGeometry check_train_args(const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& bn_weight,
                                const std::optional<at::Tensor>& bn_bias, double eps,
                                const std::optional<at::Tensor>& scale_tensor,
                                const ConvParams& conv);

// conv_bn_backward: as the forwards, plus grad_out of the output's shape and
// dtype, and mean / invstd ([C_out], statistics dtype).
ConvBnGeometry check_backward_args(const at::Tensor& grad_out, const at::Tensor& input,
                                   const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                   const std::optional<at::Tensor>& bn_weight,
                                   const std::optional<at::Tensor>& bn_bias, const at::Tensor& mean,
                                   const at::Tensor& invstd,
                                   const std::optional<at::Tensor>& scale_tensor,
                                   const ConvParams& conv);

// update_running_stats_: buffers and statistics 1-D of one length on one
// device, a factor source (momentum or num_batches_tracked), count 0 or > 1.
void check_update_running_stats_args(const at::Tensor& running_mean, const at::Tensor& running_var,
                                     const at::Tensor& mean, const at::Tensor& invstd,
                                     const std::optional<at::Tensor>& num_batches_tracked,
                                     std::optional<double> momentum, double eps, int64_t count);

}  // namespace fused_conv
