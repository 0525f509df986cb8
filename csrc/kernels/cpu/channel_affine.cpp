#include "kernels/cpu/channel_affine.h"

#include "kernels/cpu/per_channel_map.h"
#include "kernels/cpu/simd_loops.h"

namespace fused_conv::cpu {
namespace {

template <typename T>
struct AffineMap {
  T* data;
  int64_t channels;
  const T* shift;
  const T* mul;
  const T* add;

  void run(int64_t c, int64_t offset, int64_t length) const {
    simd::affine_run(data + offset, length, shift[c], mul[c], add[c]);
  }
  void rows(int64_t offset, int64_t n_rows) const {
    simd::affine_rows(data + offset, n_rows, channels, shift, mul, add);
  }
};

}  // namespace

template <typename T>
void apply_channel_affine_(T* data, const DenseChannels& d, const ChannelAffine<T>& affine) {
  for_each_channel_run(
      d, AffineMap<T>{data, d.channels, affine.shift.data(), affine.mul.data(), affine.add.data()});
}

template void apply_channel_affine_<float>(float*, const DenseChannels&,
                                           const ChannelAffine<float>&);
template void apply_channel_affine_<double>(double*, const DenseChannels&,
                                            const ChannelAffine<double>&);

}  // namespace fused_conv::cpu
