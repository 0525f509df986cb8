"""Fake (meta) kernels: output shapes, dtypes and strides without computing anything.

They must agree with the device kernels exactly (opcheck compares them): the output
takes the input's suggested memory format (channels_last in, channels_last out), the
statistics are float32, or float64 for float64 inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from .ops import conv_output_size


def stats_dtype(input: Tensor) -> torch.dtype:
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def _conv_output(input, weight, stride, padding, dilation) -> Tensor:
    n, _, h, w = input.shape
    c_out, _, kh, kw = weight.shape
    h_out = conv_output_size(h, kh, stride[0], padding[0], dilation[0])
    w_out = conv_output_size(w, kw, stride[1], padding[1], dilation[1])
    return _empty((n, c_out, h_out, w_out), input, input.dtype, suggest_memory_format(input))


def _empty(shape, like: Tensor, dtype, memory_format=torch.contiguous_format) -> Tensor:
    # Tensor.new_empty takes no memory_format.
    return torch.empty(shape, dtype=dtype, device=like.device, memory_format=memory_format)


@torch.library.register_fake("fused_conv::conv_bn_eval")
def _conv_bn_eval_fake(
    input, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps,
    scale_tensor, scale, stride, padding, dilation, groups,
):  # fmt: skip
    return _conv_output(input, weight, stride, padding, dilation)


@torch.library.register_fake("fused_conv::conv_bn_train")
def _conv_bn_train_fake(
    input, weight, bias, bn_weight, bn_bias, eps, scale_tensor, scale,
    stride, padding, dilation, groups,
):  # fmt: skip
    out = _conv_output(input, weight, stride, padding, dilation)
    c_out = weight.shape[0]
    mean = input.new_empty((c_out,), dtype=stats_dtype(input))
    return out, mean, torch.empty_like(mean)


@torch.library.register_fake("fused_conv::update_running_stats_")
def _update_running_stats_fake(
    running_mean, running_var, mean, invstd, num_batches_tracked, momentum, eps, count
):
    return None


@torch.library.register_fake("fused_conv::conv_bn_backward")
def _conv_bn_backward_fake(
    grad_out, input, weight, bias, bn_weight, bn_bias, mean, invstd, scale_tensor, scale,
    stride, padding, dilation, groups, training, input_weight_mask,
):  # fmt: skip
    sdt = stats_dtype(input)
    c_out = weight.shape[0]
    grad_input = (
        _empty(input.shape, input, input.dtype, suggest_memory_format(input))
        if input_weight_mask[0]
        else input.new_empty((0,))
    )
    grad_weight = (
        _empty(weight.shape, weight, weight.dtype)
        if input_weight_mask[1]
        else weight.new_empty((0,))
    )
    per_channel = [input.new_empty((c_out,), dtype=sdt) for _ in range(3)]
    grad_scale = input.new_empty((), dtype=sdt)
    return (grad_input, grad_weight, *per_channel, grad_scale)
