// CPU kernels of the fused_conv ops (schemas: csrc/bindings/op_schemas.cpp).
#include <torch/library.h>

#include "kernels/common/conv_bn_aten.h"
#include "kernels/cpu/conv_bn_cpu.h"

TORCH_LIBRARY_IMPL(fused_conv, CPU, m) {
  // Eval is one convolution with BN and scale folded into its weight and bias;
  // the running-statistics update is C_out-sized: the ATen versions are the
  // CPU kernels as they are.
  m.impl("conv_bn_eval", TORCH_FN(fused_conv::aten_impl::conv_bn_eval));
  m.impl("conv_bn_train", TORCH_FN(fused_conv::cpu::conv_bn_train));
  m.impl("update_running_stats_", TORCH_FN(fused_conv::aten_impl::update_running_stats_));
  m.impl("conv_bn_backward", TORCH_FN(fused_conv::cpu::conv_bn_backward));
}
