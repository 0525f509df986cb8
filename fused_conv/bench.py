"""Benchmark of fused_conv (Conv2d -> BatchNorm2d -> x scale) against its alternatives.

    python -m fused_conv bench [--quick] [--cases ref,kb_orig,resnet50] [--json PATH]
                               [--markdown PATH] [--plot PATH] [--device cpu] ...

Every contender is timed in the same process on the same inputs and parameters:

  eager        nn.Conv2d -> nn.BatchNorm2d -> * scale (train() or eval()), TF32 off
  eager(tf32)  the same with cuDNN TF32 on (PyTorch's default; KernelBench's baseline), fp32 only
  fold:nchw    eval only: BN and scale folded into the conv weights once, then F.conv2d (cuDNN),
  fold:cl      input in NCHW / channels_last (converted once, untimed), TF32 off
  fold(tf32)   eval, fp32 only: fold in the row's layout with TF32 on
  compile      torch.compile of the eager module (mode default, static shapes, compile untimed)
  fused        fused_conv.ConvBNScale2d.from_modules on the same parameters
  fused_op     eval only: torch.ops.fused_conv.conv_bn_eval called directly

Modes: eval (forward, running statistics), train (forward of the train() module under no_grad,
running statistics updated: KernelBench's headline) and train_step (forward + backward,
gradients for the input and the parameters; peak memory). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------
# Cases


@dataclass(frozen=True)
class Case:
    name: str
    group: str  # ref | kb_orig | resnet50 | rows
    n: int
    cin: int
    h: int
    w: int
    cout: int
    k: int
    stride: int = 1
    pad: int = 0
    bias: bool = True
    scale: float = 2.0
    dist: str = "rand"  # input distribution: rand (KernelBench's) or randn

    @property
    def hout(self) -> int:
        return (self.h + 2 * self.pad - self.k) // self.stride + 1

    @property
    def wout(self) -> int:
        return (self.w + 2 * self.pad - self.k) // self.stride + 1

    @property
    def shape(self) -> str:
        return (
            f"{self.n}x{self.cin}x{self.h}x{self.w} -> {self.cout} k{self.k} s{self.stride} "
            f"p{self.pad}"
        )


RESNET50_3X3 = [(64, 56), (128, 28), (256, 14), (512, 7)]
RESNET50_1X1 = [
    (64, 256, 56), (256, 64, 56), (128, 512, 28), (512, 128, 28),
    (256, 1024, 14), (1024, 256, 14), (512, 2048, 7), (2048, 512, 7),
]  # fmt: skip
# The row kernel's dispatch guard (not in the default run): shapes it takes (float32, stride
# 1, W_out >= 64) where fewer than 64 output channels leave part of its m64 MMA idle, and a
# row wider than one 128-pixel column tile; compare against FUSED_CONV_FORWARD_KERNEL=tile.
ROWS_CASES = [
    ("rows.c16", 128, 8, 128, 128, 16), ("rows.c32", 128, 8, 128, 128, 32),
    ("rows.w256", 32, 8, 256, 256, 64),
]  # fmt: skip
GROUPS = ("ref", "kb_orig", "resnet50", "rows")


def make_cases(smoke: bool) -> list[Case]:
    """The benchmark cases; `smoke` (CPU) shrinks them to tiny shapes with the same structure."""
    if not smoke:
        cases = [
            Case("ref", "ref", 128, 8, 128, 128, 64, 3),
            Case("kb_orig", "kb_orig", 128, 3, 32, 32, 16, 3),
        ]
        batch, chan, spatial = 32, (lambda c: c), (lambda s: s)
    else:
        cases = [
            Case("ref", "ref", 2, 8, 16, 16, 64, 3),
            Case("kb_orig", "kb_orig", 4, 3, 12, 12, 16, 3),
        ]
        batch, chan, spatial = 2, (lambda c: max(4, c // 16)), (lambda s: max(4, s // 7))
    for c, s in RESNET50_3X3:
        cases.append(
            Case(f"r50.3x3.{c}@{s}", "resnet50", batch, chan(c), spatial(s), spatial(s), chan(c),
                 3, 1, 1, bias=False, dist="randn")
        )  # fmt: skip
    for ci, co, s in RESNET50_1X1:
        cases.append(
            Case(f"r50.1x1.{ci}-{co}@{s}", "resnet50", batch, chan(ci), spatial(s), spatial(s),
                 chan(co), 1, 1, 0, bias=False, dist="randn")
        )  # fmt: skip
    for name, n, ci, h, w, co in ROWS_CASES:
        n, h, w = (2, 12, 70) if smoke else (n, h, w)
        cases.append(Case(name, "rows", n, ci, h, w, co, 3))
    return cases


# ---------------------------------------------------------------------------------------------
# Contenders, dtypes, layouts, tolerances

CONTENDERS = (
    "eager", "eager_tf32", "fold_nchw", "fold_cl", "fold_tf32", "compile", "fused", "fused_op",
)  # fmt: skip
LABELS = {
    "eager": "eager", "eager_tf32": "eager(tf32)", "fold_nchw": "fold:nchw",
    "fold_cl": "fold:cl", "fold_tf32": "fold(tf32)", "compile": "compile", "fused": "fused",
    "fused_op": "fused_op",
}  # fmt: skip
TF32 = {"eager_tf32", "fold_tf32"}
EVAL_ONLY = {"fold_nchw", "fold_cl", "fold_tf32", "fused_op"}
# The alternatives fused_conv is compared with ("best alt"): same precision as fused_conv
# (its fp32 path is fp32-accurate, 3xTF32), so the TF32 contenders are shown but not counted.
ALTERNATIVES = ("eager", "fold_nchw", "fold_cl", "compile")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_ALIASES = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "fp16": "fp16", "float16": "fp16",
    "half": "fp16", "bf16": "bf16", "bfloat16": "bf16",
}  # fmt: skip
LAYOUT_ALIASES = {"nchw": "nchw", "contiguous": "nchw", "cl": "cl", "nhwc": "cl",
                  "channels_last": "cl"}  # fmt: skip
MODES = ("eval", "train", "train_step")

# (bound on ||out - ref|| / ||ref||, bound on max|out - ref| / max|ref|) against the float64
# reference computed from the same (rounded) inputs and parameters.
TOLERANCES = {
    "fp32": (1e-5, 1e-4),
    "tf32": (5e-3, 3e-2),
    "fp16": (4e-3, 2e-2),
    "bf16": (2e-2, 8e-2),
}
# Relative bound on the updated running statistics (train mode).
STATS_TOLERANCE = {"fp32": 1e-4, "tf32": 5e-3, "fp16": 5e-3, "bf16": 3e-2}
HOST_BOUND = 0.9  # host_ms / median_ms from which a fused row is reported as host-bound
GRAD_FACTOR = 5.0  # gradients (train_step) get TOLERANCES x this
SLACK = 3.0  # ... or SLACK x eager's own error on the same tensor, whichever is larger


def _tolerance_key(dtype_name: str, contender: str) -> str:
    return "tf32" if (dtype_name == "fp32" and contender in TF32) else dtype_name


# ---------------------------------------------------------------------------------------------
# Modules


class EagerConvBNScale(nn.Module):
    """The unfused reference: conv -> bn -> * scale (KernelBench level-2 #73's Model)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, scaling_factor: float) -> None:
        super().__init__()
        self.conv, self.bn, self.scaling_factor = conv, bn, scaling_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) * self.scaling_factor


