// The backward's per-channel coefficients from its three sums, shared by both
// ways of computing the sums (the tile kernel's statistics pass:
// finalize_grad_kernel in conv_bn_backward.cu; the patch moments:
// finalize_moments_kernel in grad_moments.cu). The math: docs/DESIGN.md,
// "Backward", step 2.
#pragma once

#include <cstdint>

namespace fused_conv::cuda {

// Rows of the [kGradRows, C_out] float32 result of the backward's first step:
// sum g, sum g*x_hat, and A, C, D of g_hat = A*g + C*(y - ctr) + D.
enum GradRow : int { kSumG, kSumGXhat, kCoefG, kCoefY, kCoef1, kGradRows };

struct GradCoefficients {
  double sum_g_xhat, a, cy, c1;
};

// From sg = sum g, sgy = sum g*(y - ctr), sy = sum (y - ctr) over the M = count
// values of a channel, its invstd and k = scale*gamma*invstd. In training the
// saved mean is the batch mean rounded to float32, so x_hat is recentred by
// delta = invstd * sy / M.
__device__ __forceinline__ GradCoefficients grad_coefficients(double sg, double sgy, double sy,
                                                              double inv, double kc, double count,
                                                              bool training) {
  GradCoefficients r{inv * sgy, kc, 0.0, 0.0};  // sum(g * x_hat)
  if (training) {
    const double delta = inv * sy / count;
    r.sum_g_xhat -= delta * sg;
    const double proj = r.sum_g_xhat / count;
    r.cy = -kc * inv * proj;
    r.c1 = kc * (delta * proj - sg / count);
  }
  return r;
}

__device__ __forceinline__ void store_grad_rows(float* rows, int64_t c_out, int64_t c, double sg,
                                                const GradCoefficients& k) {
  rows[kSumG * c_out + c] = static_cast<float>(sg);
  rows[kSumGXhat * c_out + c] = static_cast<float>(k.sum_g_xhat);
  rows[kCoefG * c_out + c] = static_cast<float>(k.a);
  rows[kCoefY * c_out + c] = static_cast<float>(k.cy);
  rows[kCoef1 * c_out + c] = static_cast<float>(k.c1);
}

}  // namespace fused_conv::cuda
