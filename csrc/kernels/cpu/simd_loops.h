// The innermost loops of the CPU kernels, on one contiguous run of a channel
// (NCHW) or on whole rows of C channel values (NHWC). float and double
// overloads; sums are accumulated in double.
//
// On x86-64 Linux with GCC each loop is compiled for AVX-512, AVX2 and the
// baseline ISA and the best one for the running CPU is picked when the library
// loads (target_clones), as ATen does for its own kernels: the extension's
// baseline flags would otherwise limit these loops to SSE2. All versions use
// the same lane structure and no FMA contraction, so they give bitwise the
// same results.
#pragma once

#include <cstdint>

namespace fused_conv::cpu::simd {

// ---- sums (NCHW: one run of n values of one channel) ------------------------
// sum(p[i])
double sum_run(const float* p, int64_t n);
double sum_run(const double* p, int64_t n);
// sum((p[i] - mean)^2)
double squared_deviation_run(const float* p, int64_t n, double mean);
double squared_deviation_run(const double* p, int64_t n, double mean);
// acc[0] += sum(g), acc[1] += sum(g * (y - mean)), acc[2] += sum(y - mean)
void grad_sums_run(const float* y, const float* g, int64_t n, double mean, double* acc);
void grad_sums_run(const double* y, const double* g, int64_t n, double mean, double* acc);

// ---- sums (NHWC: `rows` rows of `channels` values; acc per channel) --------
// acc[c] += sum over rows of p[r, c]
void sum_rows(const float* p, int64_t rows, int64_t channels, double* acc);
void sum_rows(const double* p, int64_t rows, int64_t channels, double* acc);
// acc[c] += sum over rows of (p[r, c] - mean[c])^2
void squared_deviation_rows(const float* p, int64_t rows, int64_t channels, const double* mean,
                            double* acc);
void squared_deviation_rows(const double* p, int64_t rows, int64_t channels, const double* mean,
                            double* acc);
// acc[c] += sum(g), acc[C + c] += sum(g * (y - mean[c])), acc[2C + c] += sum(y - mean[c])
void grad_sums_rows(const float* y, const float* g, int64_t rows, int64_t channels,
                    const double* mean, double* acc);
void grad_sums_rows(const double* y, const double* g, int64_t rows, int64_t channels,
                    const double* mean, double* acc);

// ---- in-place maps ----------------------------------------------------------
// p = (p - shift) * mul + add
void affine_run(float* p, int64_t n, float shift, float mul, float add);
void affine_run(double* p, int64_t n, double shift, double mul, double add);
void affine_rows(float* p, int64_t rows, int64_t channels, const float* shift, const float* mul,
                 const float* add);
void affine_rows(double* p, int64_t rows, int64_t channels, const double* shift, const double* mul,
                 const double* add);
// y = k * g + q * (y - mean) + r
void grad_conv_out_run(float* y, const float* g, int64_t n, float mean, float k, float q, float r);
void grad_conv_out_run(double* y, const double* g, int64_t n, double mean, double k, double q,
                       double r);
void grad_conv_out_rows(float* y, const float* g, int64_t rows, int64_t channels, const float* mean,
                        const float* k, const float* q, const float* r);
void grad_conv_out_rows(double* y, const double* g, int64_t rows, int64_t channels,
                        const double* mean, const double* k, const double* q, const double* r);

}  // namespace fused_conv::cpu::simd
