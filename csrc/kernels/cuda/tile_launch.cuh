// Host side of the tile kernel (conv_tile_kernel.cuh), shared by the forward
// and backward pipelines: which configurations it covers, its launch geometry,
// and the launch itself for each TileMode. Included by .cu files only; each
// pipeline instantiates the modes it uses (conv_bn_forward.cu: kApply, kStats;
// conv_bn_backward.cu: kGradStats, kGradOut, kGradOutW; grad_input_tile.cu:
// kConv), so they compile in parallel.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <optional>
#include <type_traits>

#include "kernels/cuda/conv_tile_kernel.cuh"

namespace fused_conv::cuda {

// The tile kernel is for small K = C_in*kh*kw (the whole weight slice stays in
// shared memory) and groups == 1; wider convolutions are GEMM-bound and cuDNN
// serves them well (see docs/DESIGN.md, "Dispatch").
constexpr int kMaxK = 160;
constexpr int kMaxCin = 32;
constexpr int kMaxSmemBytes = 160 * 1024;

// A 4-D weight's element strides (C_out, C_in, tap row, tap column). The 16-bit
// row kernels stage their weights once per block and read them by these, so a
// channels_last module's weight (nn.Module.to(memory_format=...) converts it
// too) needs no contiguous copy per call. The offsets are 32-bit (64-bit
// arithmetic cost the weight-gradient pass registers enough for ptxas to
// serialise its MMAs): the kernels' *_supports() take weights of fewer than
// 2^31 elements, and strided_weight() gives one whose offsets fit.
struct WeightStrides {
  int co, ci, r, q;
};
WeightStrides weight_strides(const at::Tensor& w);
// w itself where its largest offset fits 32 bits, else a contiguous copy.
at::Tensor strided_weight(const at::Tensor& w);

int multiprocessors(int device);
// The device's compute capability, major part (9 on Hopper).
int compute_capability_major(int device);
// The most shared memory one block of a kernel may opt in to on the device.
int max_shared_memory_per_block(int device);

// Opts `kernel` in to `bytes` of dynamic shared memory on the current device.
// cudaFuncSetAttribute acts on the current device's context only (a kernel
// opted in on cuda:0 still has the 48 KB default on cuda:1), so the opt-in is
// recorded per (kernel, device); it is only ever raised, so that a concurrent
// launch of the same kernel with a larger size keeps its limit.
void allow_dynamic_smem(const void* kernel, size_t bytes);

// cudaOccupancyMaxActiveBlocksPerMultiprocessor on the current device, looked
// up once per (kernel, device, threads, dynamic shared memory).
int resident_blocks_per_sm(const void* kernel, int threads, size_t smem);

// n8 fragments per block: the block covers 8 * n_tiles_for(C_out) channels.
inline int n_tiles_for(int64_t c_out) { return c_out <= 16 ? 2 : c_out <= 32 ? 4 : 8; }

// Shared memory of a launch with kNT = nt and kSplit = split (1, 2, 4, 8 / 1, 3).
size_t smem_bytes_for(const ConvShape& s, int nt, int split, bool weight_grad, bool sliced = false);

// in_tile_*, tiles_* and tiles from the sizes, stride, kernel and dilation.
void set_tile_geometry(ConvShape& s);

// The kernel's view of the problem, or nullopt outside its reach (see
// tile_kernel_supports in conv_bn_forward.h).
std::optional<ConvShape> make_tile_shape(const at::Tensor& input, const at::Tensor& weight,
                                         at::IntArrayRef stride, at::IntArrayRef padding,
                                         at::IntArrayRef dilation, int64_t groups);

inline at::MemoryFormat format_of(const ConvShape& s) {
  return s.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// Whether kGradOutW covers the shape: float32 (measured faster there only),
// each warp's share of the K = C_in*kh*kw columns of the weight gradient fits
// its kDwFrags accumulator fragments, and the staged g_hat tile fits in shared
// memory. Else the weight gradient comes from cuDNN (kGradOut writes g_hat).
bool weight_grad_fusable(const ConvShape& s, at::ScalarType dtype);

// Partials buffer of a reduction pass (kStats, kGradStats): [c_blocks][grid][kBN][3]
// floats for the largest grid a launch picks (a block of 128 threads can't have
// more than 16 resident per multiprocessor).
at::Tensor reduction_partials(const ConvShape& s, const at::Tensor& like);

inline const float* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<float>() : nullptr;
}

struct Launch {
  dim3 grid;
  size_t smem;
};

template <int kNT, int kSplit>
size_t tile_smem_bytes(const ConvShape& s, bool weight_grad, bool sliced = false) {
  return static_cast<size_t>(SmemLayout<kNT, kSplit>(s, weight_grad, sliced).total) * sizeof(float);
}

template <typename T, int kNT, int kSplit, TileMode kMode>
Launch launch_tile_kernel(const ConvShape& s, const T* x, const T* w, const BnFold& fold,
                          const GradTerms& gt, T* out, float* partials, cudaStream_t stream,
                          bool dry_run) {
  auto kernel = conv_tile_kernel<T, kNT, kSplit, kMode>;
  const void* entry = reinterpret_cast<const void*>(kernel);
  const size_t smem =
      tile_smem_bytes<kNT, kSplit>(s, kMode == TileMode::kGradOutW, kMode == TileMode::kConv);
  allow_dynamic_smem(entry, kMaxSmemBytes);
  const int64_t c_blocks = (s.c_out + 8 * kNT - 1) / (8 * kNT);
  // Persistent grid: one wave of resident blocks. For the reduction modes the
  // grid fixes the partials' shape and so the merge order: it depends only on
  // the device and the shape, so results are reproducible run to run.
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const int per_sm = resident_blocks_per_sm(entry, kThreads, smem);
  const int64_t resident = static_cast<int64_t>(std::max(per_sm, 1)) * multiprocessors(device);
  const int grid_x = static_cast<int>(
      std::clamp<int64_t>(resident / c_blocks, 1, std::min<int64_t>(s.tiles, 1 << 30)));
  const dim3 grid(grid_x, static_cast<unsigned>(c_blocks));
  if (!dry_run) {
    kernel<<<grid, kThreads, smem, stream>>>(x, w, s, fold, gt, out, partials);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {grid, smem};
}

// One launch of the tile kernel in mode kMode on the current stream. x and w in
// the input's dtype (x in the layout s.channels_last names, w contiguous), out
// likewise (or undefined for the reduction modes). dry_run: only the geometry
// the launch would use (to size partials exactly).
template <TileMode kMode>
Launch run_tile_kernel(const ConvShape& s, const at::Tensor& x, const at::Tensor& w,
                       const BnFold& fold, const GradTerms& gt, const at::Tensor& out,
                       float* partials, bool dry_run = false) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Launch launch{};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "fused_conv_tile", [&] {
        using T = std::conditional_t<
            std::is_same_v<scalar_t, at::Half>, __half,
            std::conditional_t<std::is_same_v<scalar_t, at::BFloat16>, __nv_bfloat16, scalar_t>>;
        if constexpr (std::is_same_v<scalar_t, double>) {
          TORCH_CHECK(false, "fused_conv: the CUDA tile kernel has no float64 variant");
        } else if constexpr (kMode == TileMode::kGradOutW && !std::is_same_v<scalar_t, float>) {
          TORCH_CHECK(
              false, "fused_conv: the fused weight gradient is float32 only (weight_grad_fusable)");
        } else {
          constexpr int kSplit = sizeof(T) == 4 ? 3 : 1;
          const T* xp = reinterpret_cast<const T*>(x.const_data_ptr());
          const T* wp = reinterpret_cast<const T*>(w.const_data_ptr());
          T* op = out.defined() ? reinterpret_cast<T*>(out.mutable_data_ptr()) : nullptr;
          switch (n_tiles_for(s.c_out)) {
            case 2:
              launch = launch_tile_kernel<T, 2, kSplit, kMode>(s, xp, wp, fold, gt, op, partials,
                                                               stream, dry_run);
              break;
            case 4:
              launch = launch_tile_kernel<T, 4, kSplit, kMode>(s, xp, wp, fold, gt, op, partials,
                                                               stream, dry_run);
              break;
            default:
              launch = launch_tile_kernel<T, 8, kSplit, kMode>(s, xp, wp, fold, gt, op, partials,
                                                               stream, dry_run);
          }
        }
      });
  return launch;
}

}  // namespace fused_conv::cuda
