"""CUDA tile-kernel edge cases: tails, layouts, dtypes, dispatch, streams, determinism, sizes.

Every test compares with PyTorch's conv2d + batch norm in float64 on fresh random data.
Tests named `*sanitize*` are small and make up the compute-sanitizer run
(benchmarks/gpu_suite.sh). Skipped without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import fused_conv
from fused_conv import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = "cuda"


def tile_kernel_covers(x, w, stride, padding, dilation, groups=1) -> bool:
    return fused_conv._C.cuda_tile_kernel_supports(
        x, w, [stride] * 2, [padding] * 2, [dilation] * 2, groups
    )


def make(n, c_in, h, w, c_out, k, *, dtype=torch.float32, channels_last=False, seed=0,
         offset=0.3, bias=True, affine=True):  # fmt: skip
    g = torch.Generator(device=CUDA).manual_seed(seed)
    x = torch.randn(n, c_in, h, w, device=CUDA, generator=g) + offset
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in, k, k, device=CUDA, generator=g) / (c_in * k * k) ** 0.5
    params = {
        "bias": torch.randn(c_out, device=CUDA, generator=g).to(dtype) if bias else None,
        "bn_weight": torch.rand(c_out, device=CUDA, generator=g) + 0.5 if affine else None,
        "bn_bias": torch.randn(c_out, device=CUDA, generator=g) if affine else None,
        "running_mean": torch.randn(c_out, device=CUDA, generator=g),
        "running_var": torch.rand(c_out, device=CUDA, generator=g) + 0.5,
    }
    return x.to(dtype), weight.to(dtype), params


def reference(x, weight, p, *, training, scale, stride, padding, dilation, eps=1e-5):
    y = F.conv2d(x.double(), weight.double(), None if p["bias"] is None else p["bias"].double(),
                 stride, padding, dilation)  # fmt: skip
    if training:
        mean, var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)
    else:
        mean, var = p["running_mean"].double(), p["running_var"].double()
    out = (y - mean[:, None, None]) / torch.sqrt(var + eps)[:, None, None]
    if p["bn_weight"] is not None:
        out = out * p["bn_weight"].double()[:, None, None] + p["bn_bias"].double()[:, None, None]
    return out * scale, mean, var


def run(x, weight, p, *, training, scale=2.0, stride=1, padding=0, dilation=1):
    kwargs = dict(scale=scale, stride=stride, padding=padding, dilation=dilation)
    if training:
        return ops.conv_bn_train(x, weight, p["bias"], p["bn_weight"], p["bn_bias"], **kwargs)
    out = ops.conv_bn_eval(x, weight, p["bias"], p["bn_weight"], p["bn_bias"], p["running_mean"],
                           p["running_var"], **kwargs)  # fmt: skip
    return out, None, None


def check(x, weight, p, *, training, dtype, stride=1, padding=0, dilation=1, channels_last=False):
    out, mean, invstd = run(x, weight, p, training=training, stride=stride, padding=padding,
                            dilation=dilation)  # fmt: skip
    ref, ref_mean, ref_var = reference(x, weight, p, training=training, scale=2.0, stride=stride,
                                       padding=padding, dilation=dilation)  # fmt: skip
    assert out.dtype == dtype and out.shape == ref.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    assert torch.isfinite(out).all()
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    bound = 1e-5 if dtype == torch.float32 else 2e-2  # fp16/bf16: the output's own rounding
    assert rel <= bound, f"relative error {rel:.2e} > {bound:.0e}"
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    if training:
        assert mean.dtype == torch.float32 and invstd.dtype == torch.float32
        torch.testing.assert_close(mean.double(), ref_mean, atol=1e-5, rtol=1e-5)
        ref_invstd = 1 / torch.sqrt(ref_var + 1e-5)
        torch.testing.assert_close(invstd.double(), ref_invstd, atol=1e-5, rtol=1e-5)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize(
    "shape",
    [
        # n, c_in, h, w, c_out, k, stride, padding, dilation: tails in every tile dimension
        (2, 8, 37, 45, 64, 3, 1, 0, 1),
        (3, 3, 33, 31, 16, 3, 1, 1, 1),
        (2, 5, 19, 70, 24, 5, 2, 2, 1),
        (2, 4, 23, 41, 100, 3, 1, 3, 2),
        (1, 1, 5, 97, 7, 1, 1, 0, 1),
        (2, 3, 30, 29, 33, 7, 2, 3, 1),
        (1, 16, 9, 9, 130, 3, 1, 1, 1),
    ],
    ids=lambda s: "x".join(map(str, s)),
)
def test_sanitize_tile_kernel_matches_reference(shape, training, channels_last, dtype):
    n, c_in, h, w, c_out, k, stride, padding, dilation = shape
    x, weight, p = make(n, c_in, h, w, c_out, k, dtype=dtype, channels_last=channels_last,
                        seed=hash(shape) % 1000)  # fmt: skip
    assert tile_kernel_covers(x, weight, stride, padding, dilation)
    check(x, weight, p, training=training, dtype=dtype, stride=stride, padding=padding,
          dilation=dilation, channels_last=channels_last)  # fmt: skip


def rows_kernel_covers(x, w, stride, padding, dilation) -> bool:
    return fused_conv._C.cuda_rows_stats_supports(
        x, w, [stride] * 2, [padding] * 2, [dilation] * 2, 1
    )


def hopper_with_sm90a() -> bool:
    info = fused_conv._C.build_info()
    arch = (info.get("arch_list") or "").replace("+PTX", "").replace(";", " ").split()
    return torch.cuda.get_device_capability()[0] == 9 and "9.0a" in arch


ROWS_SHAPES = [
    # n, c_in, h, w, c_out, k, stride, padding, dilation (stride 1, W_out >= 64, C_out > 32)
    (2, 8, 20, 130, 64, 3, 1, 0, 1),  # one exact 128-pixel column tile
    (2, 8, 9, 300, 64, 3, 1, 1, 1),  # three column tiles (the last 44), odd H_out
    (3, 3, 11, 67, 40, 3, 1, 1, 1),  # C_in padded to 8, C_out < 64, odd W_out
    (2, 6, 7, 90, 100, 2, 1, 1, 2),  # two channel blocks, dilation, an even kernel
    (1, 16, 6, 129, 70, 1, 1, 0, 1),  # 1x1, a 1-pixel second column tile
    (2, 16, 5, 100, 48, 1, 1, 1, 1),  # two k-steps per tap, padding all around a 1x1
    (1, 8, 3, 64, 64, 3, 1, 1, 1),  # the narrowest row it takes
]


@pytest.mark.parametrize(
    "kernel", ["rows", "rows-stats", "tile"], ids=["on_rows", "on_rows_stats", "on_tile"]
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("shape", ROWS_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sanitize_rows_kernel_matches_reference(shape, training, channels_last, kernel,
                                                monkeypatch):  # fmt: skip
    # On Hopper: both passes on the row kernel (conv_rows.cu) by default; only the
    # training statistics there (FUSED_CONV_FORWARD_KERNEL=rows-stats); neither (=tile).
    if kernel != "rows":
        monkeypatch.setenv("FUSED_CONV_FORWARD_KERNEL", kernel)
    n, c_in, h, w, c_out, k, stride, padding, dilation = shape
    x, weight, p = make(n, c_in, h, w, c_out, k, channels_last=channels_last,
                        seed=hash(shape) % 1000 + 7)  # fmt: skip
    covered = rows_kernel_covers(x, weight, stride, padding, dilation)
    assert covered == (kernel != "tile" and hopper_with_sm90a())
    check(x, weight, p, training=training, dtype=torch.float32, stride=stride, padding=padding,
          dilation=dilation, channels_last=channels_last)  # fmt: skip


def rows16_kernel_covers(x, w, stride, padding, dilation) -> bool:
    return fused_conv._C.cuda_rows16_supports(x, w, [stride] * 2, [padding] * 2, [dilation] * 2, 1)


ROWS16_SHAPES = [
    # n, c_in, h, w, c_out, k, stride, padding, dilation (channels_last, C_in and C_out % 8 == 0)
    (2, 8, 20, 130, 64, 3, 1, 0, 1),  # one exact 128-pixel column tile
    (2, 8, 9, 300, 64, 3, 1, 1, 1),  # three column tiles (the last 44), strips past H_out
    (2, 16, 7, 90, 96, 2, 1, 1, 2),  # two channel chunks, two channel blocks, dilation
    (1, 24, 6, 67, 24, 1, 1, 1, 1),  # 3 chunks (a zero-paired k-step), C_out < 64, odd W_out
    (1, 8, 6, 129, 72, 1, 1, 0, 1),  # 1x1 (one chunk), a 1-pixel second column tile
    (1, 8, 3, 64, 64, 3, 1, 1, 1),  # the narrowest row it takes
]


@pytest.mark.parametrize(
    "kernel", ["rows", "rows-stats", "tile"], ids=["on_rows16", "stats_on_rows16", "on_tile16"]
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("shape", ROWS16_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sanitize_rows16_kernel_matches_reference(shape, training, dtype, kernel, monkeypatch):
    # float16 / bfloat16 channels_last on Hopper: both passes on the 16-bit row kernel
    # (conv_rows16.cu) by default, the statistics only (=rows-stats), or neither (=tile).
    if kernel != "rows":
        monkeypatch.setenv("FUSED_CONV_FORWARD_KERNEL", kernel)
    n, c_in, h, w, c_out, k, stride, padding, dilation = shape
    x, weight, p = make(n, c_in, h, w, c_out, k, dtype=dtype, channels_last=True,
                        seed=hash(shape) % 1000 + 11)  # fmt: skip
    covered = rows16_kernel_covers(x, weight, stride, padding, dilation)
    assert covered == (kernel != "tile" and hopper_with_sm90a())
    check(x, weight, p, training=training, dtype=dtype, stride=stride, padding=padding,
          dilation=dilation, channels_last=True)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_sanitize_parameters_read_in_their_own_dtype(training, channels_last, dtype):
    # The fold reads each per-channel tensor as given (ParamPtr): the input's 16-bit dtype or
    # float32, mixed, without a cast launch; a non-contiguous one (here beta, with NaN between
    # its elements) through a float32 copy. nhwc 16-bit: the 16-bit row kernel; else the tile
    # kernel or, for float32 NCHW, the float32 row kernel.
    x, weight, p = make(2, 8, 9, 70, 64, 3, dtype=dtype, channels_last=channels_last,
                        seed=41 + training + 2 * channels_last)  # fmt: skip
    p["bn_weight"] = p["bn_weight"].to(dtype)
    p["running_mean"] = p["running_mean"].to(dtype)
    beta = p["bn_bias"]
    p["bn_bias"] = torch.stack([beta, torch.full_like(beta, float("nan"))], dim=1)[:, 0]
    assert not p["bn_bias"].is_contiguous()
    check(x, weight, p, training=training, dtype=dtype, padding=1, channels_last=channels_last)


def test_rows16_kernel_is_not_taken_outside_its_reach():
    x, weight, _ = make(1, 8, 40, 70, 16, 3, dtype=torch.bfloat16, channels_last=True)
    assert not rows16_kernel_covers(x, weight, 2, 1, 1)  # stride 2
    assert not rows16_kernel_covers(x.contiguous(), weight, 1, 1, 1)  # NCHW
    x3, w3, _ = make(1, 3, 40, 70, 16, 3, dtype=torch.bfloat16, channels_last=True)
    assert not rows16_kernel_covers(x3, w3, 1, 1, 1)  # C_in not a multiple of 8
    assert not rows16_kernel_covers(x.float(), weight.float(), 1, 1, 1)  # float32: conv_rows.cu


def test_rows_kernel_is_not_taken_outside_its_reach():
    x, weight, _ = make(1, 8, 40, 70, 64, 3)
    assert not rows_kernel_covers(x, weight, 2, 1, 1)  # stride 2
    assert not rows_kernel_covers(x[..., :60], weight, 1, 0, 1)  # W_out = 58 < 64
    assert not rows_kernel_covers(x.half(), weight.half(), 1, 1, 1)  # float16
    assert not rows_kernel_covers(x, weight[:32].contiguous(), 1, 1, 1)  # C_out = 32
    assert rows_kernel_covers(x, weight, 1, 1, 1) == hopper_with_sm90a()


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_sanitize_affine_off_bias_off(training):
    x, weight, p = make(2, 6, 20, 35, 40, 3, bias=False, affine=False)
    check(x, weight, p, training=training, dtype=torch.float32)


@pytest.mark.parametrize(
    "c_in,k,groups", [(64, 3, 1), (8, 3, 2), (3, 11, 1)], ids=["wide", "grouped", "big-kernel"]
)
def test_outside_the_tile_kernel_falls_back_correctly(c_in, k, groups):
    x, weight, p = make(2, c_in, 24, 24, 16, k)
    weight = weight[:, : c_in // groups].contiguous()
    assert not tile_kernel_covers(x, weight, 1, 1, 1, groups)
    for training in (False, True):
        out = ops.conv_bn_scale(x, weight, p["bias"], p["bn_weight"], p["bn_bias"],
                                p["running_mean"].clone(), p["running_var"].clone(),
                                training=training, scale=2.0, padding=1, groups=groups)  # fmt: skip
        y = F.conv2d(x.double(), weight.double(), p["bias"].double(), 1, 1, 1, groups)
        mean = y.mean((0, 2, 3)) if training else p["running_mean"].double()
        var = y.var((0, 2, 3), unbiased=False) if training else p["running_var"].double()
        ref = (y - mean[:, None, None]) / torch.sqrt(var + 1e-5)[:, None, None]
        ref = ref * p["bn_weight"].double()[:, None, None] + p["bn_bias"].double()[:, None, None]
        torch.testing.assert_close(out.double(), 2 * ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("width", [40, 130], ids=["tile-kernel", "rows-kernel"])
def test_sanitize_non_default_stream_and_poisoned_output(width):
    x, weight, p = make(2, 8, 21, width, 64, 3)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        poison = torch.full((2, 64, 19, width - 2), float("nan"), device=CUDA)
        del poison  # its block is reused for the output: every element must be overwritten
        out, _, _ = run(x, weight, p, training=True)
    torch.cuda.current_stream().wait_stream(stream)
    ref, _, _ = reference(x, weight, p, training=True, scale=2.0, stride=1, padding=0, dilation=1)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("width", [64, 130], ids=["tile-kernel", "rows-kernel"])
def test_training_statistics_are_bitwise_reproducible(width):
    x, weight, p = make(8, 8, 64, width, 64, 3)
    first = run(x, weight, p, training=True)
    second = run(x, weight, p, training=True)
    for a, b in zip(first, second, strict=False):
        assert torch.equal(a, b)


@pytest.mark.parametrize("width", [40, 130], ids=["tile-kernel", "rows-kernel"])
def test_large_offset_input_keeps_variance_accurate(width):
    # mean >> std: a naive fp32 E[y^2] - E[y]^2 would lose the variance to cancellation
    # (relative error ~ (mean/std)^2 * 1e-7 ~ 0.1 here). The output itself is only as
    # accurate as fp32 allows for values of size |mean| (~1e-7 * 1000 / std).
    x, weight, p = make(4, 8, 40, width, 32, 3, offset=1000.0)
    out, mean, invstd = run(x, weight, p, training=True)
    ref, ref_mean, ref_var = reference(x, weight, p, training=True, scale=2.0, stride=1,
                                       padding=0, dilation=1)  # fmt: skip
    torch.testing.assert_close(mean.double(), ref_mean, atol=0, rtol=2e-5)
    torch.testing.assert_close(invstd.double(), 1 / torch.sqrt(ref_var + 1e-5), atol=0, rtol=1e-4)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-3


def test_kernelbench_reference_problem_matches_model():
    from fused_conv import kernelbench as kb

    for seed in range(5):
        torch.manual_seed(seed)
        model = kb.Model(*kb.get_init_inputs()).to(CUDA)
        fused = kb.ModelNew(*kb.get_init_inputs()).to(CUDA)
        fused.load_state_dict(model.state_dict())
        x = kb.get_inputs()[0].to(CUDA)
        with torch.no_grad():
            ref, out = model(x), fused(x)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fused.bn.running_mean, model.bn.running_mean)
        torch.testing.assert_close(fused.bn.running_var, model.bn.running_var)


@pytest.mark.skipif(os.environ.get("FUSED_CONV_HUGE") != "1", reason="set FUSED_CONV_HUGE=1")
def test_output_over_2_pow_31_elements():
    # 2 x 64 x 4100 x 4100 fp16 output = 2.15e9 elements (4.3 GB): 64-bit batch offsets.
    x, weight, p = make(2, 4, 4102, 4102, 64, 3, dtype=torch.float16)
    out, _, _ = run(x, weight, p, training=False)
    assert out.numel() > 2**31
    for n, rows in ((0, slice(0, 3)), (1, slice(4096, 4100))):
        xs = x[n : n + 1, :, rows.start : rows.stop + 2]
        ref, _, _ = reference(xs, weight, p, training=False, scale=2.0, stride=1, padding=0,
                              dilation=1)  # fmt: skip
        got = out[n : n + 1, :, rows].double()
        assert ((got - ref).norm() / ref.norm()).item() < 2e-3
