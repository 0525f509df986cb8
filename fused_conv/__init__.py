"""fused_conv: Conv2d -> BatchNorm2d -> x scale as one fused PyTorch operator."""

from ._loader import build_info, load_extension, register_missing_cuda_kernels
from ._version import __version__

_C = load_extension()
register_missing_cuda_kernels()

from . import _autograd, _meta, ops  # noqa: E402  (register fake/autograd kernels after the ops)
from .modules import ConvBNScale2d  # noqa: E402

__all__ = ["ConvBNScale2d", "ops", "build_info", "__version__"]
