"""Autograd formulas for the forward ops, registered with torch.library.

Both forwards save only the input, the parameters and per-channel statistics; the
backward op recomputes conv(x) + b where it needs x_hat, so no output-sized tensor
is kept alive between forward and backward.
"""

from __future__ import annotations

import torch

from ._meta import stats_dtype

_backward_op = torch.ops.fused_conv.conv_bn_backward


def _param_grads(ctx, raw, bias, bn_weight, bn_bias, scale_tensor, scale):
    """Drops the per-channel gradients of absent/frozen parameters, casts the rest to the
    parameters' dtype, and applies d(scale * t)/dt = scale for a tensor scale."""
    _, _, grad_bias, grad_bn_weight, grad_bn_bias, grad_scale = raw

    def keep(grad, param, needed):
        return grad.to(param.dtype) if (param is not None and needed) else None

    grad_scale_tensor = None
    if scale_tensor is not None and ctx.needs_grad_scale:
        grad_scale_tensor = (grad_scale * scale).reshape(scale_tensor.shape).to(scale_tensor.dtype)
    return (
        keep(grad_bias, bias, ctx.needs_grad_bias),
        keep(grad_bn_weight, bn_weight, ctx.needs_grad_bn_weight),
        keep(grad_bn_bias, bn_bias, ctx.needs_grad_bn_bias),
        grad_scale_tensor,
    )


def _run_backward(ctx, grad_out, mean, invstd, training):
    input, weight, bias, bn_weight, bn_bias, scale_tensor = ctx.saved_inputs
    raw = _backward_op(
        grad_out, input, weight, bias, bn_weight, bn_bias, mean, invstd, scale_tensor,
        ctx.scale, ctx.stride, ctx.padding, ctx.dilation, ctx.groups, training,
        [ctx.needs_grad_input, ctx.needs_grad_weight],
    )  # fmt: skip
    grad_input = raw[0] if ctx.needs_grad_input else None
    grad_weight = raw[1] if ctx.needs_grad_weight else None
    grad_bias, grad_bn_weight, grad_bn_bias, grad_scale_tensor = _param_grads(
        ctx, raw, bias, bn_weight, bn_bias, scale_tensor, ctx.scale
    )
    return grad_input, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias, grad_scale_tensor


def _record_needs(ctx, scale_index):
    needs = ctx.needs_input_grad
    ctx.needs_grad_input, ctx.needs_grad_weight, ctx.needs_grad_bias = needs[0:3]
    ctx.needs_grad_bn_weight, ctx.needs_grad_bn_bias = needs[3:5]
    ctx.needs_grad_scale = needs[scale_index]


# ---- eval forward --------------------------------------------------------------------------


def _eval_setup_context(ctx, inputs, output):
    (input, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps,
     scale_tensor, scale, stride, padding, dilation, groups) = inputs  # fmt: skip
    # The running buffers are saved as they are (like PyTorch's batch_norm): changing
    # them in place before backward is reported by autograd's version check.
    ctx.save_for_backward(
        input, weight, bias, bn_weight, bn_bias, scale_tensor, running_mean, running_var
    )
    ctx.eps, ctx.scale, ctx.groups = eps, scale, groups
    ctx.stride, ctx.padding, ctx.dilation = list(stride), list(padding), list(dilation)
    _record_needs(ctx, scale_index=8)


def _eval_backward(ctx, grad_out):
    saved = ctx.saved_tensors
    ctx.saved_inputs = saved[:6]
    running_mean, running_var = saved[6:]
    sdt = stats_dtype(saved[0])
    mean = running_mean.to(sdt)
    invstd = torch.rsqrt(running_var.to(sdt) + ctx.eps)
    grads = _run_backward(ctx, grad_out, mean, invstd, training=False)
    grad_input, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias, grad_scale = grads
    return (grad_input, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias, None, None, None,
            grad_scale, None, None, None, None, None)  # fmt: skip


# ---- training forward ----------------------------------------------------------------------


def _train_setup_context(ctx, inputs, output):
    (input, weight, bias, bn_weight, bn_bias, eps, scale_tensor, scale,
     stride, padding, dilation, groups) = inputs  # fmt: skip
    _, mean, invstd = output
    ctx.mark_non_differentiable(mean, invstd)
    # No zero tensors for the statistics' gradients (always unused) or an
    # unused output: the backward checks for None instead.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(input, weight, bias, bn_weight, bn_bias, scale_tensor, mean, invstd)
    ctx.scale, ctx.groups = scale, groups
    ctx.stride, ctx.padding, ctx.dilation = list(stride), list(padding), list(dilation)
    _record_needs(ctx, scale_index=6)


def _train_backward(ctx, grad_out, _grad_mean, _grad_invstd):
    saved = ctx.saved_tensors
    ctx.saved_inputs = saved[:6]
    mean, invstd = saved[6:]
    if grad_out is None:
        return (None,) * 12
    grads = _run_backward(ctx, grad_out, mean, invstd, training=True)
    grad_input, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias, grad_scale = grads
    return (grad_input, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias, None,
            grad_scale, None, None, None, None, None)  # fmt: skip


torch.library.register_autograd(
    "fused_conv::conv_bn_eval", _eval_backward, setup_context=_eval_setup_context
)
torch.library.register_autograd(
    "fused_conv::conv_bn_train", _train_backward, setup_context=_train_setup_context
)


# ---- the functional API's route to the same formulas -----------------------------------------
#
# The registrations above serve direct calls of torch.ops.fused_conv.* and torch.compile. Their
# wrapper (torch/_library/autograd.py) re-fills the schema defaults on every call
# (utils.fill_defaults reads schema.arguments once per argument: quadratic in the 12-14
# arguments; 75 us per call) and redispatches from Python. On the H200's host the bf16
# training step took 0.97 ms of host time through the wrapper and 0.50 ms through these
# Functions (eager's own step: 0.89 and 0.76 ms on the same two hosts), against 0.80 ms of GPU
# time: the wrapper had set the step's pace. fused_conv.ops (eager, grad needed) applies these
# Functions: the same setup_context and backward, the op called below autograd.


def _make_function(name, op, setup_context, backward):
    def forward(ctx, *args):
        with torch._C._AutoDispatchBelowAutograd():
            output = op(*args)
        setup_context(ctx, args, output)
        return output

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(backward),
    })  # fmt: skip


EvalFunction = _make_function(
    "ConvBNEvalBackward", torch.ops.fused_conv.conv_bn_eval.default, _eval_setup_context,
    _eval_backward,
)  # fmt: skip
TrainFunction = _make_function(
    "ConvBNTrainBackward", torch.ops.fused_conv.conv_bn_train.default, _train_setup_context,
    _train_backward,
)  # fmt: skip
