#include "kernels/common/conv_bn_checks.h"

#include <c10/util/Exception.h>

#include <string>

namespace fused_conv {
namespace {

// torch's Python names (torch.float32, ...), which is what users write.
std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return "float32";
    case at::kDouble:
      return "float64";
    case at::kHalf:
      return "float16";
    case at::kBFloat16:
      return "bfloat16";
    case at::kInt:
      return "int32";
    case at::kLong:
      return "int64";
    case at::kBool:
      return "bool";
    default:
      return c10::toString(dtype);
  }
}

bool is_supported_float(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
         dtype == at::kBFloat16;
}

bool is_reduced_float(at::ScalarType dtype) { return dtype == at::kHalf || dtype == at::kBFloat16; }

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// `reference` is the input, or mean for update_running_stats_ (which has no input).
void check_same_device(const at::Tensor& reference, const at::Tensor& t, const char* name,
                       const char* reference_name = "input") {
  TORCH_CHECK(t.device() == reference.device(), "fused_conv: expected ", name, " on the ",
              reference_name, "'s device ", reference.device(), ", but got ", t.device());
}

void check_int_pair(at::IntArrayRef values, const char* name, int64_t minimum) {
  TORCH_CHECK(values.size() == 2, "fused_conv: expected ", name, " to have 2 elements, but got ",
              values.size(), " (", values, ")");
  TORCH_CHECK(values[0] >= minimum && values[1] >= minimum, "fused_conv: expected ", name,
              minimum == 0 ? " >= 0" : " > 0", ", but got ", name, " = ", values);
}

// bias, bn_weight, bn_bias, running stats, mean, invstd: one value per output channel.
void check_per_channel(const at::Tensor& reference, const at::Tensor& t, const char* name,
                       int64_t channels, const char* reference_name = "input") {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, "fused_conv: expected ", name,
              " to be a 1-D tensor of C_out = ", channels, " elements, but got shape ", t.sizes());
  check_same_device(reference, t, name, reference_name);
}

// The conv's own parameters share the input's dtype (as at::convolution demands).
void check_input_dtype(const at::Tensor& input, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), "fused_conv: expected ", name, " of dtype ",
              dtype_name(input.scalar_type()), " (the input's), but got ",
              dtype_name(t.scalar_type()));
}

// BN parameters and running statistics: the input's dtype, or float32 next to
// float16 / bfloat16 inputs (mixed precision keeps BN in float32, as cuDNN and
// PyTorch's own batch_norm allow).
void check_bn_dtype(const at::Tensor& input, const at::Tensor& t, const char* name) {
  const auto dtype = input.scalar_type();
  const bool ok =
      t.scalar_type() == dtype || (is_reduced_float(dtype) && t.scalar_type() == at::kFloat);
  TORCH_CHECK(ok, "fused_conv: expected ", name, " of dtype ", dtype_name(dtype),
              is_reduced_float(dtype) ? " (the input's) or float32" : " (the input's)",
              ", but got ", dtype_name(t.scalar_type()));
}

void check_bn_param(const at::Tensor& input, const std::optional<at::Tensor>& t, const char* name,
                    int64_t channels) {
  if (!present(t)) return;
  check_per_channel(input, *t, name, channels);
  check_bn_dtype(input, *t, name);
}

void check_scale_tensor(const at::Tensor& input, const std::optional<at::Tensor>& scale_tensor) {
  if (!present(scale_tensor)) return;
  const auto& t = *scale_tensor;
  TORCH_CHECK(t.numel() == 1, "fused_conv: expected scale_tensor to hold exactly one element, ",
              "but got shape ", t.sizes());
  // Any floating dtype: like `out * scale_tensor` in eager, it is applied in the
  // statistics dtype.
  TORCH_CHECK(at::isFloatingType(t.scalar_type()),
              "fused_conv: expected a floating-point scale_tensor, but got dtype ",
              dtype_name(t.scalar_type()));
  check_same_device(input, t, "scale_tensor");
}

