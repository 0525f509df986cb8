// Per-channel algebra of BatchNorm + scale, as small tensors on the input's
// device (no host reads, so no device synchronisation):
//
//   out = s * (gamma * (y - mean) * invstd + beta)
//       = a * (y - mean) + s * beta          a = s * gamma * invstd
//       = a * y + d                          d = s * beta - a * mean
//
// with y = conv(x) + b, s = scale * scale_tensor (or scale), gamma = 1 and
// beta = 0 when the BN is not affine.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fused_conv {

// s as a 0-dim tensor of `stats_dtype` on `device`: scale * scale_tensor when
// scale_tensor is given (any floating dtype, one element), else scale.
at::Tensor effective_scale(const std::optional<at::Tensor>& scale_tensor, double scale,
                           at::ScalarType stats_dtype, at::Device device);

// gamma / beta in `stats_dtype`: the given tensor (cast), or ones / zeros.
at::Tensor bn_weight_or_ones(const std::optional<at::Tensor>& bn_weight, int64_t channels,
                             at::ScalarType stats_dtype, at::Device device);
at::Tensor bn_bias_or_zeros(const std::optional<at::Tensor>& bn_bias, int64_t channels,
                            at::ScalarType stats_dtype, at::Device device);

// 1 / sqrt(var + eps) in `stats_dtype` (var may be float16 / bfloat16 / float32
// running statistics).
at::Tensor invstd_from_var(const at::Tensor& var, double eps, at::ScalarType stats_dtype);

// The affine map the BN + scale applies per channel, all [C] in the dtype of
// `mean` (the statistics dtype).
struct BnScaleAffine {
  at::Tensor a;            // s * gamma * invstd
  at::Tensor d;            // s * beta - a * mean
  at::Tensor scaled_beta;  // s * beta
};

BnScaleAffine bn_scale_affine(const at::Tensor& mean, const at::Tensor& invstd,
                              const std::optional<at::Tensor>& bn_weight,
                              const std::optional<at::Tensor>& bn_bias, const at::Tensor& s);

// Eval folding: conv(x; weight', bias') == out for fixed statistics, with
//   weight'[o] = a[o] * weight[o]
//   bias'[o]   = a[o] * (b[o] - mean[o]) + s * beta[o]
// (the subtraction b - mean happens before scaling by a, so a large |mean| is
// not cancelled after the rounding of a product). Both are computed in the
// statistics dtype and rounded once to the input dtype; weight' is laid out
// in `memory_format` so the convolution keeps the output format.
struct FoldedConv {
  at::Tensor weight;
  at::Tensor bias;
};

FoldedConv fold_into_conv(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const at::Tensor& mean, const BnScaleAffine& affine,
                          at::MemoryFormat memory_format);

// Views a [C] tensor as [1, C, 1, 1] to broadcast over an NCHW-shaped tensor.
at::Tensor per_channel_view(const at::Tensor& t);

}  // namespace fused_conv
