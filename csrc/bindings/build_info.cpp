// The Python module fused_conv._C. It only reports how it was built: the ops
// are defined in op_schemas.cpp (TORCH_LIBRARY) and the device kernels register
// themselves with TORCH_LIBRARY_IMPL static initialisers, which run when Python
// loads this shared library (fused_conv/_loader.py imports it).
//
// setup.py passes the build facts as string macros (FUSED_CONV_VERSION,
// FUSED_CONV_TORCH_VERSION, and for CUDA builds FUSED_CONV_CUDA_VERSION,
// FUSED_CONV_ARCH_LIST, FUSED_CONV_NVCC_VERSION) and defines
// FUSED_CONV_WITH_CUDA for CUDA builds.
#include <pybind11/pybind11.h>
#include <torch/version.h>

#ifdef FUSED_CONV_WITH_CUDA
#include <torch/extension.h>

#include "kernels/cuda/conv_bn_forward.h"
#include "kernels/cuda/grad_input_rows16.h"
#include "kernels/cuda/grad_input_taps.h"
#include "kernels/cuda/grad_input_tile.h"
#include "kernels/cuda/grad_moments.h"
#endif

#include <string>

#ifndef FUSED_CONV_VERSION
#define FUSED_CONV_VERSION "unknown"
#endif
#ifndef FUSED_CONV_TORCH_VERSION
#define FUSED_CONV_TORCH_VERSION TORCH_VERSION
#endif

namespace py = pybind11;

namespace {

std::string compiler() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  return "msvc " + std::to_string(_MSC_VER);
#else
  return "unknown";
#endif
}

py::dict build_info() {
  py::dict info;
  info["version"] = FUSED_CONV_VERSION;
  info["torch_version"] = FUSED_CONV_TORCH_VERSION;
#ifdef FUSED_CONV_WITH_CUDA
  info["with_cuda"] = true;
#ifdef FUSED_CONV_CUDA_VERSION
  info["cuda_version"] = FUSED_CONV_CUDA_VERSION;
#else
  info["cuda_version"] = py::none();
#endif
#ifdef FUSED_CONV_ARCH_LIST
  info["arch_list"] = FUSED_CONV_ARCH_LIST;
#else
  info["arch_list"] = py::none();
#endif
#ifdef FUSED_CONV_NVCC_VERSION
  info["nvcc_version"] = FUSED_CONV_NVCC_VERSION;
#else
  info["nvcc_version"] = py::none();
#endif
#else
  info["with_cuda"] = false;
  info["cuda_version"] = py::none();
  info["arch_list"] = py::none();
  info["nvcc_version"] = py::none();
#endif
  info["compiler"] = compiler();
  info["cxx_standard"] = static_cast<long>(__cplusplus);
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "fused_conv C++/CUDA extension: registers the torch.ops.fused_conv.* "
      "operators and their kernels on import.";
  m.def("build_info", &build_info,
        "How this extension was built: version, torch_version, cuda_version, "
        "arch_list, with_cuda, nvcc_version, compiler, cxx_standard.");
#ifdef FUSED_CONV_WITH_CUDA
  m.def("cuda_tile_kernel_supports", &fused_conv::cuda::tile_kernel_supports,
        "Whether the CUDA forwards take the tensor-core tile kernel for this configuration "
        "(else the ATen fallback); arguments as the ops': input, weight, stride, padding, "
        "dilation, groups.");
  m.def("cuda_rows_stats_supports", &fused_conv::cuda::rows_stats_supports,
        "Whether the training forward's statistics pass takes the Hopper row kernel (float32, "
        "stride 1, W_out >= 64, C_out > 32, an sm_90a build on a compute capability 9 GPU) "
        "rather than the tile kernel; arguments as cuda_tile_kernel_supports.");
  m.def("cuda_rows16_supports", &fused_conv::cuda::rows16_supports,
        "Whether the forward's passes take the 16-bit Hopper row kernel (float16 / bfloat16 "
        "channels_last, stride 1, C_in and C_out multiples of 8, W_out >= 64, an sm_90a build "
        "on a compute capability 9 GPU); arguments as cuda_tile_kernel_supports.");
  m.def("cuda_grad_input_tile_supports", &fused_conv::cuda::grad_input_tile_supports,
        "Whether the CUDA backward computes grad_input on the tile kernel for this "
        "configuration (else cuDNN); arguments as cuda_tile_kernel_supports.");
  m.def("cuda_grad_input_rows16_supports", &fused_conv::cuda::grad_input_rows16_supports,
        "Whether the CUDA backward computes grad_input on the 16-bit Hopper row kernel "
        "(float16 / bfloat16 channels_last, stride and dilation 1, padding <= k - 1, C_in % 8 "
        "== 0, C_out % 16 == 0, width >= 64, an sm_90a build on a compute capability 9 GPU) "
        "rather than cuDNN; arguments: grad at the conv output, input, weight, stride, padding, "
        "dilation, groups.");
  m.def("cuda_grad_input_taps_supports", &fused_conv::cuda::grad_input_taps_supports,
        "Whether that grad_input takes the tap-reusing kernel (float32 NCHW 3x3, stride and "
        "dilation 1, padding <= 2, C_in <= 8, C_out <= 64); arguments as "
        "cuda_tile_kernel_supports.");
  m.def("cuda_grad_moments_supports", &fused_conv::cuda::grad_moments_supports,
        "Whether the CUDA backward takes its sums and weight gradient from the patch moments "
        "(float32 NCHW 3x3, stride and dilation 1, padding <= 2, C_in <= 8, C_out <= 64, rows "
        "that fit in shared memory); arguments as cuda_tile_kernel_supports.");
#endif
}