def _memory_format(layout: str) -> torch.memory_format:
    return torch.channels_last if layout == "cl" else torch.contiguous_format


def _seed(case: Case, salt: str = "") -> int:
    return zlib.crc32(f"{case.name}/{salt}".encode()) & 0x7FFFFFFF


def make_base(case: Case, device: torch.device) -> tuple[nn.Conv2d, nn.BatchNorm2d, torch.Tensor]:
    """fp32 conv (default init), BatchNorm with random affine parameters and running stats, and
    an fp32 input (torch.rand for the KernelBench cases, randn for ResNet), all seeded per case."""
    gen = torch.Generator(device="cpu").manual_seed(_seed(case))
    torch.manual_seed(_seed(case))
    conv = nn.Conv2d(case.cin, case.cout, case.k, case.stride, case.pad, bias=case.bias)
    bn = nn.BatchNorm2d(case.cout)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(case.cout, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(case.cout, generator=gen) * 0.2)
        bn.running_mean.copy_(torch.randn(case.cout, generator=gen) * 0.2)
        bn.running_var.copy_(torch.rand(case.cout, generator=gen) + 0.5)
    gen_x = torch.Generator(device=device).manual_seed(_seed(case, "x"))
    size = (case.n, case.cin, case.h, case.w)
    rand = torch.rand if case.dist == "rand" else torch.randn
    x = rand(size, generator=gen_x, device=device)
    return conv.to(device), bn.to(device), x


def fold(conv: nn.Conv2d, bn: nn.BatchNorm2d, scale: float, dtype: torch.dtype):
    """BN (running stats) and the scale folded into the conv weight and bias, in float64."""
    a = scale * bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    b = conv.bias.double() if conv.bias is not None else torch.zeros_like(a)
    weight = conv.weight.double() * a[:, None, None, None]
    bias = a * (b - bn.running_mean.double()) + scale * bn.bias.double()
    return weight.to(dtype), bias.to(dtype)


# ---------------------------------------------------------------------------------------------
# TF32 switch (cuDNN convolutions and matmuls); the benchmark runs with TF32 off by default.


class _TF32:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __enter__(self):
        self.saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = self.enabled
        torch.backends.cuda.matmul.allow_tf32 = self.enabled
        return self

    def __exit__(self, *exc):
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved
        return False


# ---------------------------------------------------------------------------------------------
# Timing


def _summary(times_ms: list[float]) -> dict:
    s = sorted(times_ms)

    def pct(p: float) -> float:
        return s[min(len(s) - 1, max(0, round(p * (len(s) - 1))))]

    return {"median_ms": statistics.median(s), "p10_ms": pct(0.1), "p90_ms": pct(0.9)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> dict:
    """Per-call times: CUDA events around each call (calls back to back, one sync at the end),
    or perf_counter on CPU. Returns median / p10 / p90 in ms; on CUDA also host_ms, the host's
    time to issue one call (the same loop by perf_counter, before the sync): where it comes
    near the median, the host, not the GPU, set the measured time."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(iters)
        ]
        t0 = time.perf_counter()
        for start, end in events:
            start.record()
            fn()
            end.record()
        host_ms = (time.perf_counter() - t0) * 1e3 / iters
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
        return {**_summary(times), "host_ms": host_ms}
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times)


def time_graph(fn: Callable[[], object], device: torch.device, calls: int, reps: int) -> dict:
    """Captures `calls` back-to-back calls in one CUDA graph and times its replays: per-call
    median / p10 / p90 in ms (launch overhead removed)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    try:
        for _ in range(2):
            graph.replay()
        torch.cuda.synchronize(device)
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(reps)
        ]
        for start, end in events:
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize(device)
        return _summary([start.elapsed_time(end) / calls for start, end in events])
    finally:
        del graph


def measure_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in GB/s: (bytes read + bytes written) / time."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        nbytes = int(min(1 << 30, free // 4))
    else:
        nbytes = 64 << 20
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)

    def copy_once():
        dst.copy_(src)

    t = time_calls(copy_once, device, iters=20, warmup=5)["median_ms"]
    return 2 * nbytes / (t * 1e-3) / 1e9


def floor_bytes(case: Case, dtype: torch.dtype, mode: str) -> int:
    """Minimal DRAM traffic: input read once, weights (+ BN parameters and running stats in
    fp32) read once, output written once; a training step adds grad_out read, grad_input
    written and the parameter gradients written."""
    elt = torch.empty((), dtype=dtype).element_size()
    x = case.n * case.cin * case.h * case.w * elt
    out = case.n * case.cout * case.hout * case.wout * elt
    weights = (case.cout * case.cin * case.k * case.k + (case.cout if case.bias else 0)) * elt
    weights += 4 * case.cout * 4
    total = x + weights + out
    if mode == "train_step":
        total += out + x + weights
    return total


