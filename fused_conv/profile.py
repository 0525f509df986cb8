"""`python -m fused_conv profile`: where a call of fused_conv's module spends its device time.

torch.profiler around `--steps` calls (after `--warmup` calls) of ConvBNScale2d on one of the
benchmark's cases (`--case`, the names `python -m fused_conv bench` uses), in eval, train (under
no_grad, as KernelBench runs it) or train_step (forward + backward of a fixed grad_out, the
gradients reset before each step as the benchmark does). The case's inputs, parameters, dtype
and layout are the benchmark's. Prints the kernels by self device time per call, largest first,
and their sum (the GPU time of one call; launch gaps are not in it). Without CUDA (or with
`--device cpu`) it profiles the CPU ops of the benchmark's shrunken smoke shapes instead.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from torch.profiler import ProfilerActivity, profile

from .bench import DTYPES, MODES, _memory_format, _seed, make_base, make_cases


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fused_conv profile",
        description="Self device time per kernel of one call of fused_conv's module.",
    )
    parser.add_argument("--case", default="ref", help="a benchmark case name (default: ref)")
    parser.add_argument("--mode", default="train_step", choices=MODES)
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--layout", default="nchw", choices=["nchw", "cl"])
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--steps", type=int, default=5, help="profiled calls (default: 5)")
    parser.add_argument("--warmup", type=int, default=3, help="calls before profiling")
    parser.add_argument("--top", type=int, default=15, help="rows printed (default: 15)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    return parser


def _call(case, mode: str, dtype: torch.dtype, layout: str, device: torch.device):
    """One call of the fused module as the benchmark's `fused` contender makes it."""
    from fused_conv import ConvBNScale2d

    conv, bn, x32 = make_base(case, device)
    fmt = _memory_format(layout)
    conv = copy.deepcopy(conv).to(dtype).to(memory_format=fmt)  # BN stays fp32 (as AMP)
    x = x32.to(dtype).contiguous(memory_format=fmt)
    module = ConvBNScale2d.from_modules(conv, bn, case.scale)
    module.train(mode != "eval")
    if mode != "train_step":

        def forward():
            with torch.no_grad():
                module(x)

        return forward
    gen = torch.Generator(device=device).manual_seed(_seed(case, "grad"))
    grad_out = torch.randn((case.n, case.cout, case.hout, case.wout), generator=gen, device=device)
    grad_out = grad_out.to(dtype).contiguous(memory_format=fmt)
    xg = x.detach().clone().requires_grad_(True)
    params = list(module.parameters())

    def step():
        for p in params:
            p.grad = None
        xg.grad = None
        module(xg).backward(grad_out)

    return step


def kernel_times(fn, device: torch.device, steps: int, warmup: int) -> dict[str, float]:
    """Self time per call (ms) of each kernel (CUDA) or op (CPU) over `steps` calls."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(steps):
            fn()
        if cuda:
            torch.cuda.synchronize(device)
    rows: dict[str, float] = {}
    for event in prof.key_averages():
        if cuda:
            us = getattr(event, "self_device_time_total", None)
            if us is None:  # older torch
                us = event.self_cuda_time_total
        else:
            us = event.self_cpu_time_total
        if us > 0:
            rows[event.key] = rows.get(event.key, 0.0) + us / steps / 1000.0
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("fused_conv profile: --steps must be >= 1 and --warmup >= 0")
    cases = {case.name: case for case in make_cases(smoke=device.type != "cuda")}
    if args.case not in cases:
        raise SystemExit(
            f"fused_conv profile: unknown case {args.case!r}; one of: {', '.join(cases)}"
        )
    case = cases[args.case]
    torch.backends.cudnn.allow_tf32 = False  # as the benchmark's fp32 rows
    fn = _call(case, args.mode, DTYPES[args.dtype], args.layout, device)
    rows = kernel_times(fn, device, args.steps, args.warmup)
    total = sum(rows.values())
    what = "GPU" if device.type == "cuda" else "CPU (self, ops)"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"fused_conv profile: {case.name} ({case.shape}) {args.mode} {args.dtype} "
          f"{args.layout} on {name}, {args.steps} calls")  # fmt: skip
    print(f"{what} time per call {total:.3f} ms")
    for key, ms in list(rows.items())[: args.top]:
        print(f"  {ms:8.3f} ms  {100 * ms / total:5.1f}%  {key[:100]}")
    if args.json:
        record = {
            "case": case.name, "shape": case.shape, "mode": args.mode, "dtype": args.dtype,
            "layout": args.layout, "device": name, "torch": torch.__version__,
            "steps": args.steps, "total_ms": total, "rows_ms": rows,
        }  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
    return 0
