// Host side of the fused CUDA backward (the math: docs/DESIGN.md, "Backward").
//
// With y = conv(x) (no bias), ctr = mean - bias, x_hat = (y - ctr) * invstd,
// k = s * gamma * invstd and M values per channel:
//
//   pass 1 (tile kernel, kGradStats; for float16 / bfloat16 channels_last on
//           Hopper the 16-bit row kernel, conv_rows16.h): recompute y and reduce
//           sum g, sum g*(y - ctr), sum (y - ctr) per channel into per-block
//           partials; nothing output-sized is written.
//   finalize (one block of 8 warps per channel, float64, fixed order: deterministic):
//           sum(g*x_hat) = invstd * sum g*(y - ctr), and in training the
//           recentring delta = invstd * sum(y - ctr) / M (the saved mean is
//           the exact batch mean rounded to float32: see
//           kernels/common/conv_bn_aten_backward.cpp), giving
//             g_hat = A*g + C*(y - ctr) + D,  A = k,  C = -k*invstd*proj,
//             D = k*(delta*proj - sum(g)/M),  proj = sum(g*x_hat')/M.
//   pass 2 (training only; tile kernel, kGradOutW): recompute y, form g_hat
//           in registers and reduce the weight gradient sum g_hat * x from it
//           on tensor cores into per-block partials (summed by
//           reduce_weight_grad_kernel in a fixed order); g_hat is written (in
//           the input's dtype and layout) only when grad_input is wanted.
//           float16 / bfloat16 where pass 1 ran on the 16-bit row kernel: its
//           kGradOutW writes g_hat and reduces the weight gradient from it in
//           registers (K <= 9 chunks of 8 channels; else its kGradOut and
//           cuDNN's weight gradient). Other 16-bit inputs, and float32 shapes
//           whose K is too wide for the fused weight gradient, use kGradOut
//           (write g_hat) and cuDNN's weight gradient.
//   eval:   g_hat = k*g needs no pass 2: grad_input = conv_transpose(g; k*W)
//           and grad_weight = k * (the weight gradient of g, cuDNN's).
//   grad_input = conv_transpose(g_hat; W): the tile kernel as a plain
//           convolution of g_hat (grad_input_tile.cu) where it covers the shape
//           (float32, stride 1), for float16 / bfloat16 channels_last on Hopper
//           the 16-bit row kernel (grad_input_rows16.cu), else cuDNN's
//           convolution backward (data).
//
// The per-channel gradients (bias, gamma, beta, scale) come from the sums, in
// one launch (bn_param_grads.h).
#include "kernels/cuda/conv_bn_backward.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/common/conv_bn_checks.h"
#include "kernels/common/conv_call.h"
#include "kernels/cuda/bn_param_grads.h"
#include "kernels/cuda/conv_rows.h"
#include "kernels/cuda/conv_rows16.h"
#include "kernels/cuda/dependent_launch.cuh"
#include "kernels/cuda/finalize_reduce.cuh"
#include "kernels/cuda/grad_coefficients.cuh"
#include "kernels/cuda/grad_input_correction.h"
#include "kernels/cuda/grad_input_rows16.h"
#include "kernels/cuda/grad_input_taps.h"
#include "kernels/cuda/grad_input_tile.h"
#include "kernels/cuda/grad_moments.h"
#include "kernels/cuda/tile_launch.cuh"

