// The op schemas of fused_conv, defined once. Device kernels register against
// them with TORCH_LIBRARY_IMPL (csrc/kernels/<device>/register_<device>.cpp);
// autograd and fake (meta) kernels are registered from Python
// (fused_conv/_meta.py, fused_conv/_autograd.py).
//
// Shared conventions (see docs/DESIGN.md, "Op contract"):
//   * weight is [C_out, C_in / groups, kh, kw]; bias, bn_weight, bn_bias are
//     [C_out]; a missing bn_weight / bn_bias means affine=False (gamma=1,
//     beta=0).
//   * The scale applied to the BN output is `scale * scale_tensor` when
//     scale_tensor (a one-element tensor, e.g. a learnable nn.Parameter) is
//     given, else the float `scale`.
//   * padding is symmetric; 'same' / 'valid' / asymmetric padding are resolved
//     by the Python front (fused_conv.ops) before the op is called.
//   * mean / invstd are per-channel [C_out] statistics in the accumulation
//     dtype (float32 for float16 / bfloat16 / float32 inputs, float64 for
//     float64).
//
// Why the running-statistics update is its own op: torch.library only accepts
// autograd formulas for functional schemas, so the differentiable training
// forward cannot also mutate the running buffers. The update is a C_out-sized
// elementwise op, one tiny launch.
#include <torch/library.h>

TORCH_LIBRARY(fused_conv, m) {
  // Eval forward: BN uses running statistics; BN and scale fold into the conv.
  m.def(
      "conv_bn_eval(Tensor input, Tensor weight, Tensor? bias, "
      "Tensor? bn_weight, Tensor? bn_bias, Tensor running_mean, "
      "Tensor running_var, float eps, Tensor? scale_tensor, float scale, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor");

  // Training forward: BN uses the batch statistics over N*H_out*W_out
  // (biased variance). Returns (out, mean, invstd); invstd = 1/sqrt(var+eps).
  m.def(
      "conv_bn_train(Tensor input, Tensor weight, Tensor? bias, "
      "Tensor? bn_weight, Tensor? bn_bias, float eps, Tensor? scale_tensor, "
      "float scale, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups) -> (Tensor, Tensor, Tensor)");

  // nn.BatchNorm2d's running-statistics update from the batch statistics of
  // conv_bn_train: with f = momentum, or 1/num_batches_tracked when momentum
  // is None (cumulative average; num_batches_tracked already incremented),
  //   running_mean = (1-f)*running_mean + f*mean
  //   running_var  = (1-f)*running_var  + f*var*count/(count-1)
  // where var = 1/invstd^2 - eps and count = N*H_out*W_out.
  m.def(
      "update_running_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, "
      "Tensor mean, Tensor invstd, Tensor? num_batches_tracked, "
      "float? momentum, float eps, SymInt count) -> ()");

  // Backward of both forwards. Recomputes conv(input)+bias where the
  // training-mode formula needs x_hat; nothing output-sized is saved.
  // training=False uses mean/invstd as constants (eval: running stats).
  // Returns (grad_input, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias,
  // grad_scale). grad_input / grad_weight are empty ([0]) when their
  // input_weight_mask entry is false. The per-channel grads are [C_out] in the
  // statistics' dtype and always computed (they are cheap reductions; the
  // Python autograd formula drops the ones of absent parameters and casts to
  // the parameters' dtype); grad_scale is a 0-dim tensor in the statistics'
  // dtype: the
  // gradient w.r.t. the effective scale s (the caller applies the chain rule
  // for scale_tensor).
  m.def(
      "conv_bn_backward(Tensor grad_out, Tensor input, Tensor weight, "
      "Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, Tensor mean, "
      "Tensor invstd, Tensor? scale_tensor, float scale, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, bool training, "
      "bool[2] input_weight_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor)");
}