// Everything both forwards and the backward share: input, weight, bias, BN
// parameters, scale_tensor and the convolution geometry.
ConvBnGeometry check_common_args(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& bn_weight,
                                 const std::optional<at::Tensor>& bn_bias,
                                 const std::optional<at::Tensor>& scale_tensor,
                                 const ConvParams& conv) {
  TORCH_CHECK(input.defined() && weight.defined(),
              "fused_conv: expected defined input and weight tensors");
  TORCH_CHECK(input.dim() == 4, "fused_conv: expected a 4-D input (N, C_in, H, W), but got a ",
              input.dim(), "-D tensor of shape ", input.sizes());
  TORCH_CHECK(weight.dim() == 4,
              "fused_conv: expected a 4-D weight (C_out, C_in / groups, kh, kw), but got a ",
              weight.dim(), "-D tensor of shape ", weight.sizes());
  TORCH_CHECK(is_supported_float(input.scalar_type()),
              "fused_conv: expected input of dtype float32, float64, float16 or bfloat16, but got ",
              dtype_name(input.scalar_type()));
  check_input_dtype(input, weight, "weight");
  check_same_device(input, weight, "weight");

  TORCH_CHECK(conv.groups > 0, "fused_conv: expected groups > 0, but got groups = ", conv.groups);
  check_int_pair(conv.stride, "stride", 1);
  check_int_pair(conv.padding, "padding", 0);
  check_int_pair(conv.dilation, "dilation", 1);

  ConvBnGeometry g;
  g.batch = input.size(0);
  g.in_channels = input.size(1);
  g.out_channels = weight.size(0);
  g.groups = conv.groups;
  TORCH_CHECK(weight.size(1) * conv.groups == g.in_channels, "fused_conv: expected input with ",
              "weight.size(1) * groups = ", weight.size(1), " * ", conv.groups, " = ",
              weight.size(1) * conv.groups, " channels, but got ", g.in_channels,
              " channels (input shape ", input.sizes(), ", weight shape ", weight.sizes(), ")");
  TORCH_CHECK(g.out_channels % conv.groups == 0,
              "fused_conv: expected C_out (weight.size(0) = ", g.out_channels,
              ") to be divisible by groups = ", conv.groups);

  if (present(bias)) {
    check_per_channel(input, *bias, "bias", g.out_channels);
    check_input_dtype(input, *bias, "bias");
  }
  check_bn_param(input, bn_weight, "bn_weight", g.out_channels);
  check_bn_param(input, bn_bias, "bn_bias", g.out_channels);
  check_scale_tensor(input, scale_tensor);

  // Output size per spatial dim: (size + 2*pad - dil*(k-1) - 1) / stride + 1,
  // which is >= 1 exactly when the dilated kernel fits the padded input.
  int64_t out_size[2];
  int64_t padded[2];
  int64_t dilated_kernel[2];
  for (int i = 0; i < 2; ++i) {
    padded[i] = input.size(2 + i) + 2 * conv.padding[i];
    dilated_kernel[i] = conv.dilation[i] * (weight.size(2 + i) - 1) + 1;
    out_size[i] = (padded[i] - dilated_kernel[i]) / conv.stride[i] + 1;
  }
  TORCH_CHECK(padded[0] >= dilated_kernel[0] && padded[1] >= dilated_kernel[1],
              "fused_conv: calculated padded input size per channel: (", padded[0], " x ",
              padded[1], "). Kernel size (dilated): (", dilated_kernel[0], " x ", dilated_kernel[1],
              "). Kernel size can't be greater than actual input size");
  g.out_height = out_size[0];
  g.out_width = out_size[1];
  g.count = g.batch * g.out_height * g.out_width;
  g.stats_dtype = stats_dtype_for(input.scalar_type());
  g.memory_format = input.suggest_memory_format();
  return g;
}

void check_eps(double eps) {
  TORCH_CHECK(eps >= 0, "fused_conv: expected eps >= 0, but got eps = ", eps);
}

void check_stats_tensor(const at::Tensor& input, const at::Tensor& t, const char* name,
                        const ConvBnGeometry& g) {
  check_per_channel(input, t, name, g.out_channels);
  TORCH_CHECK(t.scalar_type() == g.stats_dtype, "fused_conv: expected ", name, " of dtype ",
              dtype_name(g.stats_dtype), " (the statistics dtype for ",
              dtype_name(input.scalar_type()), " inputs), but got ", dtype_name(t.scalar_type()));
}

}  // namespace

