"""Shared helpers for the fused_conv tests.

The tests run against the INSTALLED package (`import fused_conv`), from a copy of this
directory; nothing here touches sys.path.

Every comparison is against PyTorch's own nn.Conv2d -> nn.BatchNorm2d -> * scale computed
in float64 from the very same parameters (copied into the reference).

Devices: "cpu" always; "cuda" when torch.cuda.is_available() (skipped otherwise).
Environment: FUSED_CONV_HUGE=1 enables the >2^31-element CUDA test.
"""

from __future__ import annotations

import copy
import math
import os
import zlib
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")
HUGE = os.environ.get("FUSED_CONV_HUGE", "") == "1"
requires_huge = pytest.mark.skipif(
    not HUGE, reason="set FUSED_CONV_HUGE=1 to run the >2^31-element test (needs ~20 GB GPU)"
)

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


@pytest.fixture(autouse=True, scope="session")
def _float32_convolutions_are_float32():
    """The fused tile kernels are float32-accurate (3xTF32) whatever the flags say; the
    ATen fallback (and eager PyTorch) follow torch.backends.cudnn.allow_tf32, which
    defaults to True. The tests check float32 accuracy everywhere, so TF32 is off."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# (device, dtype) pairs: float32/float64 everywhere, float16/bfloat16 on CUDA only.
DEVICE_DTYPES = [
    pytest.param("cpu", torch.float32, id="cpu-float32"),
    pytest.param("cpu", torch.float64, id="cpu-float64"),
    pytest.param("cuda", torch.float32, id="cuda-float32", marks=requires_cuda),
    pytest.param("cuda", torch.float64, id="cuda-float64", marks=requires_cuda),
    pytest.param("cuda", torch.float16, id="cuda-float16", marks=requires_cuda),
    pytest.param("cuda", torch.bfloat16, id="cuda-bfloat16", marks=requires_cuda),
]

# (atol, rtol) of outputs vs the float64 reference, and the bound on the relative
# norm error ||out - ref|| / ||ref||.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (5e-2, 5e-2),
}
NORM_TOLERANCES = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 4e-2,  # sums over many bf16-rounded terms (e.g. the BN weight gradient)
}


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device")
    config.addinivalue_line("markers", "huge: needs FUSED_CONV_HUGE=1 and a big GPU")
    config.addinivalue_line("markers", "compile: uses torch.compile (slow on CPU)")


# ---- seeds ---------------------------------------------------------------------------------


def seed_of(*parts) -> int:
    """A reproducible seed that differs between tests/parameters."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Seeds the global RNG differently for every test (from its name), reproducibly."""
    seed = seed_of(request.node.name)
    request.node.user_properties.append(("seed", seed))
    torch.manual_seed(seed)
    yield


@pytest.fixture
def gen(request) -> torch.Generator:
    return torch.Generator().manual_seed(seed_of("gen", request.node.name))


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


# ---- random parameters and inputs ----------------------------------------------------------


def _randn(shape, gen, dtype=torch.float64):
    return torch.randn(shape, generator=gen, dtype=dtype)


def _rand(shape, gen, dtype=torch.float64):
    return torch.rand(shape, generator=gen, dtype=dtype)


@torch.no_grad()
def randomize_(conv: nn.Conv2d, bn: nn.BatchNorm2d, gen: torch.Generator) -> None:
    """Random conv weight/bias, BN weight (both signs)/bias and running stats, and a random
    num_batches_tracked. Values are drawn in float64 on the CPU, then cast/copied, so a case
    is the same on every device."""
    fan_in = conv.weight[0].numel()
    conv.weight.copy_(_randn(conv.weight.shape, gen) / math.sqrt(fan_in))
    if conv.bias is not None:
        conv.bias.copy_(_randn(conv.bias.shape, gen) * 0.5)
    c = bn.num_features
    if bn.affine:
        sign = torch.where(_rand((c,), gen) < 0.2, -1.0, 1.0).double()
        bn.weight.copy_(sign * (0.5 + _rand((c,), gen)))
        bn.bias.copy_(_randn((c,), gen) * 0.5)
    if bn.track_running_stats:
        bn.running_mean.copy_(_randn((c,), gen) * 0.5)
        bn.running_var.copy_(0.5 + _rand((c,), gen))
        bn.num_batches_tracked.fill_(int(torch.randint(0, 7, (), generator=gen)))