# ---------------------------------------------------------------------------------------------
# Reference (float64) and checks


def reference(case: Case, mode: str, conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor,
              grad_out: torch.Tensor | None = None) -> dict:  # fmt: skip
    """float64 conv -> batch_norm -> * scale from the very tensors the contenders use (x and the
    conv parameters already rounded to the row's dtype). Train: also the updated running stats;
    train_step: also grad_input and grad_weight."""
    x64 = x.detach().double().contiguous()
    w64 = conv.weight.detach().double().contiguous()
    b64 = conv.bias.detach().double() if conv.bias is not None else None
    g64, beta64 = bn.weight.detach().double(), bn.bias.detach().double()
    rm64, rv64 = bn.running_mean.double(), bn.running_var.double()
    res: dict = {}
    if mode == "train_step":
        x64.requires_grad_(True)
        w64.requires_grad_(True)
        with torch.enable_grad():
            y = F.conv2d(x64, w64, b64, case.stride, case.pad)
            out = F.batch_norm(y, None, None, g64, beta64, True, 0.0, bn.eps) * case.scale
            out.backward(grad_out.double())
        res.update(out=out.detach(), grad_input=x64.grad, grad_weight=w64.grad)
        return res
    with torch.no_grad():
        y = F.conv2d(x64, w64, b64, case.stride, case.pad)
        if mode == "eval":
            out = F.batch_norm(y, rm64, rv64, g64, beta64, False, 0.0, bn.eps) * case.scale
        else:
            out = F.batch_norm(y, None, None, g64, beta64, True, 0.0, bn.eps) * case.scale
            m = bn.momentum
            res["running_mean"] = (1 - m) * rm64 + m * y.mean((0, 2, 3))
            res["running_var"] = (1 - m) * rv64 + m * y.var((0, 2, 3), unbiased=True)
    res["out"] = out
    return res


def _errors(value: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, bool]:
    """(||v - ref|| / ||ref||, max|v - ref| / max|ref|, all finite)."""
    diff = value.detach().double() - ref
    ref_norm = ref.norm().item() or 1.0
    ref_max = ref.abs().max().item() or 1.0
    finite = bool(torch.isfinite(value).all())
    return diff.norm().item() / ref_norm, diff.abs().max().item() / ref_max, finite


def measure_errors(outputs: dict, ref: dict) -> dict:
    """{tensor: [||v - ref|| / ||ref||, max|v - ref| / max|ref|, all finite]} for the tensors
    of a contender's first call that the float64 reference has."""
    return {
        key: list(_errors(value, ref[key]))
        for key, value in outputs.items()
        if key in ref and value is not None
    }


def judge(results: dict, dtype_name: str) -> None:
    """Sets `ok`, `rel_l2`, `max_rel` (worst over out / grads) and, on failure, `mismatch` for
    each contender with measured errors. Bounds: TOLERANCES (x GRAD_FACTOR for gradients); for
    the other contenders also SLACK x eager's own error on the same tensor, since eager is the
    precision PyTorch itself attains in that dtype (a training step's grad_weight sums
    N*H*W terms with cancellation: all implementations agree at ~2e-5 in fp32, ~4e-2 in bf16)."""
    eager = results.get("eager", {}).get("errors", {})
    for name, res in results.items():
        errors = res.get("errors")
        if errors is None:
            continue
        tol_key = _tolerance_key(dtype_name, name)
        l2_tol, max_tol = TOLERANCES[tol_key]
        problems, worst_l2, worst_max = [], 0.0, 0.0
        for key, (rel_l2, max_rel, finite) in errors.items():
            if key.startswith("running_"):
                if not finite or max_rel > STATS_TOLERANCE[tol_key]:
                    problems.append(f"{key} max_rel={max_rel:.2e}")
                continue
            worst_l2, worst_max = max(worst_l2, rel_l2), max(worst_max, max_rel)
            factor = GRAD_FACTOR if key.startswith("grad_") else 1.0
            l2_bound, max_bound = l2_tol * factor, max_tol * factor
            if name != "eager" and key in eager and tol_key == dtype_name:
                l2_bound = max(l2_bound, SLACK * eager[key][0])
                max_bound = max(max_bound, SLACK * eager[key][1])
            if not finite:
                problems.append(f"{key} not finite")
            elif rel_l2 > l2_bound or max_rel > max_bound:
                problems.append(f"{key} rel_l2={rel_l2:.2e} max_rel={max_rel:.2e}")
        res.update(rel_l2=worst_l2, max_rel=worst_max, ok=not problems)
        if problems:
            res["mismatch"] = "; ".join(problems)


# ---------------------------------------------------------------------------------------------
# One row: a case in one mode, dtype and layout, all contenders


@dataclass
class RowSpec:
    case: Case
    mode: str
    dtype: str
    layout: str
    tier: int = 0
    contenders: list[str] = field(default_factory=list)


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _cuda_broken(device: torch.device) -> str | None:
    """After an exception: is the CUDA context still usable? (Errors such as an illegal
    address are sticky and make every later call fail.)"""
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
        torch.zeros(1, device=device).add_(1).item()
    except Exception as exc:  # noqa: BLE001
        return _short_error(exc)
    return None


class _Prepared:
    """A contender ready to run: `fn` is what is timed; `first()` runs once and returns the
    tensors to check (out, and running stats / grads depending on the mode)."""

    def __init__(self, fn, first, tf32=False, module=None):
        self.fn, self.first, self.tf32, self.module = fn, first, tf32, module