at::ScalarType stats_dtype_for(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

ConvBnGeometry check_eval_args(const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& bn_weight,
                               const std::optional<at::Tensor>& bn_bias,
                               const at::Tensor& running_mean, const at::Tensor& running_var,
                               double eps, const std::optional<at::Tensor>& scale_tensor,
                               const ConvParams& conv) {
  auto g = check_common_args(input, weight, bias, bn_weight, bn_bias, scale_tensor, conv);
  check_eps(eps);
  for (const auto& [t, name] :
       {std::pair{&running_mean, "running_mean"}, std::pair{&running_var, "running_var"}}) {
    TORCH_CHECK(t->defined(), "fused_conv: expected a defined ", name, " tensor");
    check_per_channel(input, *t, name, g.out_channels);
    check_bn_dtype(input, *t, name);
  }
  return g;
}

ConvBnGeometry check_train_args(const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& bn_weight,
                                const std::optional<at::Tensor>& bn_bias, double eps,
                                const std::optional<at::Tensor>& scale_tensor,
                                const ConvParams& conv) {
  auto g = check_common_args(input, weight, bias, bn_weight, bn_bias, scale_tensor, conv);
  check_eps(eps);
  TORCH_CHECK(g.count != 1,
              "fused_conv: Expected more than 1 value per channel when training, got input size ",
              at::IntArrayRef(g.output_sizes()));
  return g;
}

ConvBnGeometry check_backward_args(const at::Tensor& grad_out, const at::Tensor& input,
                                   const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                   const std::optional<at::Tensor>& bn_weight,
                                   const std::optional<at::Tensor>& bn_bias, const at::Tensor& mean,
                                   const at::Tensor& invstd,
                                   const std::optional<at::Tensor>& scale_tensor,
                                   const ConvParams& conv) {
  auto g = check_common_args(input, weight, bias, bn_weight, bn_bias, scale_tensor, conv);
  TORCH_CHECK(grad_out.defined(), "fused_conv: expected a defined grad_out tensor");
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(g.output_sizes()),
              "fused_conv: expected grad_out of shape ", at::IntArrayRef(g.output_sizes()),
              " (the output's), but got ", grad_out.sizes());
  check_input_dtype(input, grad_out, "grad_out");
  check_same_device(input, grad_out, "grad_out");
  TORCH_CHECK(mean.defined() && invstd.defined(),
              "fused_conv: expected defined mean and invstd tensors");
  check_stats_tensor(input, mean, "mean", g);
  check_stats_tensor(input, invstd, "invstd", g);
  return g;
}

void check_update_running_stats_args(const at::Tensor& running_mean, const at::Tensor& running_var,
                                     const at::Tensor& mean, const at::Tensor& invstd,
                                     const std::optional<at::Tensor>& num_batches_tracked,
                                     std::optional<double> momentum, double eps, int64_t count) {
  TORCH_CHECK(mean.defined() && invstd.defined() && running_mean.defined() && running_var.defined(),
              "fused_conv: expected defined running_mean, running_var, mean and invstd tensors");
  TORCH_CHECK(mean.dim() == 1, "fused_conv: expected mean to be a 1-D tensor, but got shape ",
              mean.sizes());
  const int64_t channels = mean.size(0);
  const auto stats_dtype = mean.scalar_type();
  TORCH_CHECK(stats_dtype == at::kFloat || stats_dtype == at::kDouble,
              "fused_conv: expected mean of dtype float32 or float64 (a statistics dtype), ",
              "but got ", dtype_name(stats_dtype));
  TORCH_CHECK(invstd.scalar_type() == stats_dtype, "fused_conv: expected invstd of dtype ",
              dtype_name(stats_dtype), " (mean's), but got ", dtype_name(invstd.scalar_type()));
  for (const auto& [t, name] :
       {std::pair{&invstd, "invstd"}, std::pair{&running_mean, "running_mean"},
        std::pair{&running_var, "running_var"}}) {
    check_per_channel(mean, *t, name, channels, "mean");
  }
  for (const auto& [t, name] :
       {std::pair{&running_mean, "running_mean"}, std::pair{&running_var, "running_var"}}) {
    TORCH_CHECK(is_supported_float(t->scalar_type()), "fused_conv: expected ", name,
                " of dtype float32, float64, float16 or bfloat16, but got ",
                dtype_name(t->scalar_type()));
  }
  TORCH_CHECK(count >= 0 && count != 1, "fused_conv: expected count = N * H_out * W_out to be 0 ",
              "(no-op) or more than 1 (the unbiased variance divides by count - 1), but got ",
              count);
  check_eps(eps);
  if (momentum.has_value()) return;  // any value, as nn.BatchNorm2d allows
  TORCH_CHECK(present(num_batches_tracked),
              "fused_conv: expected num_batches_tracked when momentum is None (the cumulative ",
              "moving average divides by it), but got None");
  TORCH_CHECK(num_batches_tracked->numel() == 1,
              "fused_conv: expected num_batches_tracked to hold exactly one element, but got ",
              "shape ", num_batches_tracked->sizes());
  check_same_device(mean, *num_batches_tracked, "num_batches_tracked", "mean");
}

}  // namespace fused_conv
