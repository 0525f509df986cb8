"""torch.library.opcheck on every op: schema (mutation/aliasing), autograd registration, fake
kernels (shapes/strides/dtypes) and AOT dispatch, with several sample inputs each."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, seed_of

import fused_conv  # noqa: F401  (registers the ops and their fake/autograd kernels)

OPS = torch.ops.fused_conv


def _t(g, shape, device, dtype=torch.float32, *, grad=False, positive=False, cl=False):
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    if positive:
        t = 0.5 + t.abs()
    t = t.to(device=device, dtype=dtype)
    if cl:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(grad)


def _geometry(kind):
    # (c_in, c_out, k, hw, stride, padding, dilation, groups)
    return {
        "plain": (3, 4, 3, (7, 6), [1, 1], [1, 1], [1, 1], 1),
        "grouped": (4, 6, 3, (9, 8), [2, 1], [1, 2], [2, 1], 2),
        "pointwise": (5, 3, 1, (4, 5), [1, 1], [0, 0], [1, 1], 1),
    }[kind]


# (geometry, layout, optional tensors present, scale tensor, dtype, requires_grad)
SAMPLES = [
    pytest.param("plain", False, True, True, torch.float32, True, id="plain-all-scaletensor-grad"),
    pytest.param("plain", True, True, True, torch.float32, True, id="plain-cl-all-grad"),
    pytest.param("grouped", False, False, False, torch.float32, True, id="grouped-bare-grad"),
    pytest.param("grouped", True, False, True, torch.float64, False, id="grouped-cl-f64-nograd"),
    pytest.param("pointwise", False, True, False, torch.float64, True, id="pointwise-f64-grad"),
]


def _args(kind, cl, optional, scale_tensor, dtype, grad, device, seed):
    g = torch.Generator().manual_seed(seed)
    c_in, c_out, k, hw, stride, padding, dilation, groups = _geometry(kind)
    x = _t(g, (2, c_in, *hw), device, dtype, grad=grad, cl=cl)
    w = _t(g, (c_out, c_in // groups, k, k), device, dtype, grad=grad, cl=cl)
    b = _t(g, (c_out,), device, dtype, grad=grad) if optional else None
    gamma = _t(g, (c_out,), device, dtype, grad=grad, positive=True) if optional else None
    beta = _t(g, (c_out,), device, dtype, grad=grad) if optional else None
    st = _t(g, (), device, dtype, grad=grad) if scale_tensor else None
    return g, dict(
        x=x, w=w, b=b, gamma=gamma, beta=beta, st=st, scale=1.25, stride=stride,
        padding=padding, dilation=dilation, groups=groups, c_out=c_out,
    )  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,cl,optional,scale_tensor,dtype,grad", SAMPLES)
def test_opcheck_conv_bn_eval(kind, cl, optional, scale_tensor, dtype, grad, device):
    g, a = _args(kind, cl, optional, scale_tensor, dtype, grad, device,
                 seed_of("eval", kind, cl, device))  # fmt: skip
    rm = _t(g, (a["c_out"],), device, dtype)
    rv = _t(g, (a["c_out"],), device, dtype, positive=True)
    torch.library.opcheck(
        OPS.conv_bn_eval.default,
        (a["x"], a["w"], a["b"], a["gamma"], a["beta"], rm, rv, 1e-5, a["st"], a["scale"],
         a["stride"], a["padding"], a["dilation"], a["groups"]),
    )  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,cl,optional,scale_tensor,dtype,grad", SAMPLES)
def test_opcheck_conv_bn_train(kind, cl, optional, scale_tensor, dtype, grad, device):
    _, a = _args(kind, cl, optional, scale_tensor, dtype, grad, device,
                 seed_of("train", kind, cl, device))  # fmt: skip
    torch.library.opcheck(
        OPS.conv_bn_train.default,
        (a["x"], a["w"], a["b"], a["gamma"], a["beta"], 1e-5, a["st"], a["scale"], a["stride"],
         a["padding"], a["dilation"], a["groups"]),
    )  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "momentum,with_nbt,count,dtype",
    [
        (0.1, False, 50, torch.float32),
        (0.1, True, 50, torch.float32),
        (None, True, 7, torch.float32),
        (0.3, False, 0, torch.float32),
        (None, True, 12, torch.float64),
    ],
)
def test_opcheck_update_running_stats(momentum, with_nbt, count, dtype, device):
    g = torch.Generator().manual_seed(seed_of("update", momentum, with_nbt, count, device))
    c = 5
    rm = _t(g, (c,), device, dtype)
    rv = _t(g, (c,), device, dtype, positive=True)
    mean = _t(g, (c,), device, dtype)
    invstd = _t(g, (c,), device, dtype, positive=True)
    nbt = torch.tensor(3, device=device) if with_nbt else None
    torch.library.opcheck(
        OPS.update_running_stats_.default, (rm, rv, mean, invstd, nbt, momentum, 1e-5, count)
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "kind,cl,optional,scale_tensor,dtype,mask",
    [
        ("plain", False, True, True, torch.float32, [True, True]),
        ("plain", True, True, False, torch.float32, [True, False]),
        ("grouped", False, False, True, torch.float32, [False, True]),
        ("grouped", True, False, False, torch.float64, [True, True]),
        ("pointwise", False, True, False, torch.float64, [False, False]),
    ],
)
def test_opcheck_conv_bn_backward(kind, cl, optional, scale_tensor, dtype, mask, training, device):
    g, a = _args(kind, cl, optional, scale_tensor, dtype, False, device,
                 seed_of("backward", kind, cl, training, device))  # fmt: skip
    out, mean, invstd = OPS.conv_bn_train(
        a["x"], a["w"], a["b"], a["gamma"], a["beta"], 1e-5, a["st"], a["scale"], a["stride"],
        a["padding"], a["dilation"], a["groups"],
    )  # fmt: skip
    grad_out = _t(g, tuple(out.shape), device, dtype, cl=cl)
    torch.library.opcheck(
        OPS.conv_bn_backward.default,
        (grad_out, a["x"], a["w"], a["b"], a["gamma"], a["beta"], mean, invstd, a["st"],
         a["scale"], a["stride"], a["padding"], a["dilation"], a["groups"], training, mask),
    )  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_fake_train_matches_real_metadata(device):
    """The fake kernel's output metadata (also checked by opcheck) for a channels_last input:
    stated explicitly so a mismatch names the contract."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    g = torch.Generator().manual_seed(seed_of("fake", device))
    x = _t(g, (2, 3, 8, 7), device, cl=True)
    w = _t(g, (5, 3, 3, 3), device)
    real = OPS.conv_bn_train(x, w, None, None, None, 1e-5, None, 1.0, [1, 1], [1, 1], [1, 1], 1)
    with FakeTensorMode() as mode:
        fx, fw = mode.from_tensor(x), mode.from_tensor(w)
        fake = OPS.conv_bn_train(fx, fw, None, None, None, 1e-5, None, 1.0, [1, 1], [1, 1],
                                 [1, 1], 1)  # fmt: skip
    for r, f in zip(real, fake, strict=True):
        assert r.shape == f.shape and r.dtype == f.dtype and r.stride() == f.stride()
    assert real[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind,cl", [("plain", False), ("grouped", True)])
def test_functional_route_matches_the_registered_autograd(kind, cl, training, device):
    """fused_conv.ops records its own autograd.Function (the registered formulas without
    torch.library's per-call wrapper); a direct op call records the registered one. Both must
    give the same output and the same gradients, to the bit. With deterministic algorithms:
    the float64 CUDA data gradient comes from cuDNN, whose default algorithms are not bitwise
    reproducible from one call to the next (seen on an H200)."""
    saved = torch.are_deterministic_algorithms_enabled()
    saved_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        _check_functional_route(kind, cl, training, device)
    finally:
        torch.use_deterministic_algorithms(saved, warn_only=saved_warn)


def _check_functional_route(kind, cl, training, device):
    g, a = _args(kind, cl, True, True, torch.float64, True, device,
                 seed_of("route", kind, cl, training, device))  # fmt: skip
    rm = _t(g, (a["c_out"],), device, torch.float64)
    rv = _t(g, (a["c_out"],), device, torch.float64, positive=True)
    leaves = [a[k] for k in ("x", "w", "b", "gamma", "beta", "st")]
    conv = dict(stride=a["stride"], padding=a["padding"], dilation=a["dilation"])
    if training:
        via_ops = fused_conv.ops.conv_bn_train(
            *leaves[:5], eps=1e-5, scale=a["st"], groups=a["groups"], **conv
        )[0]
        direct = OPS.conv_bn_train(
            *leaves[:5], 1e-5, a["st"], 1.0, a["stride"], a["padding"], a["dilation"],
            a["groups"],
        )[0]  # fmt: skip
    else:
        via_ops = fused_conv.ops.conv_bn_eval(
            *leaves[:5], rm, rv, eps=1e-5, scale=a["st"], groups=a["groups"], **conv
        )
        direct = OPS.conv_bn_eval(
            *leaves[:5], rm, rv, 1e-5, a["st"], 1.0, a["stride"], a["padding"], a["dilation"],
            a["groups"],
        )  # fmt: skip
    assert type(via_ops.grad_fn).__name__.startswith("ConvBN")
    assert type(direct.grad_fn).__name__.startswith("GeneratedBackwardFor_fused_conv")
    grad_out = _t(g, tuple(via_ops.shape), device, torch.float64)
    got = torch.autograd.grad(via_ops, leaves, grad_out)
    want = torch.autograd.grad(direct, leaves, grad_out)
    assert torch.equal(via_ops, direct)
    for name, a_grad, w_grad in zip(("x", "w", "b", "gamma", "beta", "st"), got, want, strict=True):
        assert torch.isfinite(a_grad).all(), name
        assert torch.equal(a_grad, w_grad), name
