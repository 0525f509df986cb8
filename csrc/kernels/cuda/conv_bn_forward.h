// Fused CUDA forwards built on the tensor-core tile kernel (conv_tile_kernel.cuh)
// and, for stride-1 shapes on Hopper, the row kernels (conv_rows.h: float32;
// conv_rows16.h: float16 / bfloat16 channels_last).
// Callers check tile_kernel_supports() first and use the ATen path otherwise.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fused_conv::cuda {

// True when the tile kernel covers the configuration: groups == 1, float32 /
// float16 / bfloat16, C_in <= 32, C_in*kh*kw <= 160, a non-empty output and a
// shared-memory footprint within budget.
bool tile_kernel_supports(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// True when, within the tile kernel's reach, the training forward's statistics
// pass takes the Hopper row kernel instead (conv_rows.h): float32, stride
// 1, W_out >= 64, C_out > 32, sm_90a.
bool rows_stats_supports(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// True when, within the tile kernel's reach, both forward passes take the
// 16-bit Hopper row kernel (conv_rows16.h): float16 / bfloat16 channels_last,
// stride 1, C_in and C_out multiples of 8, W_out >= 64, sm_90a.
bool rows16_supports(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

at::Tensor tile_conv_bn_eval(const at::Tensor& input, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& bn_weight,
                             const std::optional<at::Tensor>& bn_bias,
                             const at::Tensor& running_mean, const at::Tensor& running_var,
                             double eps, const std::optional<at::Tensor>& scale_tensor,
                             double scale, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation);

// Returns (out, mean, invstd) in float32; mean includes the conv bias.
std::tuple<at::Tensor, at::Tensor, at::Tensor> tile_conv_bn_train(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    double eps, const std::optional<at::Tensor>& scale_tensor, double scale, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation);

}  // namespace fused_conv::cuda
