// The fallback paths' per-channel BatchNorm + scale algebra (the math:
// kernels/common/bn_fold.h), one CUDA launch each. The ATen formulation takes
// 10-15 small launches, whose host-side cost dominated the fallback's time on
// small convolutions (benchmarks/NOTES.md).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "kernels/common/bn_fold.h"

namespace fused_conv::cuda {

// weight' = a*weight (laid out in memory_format) and bias' = a*(b - mean) + s*beta
// with a = s*gamma/sqrt(var + eps), computed in stats_dtype (float32, or
// float64 for float64 inputs) and rounded once to the weight's dtype.
// Arguments as checked by check_eval_args.
FoldedConv fold_into_conv_cuda(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& bn_weight,
                               const std::optional<at::Tensor>& bn_bias,
                               const at::Tensor& running_mean, const at::Tensor& running_var,
                               double eps, const std::optional<at::Tensor>& scale_tensor,
                               double scale, at::ScalarType stats_dtype,
                               at::MemoryFormat memory_format);

// From batch statistics (training): the affine a = s*gamma*invstd,
// d = s*beta - a*mean, both [C] in mean's dtype.
struct BatchAffine {
  at::Tensor a, d;
};
BatchAffine batch_affine_cuda(const at::Tensor& mean, const at::Tensor& invstd,
                              const std::optional<at::Tensor>& bn_weight,
                              const std::optional<at::Tensor>& bn_bias,
                              const std::optional<at::Tensor>& scale_tensor, double scale);

}  // namespace fused_conv::cuda
