"""Build script of fused_conv: one extension module, ``fused_conv._C`` (torch.utils.cpp_extension,
ninja), compiled against the torch installed in the build environment.

    pip install --no-build-isolation .

Environment:
  FORCE_CUDA            1: build the CUDA kernels (error without a CUDA toolkit); 0: CPU-only.
                        Unset: CUDA kernels iff a CUDA toolkit with nvcc is found (CUDA_HOME /
                        CUDA_PATH, nvcc on PATH, /usr/local/cuda). Never decided by whether a GPU
                        is visible (torch.cuda.is_available()): build machines often have none.
  CUDA_HOME             the CUDA toolkit to use.
  TORCH_CUDA_ARCH_LIST  GPU architectures to compile for; default "8.0;8.6;8.9+PTX;9.0a".
  MAX_JOBS              parallel compile jobs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).resolve().parent
os.chdir(ROOT)  # sources must be relative paths; pip already runs us from here

PACKAGE = "fused_conv"
BUILD_INFO_FILE = "_build_info.json"
DEFAULT_ARCH_LIST = "8.0;8.6;8.9+PTX;9.0a"

ALWAYS_SOURCES = ["csrc/bindings/*.cpp", "csrc/kernels/common/*.cpp", "csrc/kernels/cpu/*.cpp"]
CUDA_SOURCES = ["csrc/kernels/cuda/*.cpp", "csrc/kernels/cuda/*.cu"]


def log(message: str) -> None:
    print(f"fused_conv setup: {message}", file=sys.stderr, flush=True)


def read_version() -> str:
    text = (ROOT / PACKAGE / "_version.py").read_text()
    match = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", text, re.MULTILINE)
    if match is None:
        raise SystemExit(f"error: no __version__ in {PACKAGE}/_version.py")
    return match.group(1)


def env_flag(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    if value == "":
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"error: {name}={os.environ[name]!r}: expected 1 or 0")


def is_toolkit(home: str | None) -> bool:
    """A CUDA toolkit root: bin/nvcc plus the runtime headers (a bare nvcc wrapper is not one)."""
    return bool(home) and all(
        (Path(home) / part).is_file() for part in ("bin/nvcc", "include/cuda_runtime.h")
    )


def find_cuda_home() -> str | None:
    """torch's choice (CUDA_HOME / CUDA_PATH, else the parent of the nvcc on PATH, else
    /usr/local/cuda) when it is a complete toolkit. When CUDA_HOME is not set and torch guessed
    from a stand-alone nvcc wrapper (e.g. /usr/local/bin/nvcc, giving /usr/local), falls back to
    /usr/local/cuda."""
    if torch.version.cuda is None:  # a CPU-only torch cannot run (or link) CUDA kernels
        return None
    home = cpp_extension.CUDA_HOME
    if is_toolkit(home):
        return home
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not explicit and is_toolkit("/usr/local/cuda"):
        return "/usr/local/cuda"
    return None


def decide_cuda() -> tuple[bool, str]:
    """(with_cuda, the toolkit's path or why the build is CPU-only)."""
    force = env_flag("FORCE_CUDA")
    if force is False:
        return False, "FORCE_CUDA=0"
    home = find_cuda_home()
    if home is None:
        if torch.version.cuda is None:
            why = f"the installed torch {torch.__version__} is a CPU-only build"
        else:
            where = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
            why = (
                f"CUDA_HOME={where} has no bin/nvcc and include/cuda_runtime.h"
                if where
                else "no CUDA toolkit (bin/nvcc, include/cuda_runtime.h) was found: set CUDA_HOME"
            )
        if force:
            raise SystemExit(f"error: FORCE_CUDA=1 but {why}")
        return False, why
    # torch.utils.cpp_extension reads its module-level CUDA_HOME for nvcc, includes and libs.
    cpp_extension.CUDA_HOME = home
    os.environ["CUDA_HOME"] = home
    return True, home


def nvcc_version(home: str) -> str | None:
    try:
        out = subprocess.run(
            [str(Path(home) / "bin" / "nvcc"), "--version"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release [\d.]+, V([\d.]+)", out)
    return match.group(1) if match else None


def cxx_standard() -> str:
    """C++17, or C++20 when the installed torch's headers demand it (ATen.h of torch >= 2.10
    refuses to compile as C++17). nvcc gets the same standard as the host compiler."""
    for include in cpp_extension.include_paths():
        aten = Path(include) / "ATen" / "ATen.h"
        if aten.is_file():
            return "c++20" if "202002L" in aten.read_text(errors="replace") else "c++17"
    return "c++17"


def pip_cuda_include_dirs() -> list[str]:
    """Headers missing from a minimal toolkit (cuBLAS / cuSPARSE, pulled in by
    ATen/cuda/CUDAContext.h) that the nvidia-* wheels torch depends on ship: nvidia/cu13/include
    (CUDA >= 13), or nvidia/<library>/include (CUDA 12 wheels). Searched after the toolkit's
    own include directory."""
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return []
    major = (torch.version.cuda or "").split(".")[0]
    dirs = []
    for base in map(Path, getattr(nvidia, "__path__", [])):
        candidates = [base / f"cu{major}" / "include"] + [
            base / lib / "include" for lib in ("cublas", "cusparse", "cusolver", "curand", "cufft")
        ]
        dirs += [str(d) for d in candidates if d.is_dir() and str(d) not in dirs]
    return dirs


def sorted_sources(patterns: list[str]) -> list[str]:
    files = sorted({str(p) for pattern in patterns for p in Path(".").glob(pattern) if p.is_file()})
    seen: dict[str, str] = {}
    for source in files:  # foo.cpp and foo.cu would both compile to foo.o
        stem = os.path.splitext(source)[0]
        if stem in seen:
            raise SystemExit(f"error: {seen[stem]} and {source} compile to the same object file")
        seen[stem] = source
    return files


def string_macro(name: str, value: str) -> str:
    if any(c in value for c in '"\\$\n'):
        raise SystemExit(f"error: cannot pass {name}={value!r} as a C string macro")
    return f'-D{name}="{value}"'


VERSION = read_version()
TORCH_VERSION = str(torch.__version__)
TORCH_PUBLIC_VERSION = TORCH_VERSION.split("+")[0]
WITH_CUDA, CUDA_HOME_OR_REASON = decide_cuda()
if WITH_CUDA and not os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
ARCH_LIST = os.environ["TORCH_CUDA_ARCH_LIST"].strip() if WITH_CUDA else None
NVCC_VERSION = nvcc_version(CUDA_HOME_OR_REASON) if WITH_CUDA else None
CXX_STD = cxx_standard()

BUILD_INFO = {
    "version": VERSION,
    "torch_version": TORCH_VERSION,
    "cuda_version": torch.version.cuda if WITH_CUDA else None,
    "arch_list": ARCH_LIST,
    "with_cuda": WITH_CUDA,
    "nvcc_version": NVCC_VERSION,
}

sources = sorted_sources(ALWAYS_SOURCES + (CUDA_SOURCES if WITH_CUDA else []))
macros = {"FUSED_CONV_VERSION": VERSION, "FUSED_CONV_TORCH_VERSION": TORCH_VERSION}
if WITH_CUDA:
    macros.update(
        FUSED_CONV_CUDA_VERSION=torch.version.cuda,
        FUSED_CONV_ARCH_LIST=ARCH_LIST,
        FUSED_CONV_NVCC_VERSION=NVCC_VERSION or "unknown",
    )
cxx_flags = ["-O3", f"-std={CXX_STD}"] + [string_macro(k, v) for k, v in macros.items()]
nvcc_flags = ["-O3", "-lineinfo", f"-std={CXX_STD}"]  # no fast-math: fp32 accuracy matters
# Kernels with sm_90a-only instructions (wgmma) are selected at run time only when the
# build has sm_90a code: their host side reads this macro.
if WITH_CUDA and "9.0a" in re.split(r"[;\s]+", ARCH_LIST.replace("+PTX", "")):
    nvcc_flags.append("-DFUSED_CONV_BUILT_SM90A")
# at::parallel_for (the CPU kernels' per-channel loops) runs in parallel only in code built
# with OpenMP, as libtorch is; at run time the extension shares torch's libgomp.
link_flags: list[str] = []
if sys.platform.startswith("linux"):
    cxx_flags.append("-fopenmp")
    link_flags.append("-fopenmp")

if WITH_CUDA:
    log(f"CUDA build: CUDA_HOME={CUDA_HOME_OR_REASON} (nvcc {NVCC_VERSION}), "
        f"TORCH_CUDA_ARCH_LIST={ARCH_LIST}, torch {TORCH_VERSION}")  # fmt: skip
    extension = CUDAExtension(
        name=f"{PACKAGE}._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        define_macros=[("FUSED_CONV_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )
    extension.include_dirs += pip_cuda_include_dirs()  # after the toolkit's include dir
else:
    log(f"CPU-only build ({CUDA_HOME_OR_REASON}), torch {TORCH_VERSION}")
    extension = CppExtension(
        name=f"{PACKAGE}._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )


class BuildExtensionWithInfo(BuildExtension):
    """Also writes fused_conv/_build_info.json (what _loader checks before importing _C): into
    the build tree, which goes into the wheel, or into the source tree for in-place builds."""

    def run(self) -> None:
        text = json.dumps(BUILD_INFO, indent=2, sort_keys=True) + "\n"
        package_dir = ROOT / PACKAGE if self.inplace else Path(self.build_lib) / PACKAGE
        package_dir.mkdir(parents=True, exist_ok=True)
        target = package_dir / BUILD_INFO_FILE
        if not target.is_file() or target.read_text() != text:
            target.write_text(text)
        log(f"wrote {target}")
        super().run()


readme = ROOT / "README.md"
setup(
    name=PACKAGE,
    version=VERSION,
    description="Fused Conv2d -> BatchNorm2d -> x scale as a PyTorch C++/CUDA operator",
    long_description=readme.read_text() if readme.is_file() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    package_data={PACKAGE: [BUILD_INFO_FILE]},
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtensionWithInfo.with_options(use_ninja=True)},
    python_requires=">=3.10",
    # The extension links against libtorch's C++ ABI, which changes with every release.
    install_requires=[f"torch=={TORCH_PUBLIC_VERSION}"],
    zip_safe=False,
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: C++",
        "Environment :: GPU :: NVIDIA CUDA",
        "Operating System :: POSIX :: Linux",
    ],
)
