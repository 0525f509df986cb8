// The float64 record that each block of a patch-moments kernel writes
// (grad_moments.cu: the flat 128-pixel kernel; grad_moments_rows.cu: the
// row-tiled tensor-core kernel), and that reduce_moments_kernel sums in a fixed
// order. k = ci*9 + tap indexes the 72 patch columns (taps row-major over the
// 3x3 window).
#pragma once

namespace fused_conv::cuda::moments {

constexpr int kCo = 64;  // output channels covered (C_out <= 64)
constexpr int kCx = 8;   // input channels covered (C_in <= 8)
constexpr int kTaps = 9;
constexpr int kK = kCx * kTaps;  // 72 patch columns
// Gw [64][72] = sum g X, G [72][72] = sum X X^T (the entries with tap(row) <=
// tap(col) must be written; the others are read from their mirror), sum X [72],
// sum g [64].
constexpr int kRecGw = 0;
constexpr int kRecG = kRecGw + kCo * kK;
constexpr int kRecS = kRecG + kK * kK;
constexpr int kRecSumG = kRecS + kK;
constexpr int kRecord = kRecSumG + kCo;

}  // namespace fused_conv::cuda::moments
