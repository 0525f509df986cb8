"""`python -m fused_conv info | demo | bench [args] | profile [args]`."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def _info(_args) -> int:
    import fused_conv

    info = fused_conv.build_info()
    info["torch_runtime"] = torch.__version__
    # The tile kernels' Hopper main loop (wgmma) exists only in an sm_90a build.
    archs = (info.get("arch_list") or "").replace(" ", ";").split(";")
    info["hopper_wgmma"] = any(a.strip().split("+")[0] == "9.0a" for a in archs)
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        if torch.cuda.get_device_capability() == (9, 0) and not info["hopper_wgmma"]:
            info["note"] = (
                "this GPU is Hopper but the build lacks the 9.0a target: the conv kernels run "
                "their portable mma.sync loop; rebuild with 9.0a in TORCH_CUDA_ARCH_LIST"
            )
    print(json.dumps(info, indent=2, sort_keys=True))
    return 0


def _time_ms(fn, device: torch.device, iters: int) -> float:
    """Median wall time per call in ms (synchronising around each call on CUDA)."""
    times = []
    for i in range(iters + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:  # the first calls warm up caches and kernels
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _demo(args) -> int:
    from fused_conv import kernelbench as kb

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    model = kb.Model(*kb.get_init_inputs()).to(device)
    fused = kb.ModelNew(*kb.get_init_inputs()).to(device)
    fused.load_state_dict(model.state_dict())
    x = kb.get_inputs()[0].to(device)
    if device.type == "cpu" and not args.full:
        x = x[:8]  # a CPU conv of the full batch takes seconds; --full runs it anyway
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"fused_conv demo on {device} ({name}), input {tuple(x.shape)}, {x.dtype}")
    ok = True
    iters = args.iters or (20 if device.type == "cuda" else 3)
    for mode in ("train", "eval"):
        model.train(mode == "train")
        fused.train(mode == "train")
        with torch.no_grad():
            ref, out = model(x), fused(x)
            diff = (out - ref).abs().max().item()
            close = torch.allclose(out, ref, atol=1e-4, rtol=1e-4) and bool(out.isfinite().all())
            stats_close = torch.allclose(
                fused.bn.running_mean, model.bn.running_mean, atol=1e-5
            ) and (torch.allclose(fused.bn.running_var, model.bn.running_var, atol=1e-5))
            t_ref = _time_ms(lambda: model(x), device, iters)
            t_fused = _time_ms(lambda: fused(x), device, iters)
        ok &= close and stats_close
        print(f"  {mode:5s}: max |fused - reference| = {diff:.2e}  allclose(1e-4): {close}  "
              f"running stats agree: {stats_close}  reference {t_ref:.3f} ms  "
              f"fused {t_fused:.3f} ms  ({t_ref / t_fused:.2f}x)")  # fmt: skip
    print("demo:", "OK" if ok else "MISMATCH")
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_conv")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, torch/CUDA built against, arch list, CUDA kernels")
    demo = sub.add_parser("demo", help="KernelBench Model vs ModelNew: agreement and times")
    demo.add_argument("--device", default=None)
    demo.add_argument("--iters", type=int, default=None)
    demo.add_argument("--full", action="store_true", help="full batch on CPU too")
    sub.add_parser("bench", help="the benchmark (see benchmarks/README.md)", add_help=False)
    sub.add_parser("profile", help="device time per kernel of one call", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from fused_conv.bench import main as bench_main

        return bench_main(rest) or 0
    if args.command == "profile":
        from fused_conv.profile import main as profile_main

        return profile_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return {"info": _info, "demo": _demo}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
