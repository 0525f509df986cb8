"""ConvBNScale2d as an nn.Module: state dicts, seeded construction, from_modules,
train()/eval(), learnable scale, padding modes, .to()."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    DEVICES,
    assert_close_ref,
    assert_stats_match,
    make_case,
    make_reference,
    randomize_,
    ref_input,
    requires_cuda,
    seed_of,
)
from torch import nn

import fused_conv
from fused_conv import kernelbench as kb
from fused_conv.modules import ConvBNScale2d


def _randomized(module, seed):
    randomize_(module.conv, module.bn, torch.Generator().manual_seed(seed))
    return module


def test_state_dict_keys_equal_model():
    model = kb.Model(*kb.get_init_inputs())
    new = kb.ModelNew(*kb.get_init_inputs())
    fused = ConvBNScale2d(8, 64, 3, scaling_factor=2.0)
    assert list(new.state_dict()) == list(model.state_dict())
    assert list(fused.state_dict()) == list(model.state_dict())


@pytest.mark.parametrize("direction", ["model_to_fused", "fused_to_model"])
def test_state_dict_round_trip(direction):
    init = kb.get_init_inputs()
    model, fused = kb.Model(*init), kb.ModelNew(*init)
    src, dst = (model, fused) if direction == "model_to_fused" else (fused, model)
    _randomized(src, seed_of("sd", direction))
    dst.load_state_dict(src.state_dict(), strict=True)
    for (k1, v1), (k2, v2) in zip(src.state_dict().items(), dst.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2), k1
    # and they compute the same thing (eval: deterministic w.r.t. the loaded stats)
    model.eval(), fused.eval()
    x = torch.rand(2, 8, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-4, rtol=1e-4, equal_nan=False)


@pytest.mark.parametrize("seed", [0, 1, 1234])
def test_seeded_construction_equals_model(seed):
    torch.manual_seed(seed)
    model = kb.Model(*kb.get_init_inputs())
    torch.manual_seed(seed)
    new = kb.ModelNew(*kb.get_init_inputs())
    torch.manual_seed(seed)
    fused = ConvBNScale2d(8, 64, 3, scaling_factor=2.0)
    for other in (new, fused):
        for (k1, v1), (k2, v2) in zip(
            model.state_dict().items(), other.state_dict().items(), strict=True
        ):
            assert k1 == k2 and torch.equal(v1, v2), f"seed {seed}: {k1} differs"
    assert new.scaling_factor == model.scaling_factor == 2.0
    # and the RNG is left in the same state (nothing else was drawn)
    torch.manual_seed(seed)
    kb.Model(*kb.get_init_inputs())
    a = torch.rand(3)
    torch.manual_seed(seed)
    kb.ModelNew(*kb.get_init_inputs())
    assert torch.equal(a, torch.rand(3))


@pytest.mark.parametrize("device", DEVICES)
def test_from_modules_shares_parameters(device):
    conv = nn.Conv2d(3, 6, 3, padding=1, device=device)
    bn = nn.BatchNorm2d(6, device=device)
    randomize_(conv, bn, torch.Generator().manual_seed(seed_of("from", device)))
    ref = make_reference(conv, bn, 0.5)
    fused = ConvBNScale2d.from_modules(conv, bn, scaling_factor=0.5)
    assert fused.conv is conv and fused.bn is bn
    assert fused.conv.weight.data_ptr() == conv.weight.data_ptr()
    assert fused.training == conv.training
    x = torch.randn(2, 3, 7, 7, device=device)
    out = fused(x)  # training: updates the SHARED running stats
    expected = ref(ref_input(x))
    assert_close_ref(out, expected, torch.float32, "output")
    assert_stats_match(bn, ref.bn, torch.float32)
    # a change to the original module is seen by the fused one
    with torch.no_grad():
        conv.weight.mul_(-1)
        ref.conv.weight.mul_(-1)
    fused.eval(), ref.eval()
    with torch.no_grad():
        assert_close_ref(fused(x), ref(ref_input(x)), torch.float32, "after in-place change")
    assert bn.training is False, "eval() must reach the wrapped bn"
    with pytest.raises((TypeError, ValueError)):
        ConvBNScale2d.from_modules(bn, conv)
    with pytest.raises(ValueError, match="num_features|out_channels"):
        ConvBNScale2d.from_modules(conv, nn.BatchNorm2d(5, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_train_eval_switch(device):
    case = make_case(c_in=3, c_out=4, kernel_size=3, n=3, hw=(8, 8), device=device,
                     seed=seed_of("switch", device))  # fmt: skip
    fused, ref = case.fused, case.ref
    assert fused.training and fused.bn.training
    for mode in (True, False, True, False):
        case.train(mode)
        assert fused.bn.training is mode and fused.conv.training is mode
        before = fused.bn.running_mean.clone()
        x = case.input()
        with torch.no_grad():
            out = fused(x)
            expected = ref(ref_input(x))
        assert_close_ref(out, expected, torch.float32, f"training={mode}")
        assert_stats_match(fused.bn, ref.bn, torch.float32)
        changed = not torch.equal(before, fused.bn.running_mean)
        assert changed is mode, "running stats must change in train() and only there"
    # eval output depends only on the running statistics: same input twice -> same output,
    # independent of the batch (one sample alone gives the same rows)
    x = case.input()
    with torch.no_grad():
        full = fused(x)
        single = fused(x[1:2])
    torch.testing.assert_close(single, full[1:2], atol=1e-6, rtol=1e-6, equal_nan=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_learnable_scale_gets_gradient(mode, device):
    case = make_case(c_in=3, c_out=4, kernel_size=3, padding=1, n=2, hw=(6, 6), device=device,
                     learnable_scale=True, scale=1.3, training=mode == "train",
                     seed=seed_of("learn", mode, device))  # fmt: skip
    s = case.fused.scaling_factor
    assert isinstance(s, nn.Parameter) and s.shape == () and s.requires_grad
    assert "scaling_factor" in dict(case.fused.named_parameters())
    x = case.input()
    g = torch.randn(2, 4, 6, 6, device=device)
    case.fused(x).backward(g)
    case.ref(ref_input(x)).backward(g.double())
    assert s.grad is not None and s.grad.shape == ()
    assert_close_ref(s.grad, case.ref.scale.grad, torch.float32, "grad scaling_factor",
                     scale_atol=max(1.0, case.ref.scale.grad.abs().item()))  # fmt: skip
    # an optimizer step moves it
    before = s.detach().clone()
    torch.optim.SGD([s], lr=0.1).step()
    assert not torch.equal(before, s.detach())


def test_fixed_scale_is_not_a_parameter():
    m = ConvBNScale2d(3, 4, 3, scaling_factor=2.5)
    assert "scaling_factor" not in dict(m.named_parameters())
    assert m.scaling_factor == 2.5
    assert len(list(m.parameters())) == 4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_padding_modes(padding_mode, mode, device):
    """Either matches nn.Conv2d's padding_mode, or raises a clear error naming it."""
    try:
        case = make_case(
            c_in=3, c_out=4, kernel_size=3, padding=(1, 2), padding_mode=padding_mode, n=2,
            hw=(7, 8), device=device, training=mode == "train",
            seed=seed_of("pmode", padding_mode, mode, device),
        )  # fmt: skip
        x = case.input()
        out = case.fused(x)
    except (ValueError, NotImplementedError) as exc:
        assert padding_mode in str(exc) or "padding_mode" in str(exc), str(exc)
        return
    with torch.no_grad():
        expected = case.ref(ref_input(x))
    assert_close_ref(out, expected, torch.float32, f"padding_mode={padding_mode}")
    assert_stats_match(case.fused.bn, case.ref.bn, torch.float32)


