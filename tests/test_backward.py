"""Backward: float64 gradcheck, gradients vs the float64 reference's autograd, and that the
backward recomputes instead of saving output-sized tensors."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    DEVICE_DTYPES,
    DEVICES,
    assert_close_ref,
    make_case,
    make_input,
    poison_cuda_cache,
    ref_input,
    seed_of,
)
from torch import nn

import fused_conv
from fused_conv import ops

# ---- gradcheck ---------------------------------------------------------------------------------

GRADCHECK_CONFIGS = {
    "base": dict(c_in=2, c_out=3, k=3, stride=1, padding=1, dilation=1, groups=1, hw=(5, 4)),
    "g2_s2_d2": dict(c_in=4, c_out=2, k=3, stride=2, padding=2, dilation=2, groups=2, hw=(6, 5)),
    "depthwise_k1": dict(
        c_in=3, c_out=3, k=1, stride=1, padding=0, dilation=1, groups=3, hw=(3, 4)
    ),  # fmt: skip
    "same_even": dict(
        c_in=2, c_out=2, k=2, stride=1, padding="same", dilation=1, groups=1, hw=(4, 3)
    ),  # fmt: skip
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params", ["all", "bare"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(GRADCHECK_CONFIGS))
def test_gradcheck(name, mode, params, device):
    """torch.autograd.gradcheck in float64 w.r.t. input, conv weight, conv bias, BN weight,
    BN bias and a learnable scale tensor ("bare": no bias, no affine, float scale)."""
    cfg = GRADCHECK_CONFIGS[name]
    g = torch.Generator().manual_seed(seed_of("gradcheck", name, mode, params, device))
    c_in, c_out, k = cfg["c_in"], cfg["c_out"], cfg["k"]

    def rnd(*shape, lo=None):
        t = torch.randn(*shape, generator=g, dtype=torch.float64)
        if lo is not None:
            t = lo + t.abs()
        return t.to(device).requires_grad_()

    x = rnd(2, c_in, *cfg["hw"])
    w = rnd(c_out, c_in // cfg["groups"], k, k)
    full = params == "all"
    b = rnd(c_out) if full else None
    gamma = rnd(c_out) if full else None
    beta = rnd(c_out) if full else None
    scale = rnd(()) if full else 1.7
    rm = torch.randn(c_out, generator=g, dtype=torch.float64).to(device)
    rv = (0.5 + torch.rand(c_out, generator=g, dtype=torch.float64)).to(device)
    training = mode == "train"

    def fn(x, w, *rest):
        it = iter(rest)
        bb, gg, be, s = (next(it), next(it), next(it), next(it)) if full else (None,) * 3 + (scale,)
        return ops.conv_bn_scale(
            x, w, bb, gg, be, None if training else rm, None if training else rv,
            training=training, eps=1e-3, scale=s, stride=cfg["stride"], padding=cfg["padding"],
            dilation=cfg["dilation"], groups=cfg["groups"],
        )  # fmt: skip

    inputs = (x, w, b, gamma, beta, scale) if full else (x, w)
    # cuDNN's float64 weight gradient sums with atomics: repeated backwards may differ in
    # the last bits unless deterministic algorithms are requested.
    nondet_tol = 1e-12 if device == "cuda" else 0.0
    assert torch.autograd.gradcheck(
        fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, nondet_tol=nondet_tol
    )


# ---- gradients vs the reference -------------------------------------------------------------

GRAD_CONFIGS = {
    "base": dict(c_in=3, c_out=5, kernel_size=3, padding=1, n=2, hw=(7, 6)),
    "g2_s2": dict(c_in=4, c_out=6, kernel_size=3, stride=2, padding=1, groups=2, n=2, hw=(9, 8)),
    "depthwise_d2": dict(
        c_in=4, c_out=4, kernel_size=3, dilation=2, padding=2, groups=4, n=2, hw=(8, 7)
    ),  # fmt: skip
    "noaffine_nobias": dict(
        c_in=3, c_out=4, kernel_size=5, padding=2, n=2, hw=(6, 6), affine=False, bias=False
    ),  # fmt: skip
    "learnable_scale_cl": dict(
        c_in=4,
        c_out=8,
        kernel_size=3,
        padding=1,
        n=2,
        hw=(6, 5),
        learnable_scale=True,
        scale=-1.25,
        layout="channels_last",
    ),
    "same_even_k_sliced": dict(
        c_in=3, c_out=4, kernel_size=(2, 3), padding="same", n=2, hw=(6, 7), layout="sliced"
    ),  # fmt: skip
    "k7_s2_batch1_odd": dict(
        c_in=2, c_out=3, kernel_size=7, stride=2, padding=3, n=1, hw=(19, 13)
    ),  # fmt: skip
}


def _grads(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor | None):
    out = module(x)
    if grad_out is None:
        out.sum().backward()  # an expanded (stride-0) grad_out
    else:
        out.backward(grad_out)
    named = {"input": x.grad}
    for name, p in module.named_parameters():
        named["scale" if name == "scaling_factor" else name] = p.grad
    return out, named


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("grad_kind", ["random", "sum", "channels_last"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(GRAD_CONFIGS))
def test_grads_match_reference(name, mode, grad_kind, device, dtype):
    case = make_case(
        **GRAD_CONFIGS[name], device=device, dtype=dtype, training=mode == "train",
        seed=seed_of("grads", name, mode, grad_kind, device, str(dtype)),
    )  # fmt: skip
    x = case.input().requires_grad_()
    x_ref = ref_input(x).requires_grad_()
    with torch.no_grad():
        out_shape = case.ref(x_ref).shape
    grad_out = grad_ref = None
    if grad_kind != "sum":
        g64 = make_input(out_shape, case.gen, dtype=torch.float64)
        grad_out = g64.to(device=device, dtype=dtype)
        if grad_kind == "channels_last":
            grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        grad_ref = grad_out.detach().double().contiguous()
    poison_cuda_cache(device)
    out, got = _grads(case.fused, x, grad_out)
    # reference state after the same forward (its training-mode forward updates its stats too)
    _, want = _grads(case.ref, x_ref, grad_ref)

    assert set(got) == set(want), (sorted(got), sorted(want))
    for key, expected in want.items():
        actual = got[key]
        if expected is None:
            assert actual is None, key
            continue
        assert actual is not None, f"no gradient for {key}"
        param_dtype = (
            x.dtype
            if key == "input"
            else dict(case.fused.named_parameters())[
                {"scale": "scaling_factor"}.get(key, key)
            ].dtype
        )
        assert actual.dtype == param_dtype, f"{key}: grad dtype {actual.dtype} != {param_dtype}"
        assert actual.shape == expected.shape, key
        scale_atol = max(1.0, expected.abs().max().item())
        assert_close_ref(actual, expected, dtype, f"grad {key}", scale_atol=scale_atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("which", ["input_only", "params_only", "weight_only"])
def test_partial_requires_grad(which, mode, device):
    """Gradients only where requested (frozen params / an input that needs no grad)."""
    case = make_case(
        c_in=3, c_out=4, kernel_size=3, padding=1, n=2, hw=(6, 6), device=device,
        training=mode == "train", learnable_scale=True, scale=0.8,
        seed=seed_of("partial", which, mode, device),
    )  # fmt: skip
    for module in (case.fused, case.ref):
        for name, p in module.named_parameters():
            keep = {"input_only": False, "params_only": True, "weight_only": name == "conv.weight"}
            p.requires_grad_(keep[which])
    x = case.input().requires_grad_(which == "input_only")
    x_ref = ref_input(x).requires_grad_(which == "input_only")
    g = make_input((2, 4, 6, 6), case.gen, dtype=torch.float64)
    case.fused(x).backward(g.float().to(device))
    case.ref(x_ref).backward(g.to(x_ref.device))
    if which == "input_only":
        assert_close_ref(x.grad, x_ref.grad, torch.float32, "grad input")
    else:
        assert x.grad is None
    for (name, p), (_, q) in zip(
        case.fused.named_parameters(), case.ref.named_parameters(), strict=True
    ):
        if q.grad is None:
            assert p.grad is None, f"{name} got a gradient although frozen"
        else:
            assert p.grad is not None, name
            scale_atol = max(1.0, q.grad.abs().max().item())
            assert_close_ref(p.grad, q.grad, torch.float32, f"grad {name}", scale_atol=scale_atol)


# ---- nothing output-sized is saved ----------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("api", ["module", "functional"])
def test_backward_saves_nothing_output_sized(api, mode, device):
    """The autograd graph keeps only the input, the parameters and per-channel statistics:
    no saved tensor has the output's numel or shares its storage."""
    case = make_case(
        c_in=3, c_out=5, kernel_size=3, n=2, hw=(8, 8), device=device, training=mode == "train",
        learnable_scale=True, seed=seed_of("saved", api, mode, device),
    )  # fmt: skip
    x = case.input().requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if api == "module":
            out = case.fused(x)
        else:
            bn = case.fused.bn
            out = ops.conv_bn_scale(
                x, case.fused.conv.weight, case.fused.conv.bias, bn.weight, bn.bias,
                bn.running_mean, bn.running_var, training=mode == "train", momentum=0.1,
                eps=bn.eps, scale=case.fused.scaling_factor,
            )  # fmt: skip
    n_out = out.numel()
    weight = case.fused.conv.weight
    assert n_out not in (x.numel(), weight.numel()), "test shapes must make the output distinct"
    assert saved, "expected the forward to save its inputs for backward"
    out_storage = out.untyped_storage().data_ptr()
    allowed = x.numel() + weight.numel() + 8 * 5 + 2
    for t in saved:
        assert t.numel() != n_out, f"an output-sized tensor {tuple(t.shape)} is saved for backward"
        if t.numel():
            assert t.untyped_storage().data_ptr() != out_storage, "the output is saved"
    assert sum(t.numel() for t in saved) <= allowed, [tuple(t.shape) for t in saved]
    out.backward(torch.randn_like(out))
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


