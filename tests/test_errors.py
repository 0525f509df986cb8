"""Bad inputs raise clear errors (matched on message fragments), through the functional API
and, for tensor checks, through the ops directly (the C++ kernels validate too)."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, requires_cuda

import fused_conv
from fused_conv import ops

ERRORS = (RuntimeError, ValueError, TypeError, IndexError)


def _base(device, *, n=2, c_in=3, c_out=4, k=3, hw=(8, 8), dtype=torch.float32, groups=1):
    x = torch.randn(n, c_in, *hw, device=device).to(dtype)
    w = torch.randn(c_out, c_in // groups, k, k, device=device).to(dtype)
    vec = dict(
        bias=torch.randn(c_out, device=device).to(dtype),
        bn_weight=torch.rand(c_out, device=device).to(dtype) + 0.5,
        bn_bias=torch.randn(c_out, device=device).to(dtype),
        running_mean=torch.randn(c_out, device=device).to(dtype),
        running_var=torch.rand(c_out, device=device).to(dtype) + 0.5,
    )
    return x, w, vec


def _call(x, w, vec, *, training, **kw):
    return ops.conv_bn_scale(
        x, w, vec.get("bias"), vec.get("bn_weight"), vec.get("bn_bias"),
        vec.get("running_mean"), vec.get("running_var"), training=training, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
def test_conv_weight_dtype_mismatch(device, training):
    x, w, vec = _base(device)
    with pytest.raises(ERRORS, match=r"(?i)dtype|scalar type"):
        _call(x, w.double(), vec, training=training)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["bias", "bn_weight", "running_var"])
def test_per_channel_dtype_mismatch(device, which):
    """float64 BN params / bias with a float32 input are neither the input dtype nor float32."""
    x, w, vec = _base(device)
    vec[which] = vec[which].double()
    with pytest.raises(ERRORS, match=r"(?i)dtype|scalar type"):
        _call(x, w, vec, training=which != "running_var")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
def test_3d_input(device, training):
    x, w, vec = _base(device)
    with pytest.raises(ERRORS, match=r"(?i)4-?d|4 dim|dimension|\bdim"):
        _call(x[0], w, vec, training=training)


@pytest.mark.parametrize("device", DEVICES)
def test_3d_input_direct_op(device):
    x, w, vec = _base(device)
    with pytest.raises(ERRORS, match=r"(?i)4-?d|4 dim|dimension|\bdim"):
        torch.ops.fused_conv.conv_bn_train(x[0], w, None, None, None, 1e-5, None, 1.0,
                                           [1, 1], [0, 0], [1, 1], 1)  # fmt: skip
    with pytest.raises(ERRORS, match=r"(?i)4-?d|4 dim|dimension|\bdim"):
        torch.ops.fused_conv.conv_bn_eval(x, w[0], None, None, None, vec["running_mean"],
                                          vec["running_var"], 1e-5, None, 1.0, [1, 1], [0, 0],
                                          [1, 1], 1)  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
def test_channel_mismatch(device, training):
    x, w, vec = _base(device, c_in=3)
    w = torch.randn(4, 5, 3, 3, device=device)
    with pytest.raises(ERRORS, match=r"(?i)channel"):
        _call(x, w, vec, training=training)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
def test_kernel_larger_than_input(device, training):
    x, w, vec = _base(device, hw=(2, 5), k=3)
    with pytest.raises(ERRORS, match=r"(?i)kernel|output size|too small|input size|larger"):
        _call(x, w, vec, training=training)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["bias", "bn_weight", "bn_bias", "running_mean", "running_var"])
def test_wrong_per_channel_size(device, which):
    x, w, vec = _base(device)
    vec[which] = torch.randn(5, device=device)  # C_out is 4
    if which == "running_var":
        vec[which] = vec[which].abs()
    training = which not in ("running_mean", "running_var")
    with pytest.raises(ERRORS, match=r"(?i)size|shape|element|channel|numel"):
        _call(x, w, vec, training=training)


@pytest.mark.parametrize("device", DEVICES)
def test_wrong_running_stat_size_in_training_update(device):
    x, w, vec = _base(device)
    vec["running_mean"] = torch.randn(6, device=device)
    vec["running_var"] = torch.rand(6, device=device)
    with pytest.raises(ERRORS, match=r"(?i)size|shape|element|channel|numel"):
        _call(x, w, vec, training=True)


@pytest.mark.parametrize("device", DEVICES)
def test_groups_not_dividing(device):
    # C_in = 4, groups = 3: 4 is not divisible by 3
    x = torch.randn(2, 4, 6, 6, device=device)
    w = torch.randn(3, 1, 3, 3, device=device)
    with pytest.raises(ERRORS, match=r"(?i)group"):
        ops.conv_bn_scale(x, w, training=True, groups=3)
    # C_out = 3 not divisible by groups = 2 (C_in = 4 is)
    w = torch.randn(3, 2, 3, 3, device=device)
    with pytest.raises(ERRORS, match=r"(?i)group"):
        ops.conv_bn_scale(x, w, training=True, groups=2)
    with pytest.raises(ERRORS, match=r"(?i)group"):
        ops.conv_bn_scale(x, torch.randn(4, 4, 3, 3, device=device), training=True, groups=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("api", ["functional", "module"])
def test_one_value_per_channel_in_training(device, api):
    x = torch.randn(1, 3, 3, 3, device=device)  # 3x3 kernel -> 1x1 output, N = 1
    msg = "Expected more than 1 value per channel when training"
    if api == "module":
        m = fused_conv.ConvBNScale2d(3, 4, 3).to(device)
        with pytest.raises(ERRORS, match=msg):
            m(x)
        m.eval()
        assert m(x).shape == (1, 4, 1, 1)  # eval is fine
    else:
        with pytest.raises(ERRORS, match=msg):
            ops.conv_bn_scale(x, torch.randn(4, 3, 3, 3, device=device), training=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_non_float_dtype(device, dtype):
    x = torch.randint(0, 2, (2, 3, 6, 6), device=device).to(dtype)
    w = torch.randint(0, 2, (4, 3, 3, 3), device=device).to(dtype)
    with pytest.raises(ERRORS, match=r"(?i)float|dtype|scalar type"):
        ops.conv_bn_scale(x, w, training=True)


@pytest.mark.parametrize("device", DEVICES)
def test_momentum_none_needs_num_batches_tracked(device):
    x, w, vec = _base(device)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        _call(x, w, vec, training=True, momentum=None)


@pytest.mark.parametrize("device", DEVICES)
def test_update_op_momentum_none_needs_num_batches_tracked(device):
    c = 4
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    mean, invstd = torch.randn(c, device=device), torch.rand(c, device=device) + 0.5
    with pytest.raises(ERRORS, match="num_batches_tracked"):
        torch.ops.fused_conv.update_running_stats_(rm, rv, mean, invstd, None, None, 1e-5, 10)


def test_running_stats_both_or_neither():
    x, w, vec = _base("cpu")
    vec["running_var"] = None
    with pytest.raises(ValueError, match="running_mean and running_var"):
        _call(x, w, vec, training=False)


def test_scale_tensor_must_have_one_element():
    x, w, vec = _base("cpu")
    with pytest.raises(ValueError, match="one-element"):
        _call(x, w, vec, training=True, scale=torch.ones(2))


@pytest.mark.parametrize(
    "kw,pattern",
    [
        (dict(stride=0), r"(?i)stride"),
        (dict(stride=(1, -1)), r"(?i)stride"),
        (dict(padding=-1), r"(?i)padding"),
        (dict(dilation=0), r"(?i)dilation"),
        (dict(padding="same", stride=2), r"(?i)same"),
        (dict(padding="full"), r"(?i)padding"),
        (dict(stride=(1, 1, 1)), r"(?i)stride"),
    ],
)
def test_bad_geometry(kw, pattern):
    x, w, vec = _base("cpu")
    with pytest.raises(ERRORS, match=pattern):
        _call(x, w, vec, training=True, **kw)


def test_weight_must_be_4d():
    x, w, vec = _base("cpu")
    with pytest.raises(ERRORS, match=r"(?i)4-?d|4 dim|dimension|\bdim|weight"):
        _call(x, w[:, :, 0], vec, training=True)


@requires_cuda
@pytest.mark.parametrize("which", ["weight", "bias", "bn_weight", "running_mean"])
def test_wrong_device(which):
    x, w, vec = _base("cuda")
    if which == "weight":
        w = w.cpu()
    else:
        vec[which] = vec[which].cpu()
    with pytest.raises(ERRORS, match=r"(?i)device|cuda|cpu"):
        _call(x, w, vec, training=which != "running_mean")


@pytest.mark.parametrize("device", DEVICES)
def test_update_op_count_one(device):
    c = 4
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    mean, invstd = torch.randn(c, device=device), torch.rand(c, device=device) + 0.5
    with pytest.raises(ERRORS, match="count"):
        torch.ops.fused_conv.update_running_stats_(rm, rv, mean, invstd, None, 0.1, 1e-5, 1)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_op_grad_out_shape(device):
    x, w, vec = _base(device)
    out, mean, invstd = ops.conv_bn_train(x, w, None, None, None)
    bad = torch.randn(out.shape[0], out.shape[1], out.shape[2] + 1, out.shape[3], device=device)
    with pytest.raises(ERRORS, match="grad_out"):
        torch.ops.fused_conv.conv_bn_backward(
            bad, x, w, None, None, None, mean, invstd, None, 1.0, [1, 1], [0, 0], [1, 1], 1,
            True, [True, True],
        )  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_negative_eps(device):
    x, w, vec = _base(device)
    with pytest.raises(ERRORS, match="eps"):
        _call(x, w, vec, training=True, eps=-1.0)