def test_to_dtype():
    case = make_case(c_in=3, c_out=4, kernel_size=3, n=2, hw=(7, 7), seed=seed_of("todtype"))
    fused = case.fused.to(torch.float64)
    for name, t in list(fused.named_parameters()) + list(fused.named_buffers()):
        if t.is_floating_point():
            assert t.dtype == torch.float64, name
    x = case.input().double()
    with torch.no_grad():
        out = fused(x)
        expected = case.ref(ref_input(x))
    assert out.dtype == torch.float64
    assert_close_ref(out, expected, torch.float64, "float64 after .to(float64)")
    assert_stats_match(fused.bn, case.ref.bn, torch.float64)


@requires_cuda
def test_to_device():
    case = make_case(c_in=3, c_out=4, kernel_size=3, n=2, hw=(7, 7), learnable_scale=True,
                     seed=seed_of("todevice"))  # fmt: skip
    fused = case.fused.to("cuda")
    for name, t in list(fused.named_parameters()) + list(fused.named_buffers()):
        assert t.device.type == "cuda", name
    x = case.input().cuda()
    with torch.no_grad():
        out = fused(x)
        expected = case.ref(ref_input(x).cpu())
    assert out.device.type == "cuda"
    assert_close_ref(out, expected, torch.float32, "on cuda")
    assert_stats_match(fused.bn, case.ref.bn, torch.float32)
    back = fused.to("cpu")
    assert all(t.device.type == "cpu" for t in back.parameters())