LAYOUTS = ("contiguous", "channels_last", "transposed", "sliced", "channels_last_sliced")


def make_input(
    shape,
    gen: torch.Generator,
    *,
    dtype=torch.float32,
    device="cpu",
    layout: str = "contiguous",
    dist: str = "randn",
    offset: float = 0.0,
) -> torch.Tensor:
    """A fresh random input of `shape` (N, C, H, W) in the requested memory layout.

    layout: contiguous | channels_last | transposed (a dense view with H/W strides swapped)
    | sliced (a strided, non-dense view) | channels_last_sliced.
    dist: randn | rand (KernelBench uses torch.rand). offset shifts the values.
    """
    n, c, h, w = shape
    draw = _randn if dist == "randn" else _rand

    def values(s):
        return (draw(s, gen) + offset).to(dtype)

    if layout == "contiguous":
        x = values((n, c, h, w))
    elif layout == "channels_last":
        x = values((n, c, h, w)).contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = values((n, c, w, h)).transpose(2, 3)
    elif layout == "sliced":
        x = values((n, c + 1, 2 * h, w + 3))[:, 1:, ::2, 2 : 2 + w]
    elif layout == "channels_last_sliced":
        base = values((n, c, 2 * h, w + 1)).contiguous(memory_format=torch.channels_last)
        x = base[:, :, 1::2, :w]
    else:
        raise ValueError(layout)
    assert x.shape == (n, c, h, w)
    return x.to(device)


def expects_channels_last(layout: str) -> bool:
    return layout in ("channels_last", "channels_last_sliced")


def check_layout(out: torch.Tensor, layout: str) -> None:
    """Output is channels_last for channels_last inputs, contiguous otherwise (the contract)."""
    if out.numel() == 0:
        return
    if expects_channels_last(layout):
        assert out.is_contiguous(memory_format=torch.channels_last), (
            f"expected a channels_last output for a {layout} input, got strides {out.stride()}"
        )
    else:
        assert out.is_contiguous(), (
            f"expected a contiguous output for a {layout} input, got strides {out.stride()}"
        )


# ---- the reference -------------------------------------------------------------------------


class Reference(nn.Module):
    """nn.Conv2d -> nn.BatchNorm2d -> * scale, PyTorch's own modules."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, scale) -> None:
        super().__init__()
        self.conv, self.bn, self.scale = conv, bn, scale

    def forward(self, x):
        return self.bn(self.conv(x)) * self.scale


def make_reference(conv: nn.Conv2d, bn: nn.BatchNorm2d, scale, dtype=torch.float64) -> Reference:
    """A float64 reference with COPIES of the same parameters, buffers and training flag."""
    conv64 = copy.deepcopy(conv).to(dtype=dtype)
    bn64 = copy.deepcopy(bn).to(dtype=dtype)
    # Parameters of any dtype (e.g. float32 BN params with a float16 conv) end up float64.
    for module in (conv64, bn64):
        for p in module.parameters():
            p.data = p.data.to(dtype)
        for buf in module.buffers():
            if buf is not None and buf.is_floating_point():
                buf.data = buf.data.to(dtype)
    if isinstance(scale, torch.Tensor):
        scale = nn.Parameter(scale.detach().to(dtype).clone(), requires_grad=scale.requires_grad)
    ref = Reference(conv64, bn64, scale)
    ref.train(bn.training)
    return ref


def ref_input(x: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    return x.detach().to(dtype).contiguous()


# ---- comparisons ---------------------------------------------------------------------------


def assert_finite(t: torch.Tensor, what: str = "output") -> None:
    bad = ~torch.isfinite(t)
    assert not bool(bad.any()), f"{what}: {int(bad.sum())} non-finite values of {t.numel()}"


def assert_close_ref(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype,
    what: str = "output",
    *,
    scale_atol: float = 1.0,
    norm: bool = True,
) -> None:
    """actual (any dtype/device) vs a float64 expected at the tolerance for `dtype`.

    NaN never passes (explicit finiteness check and equal_nan=False). scale_atol multiplies
    atol, for quantities that are sums over many elements (gradients)."""
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    )
    assert_finite(actual, what)
    atol, rtol = TOLERANCES[dtype]
    a = actual.detach().to(device="cpu", dtype=torch.float64)
    e = expected.detach().to(device="cpu", dtype=torch.float64)
    assert_finite(e, f"{what} (reference)")
    torch.testing.assert_close(
        a, e, atol=atol * scale_atol, rtol=rtol, equal_nan=False, msg=lambda m: f"{what}: {m}"
    )
    if norm and e.numel() > 0:
        denom = e.norm().item()
        # only where the reference is not ~0 (e.g. a training-mode conv-bias gradient is 0
        # analytically): there the absolute tolerance above is what applies
        if denom > 10 * atol * scale_atol * e.numel() ** 0.5:
            err = (a - e).norm().item() / denom
            assert err <= NORM_TOLERANCES[dtype], (
                f"{what}: relative norm error {err:.3e} > {NORM_TOLERANCES[dtype]:.1e}"
            )


def stats_tolerance_dtype(dtype: torch.dtype) -> torch.dtype:
    """Running stats are float32 (float64 for float64 inputs); their accuracy is limited by the
    input precision, so they are held to the input dtype's tolerance."""
    return dtype


