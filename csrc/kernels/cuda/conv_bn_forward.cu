// Host side of the fused CUDA forwards: which configurations the tile kernel
// covers, launch geometry, and the eval / training pipelines.
//
//   eval : one launch of the tile kernel; the BN + scale fold happens in its
//          prologue from the running statistics (no host sync, no extra launch).
//   train: statistics pass (the tile kernel recomputing the conv without
//          writing it, per-block Chan summaries) -> finalize (one warp per
//          channel merges the summaries in a fixed order: deterministic) ->
//          the eval-style pass with the batch statistics.
#include "kernels/cuda/conv_bn_forward.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "kernels/cuda/conv_tile_kernel.cuh"

namespace fused_conv::cuda {
namespace {

// The tile kernel is for small K = C_in*kh*kw (the whole weight slice stays in
// shared memory) and groups == 1; wider convolutions are GEMM-bound and cuDNN
// serves them well (see docs/DESIGN.md, "Dispatch").
constexpr int kMaxK = 160;
constexpr int kMaxCin = 32;
constexpr int kMaxSmemBytes = 160 * 1024;

int multiprocessors(int device) {
  static int cache[64] = {0};
  if (device < 64 && cache[device] > 0) return cache[device];
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (device < 64) cache[device] = count;
  return count;
}

int n_tiles_for(int64_t c_out) { return c_out <= 16 ? 2 : c_out <= 32 ? 4 : 8; }

template <int kNT, int kSplit>
size_t smem_bytes(const ConvShape& s) {
  return static_cast<size_t>(SmemLayout<kNT, kSplit>(s).total) * sizeof(float);
}

size_t smem_bytes_for(const ConvShape& s, int nt, int split) {
  // The layout only depends on kBVec (split >= 2) and kNT.
  if (split >= 2) {
    return nt == 2 ? smem_bytes<2, 3>(s) : nt == 4 ? smem_bytes<4, 3>(s) : smem_bytes<8, 3>(s);
  }
  return nt == 2 ? smem_bytes<2, 1>(s) : nt == 4 ? smem_bytes<4, 1>(s) : smem_bytes<8, 1>(s);
}

int split_for(at::ScalarType dtype) { return dtype == at::kFloat ? 3 : 1; }

std::optional<ConvShape> make_shape(const at::Tensor& input, const at::Tensor& weight,
                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, int64_t groups) {
  const auto dtype = input.scalar_type();
  if (groups != 1 || !(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16)) {
    return std::nullopt;
  }
  const int64_t c_in = input.size(1), h = input.size(2), w = input.size(3);
  const int64_t c_out = weight.size(0), kh = weight.size(2), kw = weight.size(3);
  const int64_t h_out = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) / stride[0] + 1;
  const int64_t w_out = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) / stride[1] + 1;
  const int64_t k = c_in * kh * kw;
  constexpr int64_t kInt32 = int64_t{1} << 31;
  if (c_in > kMaxCin || k > kMaxK || input.size(0) * h_out * w_out == 0 ||
      c_in * h * w >= kInt32 || c_out * h_out * w_out >= kInt32) {
    return std::nullopt;  // per-image offsets are int32 inside the kernel
  }
  ConvShape s{};
  s.n = input.size(0);
  s.c_in = static_cast<int>(c_in);
  s.h = static_cast<int>(h);
  s.w = static_cast<int>(w);
  s.c_out = static_cast<int>(c_out);
  s.h_out = static_cast<int>(h_out);
  s.w_out = static_cast<int>(w_out);
  s.kh = static_cast<int>(kh);
  s.kw = static_cast<int>(kw);
  s.stride_h = static_cast<int>(stride[0]);
  s.stride_w = static_cast<int>(stride[1]);
  s.pad_h = static_cast<int>(padding[0]);
  s.pad_w = static_cast<int>(padding[1]);
  s.dil_h = static_cast<int>(dilation[0]);
  s.dil_w = static_cast<int>(dilation[1]);
  s.k = static_cast<int>(k);
  s.k_steps = (s.k + 7) / 8;
  s.in_tile_h = (kTileH - 1) * s.stride_h + (s.kh - 1) * s.dil_h + 1;
  s.in_tile_w = (kTileW - 1) * s.stride_w + (s.kw - 1) * s.dil_w + 1;
  s.tiles_h = (s.h_out + kTileH - 1) / kTileH;
  s.tiles_w = (s.w_out + kTileW - 1) / kTileW;
  s.tiles = s.n * s.tiles_h * s.tiles_w;
  s.channels_last = input.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  const int nt = n_tiles_for(s.c_out);
  if (smem_bytes_for(s, nt, split_for(dtype)) > kMaxSmemBytes) return std::nullopt;
  return s;
}