def prepare(name: str, spec: RowSpec, conv_d: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor,
            grad_out: torch.Tensor | None, result: dict) -> _Prepared:  # fmt: skip
    case, mode = spec.case, spec.mode
    fmt = _memory_format(spec.layout)
    training = mode != "eval"
    tf32 = name in TF32

    if name.startswith("fold"):
        dtype = DTYPES[spec.dtype]
        weight, bias = fold(conv_d, bn, case.scale, dtype)
        fold_fmt = {"fold_nchw": torch.contiguous_format, "fold_cl": torch.channels_last}.get(
            name, fmt
        )
        weight = weight.contiguous(memory_format=fold_fmt)
        xin = x.contiguous(memory_format=fold_fmt)
        stride, pad = case.stride, case.pad

        def fold_fn():
            return F.conv2d(xin, weight, bias, stride, pad)

        return _Prepared(fold_fn, lambda: {"out": fold_fn()}, tf32)

    if name == "fused_op":
        import fused_conv  # noqa: F401  (registers the ops)

        c, b = copy.deepcopy(conv_d), copy.deepcopy(bn)
        args = (
            x, c.weight, c.bias, b.weight, b.bias, b.running_mean, b.running_var, float(b.eps),
            None, float(case.scale), list(c.stride), list(c.padding), list(c.dilation), c.groups,
        )  # fmt: skip
        op = torch.ops.fused_conv.conv_bn_eval

        def op_fn():
            return op(*args)

        return _Prepared(op_fn, lambda: {"out": op_fn()}, tf32, module=(c, b))

    conv_c, bn_c = copy.deepcopy(conv_d), copy.deepcopy(bn)
    if name == "fused":
        from fused_conv import ConvBNScale2d

        module = ConvBNScale2d.from_modules(conv_c, bn_c, case.scale)
    else:
        module = EagerConvBNScale(conv_c, bn_c, case.scale)
    module.train(training)
    call = module
    if name == "compile":
        torch._dynamo.reset()
        call = torch.compile(module, dynamic=False)

    if mode != "train_step":

        def fwd():
            return call(x)

        def first():
            out = fwd()
            got = {"out": out}
            if training:
                got.update(running_mean=bn_c.running_mean, running_var=bn_c.running_var)
            return got

        return _Prepared(fwd, first, tf32, module=module)

    xg = x.detach().clone().requires_grad_(True)
    params = list(module.parameters())

    def step():
        for p in params:
            p.grad = None
        xg.grad = None
        out = call(xg)
        out.backward(grad_out)
        return out

    def first_step():
        out = step()
        return {"out": out.detach(), "grad_input": xg.grad, "grad_weight": conv_c.weight.grad}

    result["_step_params"] = params  # for the memory measurement (removed before output)
    result["_step_input"] = xg
    return _Prepared(step, first_step, tf32, module=module)


def peak_memory_mib(prep: _Prepared, result: dict, device: torch.device) -> float:
    """Peak memory allocated during one training step above what was held before it (inputs,
    parameters, cached grad_out); gradients are set to None first so they count as step
    memory."""
    for p in result.get("_step_params", []):
        p.grad = None
    if result.get("_step_input") is not None:
        result["_step_input"].grad = None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    prep.fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def row_inputs(spec: RowSpec, device: torch.device):
    """(conv, bn, x, grad_out) of a row: the case's conv and input in the row's dtype and layout
    (BN stays fp32, as AMP), and for train_step a fixed grad_out (else None)."""
    case, dtype = spec.case, DTYPES[spec.dtype]
    conv, bn, x32 = make_base(case, device)
    fmt = _memory_format(spec.layout)
    conv_d = copy.deepcopy(conv).to(dtype).to(memory_format=fmt)
    x = x32.to(dtype).contiguous(memory_format=fmt)
    del x32
    grad_out = None
    if spec.mode == "train_step":
        gen = torch.Generator(device=device).manual_seed(_seed(case, "grad"))
        shape = (case.n, case.cout, case.hout, case.wout)
        grad_out = torch.randn(shape, generator=gen, device=device).to(dtype)
        grad_out = grad_out.contiguous(memory_format=fmt)
    return conv_d, bn, x, grad_out


def run_row(spec: RowSpec, args, device: torch.device) -> dict:
    case, mode = spec.case, spec.mode
    row: dict = {
        "case": case.name, "group": case.group, "shape": case.shape, "mode": mode,
        "dtype": spec.dtype, "layout": spec.layout, "results": {}, "notes": [],
    }  # fmt: skip
    conv_d, bn, x, grad_out = row_inputs(spec, device)
    ref = reference(case, mode, conv_d, bn, x, grad_out)

    prepared: dict[str, _Prepared] = {}
    grad_ctx = torch.enable_grad if mode == "train_step" else torch.no_grad
    for name in spec.contenders:
        res: dict = {}
        row["results"][name] = res
        if name == "compile" and not args.compile_row(case):
            res["skipped"] = "not in --compile-cases"
            continue
        try:
            with _TF32(name in TF32), grad_ctx():
                prep = prepare(name, spec, conv_d, bn, x, grad_out, res)
                t0 = time.perf_counter()
                got = prep.first()
                _sync(device)
                if name == "compile":
                    res["compile_s"] = round(time.perf_counter() - t0, 2)
                res["errors"] = measure_errors(got, ref)
                del got
                res.update(time_calls(prep.fn, device, args.iters, args.warmup))
                if mode == "train_step" and device.type == "cuda":
                    res["peak_mib"] = peak_memory_mib(prep, res, device)
            prepared[name] = prep
        except Exception as exc:  # noqa: BLE001  (one failing contender must not stop the run)
            res["error"] = _short_error(exc)
            broken = _cuda_broken(device)
            if broken:
                row["fatal"] = f"CUDA context unusable after {name}: {broken}"
                break
        finally:
            res.pop("_step_params", None)
            res.pop("_step_input", None)

    judge(row["results"], spec.dtype)
    del ref

    # CUDA graphs, where launch overhead matters (forward modes only).
    timed = [r["median_ms"] for r in row["results"].values() if "median_ms" in r]
    small = bool(timed) and min(timed) < args.graph_below_ms
    want_graphs = (
        device.type == "cuda" and mode != "train_step" and "fatal" not in row
        and (args.graphs == "always" or (args.graphs == "auto" and small))
    )  # fmt: skip
    if want_graphs:
        for name, prep in prepared.items():
            res = row["results"][name]
            try:
                with _TF32(prep.tf32), torch.no_grad():
                    g = time_graph(prep.fn, device, args.graph_calls, args.graph_reps)
                res.update({f"graph_{k}": v for k, v in g.items()})
            except Exception as exc:  # noqa: BLE001
                res["graph_error"] = _short_error(exc)
                broken = _cuda_broken(device)
                if broken:
                    row["fatal"] = f"CUDA context unusable after graph capture of {name}: {broken}"
                    break
    prepared.clear()
    row["floor_bytes"] = floor_bytes(case, DTYPES[spec.dtype], mode)
    return row


