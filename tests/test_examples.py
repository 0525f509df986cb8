"""The examples do what they say: examples/train_digits.py trains fused_conv's CNN alongside
the same CNN built from nn.Conv2d + nn.BatchNorm2d, and the two agree (issue 4)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import DEVICES

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"


def load_example():
    if not EXAMPLE.exists():
        pytest.skip(f"{EXAMPLE} is not next to the tests (copy examples/ with tests/)")
    pytest.importorskip("sklearn", reason="the digits example needs scikit-learn")
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("device", DEVICES)
def test_train_digits_curves_agree(device, capsys):
    example = load_example()
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        status = example.main(["--device", device, "--epochs", "2"])
    finally:  # the example turns TF32 off for its comparison
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    out = capsys.readouterr().out
    assert status == 0, out
    assert "curves agree" in out
    assert out.count("epoch ") == 2