struct Launch {
  dim3 grid;
  size_t smem;
};

template <typename T, int kNT, int kSplit, bool kStats>
Launch launch_tile_kernel(const ConvShape& s, const T* x, const T* w, const BnFold& fold, T* out,
                          float* partials, int grid_x /* 0: pick */, cudaStream_t stream) {
  auto kernel = conv_tile_kernel<T, kNT, kSplit, kStats>;
  const size_t smem = smem_bytes<kNT, kSplit>(s);
  static bool attribute_set = false;  // per instantiation
  if (!attribute_set) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        kMaxSmemBytes));
    attribute_set = true;
  }
  const int64_t c_blocks = (s.c_out + 8 * kNT - 1) / (8 * kNT);
  if (grid_x == 0) {
    int device = 0, per_sm = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
    const int64_t resident = static_cast<int64_t>(std::max(per_sm, 1)) * multiprocessors(device);
    grid_x = static_cast<int>(
        std::clamp<int64_t>(resident / c_blocks, 1, std::min<int64_t>(s.tiles, 1 << 30)));
  }
  const dim3 grid(grid_x, static_cast<unsigned>(c_blocks));
  kernel<<<grid, kThreads, smem, stream>>>(x, w, s, fold, out, partials);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grid, smem};
}

template <typename T, bool kStats>
Launch dispatch_tile_kernel(const ConvShape& s, const T* x, const T* w, const BnFold& fold, T* out,
                            float* partials, int grid_x, cudaStream_t stream) {
  constexpr int kSplit = sizeof(T) == 4 ? 3 : 1;
  switch (n_tiles_for(s.c_out)) {
    case 2:
      return launch_tile_kernel<T, 2, kSplit, kStats>(s, x, w, fold, out, partials, grid_x, stream);
    case 4:
      return launch_tile_kernel<T, 4, kSplit, kStats>(s, x, w, fold, out, partials, grid_x, stream);
    default:
      return launch_tile_kernel<T, 8, kSplit, kStats>(s, x, w, fold, out, partials, grid_x, stream);
  }
}

// One warp per channel: lane l merges the block summaries l, l+32, ... then a
// shuffle tree merges the lanes; the order is fixed, so results are bitwise
// reproducible. Adds the conv bias to the mean; var is biased (divides by M).
__global__ void finalize_stats_kernel(const float* __restrict__ partials, int grid_x, int bn,
                                      int64_t c_out, const float* __restrict__ bias, float eps,
                                      float* __restrict__ mean_out, float* __restrict__ invstd_out) {
  const int64_t c = blockIdx.x;
  const int lane = threadIdx.x;
  const int64_t cb = c / bn, cl = c % bn;
  double n = 0, mean = 0, m2 = 0;
  for (int b = lane; b < grid_x; b += 32) {
    const float* p = partials + ((cb * grid_x + b) * bn + cl) * 3;
    chan_merge<double>(n, mean, m2, p[0], p[1], p[2]);
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    const double nb = __shfl_down_sync(0xffffffffu, n, offset);
    const double mb = __shfl_down_sync(0xffffffffu, mean, offset);
    const double m2b = __shfl_down_sync(0xffffffffu, m2, offset);
    if (lane < offset) chan_merge<double>(n, mean, m2, nb, mb, m2b);
  }
  if (lane == 0 && c < c_out) {
    mean_out[c] = static_cast<float>(mean + (bias ? bias[c] : 0.f));
    invstd_out[c] = static_cast<float>(1.0 / sqrt(m2 / n + static_cast<double>(eps)));
  }
}

at::Tensor float_or_empty(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->to(at::kFloat).contiguous() : at::Tensor();
}

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

struct FoldInputs {  // float32 copies (no-ops for float32 tensors) kept alive for the launch
  at::Tensor bias, gamma, beta, scale_tensor;
  BnFold fold(const at::Tensor& mean, const at::Tensor& var_or_invstd, bool is_invstd, double eps,
              double scale) const {
    return BnFold{ptr_or_null(bias),
                  ptr_or_null(gamma),
                  ptr_or_null(beta),
                  mean.data_ptr<float>(),
                  var_or_invstd.data_ptr<float>(),
                  is_invstd,
                  static_cast<float>(eps),
                  ptr_or_null(scale_tensor),
                  static_cast<float>(scale)};
  }
};

FoldInputs fold_inputs(const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& bn_weight,
                       const std::optional<at::Tensor>& bn_bias,
                       const std::optional<at::Tensor>& scale_tensor) {
  return {float_or_empty(bias), float_or_empty(bn_weight), float_or_empty(bn_bias),
          float_or_empty(scale_tensor)};
}

