"""Programmatic dependent launch (csrc/kernels/cuda/dependent_launch.cuh) changes when a
kernel may start, never what it computes.

The same training steps, run once with it and once with FUSED_CONV_DEPENDENT_LAUNCH=0 (read
once per process, hence two subprocesses), must give bitwise the same outputs, running
statistics and gradients; the launches' waits are what keeps a kernel from reading its
predecessor's results early, and a misplaced one shows up here as a difference (or NaN:
every output buffer is poisoned before the steps). The results are also checked against
float64, so that two equally wrong runs cannot pass.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda

# Runs STEPS forward + backward steps of the fused module back to back (no sync between
# them, so that each step's kernels can overlap the previous ones), each with its own input
# and output gradient, and saves what every step produced, on the CPU.
STEPS_SCRIPT = r"""
import sys, torch
from torch import nn
from fused_conv import ConvBNScale2d

dtype, layout, path = getattr(torch, sys.argv[1]), sys.argv[2], sys.argv[3]
fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
torch.manual_seed(20261201)  # the layers' initialisation
gen = torch.Generator().manual_seed(20261201)
conv = nn.Conv2d(8, 64, 3, padding=1)
bn = nn.BatchNorm2d(64)
with torch.no_grad():
    bn.weight.uniform_(0.5, 1.5, generator=gen)
    bn.bias.uniform_(-0.5, 0.5, generator=gen)
    bn.running_mean.uniform_(-0.2, 0.2, generator=gen)
    bn.running_var.uniform_(0.5, 2.0, generator=gen)
module = ConvBNScale2d.from_modules(conv, bn, 2.0).to("cuda", dtype, memory_format=fmt).train()
start = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
# Poison the caching allocator's free blocks, so that a read of an unwritten buffer is NaN.
torch.full((64 << 20,), float("nan"), device="cuda")
inputs = [torch.randn(3, 8, 72, 72, generator=gen).to("cuda", dtype, memory_format=fmt)
          for _ in range(4)]
grads = [torch.randn(3, 64, 72, 72, generator=gen).to("cuda", dtype, memory_format=fmt)
         for _ in range(4)]
xs = [x.clone().requires_grad_(True) for x in inputs]
got = []
for x, g in zip(xs, grads, strict=True):
    module.zero_grad(set_to_none=True)
    out = module(x)
    out.backward(g)
    got.append({
        "out": out.detach(), "grad_input": x.grad,
        "running_mean": module.bn.running_mean.clone(),
        "running_var": module.bn.running_var.clone(),
        **{"grad_" + n: p.grad for n, p in module.named_parameters()},
    })
torch.cuda.synchronize()
cpu = lambda d: {k: v.detach().cpu() for k, v in d.items()}
torch.save({"start": start, "inputs": [x.cpu() for x in inputs], "grads": [g.cpu() for g in grads],
            "steps": [cpu(s) for s in got]}, path)
"""

CASES = [
    pytest.param("float32", "nchw", id="float32-nchw"),
    pytest.param("bfloat16", "cl", id="bfloat16-channels_last"),
    pytest.param("float16", "cl", id="float16-channels_last"),
]


def run_steps(dtype: str, layout: str, path, dependent: bool) -> dict:
    env = dict(os.environ, FUSED_CONV_DEPENDENT_LAUNCH="1" if dependent else "0")
    proc = subprocess.run(
        [sys.executable, "-c", STEPS_SCRIPT, dtype, layout, str(path)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(path)


def reference_step(start: dict, x: torch.Tensor, g: torch.Tensor) -> dict:
    """One float64 step of conv -> batch_norm(train) -> * 2 from the module's starting state
    (the running statistics after step i depend on all steps before it, so they are
    compared step by step against the fused run's own previous values instead)."""

    def leaf(t):  # a float64 copy (never t itself, whose .grad would accumulate over steps)
        return t.detach().to(torch.float64, copy=True).requires_grad_(True)

    x64, w64, b64 = leaf(x), leaf(start["conv.weight"]), leaf(start["conv.bias"])
    gamma, beta = leaf(start["bn.weight"]), leaf(start["bn.bias"])
    y = F.conv2d(x64, w64, b64, padding=1)
    out = F.batch_norm(y, None, None, gamma, beta, True, 0.0, 1e-5) * 2.0
    out.backward(g.double())
    return {"out": out, "grad_input": x64.grad, "grad_conv.weight": w64.grad,
            "grad_bn.weight": gamma.grad, "grad_bn.bias": beta.grad}  # fmt: skip


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm()).item()


@requires_cuda
@pytest.mark.parametrize("dtype,layout", CASES)
def test_dependent_launch_changes_no_bit(tmp_path, dtype, layout):
    on = run_steps(dtype, layout, tmp_path / "on.pt", dependent=True)
    off = run_steps(dtype, layout, tmp_path / "off.pt", dependent=False)
    assert len(on["steps"]) == len(off["steps"]) == 4
    bound = 1e-5 if dtype == "float32" else 2e-2
    for i, (a, b) in enumerate(zip(on["steps"], off["steps"], strict=True)):
        assert a.keys() == b.keys()
        for name in a:
            assert torch.isfinite(a[name]).all(), f"step {i}: {name} not finite"
            assert torch.equal(a[name], b[name]), f"step {i}: {name} differs with the launch mode"
        # The weights are the starting ones at every step (no optimizer step): each step's
        # output and gradients are those of one float64 step from the start.
        ref = reference_step(on["start"], on["inputs"][i], on["grads"][i])
        for name, value in ref.items():
            err = rel_err(a[name], value.detach())
            assert err < bound, f"step {i}: {name} relative error {err:.2e} (bound {bound})"
