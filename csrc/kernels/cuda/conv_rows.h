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
// Output pixels per MMA (its N): a block's column tile.
constexpr int kRowsPixels = 128;

// What the row kernels (conv_rows.cu, conv_rows16.cu) share: the convolution
// and a block's work items, strips of `rows` output rows x one 128-pixel
// column tile of one image (strips = n*strips_h*tiles_w, column tiles
// fastest), staged with their halo (staged_rows x staged_w input positions).
struct RowStrips {
  int64_t n, strips;
  int c_in, h, w, c_out, h_out, w_out;
  int kh, kw, pad_h, pad_w, dil_h, dil_w;
  int rows, strips_h, tiles_w;
  int staged_rows, staged_w;  // rows + (kh-1)*dil_h; 128 + (kw-1)*dil_w
};
RowStrips make_row_strips(const ConvShape& s, int rows);

// The persistent grid width of a row kernel `entry` (one wave of resident
// blocks per channel block; it depends only on the device and the shape, so a
// statistics merge order is fixed), after opting it in to `smem` bytes.
int row_kernel_grid(const void* entry, int threads, size_t smem, int64_t c_out, int64_t strips);

// Whether the row kernel covers the shape on `device`: compiled for sm_90a and
// running on compute capability 9, float32, stride 1, W_out >= 64, C_out > 32, K small
// enough for the weights and the staged rows to fit three warpgroups in one
// block or one in each of two blocks per SM.
// FUSED_CONV_FORWARD_KERNEL=tile turns it off (the tile kernel then runs).
// (Shared by both passes; conv_rows_apply_supports() adds its own conditions.)
bool conv_rows_stats_supports(const ConvShape& s, at::ScalarType dtype, int device);

// Per-unit (count, mean, M2) of conv(x) (no bias) per channel (a unit is a
// warpgroup with its own strips: one per block, or three), x in the layout
// s.channels_last names, w contiguous: returns the partials tensor and the
// number of units per channel block, which finalize_stats_kernel takes as its
// grid width.
std::pair<at::Tensor, int> conv_rows_stats(const ConvShape& s, const at::Tensor& x,
                                           const at::Tensor& w);

// Whether the normalise pass (and the eval forward) runs on the row kernel:
// where conv_rows_stats_supports() holds, the output is NCHW (the NHWC
// normalise pass is faster on the tile kernel: benchmarks/NOTES.md) and the
// output stage fits, unless FUSED_CONV_FORWARD_KERNEL=rows-stats.
bool conv_rows_apply_supports(const ConvShape& s, at::ScalarType dtype, int device);

// out = a[c]*conv(x) + d[c] with the fold f (conv_tile_kernel.cuh), written in
// the layout s.channels_last names; out is allocated by the caller.
// `dependent`: launched as a programmatic dependent of the stream's previous
// kernel, which must be the op's own, launched when x and w were complete
// (dependent_launch.cuh); the kernel reads f's statistics after waiting for it.
void conv_rows_apply(const ConvShape& s, const at::Tensor& x, const at::Tensor& w, const BnFold& f,
                     at::Tensor& out, bool dependent);

}  // namespace fused_conv::cuda
