// The forward's row kernel on Hopper's warpgroup MMAs with both operands in
// shared memory (conv_rows.cu): float32, stride 1, output rows of at least 64
// pixels. conv_bn_forward.cu runs the training statistics pass on it where
// conv_rows_stats_supports() says so, and the normalise pass / eval forward
// where conv_rows_apply_supports() does (NCHW outputs); elsewhere the tile
// kernel (conv_tile_kernel.cuh) runs.
#pragma once

#include <ATen/core/Tensor.h>

#include <utility>

#include "kernels/cuda/conv_tile_kernel.cuh"

namespace fused_conv::cuda {

// FUSED_CONV_ROWS_PER_STRIP (1..16) if set, else default_rows: the output rows
// a row-kernel block computes per staged strip.
int rows_per_strip(int default_rows);
// FUSED_CONV_FORWARD_KERNEL: "tile" (no row kernel), "rows-stats" (the row
// kernels for the statistics pass only) or unset / anything else (both passes).
const char* forward_kernel_choice();

// Output channels per block (the MMA's M): the statistics partials are
// [ceil(C_out / 64)][grid][64][3], as finalize_stats_kernel reads them.
constexpr int kRowsChannels = 64;

// Whether the row kernel covers the shape on `device`: compiled for sm_90a and
// running on compute capability 9, float32, stride 1, W_out >= 64, K small
// enough for the weights and the staged rows to fit two blocks per SM.
// FUSED_CONV_FORWARD_KERNEL=tile turns it off (the tile kernel then runs).
// (Shared by both passes; conv_rows_apply_supports() adds its own conditions.)
bool conv_rows_stats_supports(const ConvShape& s, at::ScalarType dtype, int device);

// Per-block (count, mean, M2) of conv(x) (no bias) per channel, x in the
// layout s.channels_last names, w contiguous: returns the partials tensor and
// the grid width that finalize_stats_kernel needs.
std::pair<at::Tensor, int> conv_rows_stats(const ConvShape& s, const at::Tensor& x,
                                           const at::Tensor& w);

// Whether the normalise pass (and the eval forward) runs on the row kernel:
// where conv_rows_stats_supports() holds, the output is NCHW (the NHWC
// normalise pass is faster on the tile kernel: benchmarks/NOTES.md) and the
// output stage fits, unless FUSED_CONV_FORWARD_KERNEL=rows-stats.
bool conv_rows_apply_supports(const ConvShape& s, at::ScalarType dtype, int device);

// out = a[c]*conv(x) + d[c] with the fold f (conv_tile_kernel.cuh), written in
// the layout s.channels_last names; out is allocated by the caller.
void conv_rows_apply(const ConvShape& s, const at::Tensor& x, const at::Tensor& w,
                     const BnFold& f, at::Tensor& out);

}  // namespace fused_conv::cuda
