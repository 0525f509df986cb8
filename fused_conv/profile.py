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
import json

import torch
from torch.profiler import ProfilerActivity, profile

from .bench import DTYPES, MODES, RowSpec, make_cases, prepare, row_inputs


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


def _call(spec: RowSpec, device: torch.device):
    """What the benchmark times for its `fused` contender in this row (under no_grad but for
    train_step, as there)."""
    conv, bn, x, grad_out = row_inputs(spec, device)
    fn = prepare("fused", spec, conv, bn, x, grad_out, {}).fn
    if spec.mode == "train_step":
        return fn

    def forward():
        with torch.no_grad():
            fn()

    return forward


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
    fn = _call(RowSpec(case, args.mode, args.dtype, args.layout), device)
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
