// CUDA kernels of the fused_conv ops (schemas: csrc/bindings/op_schemas.cpp).
//
// Forwards: the tensor-core tile kernel (conv_bn_forward.h) where it covers
// the configuration (tile_kernel_supports: docs/DESIGN.md, "Dispatch"), else
// the fallback (conv_bn_fallback.h: fold + cuDNN for eval; cuDNN conv, ATen
// reductions and an in-place normalise for training).
// Running-statistics update: one CUDA launch (running_stats_update.cu).
// Backward: the tile kernel's reductions and gradient at the conv output, then
// cuDNN's convolution backward (conv_bn_backward.h), where the tile kernel
// covers the configuration; else the ATen path.
//
// The guard makes the input's device current, so ATen allocates on it and
// launches on its current stream (the tensors are all on that device: the
// argument checks enforce it).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "kernels/common/conv_bn_aten.h"
#include "kernels/common/conv_bn_checks.h"
#include "kernels/cuda/conv_bn_backward.h"
#include "kernels/cuda/conv_bn_fallback.h"
#include "kernels/cuda/conv_bn_forward.h"
#include "kernels/cuda/running_stats_update.h"

namespace fused_conv::cuda {
namespace {

// The device to make current: the tensor's when it is a CUDA tensor. A CPU
// input next to CUDA parameters also lands in these kernels (the dispatcher
// picks CUDA); then nothing is guarded and the argument checks report the
// device mismatch.
std::optional<at::Device> cuda_device_of(const at::Tensor& t) {
  if (t.defined() && t.is_cuda()) return t.device();
  return std::nullopt;
}

at::Tensor conv_bn_eval(const at::Tensor& input, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& bn_weight,
                        const std::optional<at::Tensor>& bn_bias, const at::Tensor& running_mean,
                        const at::Tensor& running_var, double eps,
                        const std::optional<at::Tensor>& scale_tensor, double scale,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                        int64_t groups) {
  const c10::cuda::OptionalCUDAGuard device_guard(cuda_device_of(input));
  const ConvParams conv{stride, padding, dilation, groups};
  const ConvBnGeometry g = check_eval_args(input, weight, bias, bn_weight, bn_bias, running_mean,
                                           running_var, eps, scale_tensor, conv);
  if (tile_kernel_supports(input, weight, stride, padding, dilation, groups)) {
    return tile_conv_bn_eval(input, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                             eps, scale_tensor, scale, stride, padding, dilation);
  }
  return fallback_conv_bn_eval(input, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                               eps, scale_tensor, scale, conv, g);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bn_train(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    double eps, const std::optional<at::Tensor>& scale_tensor, double scale, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const c10::cuda::OptionalCUDAGuard device_guard(cuda_device_of(input));
  const ConvParams conv{stride, padding, dilation, groups};
  const ConvBnGeometry g =
      check_train_args(input, weight, bias, bn_weight, bn_bias, eps, scale_tensor, conv);
  if (tile_kernel_supports(input, weight, stride, padding, dilation, groups)) {
    return tile_conv_bn_train(input, weight, bias, bn_weight, bn_bias, eps, scale_tensor, scale,
                              stride, padding, dilation);
  }
  return fallback_conv_bn_train(input, weight, bias, bn_weight, bn_bias, eps, scale_tensor, scale,
                                conv, g);
}

void update_running_stats_(const at::Tensor& running_mean, const at::Tensor& running_var,
                           const at::Tensor& mean, const at::Tensor& invstd,
                           const std::optional<at::Tensor>& num_batches_tracked,
                           std::optional<double> momentum, double eps, int64_t count) {
  // No input here: the batch statistics name the device.
  const c10::cuda::OptionalCUDAGuard device_guard(cuda_device_of(mean));
  update_running_stats_cuda(running_mean, running_var, mean, invstd, num_batches_tracked, momentum,
                            eps, count);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_backward(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const at::Tensor& mean, const at::Tensor& invstd,
    const std::optional<at::Tensor>& scale_tensor, double scale, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool training,
    std::array<bool, 2> input_weight_mask) {
  const c10::cuda::OptionalCUDAGuard device_guard(cuda_device_of(input));
  const ConvBnGeometry geometry =
      check_backward_args(grad_out, input, weight, bias, bn_weight, bn_bias, mean, invstd,
                          scale_tensor, {stride, padding, dilation, groups});
  if (geometry.stats_dtype == at::kFloat &&
      tile_kernel_supports(input, weight, stride, padding, dilation, groups)) {
    return tile_conv_bn_backward(grad_out, input, weight, bias, bn_weight, bn_bias, mean, invstd,
                                 scale_tensor, scale, stride, padding, dilation, training,
                                 input_weight_mask);
  }
  return aten_impl::conv_bn_backward(grad_out, input, weight, bias, bn_weight, bn_bias, mean,
                                     invstd, scale_tensor, scale, stride, padding, dilation, groups,
                                     training, input_weight_mask);
}

}  // namespace
}  // namespace fused_conv::cuda

TORCH_LIBRARY_IMPL(fused_conv, CUDA, m) {
  m.impl("conv_bn_eval", TORCH_FN(fused_conv::cuda::conv_bn_eval));
  m.impl("conv_bn_train", TORCH_FN(fused_conv::cuda::conv_bn_train));
  m.impl("update_running_stats_", TORCH_FN(fused_conv::cuda::update_running_stats_));
  m.impl("conv_bn_backward", TORCH_FN(fused_conv::cuda::conv_bn_backward));
}