# ---------------------------------------------------------------------------------------------
# Derived metrics, tables, outputs


def derive(row: dict, bandwidth_gbps: float) -> None:
    res = row["results"]
    row["floor_ms"] = row["floor_bytes"] / (bandwidth_gbps * 1e9) * 1e3
    for r in res.values():
        if "median_ms" in r:
            r["floor_pct"] = 100.0 * row["floor_ms"] / r["median_ms"]
        if "graph_median_ms" in r:
            r["graph_floor_pct"] = 100.0 * row["floor_ms"] / r["graph_median_ms"]

    def ms(name: str, key: str = "median_ms") -> float | None:
        r = res.get(name, {})
        return r.get(key) if r.get("ok", False) or "ok" not in r else None

    for prefix, key in (("", "median_ms"), ("graph_", "graph_median_ms")):
        fused = ms("fused", key)
        alts = {a: ms(a, key) for a in ALTERNATIVES if ms(a, key) is not None}
        eager = ms("eager", key)
        best = min(alts, key=alts.get) if alts else None
        row[prefix + "best_alt"] = best
        row[prefix + "speedup_vs_eager"] = eager / fused if fused and eager else None
        row[prefix + "speedup_vs_best"] = alts[best] / fused if fused and best else None

    mismatched = [n for n, r in res.items() if r.get("ok") is False]
    errored = [n for n, r in res.items() if "error" in r]
    status = []
    if mismatched:
        status.append("MISMATCH:" + ",".join(mismatched))
    if errored:
        status.append("error:" + ",".join(errored))
    if "fatal" in row:
        status.append("FATAL")
    row["status"] = "; ".join(status) or "ok"


def _f(value, digits=3, suffix="") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:.0f}{suffix}"
        if abs(value) >= 10:
            return f"{value:.{max(1, digits - 2)}f}{suffix}"
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def _cell(r: dict | None, key: str = "median_ms") -> str:
    if r is None or "skipped" in r:
        return "-"
    if "error" in r:
        return "ERR"
    if key.startswith("graph_") and "graph_error" in r:
        return "no-cap"
    text = _f(r.get(key))
    if r.get("ok") is False and text != "-":
        text += "!"
    return text


def _err(r: dict | None) -> str:
    return f"{r['rel_l2']:.1e}" if r and "rel_l2" in r else "-"


def _used(rows: list[dict], key: str = "median_ms") -> list[str]:
    """Contenders with at least one value in the rows (others' columns are dropped)."""
    return [
        c for c in CONTENDERS
        if any(c in r["results"] and (key in r["results"][c] or "error" in r["results"][c])
               for r in rows)
    ]  # fmt: skip


def build_tables(
    rows: list[dict], timer: str = "CUDA events"
) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, headers, rows) of each table; the main table is last."""
    tables = []
    key_cols = ["case", "mode", "dtype", "layout"]

    def keys(r):
        return [r["case"], r["mode"], r["dtype"], r["layout"]]

    used = _used(rows)
    tables.append((
        "% of memory floor (floor time / measured median; floor = minimal bytes / copy bandwidth)",
        key_cols + ["floor ms"] + [LABELS[c] for c in used],
        [keys(r) + [_f(r.get("floor_ms"), 4)]
         + [_f(r["results"].get(c, {}).get("floor_pct"), 1, "%") for c in used] for r in rows],
    ))  # fmt: skip
    graph_rows = [r for r in rows if any("graph_median_ms" in v or "graph_error" in v
                                         for v in r["results"].values())]  # fmt: skip
    if graph_rows:
        gused = _used(graph_rows, "graph_median_ms")
        tables.append((
            "CUDA-graph replay: ms per call (one graph of back-to-back calls, median of replays)",
            key_cols + [LABELS[c] for c in gused] + ["x eager", "x best", "best"],
            [keys(r) + [_cell(r["results"].get(c), "graph_median_ms") for c in gused]
             + [_f(r.get("graph_speedup_vs_eager"), 2), _f(r.get("graph_speedup_vs_best"), 2),
                LABELS.get(r.get("graph_best_alt"), "-")] for r in graph_rows],
        ))  # fmt: skip
    step_rows = [r for r in rows if r["mode"] == "train_step"]
    if step_rows and any("peak_mib" in v for r in step_rows for v in r["results"].values()):
        sused = [c for c in _used(step_rows)]
        tables.append((
            "training step: peak memory above the inputs/params held before the step (MiB)",
            key_cols + [LABELS[c] for c in sused],
            [keys(r) + [_f(r["results"].get(c, {}).get("peak_mib"), 1) for c in sused]
             for r in step_rows],
        ))  # fmt: skip
    tables.append((
        f"median ms per call ({timer}; '!' = MISMATCH, ERR = error, - = not applicable)",
        key_cols + [LABELS[c] for c in used]
        + ["x eager", "x best", "best", "floor ms", "fused %floor", "best %floor", "fused err",
           "status"],
        [keys(r) + [_cell(r["results"].get(c)) for c in used]
         + [_f(r.get("speedup_vs_eager"), 2), _f(r.get("speedup_vs_best"), 2),
            LABELS.get(r.get("best_alt"), "-"), _f(r.get("floor_ms"), 4),
            _f(r["results"].get("fused", {}).get("floor_pct"), 1, "%"),
            _f(r["results"].get(r.get("best_alt") or "", {}).get("floor_pct"), 1, "%"),
            _err(r["results"].get("fused")),
            r["status"]] for r in rows],
    ))  # fmt: skip
    return tables


def format_text(title: str, headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]  # fmt: skip
    left = {0, 1, 2, 3, len(headers) - 1}

    def line(cells):
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [f"== {title}", line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def format_markdown(title: str, headers: list[str], rows: list[list[str]]) -> str:
    out = [f"**{title}**", "", "| " + " | ".join(headers) + " |",
           "|" + "|".join(" --- " if i in (0, 1, 2, 3) else " ---: " for i in
                          range(len(headers))) + "|"]  # fmt: skip
    out += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(out)


def environment(device: torch.device) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device_type": device.type,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        (platform.processor() or platform.machine() or "CPU"),
    }  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["sm_count"] = props.multi_processor_count
        env["memory_gib"] = round(props.total_memory / 2**30, 1)
        env["cudnn"] = torch.backends.cudnn.version()
    try:
        import fused_conv

        env["fused_conv"] = fused_conv.__version__
        env["fused_conv_build"] = fused_conv.build_info()
    except Exception as exc:  # noqa: BLE001
        env["fused_conv"] = f"unavailable ({_short_error(exc)})"
    return env


def write_plot(path: str, rows: list[dict]) -> str:
    """One panel per (case group, mode): speedup over eager of each contender, log scale."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"--plot: matplotlib is not importable; skipped {path}"
    plotted = [r for r in rows if r["results"].get("eager", {}).get("median_ms")]
    series = [
        c for c in ("fold_nchw", "fold_cl", "compile", "fused")
        if any(r["results"].get(c, {}).get("median_ms") for r in plotted)
    ]  # fmt: skip
    panels: dict[tuple[str, str], list[dict]] = {}
    for r in plotted:
        panels.setdefault((r["group"], r["mode"]), []).append(r)
    if not panels or not series:
        return f"--plot: nothing to plot; skipped {path}"
    widest = max(len(v) for v in panels.values())
    width_in = min(30.0, max(8.0, 0.08 * widest * len(series) + 2))
    fig, axes = plt.subplots(len(panels), 1, figsize=(width_in, 3.6 * len(panels)), squeeze=False)
    for ax, ((group, mode), panel) in zip(axes[:, 0], panels.items(), strict=True):
        shown = [c for c in series if any(r["results"].get(c, {}).get("median_ms") for r in panel)]
        bar = 0.8 / max(1, len(shown))
        for i, c in enumerate(shown):
            values = []
            for r in panel:
                t = r["results"].get(c, {}).get("median_ms")
                values.append(r["results"]["eager"]["median_ms"] / t if t else float("nan"))
            xs = [j + (i - (len(shown) - 1) / 2) * bar for j in range(len(panel))]
            # Bars grow from 1 (up: faster than eager, down: slower).
            ax.bar(xs, [v - 1.0 for v in values], bar, bottom=1.0, label=LABELS[c])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log", base=2)
        ax.set_xticks(range(len(panel)))
        labels = [f"{r['case']} {r['dtype']} {r['layout']}" for r in panel]
        ax.set_xticklabels(labels, rotation=70, ha="right", fontsize=7)
        ax.set_ylabel("speedup vs eager")
        ax.set_title(f"{group}, {mode}: speedup over PyTorch eager (median ms; > 1 is faster)")
        ax.legend(fontsize=7, ncol=len(shown))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"wrote {path}"