def test_deepcopy_and_repr():
    m = ConvBNScale2d(3, 4, 3, scaling_factor=2.0)
    twin = copy.deepcopy(m)
    for (k, a), (_, b) in zip(m.state_dict().items(), twin.state_dict().items(), strict=True):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), k
    text = repr(m)
    assert "Conv2d" in text and "BatchNorm2d" in text


def test_exported():
    assert fused_conv.ConvBNScale2d is ConvBNScale2d
    assert issubclass(kb.ModelNew, nn.Module)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_inference_mode(mode, device):
    """Under torch.inference_mode() (as serving code runs it), like nn.BatchNorm2d: training
    mode still updates the running statistics."""
    case = make_case(c_in=3, c_out=4, kernel_size=3, padding=1, n=2, hw=(7, 6), device=device,
                     training=mode == "train", seed=seed_of("inference", mode, device))  # fmt: skip
    x = case.input()
    with torch.inference_mode():
        out = case.fused(x)
        expected = case.ref(ref_input(x))
    assert_close_ref(out, expected, torch.float32, "output under inference_mode")
    assert_stats_match(case.fused.bn, case.ref.bn, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("mode", ["no_grad", "frozen", "grad"])
def test_graph_recorded_exactly_when_needed(device, training, mode):
    # fused_conv.ops calls the ops below torch.library's autograd wrapper when the wrapper
    # would record nothing (grad mode off, or no argument requiring grad): the outputs are
    # the same either way, and a graph exists exactly when a gradient can flow.
    seed = seed_of("graph", device, training, mode)
    fused = _randomized(ConvBNScale2d(3, 5, 3, padding=1, scaling_factor=1.5), seed).to(device)
    fused.train(training)
    ref = make_reference(fused.conv, fused.bn, 1.5)
    if mode == "frozen":
        fused.requires_grad_(False)
    x = torch.rand(2, 3, 9, 11, generator=torch.Generator().manual_seed(seed)).to(device)
    x.requires_grad_(mode != "frozen")
    if mode == "no_grad":
        with torch.no_grad():
            out = fused(x)
    else:
        out = fused(x)
    assert out.requires_grad == (mode == "grad")
    assert (out.grad_fn is not None) == (mode == "grad")
    with torch.no_grad():
        want = ref(ref_input(x))
    assert_close_ref(out, want, torch.float32)
    if training:  # the running statistics are updated on every path
        assert_stats_match(fused.bn, ref.bn, torch.float32)
