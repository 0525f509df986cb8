#include "kernels/cpu/grad_passes.h"

#include "kernels/cpu/per_channel_map.h"
#include "kernels/cpu/per_channel_sums.h"
#include "kernels/cpu/simd_loops.h"

namespace fused_conv::cpu {
namespace {

template <typename T>
struct GradSumsVisitor {
  const T* y;
  const T* g;
  int64_t channels;
  const double* mean;

  void run(int64_t c, int64_t offset, int64_t length, double* acc) const {
    simd::grad_sums_run(y + offset, g + offset, length, mean[c], acc);
  }
  void rows(int64_t offset, int64_t n_rows, double* acc) const {
    simd::grad_sums_rows(y + offset, g + offset, n_rows, channels, mean, acc);
  }
};

template <typename T>
struct GradConvOutMap {
  T* y;
  const T* g;
  int64_t channels;
  const GradConvOutCoefficients<T>* coef;

  void run(int64_t c, int64_t offset, int64_t length) const {
    simd::grad_conv_out_run(y + offset, g + offset, length, coef->mean[c], coef->k[c], coef->q[c],
                            coef->r[c]);
  }
  void rows(int64_t offset, int64_t n_rows) const {
    simd::grad_conv_out_rows(y + offset, g + offset, n_rows, channels, coef->mean.data(),
                             coef->k.data(), coef->q.data(), coef->r.data());
  }
};

}  // namespace

template <typename T>
GradSums grad_sums(const T* y, const T* g, const DenseChannels& d,
                   const std::vector<double>& mean) {
  const auto sums = per_channel_sums<3>(d, GradSumsVisitor<T>{y, g, d.channels, mean.data()});
  const auto begin = sums.begin();
  const int64_t c = d.channels;
  return {std::vector<double>(begin, begin + c), std::vector<double>(begin + c, begin + 2 * c),
          std::vector<double>(begin + 2 * c, begin + 3 * c)};
}

template <typename T>
void form_grad_conv_out_(T* y, const T* g, const DenseChannels& d,
                         const GradConvOutCoefficients<T>& coef) {
  for_each_channel_run(d, GradConvOutMap<T>{y, g, d.channels, &coef});
}

template GradSums grad_sums<float>(const float*, const float*, const DenseChannels&,
                                   const std::vector<double>&);
template GradSums grad_sums<double>(const double*, const double*, const DenseChannels&,
                                    const std::vector<double>&);
template void form_grad_conv_out_<float>(float*, const float*, const DenseChannels&,
                                         const GradConvOutCoefficients<float>&);
template void form_grad_conv_out_<double>(double*, const double*, const DenseChannels&,
                                          const GradConvOutCoefficients<double>&);

}  // namespace fused_conv::cpu