namespace fused_conv::cuda {
namespace {

// One block per channel (finalize_reduce.cuh: a fixed order, so results are
// bitwise reproducible) sums the per-block partials in float64.
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_grad_kernel(const float* __restrict__ partials, int grid_x, int bn, int64_t c_out,
                         const float* __restrict__ invstd, const float* __restrict__ k,
                         double count, bool training, float* __restrict__ rows) {
  // Launched as a dependent of pass 1 (dependent_launch.cuh).
  wait_for_previous_kernel();
  let_next_kernel_start();
  const int64_t c = blockIdx.x;
  const int64_t cb = c / bn, cl = c % bn;
  const auto add = [](double (&v)[3], const double (&o)[3]) {
    for (int i = 0; i < 3; ++i) v[i] += o[i];
  };
  double v[3] = {0, 0, 0};  // sum g, sum g*(y - ctr), sum (y - ctr)
  for (int b = threadIdx.x; b < grid_x; b += kFinalizeThreads) {
    const float* p = partials + ((cb * grid_x + b) * bn + cl) * 3;
    add(v, {p[0], p[1], p[2]});
  }
  if (!finalize_reduce(v, add) || c >= c_out) return;
  store_grad_rows(rows, c_out, c, v[0],
                  grad_coefficients(v[0], v[1], v[2], invstd[c], k[c], count, training));
}

// grad_weight[co][ci][r] = sum over the blocks of the kGradOutW partials
// [c_blocks][grid_x][bn][k8] at GEMM column k = r*c_in + ci, rounded once to
// the weight's dtype. A block takes 32 consecutive columns (one per lane, so a
// warp reads 128 contiguous bytes of a block's partials) and splits the
// grid_x partials over its kReduceSlices warps (warp w sums blocks w, w + 8,
// ... in float64); warp 0 then adds the slices in order, so the sum is the same
// every run. One thread per column summing all grid_x partials took 28 us on
// the 16-bit reference step: 18 blocks, each thread a chain of 264 loads.
constexpr int kReduceSlices = 8;

template <typename T>
__global__ void __launch_bounds__(32 * kReduceSlices)
    reduce_weight_grad_kernel(const float* __restrict__ partials, int grid_x, int bn, int k8,
                              int c_out, int c_in, int taps, T* __restrict__ grad_weight) {
  // Launched as a dependent of the pass that wrote the partials.
  wait_for_previous_kernel();
  let_next_kernel_start();
  __shared__ double slice_sums[kReduceSlices][32];
  const int lane = threadIdx.x % 32, slice = threadIdx.x / 32;
  const int64_t k_total = static_cast<int64_t>(c_in) * taps;
  const int64_t j = blockIdx.x * 32ll + lane;  // column (co, k), k fastest
  const bool valid = j < c_out * k_total;
  const int co = valid ? static_cast<int>(j / k_total) : 0;
  const int k = valid ? static_cast<int>(j % k_total) : 0;
  const int cb = co / bn, cl = co % bn;
  const float* p = partials + (static_cast<int64_t>(cb) * grid_x * bn + cl) * k8 + k;
  const int64_t block_stride = static_cast<int64_t>(bn) * k8;
  double sum = 0;
  if (valid) {
    for (int b = slice; b < grid_x; b += kReduceSlices) sum += p[b * block_stride];
  }
  slice_sums[slice][lane] = sum;
  __syncthreads();
  if (slice != 0 || !valid) return;
  double total = 0;
  for (int w = 0; w < kReduceSlices; ++w) total += slice_sums[w][lane];
  const int ci = k % c_in, r = k / c_in;
  // Through float: c10::Half / c10::BFloat16 convert from float only.
  grad_weight[(static_cast<int64_t>(co) * c_in + ci) * taps + r] =
      static_cast<T>(static_cast<float>(total));
}

at::Tensor per_out_channel_view(const at::Tensor& t) { return t.view({-1, 1, 1, 1}); }

// grad_weight in the weight's dtype from weight-gradient partials
// [c_blocks][grid_x][bn][k8] (reduce_weight_grad_kernel's layout).
at::Tensor reduce_weight_grad(const at::Tensor& partials, int grid_x, int bn, int k8,
                              const ConvShape& s, const at::Tensor& weight) {
  // Contiguous, as the op's fake kernel (fused_conv/_meta.py) declares it.
  at::Tensor grad_weight = at::empty(weight.sizes(), weight.options());
  const int64_t elements = grad_weight.numel();
  constexpr int kBlock = 32 * kReduceSlices;
  const auto blocks = static_cast<unsigned>((elements + 31) / 32);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "reduce_weight_grad", [&] {
        launch_kernel(/*dependent=*/true, reduce_weight_grad_kernel<scalar_t>, blocks, kBlock, 0,
                      stream, partials.const_data_ptr<float>(), grid_x, bn, k8, s.c_out, s.c_in,
                      s.kh * s.kw, grad_weight.mutable_data_ptr<scalar_t>());
      });
  return grad_weight;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
tile_conv_bn_backward(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& bn_weight,
                      const std::optional<at::Tensor>& bn_bias, const at::Tensor& mean,
                      const at::Tensor& invstd, const std::optional<at::Tensor>& scale_tensor,
                      double scale, at::IntArrayRef stride, at::IntArrayRef padding,
                      at::IntArrayRef dilation, bool training,
                      std::array<bool, 2> input_weight_mask) {
  c10::cuda::CUDAGuard guard(input.device());
  const auto shape = make_tile_shape(input, weight, stride, padding, dilation, 1);
  TORCH_CHECK(shape.has_value(), "fused_conv: configuration outside the tile kernel's reach");
  const ConvShape& s = *shape;
  const ConvParams conv{stride, padding, dilation, 1};
  const at::MemoryFormat format = format_of(s);
  const at::Tensor x = input.contiguous(format);
  const at::Tensor grad = grad_out.contiguous(format);

  const at::Tensor invstd_f = invstd.to(at::kFloat).contiguous();
  // ctr = mean - bias and k = s * gamma * invstd in one launch (bn_param_grads.h).
  const ChannelCoefs coefs = backward_channel_coefs(mean.to(at::kFloat).contiguous(), invstd_f,
                                                    bias, bn_weight, scale_tensor, scale);
  const at::Tensor& center = coefs.center;
  const at::Tensor& k = coefs.k;
  const int64_t count = s.n * static_cast<int64_t>(s.h_out) * s.w_out;

  // The sums and the coefficients of g_hat: from the patch moments
  // (grad_moments.cu, which also gives the weight gradient) where they cover
  // the shape, else pass 1 and finalize.
  const bool moments = grad_moments_supports(input, weight, stride, padding, dilation, 1);
  // float16 / bfloat16 channels_last on Hopper: passes 1 and 2 on the 16-bit row kernel,
  // which (like its data gradient) reads the weight by its strides; the other kernels
  // read it contiguous.
  const bool rows16 = !moments && conv_rows16_grad_supports(s, x, grad, input.get_device());
  const at::Tensor w = rows16 ? strided_weight(weight) : weight.contiguous();
  at::Tensor rows, moments_grad_weight;
  GradTerms terms{grad.const_data_ptr(), center.const_data_ptr<float>(), nullptr, nullptr, nullptr};
  if (moments) {
    std::tie(rows, moments_grad_weight) =
        grad_moments(grad, x, w, center, invstd_f, k, padding, training, input_weight_mask[1]);
  } else {
    at::Tensor partials;
    int grid_x = 0, bn = 0;
    if (rows16) {
      std::tie(partials, grid_x) = conv_rows16_grad_stats(s, x, w, terms);
      bn = kRowsChannels;
    } else {
      partials = reduction_partials(s, input);
      grid_x = static_cast<int>(
          run_tile_kernel<TileMode::kGradStats>(s, x, w, BnFold{}, terms, at::Tensor(),
                                                partials.mutable_data_ptr<float>())
              .grid.x);
      bn = 8 * n_tiles_for(s.c_out);
    }
    rows = at::empty({kGradRows, s.c_out}, input.options().dtype(at::kFloat));
    launch_kernel(/*dependent=*/true, finalize_grad_kernel, static_cast<unsigned>(s.c_out),
                  kFinalizeThreads, 0, c10::cuda::getCurrentCUDAStream(),
                  partials.const_data_ptr<float>(), grid_x, bn, s.c_out,
                  invstd_f.const_data_ptr<float>(), k.const_data_ptr<float>(),
                  static_cast<double>(count), training, rows.mutable_data_ptr<float>());
  }

  // grad_input / grad_weight. conv_grads: the gradients of the convolution given
  // the gradient g at its output (with the weight w_eff) for the mask's entries.
  const bool tile_dgrad =
      input_weight_mask[0] && grad_input_tile_supports(input, weight, stride, padding, dilation, 1);
  auto conv_grads = [&](const at::Tensor& g, const at::Tensor& w_eff,
                        std::array<bool, 2> mask) -> std::pair<at::Tensor, at::Tensor> {
    std::pair<at::Tensor, at::Tensor> grads{at::empty({0}, input.options()),
                                            at::empty({0}, weight.options())};
    // float16 / bfloat16 channels_last on Hopper: grad_input on the 16-bit
    // row kernel (grad_input_rows16.h), where cuDNN's took 4-5x its memory time.
    const bool rows16_dgrad =
        mask[0] && !tile_dgrad &&
        grad_input_rows16_supports(g, input, w_eff, stride, padding, dilation, 1);
    const std::array<bool, 2> cudnn_mask{mask[0] && !tile_dgrad && !rows16_dgrad, mask[1]};
    if (cudnn_mask[0] || cudnn_mask[1]) {
      grads = conv_backward(g, input, w_eff, conv, format, cudnn_mask);
    }
    if (mask[0] && tile_dgrad) grads.first = tile_grad_input(g, input, w_eff, padding, dilation);
    if (rows16_dgrad) grads.first = grad_input_rows16(g, input, w_eff, padding);
    return grads;
  };
  at::Tensor grad_input = at::empty({0}, input.options());
  at::Tensor grad_weight = at::empty({0}, weight.options());
  if (input_weight_mask[0] || input_weight_mask[1]) {
    if (training) {
      terms.coef_g = rows[kCoefG].const_data_ptr<float>();
      terms.coef_y = rows[kCoefY].const_data_ptr<float>();
      terms.coef_1 = rows[kCoef1].const_data_ptr<float>();
      const bool fuse_weight_grad =
          input_weight_mask[1] && weight_grad_fusable(s, input.scalar_type());
      // With the moments and the tap kernel, grad_input comes from g and x
      // (grad_input_correction.h): g_hat is never written.
      const bool g_hat_free =
          moments && grad_input_taps_supports(input, weight, stride, padding, dilation, 1);
      at::Tensor g_hat;  // stays undefined when no kernel reads it
      if ((input_weight_mask[0] && !g_hat_free) || (!fuse_weight_grad && !moments)) {
        g_hat = at::empty({s.n, s.c_out, s.h_out, s.w_out}, input.options().memory_format(format));
      }
      if (moments) {
        if (input_weight_mask[1]) grad_weight = moments_grad_weight.to(weight.scalar_type());
        if (input_weight_mask[0] && g_hat_free) {
          const at::Tensor weight_a = w.to(at::kFloat) * per_out_channel_view(rows[kCoefG]);
          grad_input = grad_input_taps(grad, x, weight_a, padding);
          add_grad_input_correction(grad_input, x, w, rows, center, padding);
        } else if (input_weight_mask[0]) {
          run_tile_kernel<TileMode::kGradOut>(s, x, w, BnFold{}, terms, g_hat, nullptr);
          grad_input = conv_grads(g_hat, weight, {true, false}).first;
        }
      } else if (fuse_weight_grad) {
        const Launch plan = run_tile_kernel<TileMode::kGradOutW>(s, x, w, BnFold{}, terms, g_hat,
                                                                 nullptr, /*dry_run=*/true);
        const int bn = 8 * n_tiles_for(s.c_out), k8 = 8 * s.k_steps;
        at::Tensor w_partials =
            at::empty({static_cast<int64_t>(plan.grid.y) * plan.grid.x * bn * k8},
                      input.options().dtype(at::kFloat));
        const Launch run = run_tile_kernel<TileMode::kGradOutW>(
            s, x, w, BnFold{}, terms, g_hat, w_partials.mutable_data_ptr<float>());
        TORCH_INTERNAL_ASSERT(run.grid.x == plan.grid.x && run.grid.y == plan.grid.y);
        grad_weight =
            reduce_weight_grad(w_partials, static_cast<int>(run.grid.x), bn, k8, s, weight);
        if (input_weight_mask[0]) grad_input = conv_grads(g_hat, weight, {true, false}).first;
      } else if (rows16 && input_weight_mask[1] && conv_rows16_weight_grad_fusable(s)) {
        // g_hat and, from it in registers, the weight gradient's partials.
        const auto [w_partials, grid_x] = conv_rows16_grad_out_w(s, x, w, terms, g_hat);
        grad_weight =
            reduce_weight_grad(w_partials, grid_x, kRowsChannels, s.kh * s.kw * s.c_in, s, weight);
        if (input_weight_mask[0]) grad_input = conv_grads(g_hat, w, {true, false}).first;
      } else {
        if (rows16) {
          conv_rows16_grad_out(s, x, w, terms, g_hat);
        } else {
          run_tile_kernel<TileMode::kGradOut>(s, x, w, BnFold{}, terms, g_hat, nullptr);
        }
        std::tie(grad_input, grad_weight) = conv_grads(g_hat, weight, input_weight_mask);
      }
    } else {
      // g_hat = k*g is linear in g: fold k into the weight for grad_input and
      // scale the weight gradient of g per output channel.
      const at::Tensor k_view = per_out_channel_view(k);
      const at::Tensor weight_k = (weight.to(at::kFloat) * k_view).to(weight.scalar_type());
      // grad_moments' weight gradient already carries k (A = k, C = D = 0).
      const std::array<bool, 2> mask{input_weight_mask[0], input_weight_mask[1] && !moments};
      std::tie(grad_input, grad_weight) = conv_grads(grad, weight_k, mask);
      if (moments && input_weight_mask[1]) {
        grad_weight = moments_grad_weight.to(weight.scalar_type());
      } else if (input_weight_mask[1]) {
        grad_weight = (grad_weight.to(at::kFloat) * k_view).to(weight.scalar_type());
      }
    }
  }
  const auto [grad_bias, grad_bn_weight, grad_bn_bias, grad_scale] =
      bn_param_grads(rows, coefs, bn_weight, bn_bias, training);
  return {grad_input, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias, grad_scale};
}

}  // namespace fused_conv::cuda
