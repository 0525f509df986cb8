"""Forward outputs AND running statistics vs PyTorch's nn.Conv2d -> nn.BatchNorm2d -> * scale
(float64, same parameters), through the module and the functional API, train and eval."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    DEVICE_DTYPES,
    DEVICES,
    TOLERANCES,
    assert_close_ref,
    assert_finite,
    assert_functional_stats,
    assert_stats_match,
    check_layout,
    conv_out_hw,
    functional_forward,
    functional_state,
    make_case,
    poison_cuda_cache,
    ref_input,
    requires_cuda,
    requires_huge,
    seed_of,
)

import fused_conv

# A pairwise-style selection over the geometry/flags instead of the full product: every value
# of every axis appears, in varied combinations; sizes are small so the CPU suite stays fast.
# Axes: kernel 1/3/5/7 (and non-square/even), stride 1/2, padding 0/1/'same'/'valid'/pairs,
# dilation 1/2, groups 1/2/C_in, bias, affine, momentum 0.1/None, track_running_stats,
# batch 1, odd sizes, layouts.
CONFIGS = {
    "base": dict(c_in=4, c_out=6, kernel_size=3, n=2, hw=(9, 8)),
    "k1_cl_negscale": dict(
        c_in=5, c_out=7, kernel_size=1, n=3, hw=(7, 5), layout="channels_last", scale=-0.5
    ),
    "k5_same_transposed_nobias": dict(
        c_in=3,
        c_out=4,
        kernel_size=5,
        padding="same",
        n=2,
        hw=(10, 11),
        layout="transposed",
        bias=False,
    ),
    "k7_s2_p1_sliced_noaffine": dict(
        c_in=3,
        c_out=5,
        kernel_size=7,
        stride=2,
        padding=1,
        n=2,
        hw=(15, 13),
        layout="sliced",
        affine=False,
    ),
    "k3_d2_same_cumulative": dict(
        c_in=4,
        c_out=4,
        kernel_size=3,
        dilation=2,
        padding="same",
        n=2,
        hw=(12, 9),
        momentum=None,
    ),
    "g2_s2_p1_cl_notrack": dict(
        c_in=4,
        c_out=6,
        kernel_size=3,
        stride=2,
        padding=1,
        groups=2,
        n=2,
        hw=(11, 10),
        layout="channels_last",
        track_running_stats=False,
    ),
    "depthwise_p1_cumulative_nobias": dict(
        c_in=4,
        c_out=4,
        kernel_size=3,
        padding=1,
        groups=4,
        n=2,
        hw=(8, 8),
        momentum=None,
        bias=False,
    ),
    "depthwise_x2_k5_d2_noaffine": dict(
        c_in=3,
        c_out=6,
        kernel_size=5,
        padding=2,
        dilation=2,
        groups=3,
        n=2,
        hw=(13, 12),
        affine=False,
    ),
    "odd_97x61_batch1_s2": dict(
        c_in=2, c_out=3, kernel_size=3, stride=2, padding=1, n=1, hw=(97, 61), scale=0.75
    ),
    "k1_s2_batch1_scale0": dict(
        c_in=3, c_out=3, kernel_size=1, stride=2, n=1, hw=(6, 7), scale=0.0
    ),
    "nonsquare_cl_sliced": dict(
        c_in=4,
        c_out=5,
        kernel_size=(3, 5),
        stride=(2, 1),
        padding=(1, 2),
        dilation=(1, 2),
        n=2,
        hw=(10, 14),
        layout="channels_last_sliced",
    ),
    "even_kernel_same": dict(c_in=3, c_out=4, kernel_size=(2, 4), padding="same", n=2, hw=(8, 9)),
    "k7_d2_same_batch1_bare": dict(
        c_in=2,
        c_out=3,
        kernel_size=7,
        dilation=2,
        padding="same",
        n=1,
        hw=(16, 15),
        momentum=None,
        affine=False,
        bias=False,
    ),
    "cl_module_and_input": dict(
        c_in=4,
        c_out=8,
        kernel_size=3,
        padding=1,
        n=2,
        hw=(8, 8),
        layout="channels_last",
        module_channels_last=True,
    ),
    "rand_offset_eps1e-3": dict(
        c_in=3,
        c_out=6,
        kernel_size=3,
        padding=1,
        n=2,
        hw=(10, 10),
        dist="rand",
        offset=3.0,
        eps=1e-3,
    ),
    "k5_s2_p1_d2": dict(
        c_in=3, c_out=4, kernel_size=5, stride=2, padding=1, dilation=2, n=2, hw=(17, 16)
    ),  # fmt: skip
    "notrack_noaffine_nobias_cumulative": dict(
        c_in=4,
        c_out=4,
        kernel_size=3,
        n=2,
        hw=(7, 7),
        track_running_stats=False,
        affine=False,
        bias=False,
        momentum=None,
    ),
    "g2_valid_cout2": dict(
        c_in=4, c_out=2, kernel_size=3, groups=2, padding="valid", n=3, hw=(6, 9)
    ),  # fmt: skip
    "learnable_scale": dict(
        c_in=4,
        c_out=6,
        kernel_size=3,
        padding=1,
        n=2,
        hw=(6, 7),
        learnable_scale=True,
        scale=1.5,
    ),
    "cout1": dict(c_in=3, c_out=1, kernel_size=3, padding=1, n=2, hw=(6, 6)),
    "cin1_k5": dict(c_in=1, c_out=5, kernel_size=5, padding=2, n=3, hw=(9, 9)),
    "out1x1_batch4": dict(c_in=3, c_out=4, kernel_size=3, n=4, hw=(3, 3), layout="sliced"),
    "c16_32_cl": dict(
        c_in=16, c_out=32, kernel_size=3, padding=1, n=2, hw=(8, 8), layout="channels_last"
    ),  # fmt: skip
    "c17_33_w13": dict(c_in=17, c_out=33, kernel_size=3, padding=1, n=1, hw=(9, 13)),
    "pad_gt_kernel": dict(c_in=3, c_out=4, kernel_size=3, padding=2, n=2, hw=(5, 6), scale=3.0),
}


def _steps(cfg, mode):
    if mode == "eval":
        return 2
    return 3 if cfg.get("momentum", 0.1) is None else 2


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("api", ["module", "functional"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_reference(name, api, mode, device, dtype):
    cfg = CONFIGS[name]
    training = mode == "train"
    case = make_case(
        **cfg, device=device, dtype=dtype, training=training,
        seed=seed_of(name, api, mode, device, str(dtype)),
    )  # fmt: skip
    layout = case.layout
    bn0 = copy.deepcopy(case.fused.bn)
    state = functional_state(case) if api == "functional" else None

    for step in range(_steps(cfg, mode)):
        x = case.input()
        x_before = x.clone()
        poison_cuda_cache(device)
        if api == "module":
            out = case.fused(x)  # autograd enabled, as in real use
        else:
            with torch.no_grad():
                out = functional_forward(case, x, state, training)
        with torch.no_grad():
            expected = case.ref(ref_input(x))
        what = f"[{name} {api} {mode} step {step}] "
        assert out.dtype == dtype and out.device == x.device
        check_layout(out, layout)
        assert_close_ref(out, expected, dtype, what + "output")
        if api == "module":
            assert_stats_match(case.fused.bn, case.ref.bn, dtype, what)
        else:
            assert_functional_stats(state, case.ref.bn, dtype, what)
        assert torch.equal(x, x_before), "the input was modified"

    if not training and bn0.track_running_stats:
        # eval never touches the running statistics
        bn = case.fused.bn
        now = (
            (bn.running_mean, bn.running_var, bn.num_batches_tracked)
            if api == "module"
            else (state["running_mean"], state["running_var"], state["num_batches_tracked"])
        )
        for a, b in zip(
            now, (bn0.running_mean, bn0.running_var, bn0.num_batches_tracked), strict=True
        ):
            assert torch.equal(a, b), "eval changed the running statistics"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("api", ["module", "functional"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_empty_batch(api, mode, device, momentum):
    """N == 0: an empty output of the right shape; running stats unchanged (and
    num_batches_tracked as nn.BatchNorm2d leaves it)."""
    training = mode == "train"
    case = make_case(
        c_in=3, c_out=5, kernel_size=3, stride=2, padding=1, n=0, hw=(9, 7), device=device,
        training=training, momentum=momentum, seed=seed_of("empty", api, mode, device),
    )  # fmt: skip
    bn0 = copy.deepcopy(case.fused.bn)
    x = case.input()
    state = functional_state(case)
    if api == "module":
        out = case.fused(x)
    else:
        out = functional_forward(case, x, state, training)
    expected = case.ref(ref_input(x))
    assert out.shape == expected.shape == (0, 5, *conv_out_hw(9, 7, 3, 2, 1))
    assert out.dtype == torch.float32
    mean, var, nbt = (
        (case.fused.bn.running_mean, case.fused.bn.running_var, case.fused.bn.num_batches_tracked)
        if api == "module"
        else (state["running_mean"], state["running_var"], state["num_batches_tracked"])
    )
    assert torch.equal(mean, bn0.running_mean)
    assert torch.equal(var, bn0.running_var)
    assert nbt.item() == case.ref.bn.num_batches_tracked.item()


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_train_op_statistics(device):
    """conv_bn_train on N == 0: mean zeros, invstd = 1/sqrt(eps) (the contract)."""
    eps = 1e-3
    x = torch.randn(0, 2, 6, 6, device=device)
    w = torch.randn(4, 2, 3, 3, device=device)
    out, mean, invstd = fused_conv.ops.conv_bn_train(x, w, None, None, None, eps=eps)
    assert out.shape == (0, 4, 4, 4)
    assert mean.shape == invstd.shape == (4,)
    assert mean.dtype == invstd.dtype == torch.float32
    torch.testing.assert_close(mean.cpu(), torch.zeros(4), atol=0, rtol=0)
    torch.testing.assert_close(invstd.cpu(), torch.full((4,), eps**-0.5), atol=0, rtol=1e-6)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("padding", [0, 1])
def test_train_op_statistics(device, dtype, padding):
    """conv_bn_train's (mean, invstd): batch statistics (biased variance) of conv(x)+b, in
    float32 (float64 for float64 inputs)."""
    g = torch.Generator().manual_seed(seed_of("stats", device, str(dtype), padding))
    x = torch.randn(3, 4, 9, 10, generator=g, dtype=torch.float64)
    w = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64) / 6
    b = torch.randn(6, generator=g, dtype=torch.float64)
    eps = 1e-4
    out, mean, invstd = fused_conv.ops.conv_bn_train(
        x.to(device, dtype), w.to(device, dtype), b.to(device, dtype), None, None, eps=eps,
        padding=padding,
    )  # fmt: skip
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.dtype == invstd.dtype == stats_dtype
    y = F.conv2d(x.to(dtype).double(), w.to(dtype).double(), b.to(dtype).double(), 1, padding)
    ref_mean = y.mean((0, 2, 3))
    ref_invstd = torch.rsqrt(y.var((0, 2, 3), unbiased=False) + eps)
    assert_close_ref(mean, ref_mean, dtype, "mean")
    assert_close_ref(invstd, ref_invstd, dtype, "invstd")
    assert_close_ref(out, (y - ref_mean[:, None, None]) * ref_invstd[:, None, None], dtype, "out")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_update_running_stats_op(device, momentum):
    """update_running_stats_ follows nn.BatchNorm2d's formula (unbiased var, momentum or
    1/num_batches_tracked) and is a no-op for count == 0."""
    g = torch.Generator().manual_seed(seed_of("update", device, momentum))
    c, count, eps = 7, 50, 1e-5
    rm = torch.randn(c, generator=g).to(device)
    rv = (0.5 + torch.rand(c, generator=g)).to(device)
    mean = torch.randn(c, generator=g).to(device)
    var = (0.2 + torch.rand(c, generator=g)).to(device)
    invstd = torch.rsqrt(var + eps)
    nbt = torch.tensor(4, device=device)
    f = momentum if momentum is not None else 1 / 4
    exp_mean = (1 - f) * rm.double() + f * mean.double()
    exp_var = (1 - f) * rv.double() + f * (1 / invstd.double() ** 2 - eps) * count / (count - 1)

    rm0, rv0 = rm.clone(), rv.clone()
    torch.ops.fused_conv.update_running_stats_(rm, rv, mean, invstd, nbt, momentum, eps, 0)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0), "count == 0 must be a no-op"

    torch.ops.fused_conv.update_running_stats_(rm, rv, mean, invstd, nbt, momentum, eps, count)
    assert_close_ref(rm, exp_mean, torch.float32, "running_mean")
    assert_close_ref(rv, exp_var, torch.float32, "running_var")
    assert nbt.item() == 4, "the op must not increment num_batches_tracked"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_deterministic(device, layout):
    """Two identical runs give bitwise identical outputs and running statistics."""
    case = make_case(
        c_in=8, c_out=16, kernel_size=3, padding=1, n=4, hw=(16, 15), device=device,
        layout=layout, seed=seed_of("det", device, layout),
    )  # fmt: skip
    twin = copy.deepcopy(case.fused)
    for _ in range(2):
        x = case.input()
        with torch.no_grad():
            a = case.fused(x)
            b = twin(x)
        assert torch.equal(a, b), "outputs differ between identical runs"
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(case.fused.bn, name), getattr(twin.bn, name)), name


@pytest.mark.parametrize("device", DEVICES)
def test_scale_tensor_forward(device):
    """A one-element tensor scale (not a Parameter) in the functional API equals the float."""
    case = make_case(c_in=3, c_out=4, kernel_size=3, n=2, hw=(7, 7), device=device,
                     seed=seed_of("scale_tensor", device))  # fmt: skip
    x = case.input()
    state = functional_state(case)
    float_out = functional_forward(case, x, dict(state, running_mean=None, running_var=None),
                                   training=True)  # fmt: skip
    for shape in [(), (1,)]:
        s = torch.full(shape, case.params["scale"], device=device)
        t_out = functional_forward(
            case, x, dict(state, scale=s, running_mean=None, running_var=None), training=True
        )
        torch.testing.assert_close(t_out, float_out, atol=1e-6, rtol=1e-6, equal_nan=False)
        assert_finite(t_out)


# ---- CUDA-only extras ------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_half_conv_float32_bn(dtype, mode, layout):
    """float16/bfloat16 input and conv with float32 BN parameters and running stats."""
    case = make_case(
        c_in=8, c_out=24, kernel_size=3, padding=1, n=4, hw=(20, 19), device="cuda",
        dtype=dtype, bn_dtype=torch.float32, layout=layout, training=mode == "train",
        seed=seed_of("mixed", str(dtype), mode, layout),
    )  # fmt: skip
    for step in range(2):
        x = case.input()
        poison_cuda_cache("cuda")
        with torch.no_grad():
            out = case.fused(x)
            expected = case.ref(ref_input(x))
        assert out.dtype == dtype
        check_layout(out, layout)
        assert_close_ref(out, expected, dtype, f"step {step} output")
        assert case.fused.bn.running_mean.dtype == torch.float32
        assert_stats_match(case.fused.bn, case.ref.bn, dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    "c_in,c_out,hw,kernel_size,stride,padding",
    [
        (3, 1, (7, 5), 3, 1, 1),
        (5, 17, (9, 13), 3, 1, 1),
        (8, 33, (11, 7), 3, 2, 1),
        (7, 65, (5, 31), 1, 1, 0),
        (16, 48, (13, 15), 5, 1, 2),
        (8, 64, (33, 35), 3, 1, 0),
    ],
)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_cuda_odd_tails(dtype, layout, c_in, c_out, hw, kernel_size, stride, padding, mode):
    """C_out not a multiple of 16/32, W not a multiple of 4, H*W odd."""
    case = make_case(
        c_in=c_in, c_out=c_out, kernel_size=kernel_size, stride=stride, padding=padding, n=3,
        hw=hw, device="cuda", dtype=dtype, layout=layout, training=mode == "train",
        seed=seed_of("tails", str(dtype), layout, c_out, hw, mode),
    )  # fmt: skip
    x = case.input()
    poison_cuda_cache("cuda")
    with torch.no_grad():
        out = case.fused(x)
        expected = case.ref(ref_input(x))
    check_layout(out, layout)
    assert_close_ref(out, expected, dtype, "output")
    assert_stats_match(case.fused.bn, case.ref.bn, dtype)


@requires_cuda
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_cuda_non_default_stream(mode):
    """The kernels run on the current stream: the input is written on a side stream after a
    long sleep, so a kernel launched on the default stream would read the NaN poison."""
    case = make_case(
        c_in=8, c_out=32, kernel_size=3, padding=1, n=8, hw=(32, 32), device="cuda",
        training=mode == "train", seed=seed_of("stream", mode),
    )  # fmt: skip
    twin = copy.deepcopy(case.fused)
    src = case.input()
    with torch.no_grad():
        expected_default = twin(src)
        expected = case.ref(ref_input(src))
    x = torch.full_like(src, float("nan"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        torch.cuda._sleep(200_000_000)
        x.copy_(src)
        out = case.fused(x)
        stats = (case.fused.bn.running_mean.clone(), case.fused.bn.running_var.clone())
    side.synchronize()
    torch.cuda.synchronize()
    assert_close_ref(out, expected, torch.float32, "output on a side stream")
    torch.testing.assert_close(out, expected_default, atol=0, rtol=0, equal_nan=False)
    assert torch.equal(stats[0], twin.bn.running_mean)
    assert torch.equal(stats[1], twin.bn.running_var)
    assert_stats_match(case.fused.bn, case.ref.bn, torch.float32)


@requires_cuda
@requires_huge
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_cuda_huge_output(mode):
    """An output of more than 2^31 elements (float16, ~4.3 GB): sampled row slices (including
    the last rows, beyond element 2^31) and the running stats vs a float64 reference computed
    slice by slice."""
    torch.cuda.empty_cache()
    dtype, c_in, c_out, h, w = torch.float16, 2, 64, 8194, 4102
    h_out, w_out = h - 2, w - 2
    assert c_out * h_out * w_out > 2**31
    case = make_case(
        c_in=c_in, c_out=c_out, kernel_size=3, n=1, hw=(h, w), device="cuda", dtype=dtype,
        training=mode == "train", seed=seed_of("huge", mode),
    )  # fmt: skip
    g = torch.Generator(device="cuda").manual_seed(seed_of("huge-x", mode))
    x = torch.randn(1, c_in, h, w, device="cuda", dtype=dtype, generator=g)
    conv, bn = case.ref.conv.cuda(), case.ref.bn.cuda()
    w64, b64 = conv.weight.detach(), conv.bias.detach()

    def ref_rows(r0, r1):  # float64 conv output rows [r0, r1)
        return F.conv2d(x[:, :, r0 : r1 + 2].double(), w64, b64)

    chunk = 512
    if mode == "train":
        m = float(h_out * w_out)
        total = torch.zeros(c_out, dtype=torch.float64, device="cuda")
        for r0 in range(0, h_out, chunk):
            total += ref_rows(r0, min(r0 + chunk, h_out)).sum((0, 2, 3))
        mean = total / m
        sq = torch.zeros_like(total)
        for r0 in range(0, h_out, chunk):
            y = ref_rows(r0, min(r0 + chunk, h_out))
            sq += ((y - mean[:, None, None]) ** 2).sum((0, 2, 3))
        var = sq / m
        f = bn.momentum
        exp_rm = (1 - f) * bn.running_mean + f * mean
        exp_rv = (1 - f) * bn.running_var + f * var * m / (m - 1)
    else:
        mean, var = bn.running_mean, bn.running_var
    invstd = torch.rsqrt(var + bn.eps)
    gamma, beta, s = bn.weight.detach(), bn.bias.detach(), case.ref.scale

    # poison: the output reuses this NaN-filled memory
    blob = torch.full((c_out * h_out * w_out + (1 << 20),), float("nan"), device="cuda",
                      dtype=dtype)  # fmt: skip
    del blob
    with torch.no_grad():
        out = case.fused(x)
    assert out.shape == (1, c_out, h_out, w_out)
    assert bool(torch.isfinite(out).all()), "non-finite values in the huge output"
    for r0 in (0, h_out // 2 - 3, h_out - 40):
        r1 = min(r0 + 40, h_out)
        y = ref_rows(r0, r1)
        expected = s * ((y - mean[:, None, None]) * (invstd * gamma)[:, None, None]
                        + beta[:, None, None])  # fmt: skip
        assert_close_ref(out[:, :, r0:r1], expected, dtype, f"rows {r0}:{r1}")
    if mode == "train":
        atol, rtol = TOLERANCES[dtype]
        torch.testing.assert_close(case.fused.bn.running_mean.double(), exp_rm, atol=atol,
                                   rtol=rtol)  # fmt: skip
        torch.testing.assert_close(case.fused.bn.running_var.double(), exp_rv, atol=atol,
                                   rtol=rtol)  # fmt: skip
    del out
    torch.cuda.empty_cache()
