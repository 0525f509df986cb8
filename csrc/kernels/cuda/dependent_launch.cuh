// Programmatic dependent launch (Hopper and later): a kernel launched with
// launch_dependent() may start while the stream's previous kernel is still
// running, once every block of that kernel has called let_next_kernel_start()
// (or exited). Its blocks then take the places that the previous kernel's
// blocks leave, and run their prologue (weight staging, the first copies of
// the input) under that kernel's tail and launch latency.
//
// The contract, for each kernel launched this way:
// - wait_for_previous_kernel() before it reads anything the previous kernel
//   writes and before its first global store; after the wait, the previous
//   kernel has completed and its stores are visible;
// - every block waits (or at least one does, so that the kernel cannot
//   complete before the previous one: completion then stays transitive
//   along a chain of such kernels);
// - before the wait it reads only tensors that were complete when the op's
//   first normally launched kernel ran (the op's inputs, not a copy made
//   just before the launch): with every kernel of a chain letting the next
//   start at once, kernels further back may still run.
// A kernel whose first act is the wait can be launched this way after any
// kernel. Launched normally, the wait and the trigger do nothing.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

namespace fused_conv::cuda {

__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Only scheduling depends on where this runs: no memory ordering.
__device__ __forceinline__ void let_next_kernel_start() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

// Whether launches on `device` use programmatic dependent launch: compute
// capability 9 or later, unless FUSED_CONV_DEPENDENT_LAUNCH=0 (a switch for
// timing both ways in one build).
bool dependent_launch_enabled(int device);

// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent
// of the stream's previous kernel where `dependent` and the device allow it.
template <typename... Params, typename... Args>
void launch_kernel(bool dependent, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, Args&&... args) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = dependent && dependent_launch_enabled(device) ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...));
}

}  // namespace fused_conv::cuda
