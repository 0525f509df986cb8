// Host side of the fused CUDA forwards: which configurations the tile kernel
// covers, launch geometry, and the eval / training pipelines.
//
//   eval : one launch of the tile kernel, or on Hopper the row kernel for
//          float32 stride-1 NCHW shapes (conv_rows.h) or float16 / bfloat16
//          channels_last ones (conv_rows16.h); the BN + scale fold happens in
//          its prologue from the running statistics (no host sync, no extra
//          launch).
//   train: statistics pass (the tile kernel recomputing the conv without
//          writing it, or where they apply on Hopper the row kernels;
//          per-block Chan summaries) -> finalize (one block per channel merges
//          the summaries in a fixed order: deterministic) -> the eval-style
//          pass with the batch statistics.
#include "kernels/cuda/conv_bn_forward.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/cuda/conv_rows.h"
#include "kernels/cuda/conv_rows16.h"
#include "kernels/cuda/dependent_launch.cuh"
#include "kernels/cuda/finalize_reduce.cuh"
#include "kernels/cuda/tile_launch.cuh"

namespace fused_conv::cuda {
namespace {

// One block per channel (finalize_reduce.cuh: a fixed order, so results are
// bitwise reproducible) merges the per-block Chan summaries. Adds the conv bias
// to the mean; var is biased (divides by M).
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_stats_kernel(const float* __restrict__ partials, int grid_x, int bn, int64_t c_out,
                          ParamPtr bias, float eps, float* __restrict__ mean_out,
                          float* __restrict__ invstd_out) {
  // Launched as a dependent of the statistics pass (dependent_launch.cuh).
  wait_for_previous_kernel();
  let_next_kernel_start();
  const int64_t c = blockIdx.x;
  const int64_t cb = c / bn, cl = c % bn;
  const auto merge = [](double (&v)[3], const double (&o)[3]) {
    chan_merge<double>(v[0], v[1], v[2], o[0], o[1], o[2]);
  };
  double v[3] = {0, 0, 0};  // count, mean, M2
  for (int b = threadIdx.x; b < grid_x; b += kFinalizeThreads) {
    const float* p = partials + ((cb * grid_x + b) * bn + cl) * 3;
    merge(v, {p[0], p[1], p[2]});
  }
  if (!finalize_reduce(v, merge) || c >= c_out) return;
  mean_out[c] = static_cast<float>(v[1] + (bias.data ? load_param(bias, c) : 0.f));
  invstd_out[c] = static_cast<float>(1.0 / sqrt(v[2] / v[0] + static_cast<double>(eps)));
}

// t as the kernels read it (ParamPtr): itself where it is a contiguous float32,
// float16 or bfloat16 tensor, else a float32 copy that `keep` holds for the
// launch; absent when t is.
ParamPtr param_of(const std::optional<at::Tensor>& t, at::Tensor& keep) {
  if (!t.has_value() || !t->defined()) return {};
  const at::ScalarType dtype = t->scalar_type();
  if (t->is_contiguous() && (dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16)) {
    return {t->const_data_ptr(), dtype == at::kFloat  ? ParamType::kFloat32
                                 : dtype == at::kHalf ? ParamType::kFloat16
                                                      : ParamType::kBFloat16};
  }
  keep = t->to(at::kFloat).contiguous();
  return {keep.const_data_ptr(), ParamType::kFloat32};
}

// The fold's parameters, with the float32 copies that some of them need
// (param_of) held until the op has issued its launches.
struct FoldInputs {
  at::Tensor copies[6];
  ParamPtr bias, gamma, beta, scale_tensor;
  FoldInputs(const std::optional<at::Tensor>& conv_bias, const std::optional<at::Tensor>& bn_weight,
             const std::optional<at::Tensor>& bn_bias, const std::optional<at::Tensor>& scale)
      : bias(param_of(conv_bias, copies[0])),
        gamma(param_of(bn_weight, copies[1])),
        beta(param_of(bn_bias, copies[2])),
        scale_tensor(param_of(scale, copies[3])) {}
  BnFold fold(const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& var_or_invstd,
              bool is_invstd, double eps, double scale) {
    return BnFold{bias,
                  gamma,
                  beta,
                  param_of(mean, copies[4]),
                  param_of(var_or_invstd, copies[5]),
                  is_invstd,
                  static_cast<float>(eps),
                  scale_tensor,
                  static_cast<float>(scale)};
  }
};

at::Tensor empty_output(const at::Tensor& input, const ConvShape& s) {
  return at::empty({s.n, s.c_out, s.h_out, s.w_out},
                   input.options().memory_format(s.channels_last ? at::MemoryFormat::ChannelsLast
                                                                 : at::MemoryFormat::Contiguous));
}

// The weight as the kernels for x take it: the 16-bit row kernel reads any
// strides (a channels_last module's weight: no copy per call), the others read
// it contiguous.
at::Tensor weight_for(const ConvShape& s, const at::Tensor& x, const at::Tensor& weight,
                      int device) {
  return conv_rows16_supports(s, x, device) ? strided_weight(weight) : weight.contiguous();
}

// out = a[c]*conv(x) + d[c] (eval, and the training forward's normalise pass):
// on a row kernel where one covers the shape, else on the tile kernel. w as
// weight_for() gives it (.contiguous() below is a no-op but where
// FUSED_CONV_FORWARD_KERNEL=rows-stats moves a 16-bit apply to the tile kernel).
// dependent: the previous kernel on the stream is finalize_stats_kernel, which
// the float32 row kernel may overlap (dependent_launch.cuh; the 16-bit one
// measured slower so: DESIGN.md).
void apply_fold(const ConvShape& s, const at::Tensor& x, const at::Tensor& w, const BnFold& fold,
                at::Tensor& out, int device, bool dependent) {
  if (conv_rows_apply_supports(s, x.scalar_type(), device)) {
    conv_rows_apply(s, x, w, fold, out, dependent);
  } else if (conv_rows16_apply_supports(s, x, device)) {
    conv_rows16_apply(s, x, w, fold, out);
  } else {
    run_tile_kernel<TileMode::kApply>(s, x, w.contiguous(), fold, GradTerms{}, out, nullptr);
  }
}

}  // namespace

bool tile_kernel_supports(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return make_tile_shape(input, weight, stride, padding, dilation, groups).has_value();
}

bool rows_stats_supports(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const auto shape = make_tile_shape(input, weight, stride, padding, dilation, groups);
  return shape.has_value() && input.is_cuda() &&
         conv_rows_stats_supports(*shape, input.scalar_type(), input.get_device());
}

bool rows16_supports(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const auto shape = make_tile_shape(input, weight, stride, padding, dilation, groups);
  return shape.has_value() && input.is_cuda() &&
         conv_rows16_supports(*shape, input.contiguous(format_of(*shape)), input.get_device());
}

at::Tensor tile_conv_bn_eval(const at::Tensor& input, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& bn_weight,
                             const std::optional<at::Tensor>& bn_bias,
                             const at::Tensor& running_mean, const at::Tensor& running_var,
                             double eps, const std::optional<at::Tensor>& scale_tensor,
                             double scale, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation) {
  c10::cuda::CUDAGuard guard(input.device());
  const auto shape = make_tile_shape(input, weight, stride, padding, dilation, 1);
  TORCH_CHECK(shape.has_value(), "fused_conv: configuration outside the tile kernel's reach");
  const ConvShape& s = *shape;
  const at::Tensor x = input.contiguous(format_of(s));
  const at::Tensor w = weight_for(s, x, weight, input.get_device());
  FoldInputs params(bias, bn_weight, bn_bias, scale_tensor);
  at::Tensor out = empty_output(input, s);
  apply_fold(s, x, w, params.fold(running_mean, running_var, false, eps, scale), out,
             input.get_device(), /*dependent=*/false);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tile_conv_bn_train(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    double eps, const std::optional<at::Tensor>& scale_tensor, double scale, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation) {
  c10::cuda::CUDAGuard guard(input.device());
  const auto shape = make_tile_shape(input, weight, stride, padding, dilation, 1);
  TORCH_CHECK(shape.has_value(), "fused_conv: configuration outside the tile kernel's reach");
  const ConvShape& s = *shape;
  const at::Tensor x = input.contiguous(format_of(s));
  const at::Tensor w = weight_for(s, x, weight, input.get_device());
  FoldInputs params(bias, bn_weight, bn_bias, scale_tensor);
  const auto stats_options = input.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({s.c_out}, stats_options);
  at::Tensor invstd = at::empty({s.c_out}, stats_options);

  // Pass 1: statistics (per-block summaries; the grid fixes the merge order).
  at::Tensor partials;
  int grid_x = 0, bn = 0;
  if (conv_rows_stats_supports(s, x.scalar_type(), input.get_device())) {
    std::tie(partials, grid_x) = conv_rows_stats(s, x, w);
    bn = kRowsChannels;
  } else if (conv_rows16_supports(s, x, input.get_device())) {
    std::tie(partials, grid_x) = conv_rows16_stats(s, x, w);
    bn = kRowsChannels;
  } else {
    bn = 8 * n_tiles_for(s.c_out);
    partials = reduction_partials(s, input);
    grid_x = static_cast<int>(run_tile_kernel<TileMode::kStats>(s, x, w, BnFold{}, GradTerms{},
                                                                at::Tensor(),
                                                                partials.mutable_data_ptr<float>())
                                  .grid.x);
  }

  // Pass 2: merge the per-block summaries into mean / invstd.
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  launch_kernel(/*dependent=*/true, finalize_stats_kernel, static_cast<unsigned>(s.c_out),
                kFinalizeThreads, 0, stream, partials.const_data_ptr<float>(), grid_x, bn, s.c_out,
                params.bias, static_cast<float>(eps), mean.mutable_data_ptr<float>(),
                invstd.mutable_data_ptr<float>());

  // Pass 3: normalise with the batch statistics.
  at::Tensor out = empty_output(input, s);
  apply_fold(s, x, w, params.fold(mean, invstd, true, eps, scale), out, input.get_device(),
             /*dependent=*/true);
  return {out, mean, invstd};
}

}  // namespace fused_conv::cuda
