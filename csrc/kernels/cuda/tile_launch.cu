// Which configurations the tile kernel covers and its launch bookkeeping
// (declarations and the rationale of the limits: tile_launch.cuh).
#include "kernels/cuda/tile_launch.cuh"

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>

#include "kernels/cuda/dependent_launch.cuh"

namespace fused_conv::cuda {
namespace {

int split_for(at::ScalarType dtype) { return dtype == at::kFloat ? 3 : 1; }

}  // namespace

size_t smem_bytes_for(const ConvShape& s, int nt, int split, bool weight_grad, bool sliced) {
  // The layout only depends on kBVec (split >= 2), kNT and the g_hat tile.
  if (split >= 2) {
    return nt == 1   ? tile_smem_bytes<1, 3>(s, weight_grad, sliced)
           : nt == 2 ? tile_smem_bytes<2, 3>(s, weight_grad, sliced)
           : nt == 4 ? tile_smem_bytes<4, 3>(s, weight_grad, sliced)
                     : tile_smem_bytes<8, 3>(s, weight_grad, sliced);
  }
  return nt == 1   ? tile_smem_bytes<1, 1>(s, weight_grad, sliced)
         : nt == 2 ? tile_smem_bytes<2, 1>(s, weight_grad, sliced)
         : nt == 4 ? tile_smem_bytes<4, 1>(s, weight_grad, sliced)
                   : tile_smem_bytes<8, 1>(s, weight_grad, sliced);
}

void set_tile_geometry(ConvShape& s) {
  s.in_tile_h = (kTileH - 1) * s.stride_h + (s.kh - 1) * s.dil_h + 1;
  s.in_tile_w = (kTileW - 1) * s.stride_w + (s.kw - 1) * s.dil_w + 1;
  s.tiles_h = (s.h_out + kTileH - 1) / kTileH;
  s.tiles_w = (s.w_out + kTileW - 1) / kTileW;
  s.tiles = s.n * s.tiles_h * s.tiles_w;
}

namespace {

// A device attribute, fixed for the process: looked up once per device (the
// first 64 devices; others on every call).
int cached_attribute(cudaDeviceAttr attribute, int device, int (&cache)[64]) {
  const bool cached = device >= 0 && device < 64;
  if (cached && cache[device] > 0) return cache[device];
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  if (cached) cache[device] = value;
  return value;
}

}  // namespace

int multiprocessors(int device) {
  static int cache[64] = {0};
  return cached_attribute(cudaDevAttrMultiProcessorCount, device, cache);
}

int compute_capability_major(int device) {
  static int cache[64] = {0};
  return cached_attribute(cudaDevAttrComputeCapabilityMajor, device, cache);
}

int max_shared_memory_per_block(int device) {
  static int cache[64] = {0};
  return cached_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device, cache);
}

bool dependent_launch_enabled(int device) {
  static const bool allowed = [] {
    const char* v = std::getenv("FUSED_CONV_DEPENDENT_LAUNCH");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return allowed && compute_capability_major(device) >= 9;
}

at::Tensor strided_weight(const at::Tensor& w) {
  int64_t span = 0;
  for (int d = 0; d < w.dim(); ++d) span += (w.size(d) - 1) * w.stride(d);
  return span < (int64_t{1} << 31) ? w : w.contiguous();
}

WeightStrides weight_strides(const at::Tensor& w) {
  TORCH_INTERNAL_ASSERT(
      w.dim() == 4 && w.numel() < (int64_t{1} << 31) && strided_weight(w).is_same(w),
      "fused_conv: a weight outside 32-bit offsets reached a 16-bit row kernel");
  return {static_cast<int>(w.stride(0)), static_cast<int>(w.stride(1)),
          static_cast<int>(w.stride(2)), static_cast<int>(w.stride(3))};
}

void allow_dynamic_smem(const void* kernel, size_t bytes) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> granted;
  const std::lock_guard<std::mutex> lock(mutex);
  size_t& have = granted[{kernel, device}];
  if (have >= bytes) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  have = bytes;
}

int resident_blocks_per_sm(const void* kernel, int threads, size_t smem) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int, size_t>, int> known;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(kernel, device, threads, smem);
  const auto it = known.find(key);
  if (it != known.end()) return it->second;
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem));
  known.emplace(key, blocks);
  return blocks;
}

std::optional<ConvShape> make_tile_shape(const at::Tensor& input, const at::Tensor& weight,
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
  if (c_in > kMaxCin || k > kMaxK || input.size(0) * h_out * w_out == 0 || c_in * h * w >= kInt32 ||
      c_out * h_out * w_out >= kInt32) {
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
  s.c_chunk = s.c_in;  // all channels in one staged patch
  s.chunks = 1;
  s.chunk_k_steps = s.k_steps;
  set_tile_geometry(s);
  s.channels_last = input.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  const int nt = n_tiles_for(s.c_out);
  if (smem_bytes_for(s, nt, split_for(dtype), false) > kMaxSmemBytes) return std::nullopt;
  return s;
}

bool weight_grad_fusable(const ConvShape& s, at::ScalarType dtype) {
  // float32 only: for fp16/bf16, cuDNN's weight gradient of the written g_hat is
  // cheaper (H100, reference problem: kGradOut 0.42 ms + cuDNN 0.18 ms against
  // kGradOutW 1.25 ms; float32: 0.79 + 1.41 ms against 1.54 ms).
  if (dtype != at::kFloat) return false;
  const int nt = n_tiles_for(s.c_out);
  const int warps_per_m = kWarps / (nt / 2);  // the block's kBN = 8*nt channels in m16 fragments
  return (s.k_steps + warps_per_m - 1) / warps_per_m <= kDwFrags &&
         smem_bytes_for(s, nt, split_for(dtype), true) <= kMaxSmemBytes;
}

at::Tensor reduction_partials(const ConvShape& s, const at::Tensor& like) {
  const int bn = 8 * n_tiles_for(s.c_out);
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const int64_t c_blocks = (s.c_out + bn - 1) / bn;
  const int64_t max_grid = std::min<int64_t>(s.tiles, 16 * multiprocessors(device));
  return at::empty({c_blocks * max_grid * bn * 3}, like.options().dtype(at::kFloat));
}

}  // namespace fused_conv::cuda
