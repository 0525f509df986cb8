// One launch for the eval fold (declaration and math: bn_fold_cuda.h).
#include "kernels/cuda/bn_fold_cuda.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <array>

namespace fused_conv::cuda {
namespace {

// Per-channel inputs in the statistics dtype S; null = absent (gamma 1, beta 0,
// bias 0, scale_tensor 1).
template <typename S>
struct ChannelParams {
  const S* bias;
  const S* gamma;
  const S* beta;
  const S* mean;
  const S* var;     // eval: running variance
  const S* invstd;  // training: batch 1/sqrt(var + eps)
  const S* scale_tensor;
  double scale, eps;
};

// Strides of a [C_out, C_in/g, kh, kw] weight, in elements.
struct WeightStrides {
  std::array<int64_t, 4> s;
};

// One thread per weight element (grid-stride): a is recomputed per element,
// which is cheaper than a second launch; the element with r == 0 of each
// output channel also writes its bias.
template <typename W, typename S>
__global__ void fold_bn_kernel(const W* __restrict__ weight, WeightStrides src, WeightStrides dst,
                               int64_t c_out, int64_t c_in, int64_t kh, int64_t kw,
                               ChannelParams<S> p, W* __restrict__ weight_out,
                               W* __restrict__ bias_out) {
  const int64_t per_out = c_in * kh * kw;
  const int64_t total = c_out * per_out;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = i / per_out, r = i % per_out;
    const int64_t ci = r / (kh * kw), q = r % (kh * kw);
    const int64_t kr = q / kw, kq = q % kw;
    const S s = static_cast<S>(p.scale) * (p.scale_tensor ? p.scale_tensor[0] : S(1));
    const S invstd = S(1) / sqrt(p.var[o] + static_cast<S>(p.eps));
    const S a = (p.gamma ? p.gamma[o] : S(1)) * invstd * s;
    const int64_t from = o * src.s[0] + ci * src.s[1] + kr * src.s[2] + kq * src.s[3];
    const int64_t to = o * dst.s[0] + ci * dst.s[1] + kr * dst.s[2] + kq * dst.s[3];
    weight_out[to] = static_cast<W>(static_cast<S>(weight[from]) * a);
    if (r == 0) {
      const S centred = (p.bias ? p.bias[o] : S(0)) - p.mean[o];
      const S scaled_beta = s * (p.beta ? p.beta[o] : S(0));
      bias_out[o] = static_cast<W>(scaled_beta + a * centred);
    }
  }
}

template <typename S>
__global__ void batch_affine_kernel(int64_t channels, ChannelParams<S> p, S* __restrict__ a,
                                    S* __restrict__ d) {
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < channels;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const S s = static_cast<S>(p.scale) * (p.scale_tensor ? p.scale_tensor[0] : S(1));
    const S ac = (p.gamma ? p.gamma[c] : S(1)) * p.invstd[c] * s;
    a[c] = ac;
    d[c] = s * (p.beta ? p.beta[c] : S(0)) - ac * p.mean[c];
  }
}

// The tensor in the statistics dtype, contiguous (no copy when it already is).
at::Tensor as_stats(const at::Tensor& t, at::ScalarType stats_dtype) {
  return t.to(stats_dtype).contiguous();
}

template <typename S>
const S* ptr_of(const std::optional<at::Tensor>& t, at::Tensor& keep, at::ScalarType stats_dtype) {
  if (!t.has_value() || !t->defined()) return nullptr;
  keep = as_stats(*t, stats_dtype);
  return keep.const_data_ptr<S>();
}

WeightStrides strides_of(const at::Tensor& t) {
  return {{t.stride(0), t.stride(1), t.stride(2), t.stride(3)}};
}

}  // namespace