def assert_stats_match(fused_bn: nn.BatchNorm2d, ref_bn: nn.BatchNorm2d, dtype, what="") -> None:
    if not ref_bn.track_running_stats:
        assert fused_bn.running_mean is None and fused_bn.running_var is None
        return
    assert_close_ref(fused_bn.running_mean, ref_bn.running_mean, dtype, f"{what}running_mean")
    assert_close_ref(fused_bn.running_var, ref_bn.running_var, dtype, f"{what}running_var")
    assert fused_bn.num_batches_tracked.item() == ref_bn.num_batches_tracked.item(), (
        f"{what}num_batches_tracked {fused_bn.num_batches_tracked.item()} != "
        f"{ref_bn.num_batches_tracked.item()}"
    )


# ---- CUDA allocator poisoning --------------------------------------------------------------


def poison_cuda_cache(device) -> None:
    """Fills cached (freed) CUDA memory with NaN, so an output that is not fully written by a
    kernel shows up as NaN instead of happening to hold the right values. No-op on CPU."""
    if torch.device(device).type != "cuda":
        return
    blobs = []
    for nbytes in (1 << 10, 1 << 16, 1 << 20, 1 << 24, 1 << 26):
        blobs.append(torch.full((nbytes // 4,), float("nan"), device=device))
    del blobs  # back to the caching allocator, NaN-filled


# ---- one case: fused module + float64 reference + inputs ----------------------------------


@dataclass
class Case:
    fused: nn.Module
    ref: Reference
    device: str
    dtype: torch.dtype
    in_shape: tuple
    layout: str = "contiguous"
    dist: str = "randn"
    offset: float = 0.0
    gen: torch.Generator = field(default_factory=torch.Generator)
    params: dict = field(default_factory=dict)

    def input(self) -> torch.Tensor:
        """A fresh random input for this case (new values at every call)."""
        return make_input(
            self.in_shape, self.gen, dtype=self.dtype, device=self.device,
            layout=self.layout, dist=self.dist, offset=self.offset,
        )  # fmt: skip

    def train(self, mode: bool = True) -> Case:
        self.fused.train(mode)
        self.ref.train(mode)
        return self


def make_case(
    *,
    c_in=4,
    c_out=6,
    kernel_size=3,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    bias=True,
    padding_mode="zeros",
    eps=1e-5,
    momentum=0.1,
    affine=True,
    track_running_stats=True,
    scale=2.0,
    learnable_scale=False,
    n=2,
    hw=(9, 8),
    device="cpu",
    dtype=torch.float32,
    bn_dtype=None,
    layout="contiguous",
    dist="randn",
    offset=0.0,
    seed=0,
    training=True,
    module_channels_last=False,
) -> Case:
    """A ConvBNScale2d with random parameters and running stats, its float64 reference from the
    same parameters, and a generator for fresh inputs. bn_dtype: BN parameters/buffers in
    another dtype than the conv (float32 BN with float16/bfloat16 conv)."""
    import fused_conv

    gen = torch.Generator().manual_seed(seed)
    fused = fused_conv.ConvBNScale2d(
        c_in, c_out, kernel_size, stride=stride, padding=padding, dilation=dilation,
        groups=groups, bias=bias, padding_mode=padding_mode, eps=eps, momentum=momentum,
        affine=affine, track_running_stats=track_running_stats, scaling_factor=scale,
        learnable_scale=learnable_scale,
    )  # fmt: skip
    randomize_(fused.conv, fused.bn, gen)
    if learnable_scale:
        with torch.no_grad():
            fused.scaling_factor.fill_(scale)
    fused.to(device=device, dtype=dtype)
    if bn_dtype is not None:
        fused.bn.to(dtype=bn_dtype)
        if learnable_scale:
            fused.scaling_factor.data = fused.scaling_factor.data.to(bn_dtype)
    if module_channels_last:
        fused.to(memory_format=torch.channels_last)
    fused.train(training)
    ref = make_reference(fused.conv, fused.bn, fused.scaling_factor)
    h, w = hw
    return Case(
        fused=fused, ref=ref, device=device, dtype=dtype, in_shape=(n, c_in, h, w),
        layout=layout, dist=dist, offset=offset, gen=gen,
        params=dict(
            stride=stride, padding=padding, dilation=dilation, groups=groups, eps=eps,
            momentum=momentum, scale=scale,
        ),
    )  # fmt: skip


def functional_forward(case: Case, x: torch.Tensor, state: dict, training: bool):
    """fused_conv.ops.conv_bn_scale on tensors held in `state` (parameters and running
    stats), with the geometry from the case parameters (not from the module)."""
    from fused_conv import ops

    p = case.params
    return ops.conv_bn_scale(
        x, state["weight"], state.get("bias"), state.get("bn_weight"), state.get("bn_bias"),
        state.get("running_mean"), state.get("running_var"), training=training,
        momentum=p["momentum"], eps=p["eps"], scale=state["scale"], stride=p["stride"],
        padding=p["padding"], dilation=p["dilation"], groups=p["groups"],
        num_batches_tracked=state.get("num_batches_tracked"),
    )  # fmt: skip


def functional_state(case: Case) -> dict:
    """Independent copies of the fused module's tensors for functional_forward."""
    conv, bn = case.fused.conv, case.fused.bn

    def c(t):
        return None if t is None else t.detach().clone()

    scale = case.fused.scaling_factor
    return {
        "weight": c(conv.weight),
        "bias": c(conv.bias),
        "bn_weight": c(bn.weight),
        "bn_bias": c(bn.bias),
        "running_mean": c(bn.running_mean),
        "running_var": c(bn.running_var),
        "num_batches_tracked": c(bn.num_batches_tracked),
        "scale": c(scale) if isinstance(scale, torch.Tensor) else scale,
    }


def assert_functional_stats(state: dict, ref_bn: nn.BatchNorm2d, dtype, what="") -> None:
    if not ref_bn.track_running_stats:
        return
    assert_close_ref(state["running_mean"], ref_bn.running_mean, dtype, f"{what}running_mean")
    assert_close_ref(state["running_var"], ref_bn.running_var, dtype, f"{what}running_var")
    assert state["num_batches_tracked"].item() == ref_bn.num_batches_tracked.item()


def conv_out_hw(h, w, kernel_size, stride=1, padding=0, dilation=1):
    """Output size via PyTorch itself (F.conv2d on an empty-channel meta tensor)."""
    k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    x = torch.empty(1, 1, h, w, device="meta")
    wt = torch.empty(1, 1, *k, device="meta")
    return tuple(F.conv2d(x, wt, None, stride, padding, dilation).shape[2:])
