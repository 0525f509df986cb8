"""The installed package: imported from an installation (not a source tree), build info,
`python -m fused_conv info`, registered ops."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICES

import fused_conv

OPS = ("conv_bn_eval", "conv_bn_train", "update_running_stats_", "conv_bn_backward")


def test_imported_from_an_installation_not_the_source_tree():
    """The tests must exercise the installed wheel: the directory that holds the imported
    `fused_conv` package must not be a source checkout (no setup.py next to it)."""
    pkg_dir = Path(fused_conv.__file__).resolve().parent
    holder = pkg_dir.parent
    assert not (holder / "setup.py").exists(), (
        f"fused_conv was imported from {pkg_dir}, inside a source tree ({holder} has setup.py); "
        "install the wheel and run the tests from a copy of tests/"
    )
    assert (pkg_dir / "__init__.py").exists()


def test_build_info():
    info = fused_conv.build_info()
    for key in ("version", "torch_version", "cuda_version", "arch_list", "with_cuda"):
        assert key in info, f"build_info() lacks {key!r}: {sorted(info)}"
    assert info["version"] == fused_conv.__version__
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["with_cuda"], bool)
    if info["with_cuda"]:
        assert info["cuda_version"], "a CUDA build names its CUDA version"
    else:
        assert info["cuda_version"] is None
    json.dumps(info)  # plain data


def test_version_string():
    v = fused_conv.__version__
    assert isinstance(v, str) and v[0].isdigit() and v.count(".") >= 2


def test_cli_info(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fused_conv", "info"], cwd=tmp_path, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert fused_conv.__version__ in proc.stdout
    assert torch.__version__ in proc.stdout
    info = json.loads(proc.stdout)
    # Whether the build lists the sm_90a target (also as "9.0a+PTX"); CI builds "9.0a".
    assert info["hopper_wgmma"] is ("9.0a" in (fused_conv.build_info()["arch_list"] or ""))


def test_cli_rejects_unknown_command(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fused_conv", "no-such-command"], cwd=tmp_path,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0


@pytest.mark.parametrize("name", OPS)
def test_ops_registered(name):
    packet = getattr(torch.ops.fused_conv, name)
    assert hasattr(packet, "default")
    qualname = f"fused_conv::{name}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU"), (
        f"no CPU kernel for {qualname}"
    )


@pytest.mark.parametrize("device", [d for d in DEVICES if not isinstance(d, str)])
@pytest.mark.parametrize("name", OPS)
def test_cuda_kernels_registered(name, device):
    info = fused_conv.build_info()
    assert info["with_cuda"], "a CUDA-capable machine should run a CUDA build of fused_conv"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_conv::{name}", "CUDA")


def test_public_api():
    for name in ("ConvBNScale2d", "ops", "build_info", "__version__"):
        assert hasattr(fused_conv, name), name
    for name in ("conv_bn_scale", "conv_bn_eval", "conv_bn_train"):
        assert callable(getattr(fused_conv.ops, name)), name
    from fused_conv import kernelbench

    for name in ("Model", "ModelNew", "get_inputs", "get_init_inputs"):
        assert hasattr(kernelbench, name), name


@pytest.mark.parametrize("device", DEVICES)
def test_cli_profile(tmp_path, device):
    # `python -m fused_conv profile`: per-kernel (CUDA) or per-op (CPU) self time of a
    # training step of the reference case (the benchmark's smoke shape on CPU).
    path = tmp_path / "profile.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fused_conv", "profile", "--device", device, "--steps", "2",
         "--warmup", "1", "--json", str(path)], cwd=tmp_path, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(path.read_text())
    assert record["case"] == "ref" and record["mode"] == "train_step"
    rows = record["rows_ms"]
    assert rows and all(ms > 0 for ms in rows.values())
    assert abs(sum(rows.values()) - record["total_ms"]) <= 1e-6 * record["total_ms"]
    # the fused ops (CPU) or kernels (CUDA) are among what the step spent its time on
    assert any("fused_conv" in name for name in rows), sorted(rows)[:20]
    assert f"{record['total_ms']:.3f} ms" in proc.stdout
