// The patch moments of grad_moments.h from a row-tiled kernel whose products
// run as Hopper warpgroup MMAs with both operands in shared memory where they
// can (grad_moments_rows.cu).
#pragma once

#include <ATen/core/Tensor.h>

namespace fused_conv::cuda {

// True when the row-tiled kernel takes a problem that grad_moments_supports
// admits: a compute-capability 9.x device and output rows of at most 128
// pixels (a tile holds whole rows). FUSED_CONV_MOMENTS_KERNEL=flat in the
// environment selects the flat 128-pixel kernel instead (to test it on Hopper).
bool grad_moments_rows_supports(int device, int64_t out_width);

// The per-block float64 records ([blocks, moments::kRecord], the layout of
// grad_moments_record.cuh) of g (float32 [N, C_out, H_out, W_out]) against the
// patches of x (float32 NCHW, 3x3, stride 1, padding (pad_h, pad_w)), each
// input channel shifted by x[0][ci][H/2][W/2]. G and sum X only when gram.
// On the current stream.
at::Tensor grad_moments_rows(const at::Tensor& g, const at::Tensor& x, int pad_h, int pad_w,
                             bool gram);

}  // namespace fused_conv::cuda