BatchAffine batch_affine_cuda(const at::Tensor& mean, const at::Tensor& invstd,
                              const std::optional<at::Tensor>& bn_weight,
                              const std::optional<at::Tensor>& bn_bias,
                              const std::optional<at::Tensor>& scale_tensor, double scale) {
  const at::ScalarType stats_dtype = mean.scalar_type();
  const int64_t channels = mean.numel();
  BatchAffine out{at::empty_like(mean), at::empty_like(mean)};
  if (channels == 0) return out;
  constexpr int kBlock = 256;
  const int64_t blocks = std::min<int64_t>((channels + kBlock - 1) / kBlock, 65535);
  at::Tensor keep[5];
  AT_DISPATCH_FLOATING_TYPES(stats_dtype, "batch_affine", [&] {
    using S = scalar_t;
    ChannelParams<S> p{};
    p.gamma = ptr_of<S>(bn_weight, keep[0], stats_dtype);
    p.beta = ptr_of<S>(bn_bias, keep[1], stats_dtype);
    keep[2] = as_stats(mean, stats_dtype);
    p.mean = keep[2].const_data_ptr<S>();
    keep[3] = as_stats(invstd, stats_dtype);
    p.invstd = keep[3].const_data_ptr<S>();
    if (scale_tensor.has_value() && scale_tensor->defined()) {
      keep[4] = as_stats(scale_tensor->reshape({-1}), stats_dtype);
      p.scale_tensor = keep[4].const_data_ptr<S>();
    }
    p.scale = scale;
    batch_affine_kernel<S>
        <<<static_cast<unsigned>(blocks), kBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
            channels, p, out.a.mutable_data_ptr<S>(), out.d.mutable_data_ptr<S>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

FoldedConv fold_into_conv_cuda(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& bn_weight,
                               const std::optional<at::Tensor>& bn_bias,
                               const at::Tensor& running_mean, const at::Tensor& running_var,
                               double eps, const std::optional<at::Tensor>& scale_tensor,
                               double scale, at::ScalarType stats_dtype,
                               at::MemoryFormat memory_format) {
  const int64_t c_out = weight.size(0);
  FoldedConv folded;
  folded.weight = at::empty(weight.sizes(), weight.options().memory_format(memory_format));
  folded.bias = at::empty({c_out}, weight.options());
  const int64_t total = weight.numel();
  if (total == 0) return folded;
  constexpr int kBlock = 256;
  const int64_t blocks = std::min<int64_t>((total + kBlock - 1) / kBlock, 65535);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Keeps the converted per-channel tensors alive until the launch is queued.
  at::Tensor keep[6];
  AT_DISPATCH_FLOATING_TYPES(
      stats_dtype == at::kDouble ? at::kDouble : at::kFloat, "fold_stats", [&] {
        using S = scalar_t;
        ChannelParams<S> p{};
        p.bias = ptr_of<S>(bias, keep[0], stats_dtype);
        p.gamma = ptr_of<S>(bn_weight, keep[1], stats_dtype);
        p.beta = ptr_of<S>(bn_bias, keep[2], stats_dtype);
        keep[3] = as_stats(running_mean, stats_dtype);
        p.mean = keep[3].const_data_ptr<S>();
        keep[4] = as_stats(running_var, stats_dtype);
        p.var = keep[4].const_data_ptr<S>();
        if (scale_tensor.has_value() && scale_tensor->defined()) {
          keep[5] = as_stats(scale_tensor->reshape({-1}), stats_dtype);
          p.scale_tensor = keep[5].const_data_ptr<S>();
        }
        p.scale = scale;
        p.eps = eps;
        AT_DISPATCH_FLOATING_TYPES_AND2(
            at::kHalf, at::kBFloat16, weight.scalar_type(), "fold_bn", [&] {
              fold_bn_kernel<scalar_t, S><<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(
                  weight.const_data_ptr<scalar_t>(), strides_of(weight), strides_of(folded.weight),
                  c_out, weight.size(1), weight.size(2), weight.size(3), p,
                  folded.weight.mutable_data_ptr<scalar_t>(),
                  folded.bias.mutable_data_ptr<scalar_t>());
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            });
      });
  return folded;
}

}  // namespace fused_conv::cuda
