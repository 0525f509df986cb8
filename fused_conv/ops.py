"""Functional API: Conv2d -> BatchNorm2d -> x scale as one operator.

    out = s * (gamma * (conv(x) + b - mean) / sqrt(var + eps) + beta)

These functions validate and normalise arguments (pairs, 'same'/'valid' padding,
float or tensor scale) and call ``torch.ops.fused_conv.*``. The tensor checks
(shapes, dtypes, devices) live in the C++ kernels so that direct op calls get
them too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _autograd

__all__ = ["conv_bn_scale", "conv_bn_eval", "conv_bn_train", "conv_output_size"]

IntOrPair = int | Sequence[int]
Padding = int | Sequence[int] | str
Scale = float | Tensor


def _pair(value: IntOrPair, name: str) -> list[int]:
    # Fast path for what nn.Conv2d stores (a tuple of two ints): the generic checks
    # below (an ABC isinstance per call) cost microseconds of host time per forward.
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return [value[0], value[1]]
    if isinstance(value, int) and not isinstance(value, bool):
        return [value, value]
    items = list(value) if isinstance(value, Sequence) else None
    if items is None or len(items) != 2 or not all(isinstance(v, int) for v in items):
        raise ValueError(
            f"fused_conv: expected {name} to be an int or a pair of ints, got {value!r}"
        )
    return items


def _split_scale(scale: Scale) -> tuple[Tensor | None, float]:
    """The ops take `scale * scale_tensor`: a tensor scale stays a tensor so it can be learned."""
    if isinstance(scale, Tensor):
        if scale.numel() != 1:
            raise ValueError(
                f"fused_conv: expected a one-element scale tensor, got shape {tuple(scale.shape)}"
            )
        return scale, 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"fused_conv: expected scale to be a float or a tensor, got {type(scale)}")
    return None, float(scale)


def _resolve_padding(
    input: Tensor, weight: Tensor, padding: Padding, stride: list[int], dilation: list[int]
) -> tuple[Tensor, list[int]]:
    """Turns nn.Conv2d's padding forms into the symmetric padding the ops take.

    'same' with an odd total padding (even dilated kernel) needs one more row/column
    at the bottom/right, as PyTorch does it: that extra is padded explicitly.
    """
    if not isinstance(padding, str):
        return input, _pair(padding, "padding")
    if padding == "valid":
        return input, [0, 0]
    if padding != "same":
        raise ValueError(
            f"fused_conv: padding must be an int, a pair, 'same' or 'valid', got {padding!r}"
        )
    if stride != [1, 1]:
        raise ValueError("fused_conv: padding='same' is not supported for strided convolutions")
    if weight.dim() != 4:
        raise ValueError(
            f"fused_conv: expected a 4-D weight (C_out, C_in/groups, kh, kw), got shape "
            f"{tuple(weight.shape)}"
        )
    total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:], strict=False)]
    before = [t // 2 for t in total]
    extra = [t - 2 * b for t, b in zip(total, before, strict=True)]
    if any(extra):
        if input.dim() != 4:
            raise ValueError(
                f"fused_conv: expected a 4-D input (N, C_in, H, W), got shape {tuple(input.shape)}"
            )
        input = F.pad(input, [0, extra[1], 0, extra[0]])
    return input, before


def _call_op(op, function, *args):
    """op(*args), without torch.library's Python autograd wrapper on the eager path: under
    torch.compile the op is traced as registered; with grad mode on and an argument that
    requires grad, `function` (fused_conv._autograd: the registered formulas as an
    autograd.Function, without the wrapper's per-call host time) records the node; otherwise
    the op runs below the autograd layer, as the wrapper itself would run it."""
    if torch.compiler.is_compiling():
        return op(*args)
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
        return function.apply(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _geometry(input, weight, stride, padding, dilation):
    stride = _pair(stride, "stride")
    dilation = _pair(dilation, "dilation")
    input, padding = _resolve_padding(input, weight, padding, stride, dilation)
    return input, stride, padding, dilation


def conv_bn_eval(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    *,
    eps: float = 1e-5,
    scale: Scale = 1.0,
    stride: IntOrPair = 1,
    padding: Padding = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
) -> Tensor:
    """Eval-mode forward: BatchNorm with the running statistics, folded into the conv."""
    input, stride, padding, dilation = _geometry(input, weight, stride, padding, dilation)
    scale_tensor, scale_value = _split_scale(scale)
    return _call_op(
        torch.ops.fused_conv.conv_bn_eval.default, _autograd.EvalFunction,
        input, weight, bias, bn_weight, bn_bias, running_mean, running_var, float(eps),
        scale_tensor, scale_value, stride, padding, dilation, groups,
    )  # fmt: skip


def conv_bn_train(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    *,
    eps: float = 1e-5,
    scale: Scale = 1.0,
    stride: IntOrPair = 1,
    padding: Padding = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode forward with batch statistics. Returns (out, mean, invstd), the
    statistics per output channel over N*H_out*W_out (biased variance)."""
    input, stride, padding, dilation = _geometry(input, weight, stride, padding, dilation)
    scale_tensor, scale_value = _split_scale(scale)
    return _call_op(
        torch.ops.fused_conv.conv_bn_train.default, _autograd.TrainFunction,
        input, weight, bias, bn_weight, bn_bias, float(eps), scale_tensor, scale_value,
        stride, padding, dilation, groups,
    )  # fmt: skip


def conv_bn_scale(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    bn_weight: Tensor | None = None,
    bn_bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    *,
    training: bool,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    scale: Scale = 1.0,
    stride: IntOrPair = 1,
    padding: Padding = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    num_batches_tracked: Tensor | None = None,
) -> Tensor:
    """``conv2d -> F.batch_norm -> * scale`` with nn.BatchNorm2d's semantics.

    Batch statistics are used when ``training`` or when no running statistics are
    given. In training, given running statistics are updated in place with
    ``momentum`` (``None``: cumulative average over ``num_batches_tracked``), and
    ``num_batches_tracked``, when given, is incremented first, as nn.BatchNorm2d does.
    """
    if (running_mean is None) != (running_var is None):
        raise ValueError("fused_conv: running_mean and running_var must both be given or both None")
    if not training and running_mean is not None:
        return conv_bn_eval(
            input, weight, bias, bn_weight, bn_bias, running_mean, running_var,
            eps=eps, scale=scale, stride=stride, padding=padding, dilation=dilation,
            groups=groups,
        )  # fmt: skip

    out, mean, invstd = conv_bn_train(
        input, weight, bias, bn_weight, bn_bias, eps=eps, scale=scale, stride=stride,
        padding=padding, dilation=dilation, groups=groups,
    )  # fmt: skip
    if training and running_mean is not None:
        if momentum is None and num_batches_tracked is None:
            raise ValueError(
                "fused_conv: momentum=None (cumulative moving average) needs num_batches_tracked"
            )
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        count = out.shape[0] * out.shape[2] * out.shape[3]
        torch.ops.fused_conv.update_running_stats_(
            running_mean, running_var, mean, invstd,
            num_batches_tracked if momentum is None else None,
            None if momentum is None else float(momentum), float(eps), count,
        )  # fmt: skip
    return out
