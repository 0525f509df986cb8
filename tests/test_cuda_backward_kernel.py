"""CUDA fused backward (kernels/cuda/conv_bn_backward.cu): gradients of every tensor against
float64 autograd of conv2d -> batch norm -> * scale, on shapes the tile kernel covers (tails in
every tile dimension, both layouts, all dtypes, train and eval), its dispatch, determinism and a
large-offset input. Tests named `*sanitize*` are small and run under compute-sanitizer
(benchmarks/gpu_suite.sh). Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_conv
from fused_conv import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = "cuda"
EPS = 1e-5
KEYS = ("input", "weight", "bias", "bn_weight", "bn_bias", "scale")

# Relative L2 error bounds per gradient. float32: float32-accurate (the conv backward runs
# without TF32: conftest turns it off). float16 / bfloat16: g_hat is rounded to the input
# dtype before the convolution's backward, as in eager PyTorch.
BOUNDS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def layout_weight(weight, layout):
    """The weight as given to the op: contiguous, channels_last (what Module.to(memory_format=)
    makes of a conv's weight), or "strided": a non-dense view whose neighbours in memory are
    NaN, so that reading it as if contiguous poisons the result."""
    if layout == "channels_last":
        return weight.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        return torch.stack([weight, torch.full_like(weight, float("nan"))], dim=-1)[..., 0]
    return weight


def make(n, c_in, h, w, c_out, k, *, dtype, channels_last, seed, offset=0.3,
         weight_layout="contiguous"):  # fmt: skip
    g = torch.Generator(device=CUDA).manual_seed(seed)
    x = (torch.randn(n, c_in, h, w, device=CUDA, generator=g) + offset).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in, k, k, device=CUDA, generator=g) / (c_in * k * k) ** 0.5
    params = {
        "weight": layout_weight(weight.to(dtype), weight_layout),
        "bias": torch.randn(c_out, device=CUDA, generator=g).to(dtype),
        "bn_weight": torch.rand(c_out, device=CUDA, generator=g) + 0.5,
        "bn_bias": torch.randn(c_out, device=CUDA, generator=g),
        "scale": torch.tensor(1.5, device=CUDA),
        "running_mean": torch.randn(c_out, device=CUDA, generator=g),
        "running_var": torch.rand(c_out, device=CUDA, generator=g) + 0.5,
    }
    return x, params, g


def forward(x, p, *, training, stride, padding, dilation):
    return ops.conv_bn_scale(
        x, p["weight"], p["bias"], p["bn_weight"], p["bn_bias"],
        None if training else p["running_mean"], None if training else p["running_var"],
        training=training, eps=EPS, scale=p["scale"], stride=stride, padding=padding,
        dilation=dilation,
    )  # fmt: skip


def reference_forward(x, p, *, training, stride, padding, dilation):
    y = F.conv2d(x, p["weight"], p["bias"], stride, padding, dilation)
    if training:
        mean, var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)
    else:
        mean, var = p["running_mean"], p["running_var"]
    xhat = (y - mean[:, None, None]) / torch.sqrt(var + EPS)[:, None, None]
    return (xhat * p["bn_weight"][:, None, None] + p["bn_bias"][:, None, None]) * p["scale"]


def gradients(fn, x, p, grad_out, wanted=KEYS, **kw):
    x = x.detach().requires_grad_("input" in wanted)
    q = {key: v.detach().requires_grad_(key in wanted) for key, v in p.items()}
    out = fn(x, q, **kw)
    out.backward(grad_out)
    return out, {"input": x.grad, **{key: q[key].grad for key in KEYS if key != "input"}}


def check_backward(
    shape, *, dtype, channels_last, training, seed, offset=0.3, bound=None, wanted=KEYS,
    weight_layout="contiguous", check_out=False,
):  # fmt: skip
    n, c_in, h, w, c_out, k, stride, padding, dilation = shape
    x, p, g = make(n, c_in, h, w, c_out, k, dtype=dtype, channels_last=channels_last, seed=seed,
                   offset=offset, weight_layout=weight_layout)  # fmt: skip
    conv = dict(stride=stride, padding=padding, dilation=dilation)
    assert fused_conv._C.cuda_tile_kernel_supports(
        x, p["weight"], [stride] * 2, [padding] * 2, [dilation] * 2, 1
    )
    x64 = x.double()
    p64 = {key: v.double() for key, v in p.items()}
    with torch.no_grad():
        out_shape = reference_forward(x64, p64, training=training, **conv).shape
    grad_out = torch.randn(out_shape, device=CUDA, generator=g).to(dtype)
    if channels_last:
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    out, got = gradients(forward, x, p, grad_out, wanted, training=training, **conv)
    out64, want = gradients(reference_forward, x64, p64, grad_out.double(), training=training,
                            **conv)  # fmt: skip
    bound = bound or BOUNDS[dtype]
    if check_out:
        out_err = (out.double() - out64).norm().item() / out64.norm().item()
        assert torch.isfinite(out).all() and out_err <= bound, f"out: relative error {out_err:.2e}"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if "input" in wanted:
        assert got["input"].is_contiguous(memory_format=fmt)
    errors = {}
    for key in KEYS:
        if key not in wanted:
            assert got[key] is None, key
            continue
        a, e = got[key], want[key]
        assert a is not None and a.shape == e.shape, key
        assert a.dtype == (dtype if key == "input" else p[key].dtype), key
        assert torch.isfinite(a).all(), f"grad {key} not finite"
        ref_norm = e.norm().item()
        if key == "scale":
            # dL/ds sums C_out terms gamma*sum(g*xhat) + beta*sum(g) of either sign; its error
            # is measured against the size of those terms, as float32 can give no more
            # (against a sum that happens to cancel, each term would need better).
            terms = (p64["bn_weight"] * want["bn_weight"]).abs().sum()
            terms = terms + (p64["bn_bias"] * want["bn_bias"]).abs().sum()
            ref_norm = max(ref_norm, terms.item() / abs(p["scale"].item()))
        if key == "bias" and training:
            # analytically 0: the batch mean absorbs the conv bias
            assert a.abs().max().item() <= 1e-4 * max(1.0, want["bn_bias"].abs().max().item())
            continue
        errors[key] = (a.double() - e).norm().item() / ref_norm
    print(shape, dtype, "train" if training else "eval", {k: f"{v:.1e}" for k, v in errors.items()})
    for key, err in errors.items():
        assert err <= bound, f"grad {key}: relative error {err:.2e} > {bound:.0e}"


SHAPES = [
    # n, c_in, h, w, c_out, k, stride, padding, dilation: tails in every tile dimension.
    # In training the weight gradient is fused into the tile kernel (kGradOutW) unless K =
    # c_in*k*k is too wide for the channel block (weight_grad_fusable): then cuDNN's.
    # float32 stride-1 shapes take grad_input from the tile kernels (grad_input_tile_supports):
    # the tap-reusing kernel for NCHW 3x3 with C_in <= 8 and C_out <= 64 (16-, 8- or 4-byte
    # row copies by the conv output's width; grad_input_taps_supports; NHWC takes kConv),
    # kConv over 8-channel slices of g_hat for the rest; others from cuDNN. float32 NCHW 3x3
    # stride-1 shapes with C_in <= 8, C_out <= 64 and padding <= 2 take the sums and the
    # weight gradient from the patch moments instead (grad_moments_supports), and grad_input
    # from the tap kernel on g plus the correction from x (g_hat never written): 16-byte
    # copies where the widths allow, else 4-byte.
    (2, 8, 37, 45, 64, 3, 1, 1, 1),  # fused, 64-channel blocks
    (3, 3, 33, 31, 16, 3, 1, 0, 1),  # fused, 16-channel blocks
    (2, 5, 19, 70, 24, 5, 2, 2, 1),  # fused, 32-channel blocks
    (2, 4, 23, 41, 100, 3, 1, 3, 2),  # fused, two channel blocks, the second partial
    (1, 2, 5, 97, 7, 1, 1, 0, 1),  # c_in = 1, k = 1 would make grad_weight 0 in training
    (2, 3, 30, 29, 33, 7, 2, 3, 1),  # K = 147 with 64-channel blocks: cuDNN's weight gradient
    (2, 16, 21, 35, 32, 3, 1, 1, 1),  # K = 144 with 32-channel blocks: fused, 9 n8 fragments
    (2, 17, 13, 40, 20, 3, 1, 1, 1),  # grad_input: 3 slices (the last 4 channels), 32-ch. blocks
    (2, 3, 10, 12, 9, 3, 1, 3, 1),  # padding > dilation*(k-1): cuDNN's grad_input
    (2, 8, 37, 44, 64, 3, 1, 1, 1),  # taps, 16-byte rows: row (37 = 4*8 + 5), column tails
    (3, 3, 21, 69, 40, 3, 1, 0, 1),  # taps, 4-byte rows (67): padding 0, 3 slices, 8-ch. tail
    (2, 5, 14, 32, 20, 3, 1, 2, 1),  # taps, 8-byte rows (34): padding 2, 2 slices, 4-ch. tail
    (2, 6, 30, 28, 48, 3, 1, 0, 1),  # moments: 26-pixel rows (a tile spans 8 input rows)
    (3, 1, 12, 40, 16, 3, 1, 1, 1),  # moments with C_in = 1 (7 zero input-channel planes)
    (2, 3, 3, 30, 16, 3, 1, 0, 1),  # moments, 3 input rows: every row a border row
    (2, 8, 10, 128, 64, 3, 1, 0, 1),  # moments on Hopper: 126-pixel rows, one per row tile
    (2, 4, 9, 128, 16, 3, 1, 2, 1),  # moments, 130-pixel rows: the flat kernel on Hopper too
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backward_matches_reference(shape, training, channels_last, dtype):
    check_backward(shape, dtype=dtype, channels_last=channels_last, training=training,
                   seed=sum(shape) * 7 + training)  # fmt: skip


def hopper_with_sm90a() -> bool:
    arch = fused_conv._C.build_info().get("arch_list") or ""
    return torch.cuda.get_device_capability()[0] == 9 and "9.0a" in arch


ROWS16_SHAPES = [
    # float16 / bfloat16 channels_last shapes the 16-bit Hopper row kernel takes (stride 1,
    # C_in and C_out multiples of 8, W_out >= 64): both backward passes over grad_out on it
    (2, 8, 9, 130, 64, 3, 1, 0, 1),  # the reference problem's rows (128 pixels)
    (2, 16, 7, 90, 96, 2, 1, 1, 2),  # two channel chunks, two channel blocks, dilation
    (1, 24, 6, 67, 24, 1, 1, 1, 1),  # a zero-paired k-step, C_out < 64, odd W_out
    (1, 8, 6, 129, 72, 1, 1, 0, 1),  # a 1-pixel second column tile, an 8-channel block
    (1, 16, 6, 70, 32, 3, 1, 1, 1),  # 18 chunks: g_hat's pass without the weight gradient
    (1, 8, 8, 70, 64, 3, 1, 2, 2),  # 3x3, dilation 2: the weight gradient's N = 24 stride
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("shape", ROWS16_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sanitize_rows16_backward_matches_reference(shape, training, dtype):
    n, c_in, h, w, c_out, k, stride, padding, dilation = shape
    x, p, _ = make(n, c_in, h, w, c_out, k, dtype=dtype, channels_last=True, seed=5)
    covered = fused_conv._C.cuda_rows16_supports(
        x, p["weight"], [stride] * 2, [padding] * 2, [dilation] * 2, 1
    )
    assert covered == hopper_with_sm90a()
    check_backward(shape, dtype=dtype, channels_last=True, training=training,
                   seed=sum(shape) * 5 + training)  # fmt: skip
    # The weight gradient alone: in training, g_hat's pass also reduces it (K <= 9 chunks).
    check_backward(shape, dtype=dtype, channels_last=True, training=training,
                   seed=sum(shape) * 5 + 2, wanted=("weight",))  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 3])
def test_rows16_backward_with_many_strips_per_block(monkeypatch, rows, dtype):
    # More strips than the row kernel's blocks (at most 4 per multiprocessor), so each block
    # runs several: the next strip's input and the g of its first row are copied during the
    # last row of the strip before, into the other ring slot and stage (conv_rows16.cu).
    # rows = 3 also leaves a 2-row last strip in every image.
    monkeypatch.setenv("FUSED_CONV_ROWS_PER_STRIP", str(rows))
    per_image = -(-32 // rows)  # 32 output rows of 64 pixels
    n = 4 * torch.cuda.get_device_properties(0).multi_processor_count // per_image + 2
    check_backward((n, 8, 34, 66, 64, 3, 1, 0, 1), dtype=dtype, channels_last=True,
                   training=True, seed=rows + n)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("weight_layout", ["channels_last", "strided"])
def test_sanitize_rows16_reads_the_weight_by_its_strides(weight_layout, training, dtype):
    # The 16-bit row kernels (both forward passes, both backward passes, the data gradient)
    # stage the weight by its strides instead of a contiguous copy per call.
    shape = (2, 16, 9, 70, 64, 3, 1, 1, 1)
    n, c_in, h, w, c_out, k, stride, padding, dilation = shape
    x, p, _ = make(n, c_in, h, w, c_out, k, dtype=dtype, channels_last=True, seed=9,
                   weight_layout=weight_layout)  # fmt: skip
    assert not p["weight"].is_contiguous()
    covered = fused_conv._C.cuda_rows16_supports(
        x, p["weight"], [stride] * 2, [padding] * 2, [dilation] * 2, 1
    )
    assert covered == hopper_with_sm90a()
    check_backward(shape, dtype=dtype, channels_last=True, training=training, seed=11 + training,
                   weight_layout=weight_layout, check_out=True)  # fmt: skip


DGRAD16_SHAPES = [
    # grad_input on the 16-bit Hopper row kernel (grad_input_rows16.cu): float16 / bfloat16
    # channels_last, stride and dilation 1, padding <= k - 1, C_in % 8, C_out % 16, W >= 64
    (2, 8, 9, 130, 64, 3, 1, 0, 1),  # reference rows; a 2-pixel third tile, a 1-row group
    (2, 16, 7, 90, 32, 3, 1, 1, 1),  # two 8-channel blocks, padding 1
    (1, 8, 40, 70, 16, 4, 1, 2, 1),  # 4x4, two row segments (the second 8 rows), one pair
    (1, 24, 6, 67, 48, 1, 1, 0, 1),  # 1x1, three channel blocks, three chunk pairs
    (3, 8, 33, 64, 16, 2, 1, 1, 1),  # an even kernel (g padded by 0), a 1-row segment
]


def dgrad16_covers(shape, dtype) -> bool:
    n, c_in, h, w, c_out, k, stride, padding, dilation = shape
    x = torch.empty(n, c_in, h, w, device=CUDA, dtype=dtype).contiguous(
        memory_format=torch.channels_last
    )
    weight = torch.empty(c_out, c_in, k, k, device=CUDA, dtype=dtype)
    h_out = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    w_out = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    grad = torch.empty(n, c_out, h_out, w_out, device=CUDA, dtype=dtype).contiguous(
        memory_format=torch.channels_last
    )
    return fused_conv._C.cuda_grad_input_rows16_supports(
        grad, x, weight, [stride] * 2, [padding] * 2, [dilation] * 2, 1
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("shape", DGRAD16_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sanitize_rows16_grad_input_matches_reference(shape, training, dtype):
    assert dgrad16_covers(shape, dtype) == hopper_with_sm90a()
    check_backward(shape, dtype=dtype, channels_last=True, training=training,
                   seed=sum(shape) * 3 + training, wanted=("input",))  # fmt: skip
    check_backward(shape, dtype=dtype, channels_last=True, training=training,
                   seed=sum(shape) * 3 + 1 - training)  # fmt: skip


def test_rows16_grad_input_is_not_taken_outside_its_reach(monkeypatch):
    bf16 = torch.bfloat16
    assert not dgrad16_covers((1, 8, 9, 70, 24, 3, 1, 1, 1), bf16)  # C_out % 16 != 0
    assert not dgrad16_covers((1, 8, 9, 70, 16, 3, 1, 1, 2), bf16)  # dilation 2
    assert not dgrad16_covers((1, 8, 9, 70, 16, 3, 2, 1, 1), bf16)  # stride 2
    assert not dgrad16_covers((1, 8, 9, 70, 16, 3, 1, 3, 1), bf16)  # padding > k - 1
    assert not dgrad16_covers((1, 8, 9, 60, 16, 3, 1, 1, 1), bf16)  # width < 64
    assert not dgrad16_covers((1, 8, 9, 70, 16, 3, 1, 1, 1), torch.float32)
    monkeypatch.setenv("FUSED_CONV_FORWARD_KERNEL", "tile")
    assert not dgrad16_covers(DGRAD16_SHAPES[0], bf16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("wanted", [("input",), ("weight",), ("weight", "bn_weight")], ids="+".join)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[5]], ids=["fused_dw", "cudnn_dw"])
def test_backward_of_some_inputs(shape, wanted, dtype):
    # grad_input alone: g_hat for cuDNN only; grad_weight alone: g_hat is never written.
    check_backward(shape, dtype=dtype, channels_last=False, training=True, seed=len(wanted),
                   wanted=wanted)  # fmt: skip


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_sanitize_backward_small(training, channels_last):
    check_backward((2, 3, 9, 35, 10, 3, 1, 1, 1), dtype=torch.float32,
                   channels_last=channels_last, training=training, seed=5)  # fmt: skip


@pytest.mark.parametrize("width", [36, 34, 35], ids=["copy16", "copy8", "copy4"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_sanitize_backward_taps(training, width):
    # grad_input on the tap-reusing kernel: two tiles in width, the second partial; the
    # width picks the row copies (16, 8 or 4 bytes). The sums and grad_weight come from the
    # patch moments (16-byte copies for width 36, 4-byte for the others; a partial last tile).
    check_backward((2, 3, 9, width, 10, 3, 1, 1, 1), dtype=torch.float32, channels_last=False,
                   training=training, seed=6)  # fmt: skip


@pytest.mark.parametrize("c_out", [16, 40], ids=["1slice", "3slices"])
def test_sanitize_backward_taps_several_tiles_per_block(c_out):
    # 12 * 3 * 4 = 144 tiles: more than the persistent grid (one block per SM), so blocks
    # carry the ring and Z from tile to tile (with one slice per tile too); the same for the
    # patch moments' 12 * 24 tiles of 128 pixels.
    check_backward((12, 4, 24, 128, c_out, 3, 1, 1, 1), dtype=torch.float32,
                   channels_last=False, training=True, seed=7)  # fmt: skip


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("shape", SHAPES[12:16], ids=lambda s: "x".join(map(str, s)))
def test_flat_moments_kernel_matches_reference(shape, training, monkeypatch):
    # FUSED_CONV_MOMENTS_KERNEL=flat: the flat 128-pixel kernel where Hopper would take the
    # row-tiled one, so that both are checked on the device the suite runs on.
    monkeypatch.setenv("FUSED_CONV_MOMENTS_KERNEL", "flat")
    check_backward(shape, dtype=torch.float32, channels_last=False, training=training,
                   seed=sum(shape) + 3)  # fmt: skip


@pytest.mark.parametrize("kernel", ["rows", "flat"])
def test_sanitize_backward_moments_kernels(kernel, monkeypatch):
    # both patch-moments kernels under compute-sanitizer: 2 x 18 rows tiles and a partial
    # flat tile, padding 1 (rows outside the image), 8-byte copies.
    monkeypatch.setenv("FUSED_CONV_MOMENTS_KERNEL", kernel)
    check_backward((2, 5, 20, 34, 24, 3, 1, 1, 1), dtype=torch.float32, channels_last=False,
                   training=True, seed=8)  # fmt: skip


def test_backward_large_offset_input():
    # mean(y) >> std(y): x_hat and the sums of g * x_hat must not cancel in float32
    # (the kernel centres y on the saved mean before summing).
    check_backward((2, 8, 20, 40, 32, 3, 1, 1, 1), dtype=torch.float32, channels_last=False,
                   training=True, seed=11, offset=300.0, bound=1e-3)  # fmt: skip


# Hopper runs the row-tiled patch moments (wgmma) where output rows fit 128 pixels; other
# devices the flat 128-pixel kernel (grad_moments_rows_supports).
MOMENTS_KERNEL = (
    "grad_moments_rows_kernel"
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
    else "grad_moments_kernel"
)


@pytest.mark.parametrize(
    "c_in,c_out,kernels,tile_modes",
    [
        # the patch moments give the sums and grad_weight; grad_input = the tap kernel on g
        # (weights A*W) + the correction from x: no tile kernel, g_hat never written
        (
            8,
            64,
            (
                MOMENTS_KERNEL,
                "finalize_moments_kernel",
                "grad_input_taps_kernel",
                "grad_input_correction_kernel",
                "grad_input_border_kernel",
            ),
            0,
        ),
        # C_in > 8: kGradStats, then kGradOutW (g_hat and grad_weight); kConv for grad_input
        (9, 32, ("finalize_grad_kernel", "reduce_weight_grad_kernel"), 3),
    ],
    ids=["moments", "tile"],
)
def test_backward_runs_the_fused_kernels(c_in, c_out, kernels, tile_modes):
    x, p, _ = make(2, c_in, 16, 40, c_out, 3, dtype=torch.float32, channels_last=False, seed=3)
    x.requires_grad_()
    out = forward(x, {k: v.requires_grad_(k in KEYS) for k, v in p.items()}, training=True,
                  stride=1, padding=1, dilation=1)  # fmt: skip
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
    names = " ".join(e.name for e in prof.events())
    for kernel in kernels:
        assert kernel in names, (kernel, names[:2000])
    tile = {e.name for e in prof.events() if "conv_tile_kernel" in e.name}
    assert len(tile) == tile_modes, tile


@pytest.mark.parametrize(
    "dtype,stride,padding,dilation,expected",
    [
        (torch.float32, 1, 1, 1, True),
        (torch.float32, 1, 0, 1, True),  # padding 2 for the transposed convolution
        (torch.float32, 1, 4, 2, True),
        (torch.float32, 1, 3, 1, False),  # would need negative padding
        (torch.float32, 2, 1, 1, False),  # strided: a transposed convolution proper
        (torch.float16, 1, 1, 1, False),  # 16-bit: cuDNN's
        (torch.bfloat16, 1, 1, 1, False),
    ],
)
def test_grad_input_dispatch(dtype, stride, padding, dilation, expected):
    x = torch.randn(2, 8, 12, 12, device=CUDA).to(dtype)
    w = torch.randn(64, 8, 3, 3, device=CUDA).to(dtype)
    got = fused_conv._C.cuda_grad_input_tile_supports(
        x, w, [stride] * 2, [padding] * 2, [dilation] * 2, 1
    )
    assert got is expected


def stride_one_args(shape, channels_last, padding, dilation):
    """Arguments of the dispatch predicates for a stride-1 conv of shape (n, c_in, h, w, c_out,
    k)."""
    n, c_in, h, w, c_out, k = shape
    x = torch.randn(n, c_in, h, w, device=CUDA)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in, k, k, device=CUDA)
    return (x, weight, [1, 1], [padding] * 2, [dilation] * 2, 1)


@pytest.mark.parametrize(
    "shape,channels_last,padding,dilation,expected",
    [
        ((2, 8, 12, 12, 64, 3), False, 1, 1, True),
        ((2, 3, 12, 14, 20, 3), False, 0, 1, True),
        ((2, 8, 12, 13, 64, 3), False, 2, 1, True),
        ((2, 8, 12, 12, 64, 3), True, 1, 1, False),  # NHWC: kConv
        ((2, 8, 12, 12, 64, 3), False, 3, 1, False),  # padding > 2: cuDNN
        ((2, 9, 12, 12, 64, 3), False, 1, 1, False),  # C_in > 8
        ((2, 8, 12, 12, 65, 3), False, 1, 1, False),  # C_out > 64
        ((2, 8, 12, 12, 64, 5), False, 2, 1, False),  # 5x5
        ((2, 8, 12, 12, 64, 3), False, 2, 2, False),  # dilation 2
    ],
)
def test_grad_input_taps_dispatch(shape, channels_last, padding, dilation, expected):
    args = stride_one_args(shape, channels_last, padding, dilation)
    assert fused_conv._C.cuda_grad_input_taps_supports(*args) is expected
    # kConv covers the others but padding > dilation*(k-1)
    covered = expected or padding <= dilation * (shape[5] - 1)
    assert fused_conv._C.cuda_grad_input_tile_supports(*args) is covered


@pytest.mark.parametrize(
    "shape,channels_last,padding,dilation,expected",
    [
        ((2, 8, 12, 40, 64, 3), False, 1, 1, True),
        ((2, 3, 12, 30, 20, 3), False, 0, 1, True),  # 28 columns: a tile spans 8 input rows
        ((2, 8, 12, 41, 64, 3), False, 2, 1, True),
        ((1, 8, 4, 129, 64, 3), False, 1, 1, False),  # wider than a staged row (128)
        ((2, 8, 12, 12, 64, 3), False, 1, 1, False),  # 128 pixels span too many rows
        ((2, 8, 12, 40, 64, 3), True, 1, 1, False),  # NHWC
        ((2, 8, 12, 40, 64, 3), False, 3, 1, False),  # padding > 2
        ((2, 9, 12, 40, 64, 3), False, 1, 1, False),  # C_in > 8
        ((2, 8, 12, 40, 65, 3), False, 1, 1, False),  # C_out > 64
        ((2, 8, 12, 40, 64, 5), False, 2, 1, False),  # 5x5
        ((2, 8, 12, 40, 64, 3), False, 2, 2, False),  # dilation 2
    ],
)
def test_grad_moments_dispatch(shape, channels_last, padding, dilation, expected):
    args = stride_one_args(shape, channels_last, padding, dilation)
    assert fused_conv._C.cuda_grad_moments_supports(*args) is expected
    half = (args[0].half(), args[1].half(), *args[2:])
    assert fused_conv._C.cuda_grad_moments_supports(*half) is False


@pytest.mark.parametrize(
    "c_in,grad_input_kernel", [(8, "grad_input_taps_kernel"), (9, "TileMode)5")]
)  # TileMode)5: demangled TileMode::kConv
def test_eval_backward_takes_grad_input_from_the_tile_kernel(c_in, grad_input_kernel):
    x, p, _ = make(2, c_in, 16, 40, 64, 3, dtype=torch.float32, channels_last=False, seed=4)
    x.requires_grad_()
    out = forward(x, p, training=False, stride=1, padding=1, dilation=1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
    names = {e.name for e in prof.events()}
    assert any(grad_input_kernel in name for name in names), names


def test_backward_is_bitwise_reproducible():
    x, p, g = make(4, 8, 32, 64, 64, 3, dtype=torch.float32, channels_last=False, seed=9)
    grad_out = torch.randn(4, 64, 32, 64, device=CUDA, generator=g)
    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True  # cuDNN's weight gradient, else atomics
    try:
        runs = [
            gradients(forward, x, p, grad_out, training=True, stride=1, padding=1, dilation=1)[1]
            for _ in range(2)
        ]
    finally:
        torch.backends.cudnn.deterministic = deterministic
    for key in KEYS:
        assert torch.equal(runs[0][key], runs[1][key]), key


def test_bfloat16_weight_gradient_does_not_drift_with_the_batch():
    # bfloat16 grad_out takes few distinct values per channel; rounded to nearest, g_hat
    # would carry the same error on every element of a value, and the weight gradient (a
    # sum over N*H*W) would drift with the batch size. x in [0, 1) as in KernelBench.
    g = torch.Generator(device=CUDA).manual_seed(21)
    x = torch.rand(32, 8, 64, 64, device=CUDA, generator=g).to(torch.bfloat16)
    _, p, _ = make(1, 8, 4, 4, 32, 3, dtype=torch.bfloat16, channels_last=False, seed=21)
    conv = dict(stride=1, padding=1, dilation=1)
    grad_out = torch.randn(32, 32, 64, 64, device=CUDA, generator=g).to(torch.bfloat16)
    _, got = gradients(forward, x, p, grad_out, training=True, **conv)
    p64 = {key: v.double() for key, v in p.items()}
    _, want = gradients(
        reference_forward, x.double(), p64, grad_out.double(), training=True, **conv
    )
    err = ((got["weight"].double() - want["weight"]).norm() / want["weight"].norm()).item()
    print("bf16 grad_weight relative error", err)
    assert err <= 1e-2, f"grad weight: relative error {err:.2e}"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_kernels_launch_on_a_second_device():
    # A kernel's opt-in to more than 48 KB of shared memory (cudaFuncSetAttribute) holds for
    # one device's context only: the forward tile kernel, the patch moments and the tap
    # kernel must launch on whichever device comes second, and again on the first.
    for index in (1, 0, 1):
        with torch.cuda.device(index):
            check_backward(SHAPES[0], dtype=torch.float32, channels_last=False, training=True,
                           seed=index)  # fmt: skip
