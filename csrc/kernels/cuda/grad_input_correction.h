// grad_input of the training backward without writing g_hat (the math:
// docs/DESIGN.md, "Backward", step 0).
#pragma once

#include <ATen/core/Tensor.h>

namespace fused_conv::cuda {

// With g_hat = A*g + C*(y - ctr) + D (per output channel, valid output pixels
// only) and y = conv(x; W),
//   conv_transpose(g_hat; W) = conv_transpose(g; A*W) + R,
//   R[ci][p] = sum over the taps t that map p to a valid output pixel q of
//              sum_c W[c][ci][t] * (C_c * (y_c[q] - ctr_c) + D_c),
// and y_c[q] - ctr_c = W_c . X~[q] - ctr'_c with X~ the patch of x shifted by
// shift[ci] = x[0][ci][H/2][W/2] (ctr' = ctr - W . shift), so R is a 5x5
// convolution of x~ with V = W^T diag(C) W (72 x 72) collapsed over the taps,
// minus the taps that fall outside the output near the border, plus
// e = sum_c W[c] (D_c - C_c ctr'_c) per valid tap.
//
// Adds R to grad_input (float32 NCHW, the input's shape: the tap kernel's
// result for g with weights A*W) in place, on the current stream. rows: the
// [kGradRows, C_out] float32 coefficients of grad_moments (C and D used);
// center = mean - conv bias (float32). Requires grad_moments_supports.
void add_grad_input_correction(at::Tensor& grad_input, const at::Tensor& input,
                               const at::Tensor& weight, const at::Tensor& rows,
                               const at::Tensor& center, at::IntArrayRef padding);

}  // namespace fused_conv::cuda
