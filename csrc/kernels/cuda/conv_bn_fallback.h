// The CUDA forwards outside the tile kernel's reach (tile_kernel_supports):
// cuDNN for the convolution, ATen for the output-sized reductions, and one
// launch each for the per-channel BatchNorm algebra (bn_fold_cuda.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "kernels/common/conv_bn_checks.h"

namespace fused_conv::cuda {

// Eval: conv(x; a*W) + a*(b - mean) + s*beta, the fold in one launch.
// `g` is check_eval_args' result.
at::Tensor fallback_conv_bn_eval(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& bn_weight,
                                 const std::optional<at::Tensor>& bn_bias,
                                 const at::Tensor& running_mean, const at::Tensor& running_var,
                                 double eps, const std::optional<at::Tensor>& scale_tensor,
                                 double scale, const ConvParams& conv, const ConvBnGeometry& g);

// Training: y = conv(x) + b into the output, Welford mean/invstd over (N, H, W)
// (at::batch_norm_stats), the affine in one launch, then out = a*y + d in place.
// Returns (out, mean, invstd) as the conv_bn_train op. `g` is check_train_args'.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fallback_conv_bn_train(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    double eps, const std::optional<at::Tensor>& scale_tensor, double scale, const ConvParams& conv,
    const ConvBnGeometry& g);

}  // namespace fused_conv::cuda