@pytest.mark.parametrize("device", DEVICES)
def test_backward_op_masks(device):
    """conv_bn_backward returns empty grad_input/grad_weight when masked out, and the same
    per-channel gradients either way."""
    g = torch.Generator().manual_seed(seed_of("masks", device))
    x = torch.randn(2, 3, 6, 6, generator=g).to(device)
    w = (torch.randn(4, 3, 3, 3, generator=g) / 5).to(device)
    gamma = (0.5 + torch.rand(4, generator=g)).to(device)
    beta = torch.randn(4, generator=g).to(device)
    out, mean, invstd = fused_conv.ops.conv_bn_train(x, w, None, gamma, beta, eps=1e-5, scale=1.5)
    go = torch.randn(out.shape, generator=g).to(device)
    full = torch.ops.fused_conv.conv_bn_backward(
        go, x, w, None, gamma, beta, mean, invstd, None, 1.5, [1, 1], [0, 0], [1, 1], 1, True,
        [True, True],
    )  # fmt: skip
    assert full[0].shape == x.shape and full[1].shape == w.shape
    for mask in ([False, True], [True, False], [False, False]):
        part = torch.ops.fused_conv.conv_bn_backward(
            go, x, w, None, gamma, beta, mean, invstd, None, 1.5, [1, 1], [0, 0], [1, 1], 1,
            True, mask,
        )  # fmt: skip
        for i in (0, 1):
            if mask[i]:
                torch.testing.assert_close(part[i], full[i], atol=0, rtol=0)
            else:
                assert part[i].numel() == 0, f"output {i} should be empty when masked"
        for i in range(2, 6):
            torch.testing.assert_close(part[i], full[i], atol=0, rtol=0)
    # grad_scale / per-channel grads vs the formulas of the contract, in float64
    y = torch.nn.functional.conv2d(x.double(), w.double())
    xh = (y - mean.double()[:, None, None]) * invstd.double()[:, None, None]
    sg = go.double().sum((0, 2, 3))
    sgx = (go.double() * xh).sum((0, 2, 3))
    for i in range(2, 5):
        assert full[i].shape == (4,) and full[i].dtype == torch.float32, i
    assert full[5].shape == () and full[5].dtype == torch.float32
    assert_close_ref(full[3], 1.5 * sgx, torch.float32, "grad_bn_weight", scale_atol=10)
    assert_close_ref(full[4], 1.5 * sg, torch.float32, "grad_bn_bias", scale_atol=10)
    assert_close_ref(full[5], (gamma.double() * sgx + beta.double() * sg).sum(), torch.float32,
                     "grad_scale", scale_atol=10)  # fmt: skip
    # training: grad_bias sums g_hat, which has zero mean per channel
    assert_close_ref(full[2], torch.zeros(4, dtype=torch.float64), torch.float32, "grad_bias",
                     scale_atol=10, norm=False)  # fmt: skip
