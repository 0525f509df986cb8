// grad_input = conv_transpose(g; W) for stride 1, as a plain convolution on the
// tile kernel (TileMode::kConv). With stride 1 each input pixel
// receives from the output pixels at ih + pad - kr*dil, so
//   grad_input[ci][ih][iw] = sum_{c,kr',kq'} W'[ci][c][kr'][kq']
//                            * g[c][ih - pad' + kr'*dil][iw - pad' + kq'*dil],
//   W'[ci][c][kr'][kq'] = W[c][ci][kh-1-kr'][kw-1-kq'],  pad' = dil*(k-1) - pad,
// a convolution of g (C_out channels, the conv output's size) into C_in channels
// of the input's size. Its K = C_out*kh*kw is too wide for one staged patch, so
// the kernel walks g in 8-channel slices (ConvShape::chunks) and carries the
// accumulators from slice to slice; B (the flipped weights, 3xTF32-split) stays
// in shared memory for the whole launch.
#include "kernels/cuda/grad_input_tile.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/cuda/grad_input_taps.h"
#include "kernels/cuda/tile_launch.cuh"

namespace fused_conv::cuda {
namespace {

// c_chunk: slice*kh*kw is a multiple of 8 for any kernel. 16-channel slices measured slower
// (H200, reference problem: 1.30 against 1.19 ms).
constexpr int kSliceChannels = 8;

// The output channel blocks: one n8 fragment covers C_in <= 8 (the reference
// problem); wider inputs use the forward's blocks.
int grad_input_n_tiles(int64_t c_in) { return c_in <= 8 ? 1 : n_tiles_for(c_in); }

std::optional<ConvShape> make_grad_input_shape(const at::Tensor& input, const at::Tensor& weight,
                                               at::IntArrayRef stride, at::IntArrayRef padding,
                                               at::IntArrayRef dilation, int64_t groups) {
  if (input.scalar_type() != at::kFloat || groups != 1 || stride[0] != 1 || stride[1] != 1) {
    return std::nullopt;
  }
  const int64_t c_in = input.size(1), h = input.size(2), w = input.size(3);
  const int64_t c_out = weight.size(0), kh = weight.size(2), kw = weight.size(3);
  const int64_t pad_h = dilation[0] * (kh - 1) - padding[0];
  const int64_t pad_w = dilation[1] * (kw - 1) - padding[1];
  const int64_t h_out = h + 2 * padding[0] - dilation[0] * (kh - 1);  // the forward's output
  const int64_t w_out = w + 2 * padding[1] - dilation[1] * (kw - 1);
  constexpr int64_t kInt32 = int64_t{1} << 31;
  if (pad_h < 0 || pad_w < 0 || h_out <= 0 || w_out <= 0 || input.numel() == 0 ||
      c_out * h_out * w_out >= kInt32 || c_in * h * w >= kInt32 || c_out * kh * kw >= kInt32) {
    return std::nullopt;
  }
  ConvShape s{};
  s.n = input.size(0);
  s.c_in = static_cast<int>(c_out);  // this convolution reads g ...
  s.h = static_cast<int>(h_out);
  s.w = static_cast<int>(w_out);
  s.c_out = static_cast<int>(c_in);  // ... and writes grad_input
  s.h_out = static_cast<int>(h);
  s.w_out = static_cast<int>(w);
  s.kh = static_cast<int>(kh);
  s.kw = static_cast<int>(kw);
  s.stride_h = s.stride_w = 1;
  s.pad_h = static_cast<int>(pad_h);
  s.pad_w = static_cast<int>(pad_w);
  s.dil_h = static_cast<int>(dilation[0]);
  s.dil_w = static_cast<int>(dilation[1]);
  s.k = static_cast<int>(c_out * kh * kw);
  if (c_out <= kSliceChannels) {  // one slice: as the forward
    s.c_chunk = s.c_in;
    s.chunks = 1;
    s.k_steps = s.chunk_k_steps = (s.k + 7) / 8;
  } else {
    s.c_chunk = kSliceChannels;
    s.chunks = static_cast<int>((c_out + kSliceChannels - 1) / kSliceChannels);
    s.chunk_k_steps = s.kh * s.kw;  // kSliceChannels * kh * kw / 8
    s.k_steps = s.chunks * s.chunk_k_steps;
  }
  set_tile_geometry(s);
  s.channels_last = input.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  if (smem_bytes_for(s, grad_input_n_tiles(c_in), 3, false, /*sliced=*/true) > kMaxSmemBytes) {
    return std::nullopt;
  }
  return s;
}

template <int kNT>
void launch(const ConvShape& s, const at::Tensor& g, const at::Tensor& w, const at::Tensor& out) {
  launch_tile_kernel<float, kNT, 3, TileMode::kConv>(
      s, g.const_data_ptr<float>(), w.const_data_ptr<float>(), BnFold{}, GradTerms{},
      out.mutable_data_ptr<float>(), nullptr, c10::cuda::getCurrentCUDAStream(), false);
}

}  // namespace

bool grad_input_tile_supports(const at::Tensor& input, const at::Tensor& weight,
                              at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t groups) {
  return grad_input_taps_supports(input, weight, stride, padding, dilation, groups) ||
         make_grad_input_shape(input, weight, stride, padding, dilation, groups).has_value();
}

at::Tensor tile_grad_input(const at::Tensor& grad_conv_out, const at::Tensor& input,
                           const at::Tensor& weight, at::IntArrayRef padding,
                           at::IntArrayRef dilation) {
  const int64_t unit[2] = {1, 1};
  // The tap-reusing kernel where it applies, the plain-convolution form elsewhere.
  if (grad_input_taps_supports(input, weight, unit, padding, dilation, 1)) {
    return grad_input_taps(grad_conv_out, input, weight, padding);
  }
  const auto shape = make_grad_input_shape(input, weight, unit, padding, dilation, 1);
  TORCH_CHECK(shape.has_value(), "fused_conv: grad_input outside the tile kernel's reach");
  const ConvShape& s = *shape;
  const at::Tensor g = grad_conv_out.contiguous(format_of(s));
  // [C_in][C_out][kh][kw], spatially flipped: the convolution that g goes through.
  const at::Tensor w_flipped = weight.to(at::kFloat).flip({2, 3}).transpose(0, 1).contiguous();
  at::Tensor grad_input = at::empty(input.sizes(), input.options().memory_format(format_of(s)));
  switch (grad_input_n_tiles(s.c_out)) {
    case 1:
      launch<1>(s, g, w_flipped, grad_input);
      break;
    case 2:
      launch<2>(s, g, w_flipped, grad_input);
      break;
    case 4:
      launch<4>(s, g, w_flipped, grad_input);
      break;
    default:
      launch<8>(s, g, w_flipped, grad_input);
  }
  return grad_input;
}

}  // namespace fused_conv::cuda
