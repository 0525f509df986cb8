"""Loads the compiled extension ``fused_conv._C`` safely.

The extension is C++ compiled against one exact torch (libtorch has no stable C++ ABI), so
before importing it we compare the torch it was built against (``_build_info.json``, written
by setup.py at build time) with the torch installed now, and turn every failure to load it
("undefined symbol", a missing libtorch_cuda.so, ...) into a one-line ImportError that names
both versions and the fix.

Importing ``fused_conv._C`` runs the kernels' TORCH_LIBRARY_IMPL static initialisers, which
register them with the dispatcher under ``torch.ops.fused_conv.*``.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ._version import __version__

__all__ = ["build_info", "load_extension", "register_missing_cuda_kernels"]

_BUILD_INFO_PATH = Path(__file__).with_name("_build_info.json")
_EXTENSION = f"{__package__}._C"
_REBUILD = (
    "pip install --no-build-isolation --force-reinstall --no-deps <fused_conv source dir or sdist>"
)
# The ops of csrc/bindings/op_schemas.cpp.
OPS = ("conv_bn_eval", "conv_bn_train", "update_running_stats_", "conv_bn_backward")

_module: ModuleType | None = None
_fallback_lib: torch.library.Library | None = None


def _read_build_info() -> dict[str, Any] | None:
    try:
        info = json.loads(_BUILD_INFO_PATH.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _describe(info: dict[str, Any] | None) -> tuple[str, str]:
    """('torch X (CUDA Y)', 'X') for the torch the extension was built against."""
    if not info or not info.get("torch_version"):
        return "an unknown torch", "<the torch it was built against>"
    version = str(info["torch_version"])
    cuda = info.get("cuda_version")
    return f"torch {version} ({f'CUDA {cuda}' if cuda else 'no CUDA kernels'})", version


def _version_error(info: dict[str, Any] | None, failure: str = "") -> ImportError:
    built, pin = _describe(info)
    fix = (
        f"reinstall fused_conv from source against this torch ({_REBUILD}) or install torch=={pin}"
    )
    if failure and pin == torch.__version__:  # same torch, yet it does not load
        return ImportError(
            f"fused_conv {__version__} (built against {built}) failed to load with the installed "
            f"torch {torch.__version__}: {failure}; {fix}"
        )
    failure = f" ({failure})" if failure else ""
    return ImportError(
        f"fused_conv {__version__} was built against {built} but torch {torch.__version__} is "
        f"installed{failure}; {fix}"
    )


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_extension() -> ModuleType:
    """Imports and returns ``fused_conv._C`` (once), or raises a one-line ImportError."""
    global _module
    if _module is not None:
        return _module
    info = _read_build_info()
    if info is not None and info.get("torch_version") != torch.__version__:
        raise _version_error(info)
    try:
        module = importlib.import_module(_EXTENSION)
    except ModuleNotFoundError as exc:
        if exc.name != _EXTENSION:
            raise _version_error(info, _one_line(exc)) from None
        raise ImportError(
            f"fused_conv {__version__}: the compiled extension {_EXTENSION} is missing (is this an "
            f"unbuilt source tree?); build it against torch {torch.__version__} with "
            "pip install --no-build-isolation . (or python setup.py build_ext --inplace)"
        ) from None
    except (ImportError, OSError) as exc:
        raise _version_error(info, _one_line(exc)) from None
    compiled = module.build_info()
    if compiled.get("torch_version") != torch.__version__:
        raise _version_error(compiled)
    _module = module
    return module


def build_info() -> dict[str, Any]:
    """How fused_conv was built: version, torch_version, cuda_version (None for CPU-only
    builds), arch_list, with_cuda, plus nvcc_version, compiler and cxx_standard."""
    info = dict(_read_build_info() or {})
    info.update(load_extension().build_info())  # what was compiled in wins
    info["version"] = __version__
    return info


def _cuda_unavailable_kernel(name: str):
    message = (
        "fused_conv was built without CUDA kernels (CPU-only build: no CUDA toolkit found at "
        f"build time, or FORCE_CUDA=0) but torch.ops.fused_conv.{name} got a CUDA tensor; "
        "rebuild with CUDA_HOME set to a CUDA toolkit or FORCE_CUDA=1 "
        f"(CUDA_HOME=/usr/local/cuda FORCE_CUDA=1 {_REBUILD})"
    )

    def kernel(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(message)

    kernel.__name__ = f"{name}_cuda_unavailable"
    return kernel


def _has_cuda_kernel(qualname: str) -> bool:
    has_kernel = getattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", None)
    return bool(has_kernel and has_kernel(qualname, "CUDA"))


def register_missing_cuda_kernels() -> list[str]:
    """For a build without CUDA kernels, registers for each op a CUDA kernel that raises a
    RuntimeError explaining how to rebuild (instead of the dispatcher's generic "could not run
    ... with arguments from the 'CUDA' backend"). Idempotent; returns the ops it registered."""
    global _fallback_lib
    if load_extension().build_info().get("with_cuda"):
        return []
    registered = []
    for name in OPS:
        qualname = f"fused_conv::{name}"
        if _has_cuda_kernel(qualname):
            continue
        if _fallback_lib is None:
            _fallback_lib = torch.library.Library("fused_conv", "IMPL")  # kept alive: module global
        torch.library.impl(qualname, "CUDA", _cuda_unavailable_kernel(name), lib=_fallback_lib)
        registered.append(name)
    return registered