# ---------------------------------------------------------------------------------------------
# CLI


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fused_conv bench",
        description="Times fused_conv against PyTorch eager, fold+cuDNN and torch.compile "
        "(see benchmarks/README.md).",
    )
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda if available, else a reduced CPU smoke run")  # fmt: skip
    p.add_argument(
        "--cases",
        default="ref,kb_orig,resnet50",
        help="groups (ref, kb_orig, resnet50, rows) or case names, comma-separated",
    )
    p.add_argument(
        "--quick", action="store_true", help="ref + kb_orig only, fp32 NCHW + bf16 channels_last"
    )
    p.add_argument(
        "--modes",
        default="eval,train,train_step",
        help="eval, train, train_step (train_step only for --train-step cases)",
    )
    p.add_argument(
        "--train-step",
        default="ref",
        metavar="CASES",
        help="cases/groups that get the train_step mode: list, 'all' or 'none' (default: ref)",
    )
    p.add_argument("--dtypes", default="fp32,fp16,bf16", help="fp32, fp16, bf16")
    p.add_argument(
        "--layouts",
        default="auto",
        help="nchw, cl (channels_last); 'auto': fp32 in NCHW, fp16/bf16 in both",
    )
    p.add_argument(
        "--contenders", default=",".join(CONTENDERS), help=f"subset of {','.join(CONTENDERS)}"
    )
    p.add_argument(
        "--compile-cases",
        default=None,
        metavar="CASES",
        help="cases/groups where torch.compile is timed: list, 'all' or 'none' "
        "(default: ref,kb_orig on CUDA, none on CPU; each compile costs "
        "seconds)",
    )
    p.add_argument("--iters", type=int, default=None, help="timed calls (default 50; CPU 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 10; CPU 1)")
    p.add_argument(
        "--graphs",
        choices=("auto", "always", "never"),
        default="auto",
        help="CUDA-graph replay timing: auto = rows whose fastest contender is "
        "below --graph-below-ms",
    )
    p.add_argument("--graph-below-ms", type=float, default=0.15)
    p.add_argument("--graph-calls", type=int, default=20, help="calls captured per graph")
    p.add_argument("--graph-reps", type=int, default=10, help="timed replays per graph")
    p.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="torch.backends.cudnn.benchmark = True (autotuned cuDNN algorithms for "
        "every contender; slower start)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="S",
        help="stop starting new rows after S seconds (0 = no limit; default 150 on "
        "CUDA). Rows run most important first: ref, kb_orig, resnet50 in fp32 "
        "NCHW and bf16 channels_last, then the other dtype/layout pairs",
    )
    p.add_argument("--json", metavar="PATH", help="write all rows and the environment as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the tables as Markdown")
    p.add_argument("--plot", metavar="PATH", help="PNG bar chart of speedups vs eager")
    p.add_argument("--list", action="store_true", help="print the planned rows and exit")
    return p


def _select(names: str, cases: list[Case], what: str) -> set[str]:
    if names.strip().lower() == "all":
        return {c.name for c in cases}
    if names.strip().lower() in ("none", ""):
        return set()
    chosen = set()
    for token in _split(names):
        hit = {c.name for c in cases if token in (c.group, c.name)}
        if not hit:
            raise SystemExit(
                f"bench: unknown case {token!r} in {what}; known: "
                f"{', '.join(GROUPS)}, {', '.join(c.name for c in cases)}"
            )
        chosen |= hit
    return chosen


