// The row kernel for float16 / bfloat16 channels_last tensors on Hopper
// (conv_rows16.cu): the forward's training statistics pass, normalise pass and
// eval forward, and the training backward's two passes over grad_out, where
// the *_supports() functions say so; elsewhere the tile kernel runs. The
// float32 row kernel is conv_rows.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <utility>

#include "kernels/cuda/conv_tile_kernel.cuh"

namespace fused_conv::cuda {

// Whether the 16-bit row kernel covers the shape for the tensor x (as the
// forward passes it to the kernels: contiguous in s's layout) on `device`:
// an sm_90a build on compute capability 9, float16 / bfloat16, channels_last,
// stride 1, C_in and C_out multiples of 8 (16-byte pieces of a pixel's
// channels), W_out >= 64, x 16-byte aligned; the forward asks only within the
// tile kernel's reach (C_in*kh*kw <= 160).
// FUSED_CONV_FORWARD_KERNEL=tile turns it off.
bool conv_rows16_supports(const ConvShape& s, const at::Tensor& x, int device);
// ... for the normalise pass and the eval forward, which
// FUSED_CONV_FORWARD_KERNEL=rows-stats also leaves on the tile kernel.
bool conv_rows16_apply_supports(const ConvShape& s, const at::Tensor& x, int device);

// Every pass below takes the weight w with any strides (it is staged once per
// block by them: a channels_last module's weight needs no contiguous copy).

// Per-block (count, mean, M2) of conv(x) (no bias) per channel: the partials
// tensor [ceil(C_out / 64)][grid][64][3] and the grid width, as
// finalize_stats_kernel reads them.
std::pair<at::Tensor, int> conv_rows16_stats(const ConvShape& s, const at::Tensor& x,
                                             const at::Tensor& w);

// out = a[c]*conv(x) + d[c] with the fold f, rounded to x's dtype, channels_last
// (out allocated by the caller, 16-byte aligned).
void conv_rows16_apply(const ConvShape& s, const at::Tensor& x, const at::Tensor& w,
                       const BnFold& f, at::Tensor& out);

// The backward's passes on the same kernel (the math: conv_bn_backward.cu),
// where conv_rows16_apply_supports() holds and grad (grad_out in the input's
// layout) is channels_last, 16-byte aligned, in x's dtype:
bool conv_rows16_grad_supports(const ConvShape& s, const at::Tensor& x, const at::Tensor& grad,
                               int device);
// pass 1: per-block (sum g, sum g*(y - ctr), sum (y - ctr)) per channel, as
// finalize_grad_kernel reads them ([ceil(C_out / 64)][grid][64][3], grid width);
std::pair<at::Tensor, int> conv_rows16_grad_stats(const ConvShape& s, const at::Tensor& x,
                                                  const at::Tensor& w, const GradTerms& gt);
// pass 2: g_hat = A*g + C*(y - ctr) + D, rounded to x's dtype without bias.
void conv_rows16_grad_out(const ConvShape& s, const at::Tensor& x, const at::Tensor& w,
                          const GradTerms& gt, at::Tensor& g_hat);
// Whether pass 2 can also reduce the weight gradient (K <= 9 channel chunks
// of 8: 3x3 x 8 input channels), and that pass: g_hat as above plus per-block
// partials of sum g_hat * x over the block's pixels, [ceil(C_out / 64)][grid]
// [64][kh*kw*C_in] at column tap*C_in + input channel (with the grid width),
// as reduce_weight_grad_kernel (conv_bn_backward.cu) reads them.
bool conv_rows16_weight_grad_fusable(const ConvShape& s);
std::pair<at::Tensor, int> conv_rows16_grad_out_w(const ConvShape& s, const at::Tensor& x,
                                                  const at::Tensor& w, const GradTerms& gt,
                                                  at::Tensor& g_hat);

}  // namespace fused_conv::cuda
