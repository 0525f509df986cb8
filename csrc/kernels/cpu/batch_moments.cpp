#include "kernels/cpu/batch_moments.h"

#include "kernels/cpu/per_channel_sums.h"
#include "kernels/cpu/simd_loops.h"

namespace fused_conv::cpu {
namespace {

template <typename T>
struct ValueSum {
  const T* data;
  int64_t channels;

  void run(int64_t /*c*/, int64_t offset, int64_t length, double* acc) const {
    acc[0] += simd::sum_run(data + offset, length);
  }
  void rows(int64_t offset, int64_t n_rows, double* acc) const {
    simd::sum_rows(data + offset, n_rows, channels, acc);
  }
};

template <typename T>
struct SquaredDeviationSum {
  const T* data;
  int64_t channels;
  const double* mean;

  void run(int64_t c, int64_t offset, int64_t length, double* acc) const {
    acc[0] += simd::squared_deviation_run(data + offset, length, mean[c]);
  }
  void rows(int64_t offset, int64_t n_rows, double* acc) const {
    simd::squared_deviation_rows(data + offset, n_rows, channels, mean, acc);
  }
};

}  // namespace

template <typename T>
ChannelMoments channel_moments(const T* data, const DenseChannels& d) {
  const double inv_count = 1.0 / static_cast<double>(d.count());
  ChannelMoments m;
  m.mean = per_channel_sums<1>(d, ValueSum<T>{data, d.channels});
  for (double& v : m.mean) v *= inv_count;
  m.var = per_channel_sums<1>(d, SquaredDeviationSum<T>{data, d.channels, m.mean.data()});
  for (double& v : m.var) v *= inv_count;
  return m;
}

template ChannelMoments channel_moments<float>(const float*, const DenseChannels&);
template ChannelMoments channel_moments<double>(const double*, const DenseChannels&);

}  // namespace fused_conv::cpu
