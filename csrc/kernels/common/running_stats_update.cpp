// update_running_stats_ of conv_bn_aten.h: C_out-sized elementwise work, the
// same on every device (the CPU kernels register it too).
#include <ATen/ATen.h>

#include <variant>

#include "kernels/common/conv_bn_aten.h"
#include "kernels/common/conv_bn_checks.h"

namespace fused_conv::aten_impl {
namespace {

// The averaging factor f: momentum (a host number), or 1 / num_batches_tracked
// read on the device (no host sync).
using Factor = std::variant<double, at::Tensor>;

// buffer = (1 - f) * buffer + f * batch_value, computed in the statistics
// dtype and rounded once into the buffer's dtype.
void blend_into(const at::Tensor& buffer, const at::Tensor& batch_value, const Factor& factor) {
  const bool same_dtype = buffer.scalar_type() == batch_value.scalar_type();
  const at::Tensor work = same_dtype ? buffer : buffer.to(batch_value.scalar_type());
  if (const double* f = std::get_if<double>(&factor)) {
    work.lerp_(batch_value, *f);
  } else {
    work.lerp_(batch_value, std::get<at::Tensor>(factor));
  }
  if (!same_dtype) buffer.copy_(work);
}

}  // namespace

void update_running_stats_(const at::Tensor& running_mean, const at::Tensor& running_var,
                           const at::Tensor& mean, const at::Tensor& invstd,
                           const std::optional<at::Tensor>& num_batches_tracked,
                           std::optional<double> momentum, double eps, int64_t count) {
  check_update_running_stats_args(running_mean, running_var, mean, invstd, num_batches_tracked,
                                  momentum, eps, count);
  if (count == 0) return;  // an empty batch carries no statistics
  const auto stats_dtype = mean.scalar_type();

  // The batch variance back from invstd = 1/sqrt(var + eps), then unbiased
  // (Bessel's correction over the count values per channel), as
  // nn.BatchNorm2d stores it.
  const double bessel = static_cast<double>(count) / static_cast<double>(count - 1);
  const at::Tensor unbiased_var = invstd.pow(-2).sub_(eps).mul_(bessel);

  Factor factor = 0.0;
  if (momentum.has_value()) {
    factor = *momentum;
  } else {
    // Cumulative moving average: f = 1 / num_batches_tracked, which the caller
    // has already incremented (>= 1). A count of 0 is taken as 1 (the buffers
    // become the batch statistics) instead of dividing by zero.
    factor = num_batches_tracked->reshape({}).to(stats_dtype).clamp_min(1).reciprocal();
  }
  blend_into(running_mean, mean, factor);
  blend_into(running_var, unbiased_var, factor);
}

}  // namespace fused_conv::aten_impl