def plan(args, cases: list[Case], device: torch.device) -> list[RowSpec]:
    if args.quick:
        args.cases, args.dtypes, args.layouts = "ref,kb_orig", "fp32,bf16", "auto"
    selected = _select(args.cases, cases, "--cases")
    step_cases = _select(args.train_step, cases, "--train-step")
    compile_cases = _select(args.compile_cases, cases, "--compile-cases")
    args.compile_row = lambda case: case.name in compile_cases
    try:
        dtypes = [DTYPE_ALIASES[d.lower()] for d in _split(args.dtypes)]
        layouts = (None if args.layouts == "auto"
                   else [LAYOUT_ALIASES[v.lower()] for v in _split(args.layouts)])  # fmt: skip
    except KeyError as exc:
        raise SystemExit(f"bench: unknown dtype or layout {exc}") from None
    modes = _split(args.modes)
    bad = [m for m in modes if m not in MODES] + [
        c for c in _split(args.contenders) if c not in CONTENDERS
    ]
    if bad:
        raise SystemExit(f"bench: unknown mode or contender {bad}; modes {MODES}, "
                         f"contenders {CONTENDERS}")  # fmt: skip
    contenders = [c for c in CONTENDERS if c in _split(args.contenders)]
    if args.quick and "fp16" in dtypes:
        dtypes.remove("fp16")
    pairs = []
    for d in dict.fromkeys(dtypes):
        for lay in layouts or (["nchw"] if d == "fp32" else ["cl", "nchw"]):
            if args.quick and d == "bf16" and lay == "nchw" and layouts is None:
                continue
            pairs.append((d, lay))
    primary = {("fp32", "nchw"), ("bf16", "cl")}
    specs = []
    for case in cases:
        if case.name not in selected:
            continue
        for d, lay in pairs:
            for mode in MODES:
                if mode not in modes or (mode == "train_step" and case.name not in step_cases):
                    continue
                names = [
                    c for c in contenders
                    if not (c in EVAL_ONLY and mode != "eval")
                    and not (c in TF32 and (d != "fp32" or device.type != "cuda"))
                ]  # fmt: skip
                group_rank = GROUPS.index(case.group)
                tier = group_rank if (d, lay) in primary else len(GROUPS) + group_rank
                specs.append(RowSpec(case, mode, d, lay, tier, names))
    # Most important rows first (a stable sort keeps the case/mode order within a tier).
    return sorted(specs, key=lambda s: s.tier)


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _setup_error_row(spec: RowSpec, exc: BaseException, device: torch.device) -> dict:
    case = spec.case
    row = {
        "case": case.name, "group": case.group, "shape": case.shape, "mode": spec.mode,
        "dtype": spec.dtype, "layout": spec.layout, "results": {}, "notes": [],
        "error": _short_error(exc), "floor_bytes": floor_bytes(case, DTYPES[spec.dtype], spec.mode),
    }  # fmt: skip
    broken = _cuda_broken(device)
    if broken:
        row["fatal"] = f"CUDA context unusable: {broken}"
    return row


