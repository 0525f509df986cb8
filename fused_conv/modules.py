"""ConvBNScale2d: a drop-in for nn.Conv2d -> nn.BatchNorm2d -> x scaling_factor.

It keeps the real nn.Conv2d and nn.BatchNorm2d as submodules `.conv` and `.bn`, so
parameters stay trainable, `train()`/`eval()` mean what they mean for BatchNorm, and
state_dicts are interchangeable with the unfused model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops


class ConvBNScale2d(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        scaling_factor: float = 1.0,
        learnable_scale: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        # Created in the order conv then bn, so a seeded construction draws the same
        # weights as the unfused reference.
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, **factory,
        )  # fmt: skip
        self.bn = nn.BatchNorm2d(
            out_channels, eps, momentum, affine, track_running_stats, **factory
        )
        if learnable_scale:
            self.scaling_factor = nn.Parameter(torch.tensor(float(scaling_factor), **factory))
        else:
            self.scaling_factor = float(scaling_factor)

    @classmethod
    def from_modules(
        cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, scaling_factor: float | Tensor = 1.0
    ) -> ConvBNScale2d:
        """Wraps existing modules; their parameters and buffers are shared, not copied."""
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(
                f"fused_conv: from_modules expects (nn.Conv2d, nn.BatchNorm2d), got "
                f"({type(conv).__name__}, {type(bn).__name__})"
            )
        if conv.out_channels != bn.num_features:
            raise ValueError(
                f"fused_conv: conv.out_channels ({conv.out_channels}) must equal "
                f"bn.num_features ({bn.num_features})"
            )
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.conv, module.bn, module.scaling_factor = conv, bn, scaling_factor
        module.train(conv.training)
        return module

    def forward(self, x: Tensor) -> Tensor:
        conv, bn = self.conv, self.bn
        padding = conv.padding
        if conv.padding_mode != "zeros":
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding = 0
        # nn.BatchNorm2d's rules: running stats are used in eval unless they are not
        # tracked; in training they are updated when tracked.
        track = bn.training and bn.track_running_stats
        use_running = not bn.training or bn.track_running_stats
        return ops.conv_bn_scale(
            x, conv.weight, conv.bias, bn.weight, bn.bias,
            bn.running_mean if use_running else None,
            bn.running_var if use_running else None,
            training=bn.training, momentum=bn.momentum, eps=bn.eps,
            scale=self.scaling_factor, stride=conv.stride, padding=padding,
            dilation=conv.dilation, groups=conv.groups,
            num_batches_tracked=bn.num_batches_tracked if track else None,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"scaling_factor={self.scaling_factor}"
            if isinstance(self.scaling_factor, float)
            else ""
        )
