// update_running_stats_ on CUDA in one launch (see running_stats_update.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fused_conv::cuda {

void update_running_stats_cuda(const at::Tensor& running_mean, const at::Tensor& running_var,
                               const at::Tensor& mean, const at::Tensor& invstd,
                               const std::optional<at::Tensor>& num_batches_tracked,
                               std::optional<double> momentum, double eps, int64_t count);

}  // namespace fused_conv::cuda
