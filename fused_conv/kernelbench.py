"""KernelBench level-2 problem 73 (Conv2d -> BatchNorm2d -> scaling) at this project's size.

`Model` is the reference exactly as KernelBench states it; `ModelNew` is the fused drop-in
with the same constructor and state_dict. KernelBench runs both in training mode (the
default of a fresh module), under no_grad, with `get_inputs()` moved to the GPU.
"""

from __future__ import annotations

import torch
from torch import nn

from .modules import ConvBNScale2d

batch_size = 128
in_channels = 8
out_channels = 64
height, width = 128, 128
kernel_size = 3
scaling_factor = 2.0


class Model(nn.Module):
    """Performs a convolution, applies Batch Normalization, and scales the output."""

    def __init__(self, in_channels, out_channels, kernel_size, scaling_factor):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size)
        self.bn = nn.BatchNorm2d(out_channels)
        self.scaling_factor = scaling_factor

    def forward(self, x):
        x = self.conv(x)
        x = self.bn(x)
        x = x * self.scaling_factor
        return x


class ModelNew(ConvBNScale2d):
    """The same computation as `Model` through one fused operator; same constructor,
    attributes (`conv`, `bn`, `scaling_factor`) and state_dict."""

    def __init__(self, in_channels, out_channels, kernel_size, scaling_factor):
        super().__init__(in_channels, out_channels, kernel_size, scaling_factor=scaling_factor)


def get_inputs():
    return [torch.rand(batch_size, in_channels, height, width)]


def get_init_inputs():
    return [in_channels, out_channels, kernel_size, scaling_factor]
