#include "kernels/cuda/bn_param_grads.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/cuda/dependent_launch.cuh"
#include "kernels/cuda/grad_coefficients.cuh"

namespace fused_conv::cuda {
namespace {

constexpr int kThreads = 256;

// A per-channel parameter as the kernels read it: any floating dtype, any
// stride, or absent (then the caller's default). Reading the dtype at run time
// keeps one kernel for every mix of parameter dtypes the op accepts.
enum class ParamType : int { kAbsent, kFloat, kDouble, kHalf, kBFloat16 };

struct ParamView {
  const void* data = nullptr;
  ParamType type = ParamType::kAbsent;
  int64_t stride = 0;
};

ParamView param_view(const std::optional<at::Tensor>& t) {
  ParamView v;
  if (!t.has_value() || !t->defined()) return v;
  switch (t->scalar_type()) {
    case at::kFloat:
      v.type = ParamType::kFloat;
      break;
    case at::kDouble:
      v.type = ParamType::kDouble;
      break;
    case at::kHalf:
      v.type = ParamType::kHalf;
      break;
    case at::kBFloat16:
      v.type = ParamType::kBFloat16;
      break;
    default:
      TORCH_INTERNAL_ASSERT(false, "fused_conv: unexpected parameter dtype ", t->scalar_type());
  }
  v.data = t->const_data_ptr();
  // A scale_tensor has one element (any shape); a per-channel tensor is 1-D.
  v.stride = t->dim() == 1 ? t->stride(0) : 0;
  return v;
}

__device__ __forceinline__ float load(const ParamView& p, int64_t i, float absent) {
  const int64_t at = i * p.stride;
  switch (p.type) {
    case ParamType::kFloat:
      return static_cast<const float*>(p.data)[at];
    case ParamType::kDouble:
      return static_cast<float>(static_cast<const double*>(p.data)[at]);
    case ParamType::kHalf:
      return __half2float(static_cast<const __half*>(p.data)[at]);
    case ParamType::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p.data)[at]);
    default:
      return absent;
  }
}

// One block. The float32 arithmetic matches the ATen ops it replaces:
// s = float(scale_tensor) * float(scale), k = (gamma * invstd) * s.
__global__ void channel_coefs_kernel(int64_t channels, const float* __restrict__ mean,
                                     const float* __restrict__ invstd, ParamView bias,
                                     ParamView gamma, ParamView scale_tensor, float scale,
                                     float* __restrict__ coefs) {
  const float s =
      scale_tensor.type == ParamType::kAbsent ? scale : load(scale_tensor, 0, 1.0f) * scale;
  for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) {
    coefs[c] = bias.type == ParamType::kAbsent ? mean[c] : mean[c] - load(bias, c, 0.0f);
    coefs[channels + c] = load(gamma, c, 1.0f) * invstd[c] * s;
  }
  if (threadIdx.x == 0) coefs[2 * channels] = s;
}

// One block: per-channel products, then grad_scale as a fixed-order float64
// tree over the threads' partial sums (bitwise reproducible).
__global__ void param_grads_kernel(int64_t channels, const float* __restrict__ rows,
                                   const float* __restrict__ coefs, ParamView gamma, ParamView beta,
                                   bool training, float* __restrict__ grad_bias,
                                   float* __restrict__ grad_bn_weight,
                                   float* __restrict__ grad_bn_bias,
                                   float* __restrict__ grad_scale) {
  // Launched as a dependent of the backward's last pass (dependent_launch.cuh).
  wait_for_previous_kernel();
  __shared__ double partial[kThreads];
  const float* sum_g = rows + kSumG * channels;
  const float* sum_g_xhat = rows + kSumGXhat * channels;
  const float* k = coefs + channels;
  const float s = coefs[2 * channels];
  double acc = 0;
  for (int64_t c = threadIdx.x; c < channels; c += kThreads) {
    grad_bias[c] = training ? 0.0f : k[c] * sum_g[c];
    grad_bn_weight[c] = s * sum_g_xhat[c];
    grad_bn_bias[c] = s * sum_g[c];
    acc += static_cast<double>(load(gamma, c, 1.0f)) * sum_g_xhat[c] +
           static_cast<double>(load(beta, c, 0.0f)) * sum_g[c];
  }
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) *grad_scale = static_cast<float>(partial[0]);
}

void check_stats(const at::Tensor& t, int64_t channels, const char* name) {
  TORCH_CHECK(
      t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == channels && t.is_contiguous(),
      "fused_conv: expected ", name, " as a contiguous float32 [", channels, "] tensor, but got ",
      t.scalar_type(), " ", t.sizes());
}

}  // namespace

ChannelCoefs backward_channel_coefs(const at::Tensor& mean, const at::Tensor& invstd,
                                    const std::optional<at::Tensor>& bias,
                                    const std::optional<at::Tensor>& bn_weight,
                                    const std::optional<at::Tensor>& scale_tensor, double scale) {
  const int64_t channels = mean.numel();
  check_stats(mean, channels, "mean");
  check_stats(invstd, channels, "invstd");
  ChannelCoefs out;
  out.all = at::empty({2 * channels + 1}, mean.options());
  channel_coefs_kernel<<<1, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      channels, mean.const_data_ptr<float>(), invstd.const_data_ptr<float>(), param_view(bias),
      param_view(bn_weight), param_view(scale_tensor), static_cast<float>(scale),
      out.all.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  out.center = out.all.narrow(0, 0, channels);
  out.k = out.all.narrow(0, channels, channels);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_param_grads(
    const at::Tensor& rows, const ChannelCoefs& coefs, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, bool training) {
  const int64_t channels = coefs.k.numel();
  TORCH_INTERNAL_ASSERT(rows.scalar_type() == at::kFloat && rows.is_contiguous() &&
                        rows.size(0) >= kGradRows && rows.size(1) == channels);
  const auto options = rows.options();
  at::Tensor grad_bias = at::empty({channels}, options);
  at::Tensor grad_bn_weight = at::empty({channels}, options);
  at::Tensor grad_bn_bias = at::empty({channels}, options);
  at::Tensor grad_scale = at::empty({}, options);
  launch_kernel(/*dependent=*/true, param_grads_kernel, 1, kThreads, 0,
                c10::cuda::getCurrentCUDAStream(), channels, rows.const_data_ptr<float>(),
                coefs.all.const_data_ptr<float>(), param_view(bn_weight), param_view(bn_bias),
                training, grad_bias.mutable_data_ptr<float>(),
                grad_bn_weight.mutable_data_ptr<float>(), grad_bn_bias.mutable_data_ptr<float>(),
                grad_scale.mutable_data_ptr<float>());
  return {grad_bias, grad_bn_weight, grad_bn_bias, grad_scale};
}

}  // namespace fused_conv::cuda