at::Tensor empty_output(const at::Tensor& input, const ConvShape& s) {
  return at::empty({s.n, s.c_out, s.h_out, s.w_out},
                   input.options().memory_format(s.channels_last ? at::MemoryFormat::ChannelsLast
                                                                 : at::MemoryFormat::Contiguous));
}

template <bool kStats>
Launch run_tile_kernel(const ConvShape& s, const at::Tensor& x, const at::Tensor& w,
                       const BnFold& fold, const at::Tensor& out, float* partials, int grid_x) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Launch launch{};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fused_conv_tile", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, at::Half>, __half,
                                 std::conditional_t<std::is_same_v<scalar_t, at::BFloat16>,
                                                    __nv_bfloat16, scalar_t>>;
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "fused_conv: the CUDA tile kernel has no float64 variant");
    } else {
      launch = dispatch_tile_kernel<T, kStats>(
          s, reinterpret_cast<const T*>(x.const_data_ptr()),
          reinterpret_cast<const T*>(w.const_data_ptr()), fold,
          out.defined() ? reinterpret_cast<T*>(out.mutable_data_ptr()) : nullptr, partials,
          grid_x, stream);
    }
  });
  return launch;
}

at::MemoryFormat format_of(const ConvShape& s) {
  return s.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

}  // namespace

bool tile_kernel_supports(const at::Tensor& input, const at::Tensor& weight,
                          at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t groups) {
  return make_shape(input, weight, stride, padding, dilation, groups).has_value();
}

at::Tensor tile_conv_bn_eval(const at::Tensor& input, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& bn_weight,
                             const std::optional<at::Tensor>& bn_bias,
                             const at::Tensor& running_mean, const at::Tensor& running_var,
                             double eps, const std::optional<at::Tensor>& scale_tensor,
                             double scale, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation) {
  c10::cuda::CUDAGuard guard(input.device());
  const auto shape = make_shape(input, weight, stride, padding, dilation, 1);
  TORCH_CHECK(shape.has_value(), "fused_conv: configuration outside the tile kernel's reach");
  const ConvShape& s = *shape;
  const at::Tensor x = input.contiguous(format_of(s));
  const at::Tensor w = weight.contiguous();
  const FoldInputs params = fold_inputs(bias, bn_weight, bn_bias, scale_tensor);
  const at::Tensor mean = running_mean.to(at::kFloat).contiguous();
  const at::Tensor var = running_var.to(at::kFloat).contiguous();
  at::Tensor out = empty_output(input, s);
  run_tile_kernel<false>(s, x, w, params.fold(mean, var, false, eps, scale), out, nullptr, 0);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tile_conv_bn_train(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    double eps, const std::optional<at::Tensor>& scale_tensor, double scale,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  c10::cuda::CUDAGuard guard(input.device());
  const auto shape = make_shape(input, weight, stride, padding, dilation, 1);
  TORCH_CHECK(shape.has_value(), "fused_conv: configuration outside the tile kernel's reach");
  const ConvShape& s = *shape;
  const at::Tensor x = input.contiguous(format_of(s));
  const at::Tensor w = weight.contiguous();
  const FoldInputs params = fold_inputs(bias, bn_weight, bn_bias, scale_tensor);
  const auto stats_options = input.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({s.c_out}, stats_options);
  at::Tensor invstd = at::empty({s.c_out}, stats_options);

  // Pass 1: statistics. The grid (one wave of resident blocks, fixed for a given
  // device) fixes the partials' shape and so the merge order. A block of 128
  // threads can't have more than 16 resident per multiprocessor: size for that.
  const int bn = 8 * n_tiles_for(s.c_out);
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const int64_t c_blocks = (s.c_out + bn - 1) / bn;
  const int64_t max_grid = std::min<int64_t>(s.tiles, 16 * multiprocessors(device));
  at::Tensor partials = at::empty({c_blocks * max_grid * bn * 3}, stats_options);
  const Launch stats = run_tile_kernel<true>(s, x, w, BnFold{}, at::Tensor(),
                                             partials.mutable_data_ptr<float>(), 0);

  // Pass 2: merge the per-block summaries into mean / invstd.
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  finalize_stats_kernel<<<static_cast<unsigned>(s.c_out), 32, 0, stream>>>(
      partials.const_data_ptr<float>(), static_cast<int>(stats.grid.x), bn, s.c_out,
      ptr_or_null(params.bias), static_cast<float>(eps), mean.mutable_data_ptr<float>(),
      invstd.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Pass 3: normalise with the batch statistics.
  at::Tensor out = empty_output(input, s);
  run_tile_kernel<false>(s, x, w, params.fold(mean, invstd, true, eps, scale), out, nullptr, 0);
  return {out, mean, invstd};
}

}  // namespace fused_conv::cuda
