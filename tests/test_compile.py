"""torch.compile(fullgraph=True) equals eager, running statistics included. A handful of
compiles only (each costs tens of seconds on a CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    DEVICES,
    assert_close_ref,
    assert_stats_match,
    make_case,
    ref_input,
    seed_of,
)

import fused_conv  # noqa: F401
from fused_conv import ops

pytestmark = pytest.mark.compile


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _assert_same(compiled, eager, what):
    assert compiled.shape == eager.shape and compiled.dtype == eager.dtype, what
    assert bool(torch.isfinite(compiled).all()), f"{what}: non-finite values"
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5, equal_nan=False,
                               msg=lambda m: f"{what}: {m}")  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_compile_module(mode, device):
    case = make_case(
        c_in=3, c_out=8, kernel_size=3, stride=1, padding=1, n=2, hw=(10, 9), device=device,
        training=mode == "train", momentum=None, layout="channels_last",
        seed=seed_of("compile", mode, device),
    )  # fmt: skip
    eager = copy.deepcopy(case.fused)
    compiled = torch.compile(case.fused, fullgraph=True)
    for step in range(3):  # three steps: the cumulative average uses num_batches_tracked
        x = case.input()
        with torch.no_grad():
            out_c = compiled(x)
            out_e = eager(x)
            expected = case.ref(ref_input(x))
        _assert_same(out_c, out_e, f"step {step} output")
        assert out_c.is_contiguous(memory_format=torch.channels_last)
        assert_close_ref(out_c, expected, torch.float32, f"step {step} output vs reference")
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            _assert_same(getattr(case.fused.bn, name), getattr(eager.bn, name), name)
        assert_stats_match(case.fused.bn, case.ref.bn, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_functional(device):
    """The functional API under compile, training with running stats (updated in place)."""
    case = make_case(
        c_in=4, c_out=6, kernel_size=3, stride=2, padding=1, groups=2, n=2,
        hw=(11, 10), device=device, seed=seed_of("compile-fn", device),
    )  # fmt: skip
    bn, conv = case.fused.bn, case.fused.conv

    def fn(x, w, b, g, beta, rm, rv, nbt):
        return ops.conv_bn_scale(
            x, w, b, g, beta, rm, rv, training=True, momentum=0.1, eps=bn.eps, scale=2.0,
            stride=2, padding=1, groups=2, num_batches_tracked=nbt,
        )  # fmt: skip

    tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
               bn.num_batches_tracked)  # fmt: skip
    args_c = [t.detach().clone() for t in tensors]
    args_e = [t.clone() for t in args_c]
    compiled = torch.compile(fn, fullgraph=True)
    for step in range(2):
        x = case.input()
        out_c = compiled(x, *args_c)
        out_e = fn(x, *args_e)
        _assert_same(out_c, out_e, f"step {step} output")
        for i, name in zip(
            (4, 5, 6), ("running_mean", "running_var", "num_batches_tracked"), strict=True
        ):
            _assert_same(args_c[i], args_e[i], f"step {step} {name}")
        assert args_c[6].item() == step + 1 + bn.num_batches_tracked.item()


@pytest.mark.parametrize("device", DEVICES)
def test_compile_forward_backward(device):
    """Compiled forward + backward (training, learnable scale): grads and stats equal eager."""
    case = make_case(
        c_in=3, c_out=5, kernel_size=3, padding=1, n=2, hw=(8, 7), device=device,
        learnable_scale=True, scale=1.5, seed=seed_of("compile-bw", device),
    )  # fmt: skip
    eager = copy.deepcopy(case.fused)
    compiled = torch.compile(case.fused, fullgraph=True)
    x = case.input()
    xc = x.clone().requires_grad_()
    xe = x.clone().requires_grad_()
    g = torch.randn(2, 5, 8, 7, device=device)
    out_c = compiled(xc)
    out_e = eager(xe)
    _assert_same(out_c, out_e, "output")
    out_c.backward(g)
    out_e.backward(g)
    _assert_same(xc.grad, xe.grad, "grad input")
    for (name, p), (_, q) in zip(
        case.fused.named_parameters(), eager.named_parameters(), strict=True
    ):
        assert p.grad is not None, name
        _assert_same(p.grad, q.grad, f"grad {name}")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        _assert_same(getattr(case.fused.bn, name), getattr(eager.bn, name), name)