def run_all(specs: list[RowSpec], args, device: torch.device, bandwidth: float, t_start: float):
    """Runs the rows in order until the time budget is spent or the CUDA context is lost.
    Returns (rows, skipped specs, fatal reason or None)."""
    rows: list[dict] = []
    fatal = None
    i = 0
    try:
        for i, spec in enumerate(specs):  # noqa: B007  (i is read after an interrupt)
            if fatal or (args.time_budget and time.perf_counter() - t_start > args.time_budget):
                break
            t_row = time.perf_counter()
            try:
                row = run_row(spec, args, device)
            except Exception as exc:  # noqa: BLE001  (the row's setup failed)
                row = _setup_error_row(spec, exc, device)
            row["tier"] = spec.tier
            derive(row, bandwidth)
            if "error" in row:
                row["status"] = ("FATAL; " if "fatal" in row else "") + "error:setup"
            fatal = fatal or row.get("fatal")
            rows.append(row)
            cells = ", ".join(
                f"{LABELS[c]} {_cell(r)}" for c, r in row["results"].items() if "skipped" not in r
            )
            _progress(
                f"[{i + 1}/{len(specs)} {time.perf_counter() - t_start:6.1f}s] {spec.case.name} "
                f"{spec.mode} {spec.dtype} {spec.layout}: {cells or row.get('error')} -> "
                f"{row['status']} ({time.perf_counter() - t_row:.1f}s)"
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
        else:
            i = len(specs)
    except KeyboardInterrupt:
        _progress("interrupted: reporting the rows measured so far")
        fatal = fatal or "interrupted"
        i = len(rows)
    return rows, specs[i:], fatal


def collect_notes(rows: list[dict], skipped: list[RowSpec], fatal, args) -> list[str]:
    notes = []
    for r in rows:
        tag = f"{r['case']} {r['mode']} {r['dtype']} {r['layout']}"
        if "error" in r:
            notes.append(f"ERROR {tag}: setup: {r['error']}")
        for c, res in r["results"].items():
            if "mismatch" in res:
                notes.append(f"MISMATCH {tag} {LABELS[c]}: {res['mismatch']}")
            if "error" in res:
                notes.append(f"ERROR {tag} {LABELS[c]}: {res['error']}")
            if "graph_error" in res:
                notes.append(f"(no CUDA graph) {tag} {LABELS[c]}: {res['graph_error']}")
        if "fatal" in r:
            notes.append(f"FATAL {tag}: {r['fatal']} -- later rows skipped")
    host_bound = [
        f"{r['case']}/{r['mode']}/{r['dtype']}/{r['layout']} {LABELS[c]} "
        f"({res['host_ms']:.3f} of {res['median_ms']:.3f} ms)"
        for r in rows for c, res in r["results"].items()
        if c in ("fused", "fused_op") and "host_ms" in res and "median_ms" in res
        and res["host_ms"] >= HOST_BOUND * res["median_ms"]
    ]  # fmt: skip
    if host_bound:
        notes.append(
            f"host-bound (the host took >= {HOST_BOUND:.0%} of the median to issue a call, so "
            f"the GPU may have waited; its kernel time is lower): " + ", ".join(host_bound)
        )
    if skipped:
        reason = f"({fatal})" if fatal else f"by --time-budget {args.time_budget:.0f} s"
        names = [f"{s.case.name}/{s.mode}/{s.dtype}/{s.layout}" for s in skipped]
        notes.append(
            f"{len(skipped)} rows skipped {reason}: {', '.join(names[:10])}"
            + (" ..." if len(names) > 10 else "")
        )
    compile_times = [
        r["results"]["compile"]["compile_s"] for r in rows
        if "compile_s" in r["results"].get("compile", {})
    ]  # fmt: skip
    if compile_times:
        notes.append(
            f"torch.compile: {len(compile_times)} compiles, {sum(compile_times):.0f} s in all "
            f"(excluded from the timings)"
        )
    return notes


def write_markdown(path: str, env: dict, meta: dict, tables, notes: list[str], argv) -> None:
    command = " ".join(argv if argv is not None else sys.argv[1:])
    head = (
        f"### fused_conv benchmark: {env['device']}, torch {env['torch']}, fused_conv "
        f"{env['fused_conv']}, {env['date'][:10]}\n\n"
        f"Copy bandwidth {meta['bandwidth_gbps']:.0f} GB/s; median of {meta['args']['iters']} "
        f"calls after {meta['args']['warmup']} warm-up calls; "
        f"cudnn.benchmark={bool(meta['args']['cudnn_benchmark'])}; TF32 off except the (tf32) "
        f"columns; wall time {meta['wall_s']:.0f} s. Command: `python -m fused_conv bench "
        f"{command}`.\n"
    )
    body = "\n\n".join(format_markdown(*t) for t in tables)
    extra = "\n".join(f"- {n}" for n in notes)
    with open(path, "w") as f:
        f.write(head + "\n" + body + ("\n\nNotes:\n\n" + extra if extra else "") + "\n")


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark; returns 0 when every row is ok, 1 on any MISMATCH / error / skip
    after a fatal error (the tables and files are written either way)."""
    args = build_parser().parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda, but CUDA is not available")
    device = torch.device(args.device)
    smoke = device.type == "cpu"
    args.iters = args.iters or (3 if smoke else 50)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 10)
    if args.time_budget is None:
        args.time_budget = 0.0 if smoke else 150.0
    if args.compile_cases is None:  # CPU inductor builds take long: opt in explicitly there
        args.compile_cases = "none" if smoke else "ref,kb_orig"

    cases = make_cases(smoke)
    specs = plan(args, cases, device)
    if args.list:
        for s in specs:
            print(f"tier {s.tier}  {s.case.name:20s} {s.mode:10s} {s.dtype} {s.layout:4s}  "
                  f"{s.case.shape}  [{', '.join(s.contenders)}]")  # fmt: skip
        print(f"{len(specs)} rows; torch.compile in: {args.compile_cases}")
        return 0
    t_start = time.perf_counter()
    env = environment(device)
    if smoke:
        print(
            "CPU SMOKE MODE: tiny shapes, few iterations, no CUDA graphs / TF32 / memory "
            "columns -- checks that the benchmark runs, NOT a performance measurement."
        )
    print(
        f"fused_conv bench: {env['device']}, torch {env['torch']}, fused_conv "
        f"{env['fused_conv']}, {env['date']}"
    )

    saved_flags = (
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
    )  # fmt: skip
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
    torch.backends.cudnn.allow_tf32 = False  # the honest fp32 baseline; TF32 is opted into
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        bandwidth = measure_bandwidth(device)
        print(
            f"copy bandwidth: {bandwidth:.0f} GB/s (read + write of a "
            f"{'64 MiB' if smoke else '1 GiB'} device-to-device copy); {len(specs)} rows, "
            f"iters={args.iters}, warmup={args.warmup}, "
            f"cudnn.benchmark={bool(args.cudnn_benchmark)}, time budget "
            f"{args.time_budget or 'none'}",
            flush=True,
        )
        rows, skipped, fatal = run_all(specs, args, device, bandwidth, t_start)
    finally:
        (
            torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32,
        ) = saved_flags  # fmt: skip

    # Display order: case, mode, dtype, layout (rows ran most important first).
    def display_key(r):
        return (
            [c.name for c in cases].index(r["case"]), MODES.index(r["mode"]),
            list(DTYPES).index(r["dtype"]), r["layout"] != "cl",
        )  # fmt: skip

    rows.sort(key=display_key)
    wall = time.perf_counter() - t_start
    notes = collect_notes(rows, skipped, fatal, args)
    tables = build_tables(rows, "perf_counter" if smoke else "CUDA events")
    meta = {
        **env, "bandwidth_gbps": bandwidth, "wall_s": round(wall, 1),
        "args": {k: v for k, v in vars(args).items() if k != "compile_row"},
        "tolerances": TOLERANCES, "stats_tolerance": STATS_TOLERANCE,
        "grad_factor": GRAD_FACTOR, "slack_vs_eager": SLACK,
        "cases": [asdict(c) for c in cases],
        "skipped": [f"{s.case.name}/{s.mode}/{s.dtype}/{s.layout}" for s in skipped],
        "notes": notes,
    }  # fmt: skip
    outputs = []
    for what, path, write in (
        ("json", args.json, lambda p: _write_json(p, meta, rows)),
        ("markdown", args.markdown, lambda p: write_markdown(p, env, meta, tables, notes, argv)),
        ("plot", args.plot, lambda p: write_plot(p, rows)),
    ):
        if not path:
            continue
        try:
            outputs.append(write(path) or f"wrote {path}")
        except Exception as exc:  # noqa: BLE001  (a bad path must not lose the printed tables)
            outputs.append(f"--{what}: could not write {path}: {_short_error(exc)}")

    print()
    for line in notes + outputs:
        print(line)
    print(f"wall time {wall:.1f} s")
    for t in tables:
        print()
        print(format_text(*t))
    return 1 if (fatal or any(r["status"] != "ok" for r in rows)) else 0


def _write_json(path: str, meta: dict, rows: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    sys.exit(main())
