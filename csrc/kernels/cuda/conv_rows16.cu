// The forward as one warpgroup MMA chain per output row for float16 / bfloat16
// channels_last tensors (Hopper, sm_90a; stride 1, C_in and C_out multiples of
// 8), in two passes like the float32 row kernel (conv_rows.cu): statistics
// (per-channel Chan summaries of conv(x), nothing written) and apply
// (out = a[c]*conv(x) + d[c], rounded to the input's dtype).
//
// GEMM per output row oh and 128-pixel column tile:
//   D(64 output channels x 128 pixels) = W(64 x K) * X(K x 128),
//   K = (input channel chunk p of 8, tap (r, q)), one chunk = 8 channels of a tap.
// wgmma reads 16-bit operands from shared memory K-major in core matrices of 8
// rows x 16 bytes (8 values of K). In NHWC, 8 channels of a pixel are 16
// contiguous bytes, so a strip of input rows staged as [chunk p][row][column]
// [8 channels] (a verbatim copy of the NHWC rows when C_in = 8) holds, at
// (p, staged row oh - oh0 + r*dil_h, column j + q*dil_w), the core matrix of
// chunk (p, r, q) for pixels j..j+7: 128 contiguous bytes, the next 8 pixels
// 128 bytes further (stride byte offset). No conversion, no im2col: the MMAs
// read the copied input directly.
//
// A k16-step is two chunks (leading byte offset = the distance between their
// core matrices, a constant per step because both move with the row and the
// pixel group alike). Chunks are ordered (p, r, q), which is ascending in the
// staged layout, so the second of a pair always lies above the first; an odd
// last chunk pairs with a 2 KB zero region placed above the ring (its offset
// then depends on the row: computed per MMA). W is staged [k-step][k-half]
// [channel][8] (k-halves 1 KB apart, 8-channel groups 128 bytes apart), zeros
// past C_out and for the padding chunk.
//
// A block is one warpgroup, persistent over strips of `rows` output rows of one
// image and one column tile; the input arrives by 16-byte cp.async (zero fill
// outside the image) into a ring of slots: forward, 3 slots, two strips ahead;
// backward, 2 slots, each strip travelling with its first row's g. Per output row the
// warpgroup issues ceil(K / 16) MMAs (5 for 3x3 x 8 channels), waits, then:
//   statistics: folds the row into per-thread Chan summaries (rows_statistics.cuh);
//   apply: a*acc + d rounded to 16 bits, written by stmatrix.trans into an
//     [pixel][64 channels] stage (rows 144 bytes apart: 8 consecutive pixels in
//     distinct banks), then the block writes the stage as 16-byte pieces, which
//     for C_out = 64 is one contiguous run of W_out*128 bytes of the output.
//   backward (kGradStats, kGradOut): a stage holds the row's g, copied there
//     by cp.async while the row before was computed (two stages, in turn),
//     read back by ldmatrix.trans at the accumulators' positions; kGradOut
//     rewrites it with g_hat and writes it out like apply.
//   kGradOutW: the stage is laid out as MN-major core matrices instead, so
//     that it is the A operand (64 channels x 128 pixels) of the weight
//     gradient's warpgroup MMAs, whose B operand is the staged strip itself
//     (pixels 16 bytes apart, 8 input channels each): per 16 pixels three
//     m64n24k16 for a 3-wide kernel (one per chunk triple (p, r, q = 0..2)),
//     else one m64n8k16 per chunk.
// Shared memory for the reference problem: ~68 KB forward, ~73 KB backward;
// 3 blocks per multiprocessor.
#include "kernels/cuda/conv_rows16.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels/cuda/conv_rows.h"
#include "kernels/cuda/rows_statistics.cuh"
#include "kernels/cuda/tf32_mma.cuh"
#include "kernels/cuda/tile_launch.cuh"
#include "kernels/cuda/wgmma_16bit.cuh"

namespace fused_conv::cuda {
namespace {

constexpr int kThreads = 128;  // one warpgroup
constexpr int kCo = kRowsChannels;
constexpr int kPix = kRowsPixels;
constexpr int kMaxKSteps = 10;   // 20 chunks: K <= 160, the tile kernel's reach
constexpr int kChunkBytes = 16;  // 8 channels of one pixel
constexpr int kStageRow = 144;   // bytes per staged pixel: 64 channels + 16
constexpr int kStageBytes = kPix * kStageRow;
// kGradOutW stages g_hat as the weight-gradient MMA's A operand instead:
// MN-major core matrices (8 pixels x 8 channels, 128 bytes), the 8 channel
// groups of a pixel group 128 bytes apart, pixel groups 1 KB apart (16 KB).
constexpr int kCmPixelGroup = 8 * 128;
static_assert(kPix / 8 * kCmPixelGroup <= kStageBytes, "the core-matrix stage fits the stage");
constexpr int kZeroBytes = 16 * 128;  // the 16 pixel groups of one core-matrix column
constexpr int kDefaultRows = 4;       // the strip's halo is re-read (kh-1)/rows times
[[maybe_unused]] constexpr int kMinWidth = 64;
[[maybe_unused]] constexpr size_t kMaxSmem = 113 * 1024;  // at least two blocks per multiprocessor

// What one launch computes from y = conv(x) (no bias), per output row:
enum class Rows16Mode : int {
  kStats,      // per-block (count, mean, M2) of y (training forward, pass 1)
  kApply,      // out = a[c]*y + d[c] (forward)
  kGradStats,  // per-block sums of g, g*(y - ctr), y - ctr (backward, pass 1)
  kGradOut,    // out = A[c]*g + C[c]*(y - ctr) + D[c], the gradient at the conv
               // output, unbiasedly rounded (backward, pass 2)
  kGradOutW,   // kGradOut, and per-block partials of the weight gradient
               // sum out * x (out as written), for K <= kMaxWChunks chunks
};
// The fused weight gradient keeps 4 accumulators per chunk and thread.
constexpr int kMaxWChunks = 9;  // 3x3 x 8 input channels

struct Rows16Shape : RowStrips {
  int planes;        // C_in / 8: 16-byte channel chunks per pixel
  int chunks;        // kh*kw*planes
  int k_steps;       // ceil(chunks / 2)
  int items;         // 16-byte pieces of a strip: planes*staged_rows*staged_w
  int slot_bytes;    // items*16
  int w_bytes;       // k_steps*2*64*16
  WeightStrides ws;  // of the weight as given (run_rows16 sets them and w_chunked)
  bool w_chunked;    // each 8-channel chunk of a tap is 16 aligned contiguous bytes
};

// The input ring's slots and the [pixel][channel] stages per mode. The forward
// keeps two strips in flight (3 slots, one stage for the output). The backward
// modes stream g, 8x the input's bytes for the reference problem: each row's g
// is copied into one of two stages while the row before it is computed, and a
// strip's input travels with its first row's g, so two slots hold every strip
// in use. One row ahead measured faster than two (three stages and slots, two
// blocks per multiprocessor): 0.31 against 0.35 ms for g_hat's pass of the
// reference problem. Three blocks per multiprocessor fit the shared memory of
// two stages, and 168 registers per thread (a few bytes spill), within which
// ptxas still keeps the MMAs pipelined.
constexpr int kGradStages = 2;
constexpr int kGradMinBlocks = 3;
constexpr bool is_forward(Rows16Mode m) {
  return m == Rows16Mode::kStats || m == Rows16Mode::kApply;
}
// The forward statistics pass has no stage: 50 KB of shared memory for the
// reference problem, four blocks per multiprocessor, if each thread keeps to
// 128 registers (132 unbounded, which allowed three: 0.082 -> 0.086 ms).
constexpr int min_blocks(Rows16Mode m) {
  return m == Rows16Mode::kStats ? 4 : is_forward(m) ? 1 : kGradMinBlocks;
}
constexpr int ring_slots(Rows16Mode m) { return is_forward(m) ? 3 : kGradStages; }
constexpr int stage_count(Rows16Mode m) {
  return m == Rows16Mode::kStats ? 0 : m == Rows16Mode::kApply ? 1 : kGradStages;
}

// Weights, the ring, the zero region, the stages, the k-step tables.
size_t smem_bytes(const Rows16Shape& r, Rows16Mode m) {
  return static_cast<size_t>(r.w_bytes) + static_cast<size_t>(ring_slots(m)) * r.slot_bytes +
         kZeroBytes + static_cast<size_t>(stage_count(m)) * kStageBytes +
         2 * kMaxKSteps * sizeof(int);
}

Rows16Shape make_rows16_shape(const ConvShape& s, int rows) {
  Rows16Shape r{};
  static_cast<RowStrips&>(r) = make_row_strips(s, rows);
  r.planes = s.c_in / 8;
  r.chunks = s.kh * s.kw * r.planes;
  r.k_steps = (r.chunks + 1) / 2;
  r.items = r.planes * r.staged_rows * r.staged_w;
  r.slot_bytes = r.items * kChunkBytes;
  r.w_bytes = r.k_steps * 2 * kCo * kChunkBytes;
  return r;
}

#if FUSED_CONV_WGMMA
// The block's weights into shared memory: 16-byte chunk j = u * kCo + co holds
// input channels 8p..8p+7 of chunk u = 2ks + kc = (p, tap) (k-step ks, k-half
// kc) for channel c_base + co; zeros past the chunks and C_out. `chunked`
// (a channels_last weight: each chunk 16 aligned contiguous bytes): one
// cp.async per chunk, left to the caller's next commit group; otherwise
// element by element by the strides, the 8 loads of a chunk independent.
// (Every block stages at its start, so this is on each launch's critical
// path: element by element it is 36 two-byte loads per thread for the
// reference problem.) Not inlined: inside the kernel, this code alone changed
// the register allocation of the weight-gradient pass enough for ptxas to
// serialise its MMAs (C7511).
template <typename T>
__device__ __noinline__ void stage_weights16(const T* __restrict__ w, WeightStrides ws, int chunks,
                                             int k_steps, int taps, int kw, int c_out, int c_base,
                                             unsigned char* w_s, bool chunked) {
  const uint32_t w_addr = static_cast<uint32_t>(__cvta_generic_to_shared(w_s));
  T* w_t = reinterpret_cast<T*>(w_s);
  for (int j = threadIdx.x; j < k_steps * 2 * kCo; j += kThreads) {
    const int u = j / kCo, co = j % kCo, c = c_base + co;
    const int p = u / taps, tap = u - p * taps, tr = tap / kw, tq = tap - tr * kw;
    const bool live = u < chunks && c < c_out;
    const T* src = w + (live ? c * ws.co + (8 * p * ws.ci + tr * ws.r + tq * ws.q) : 0);
    if (chunked) {
      cp_async_16(w_addr + j * kChunkBytes, src, live);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) w_t[8 * j + e] = live ? src[e * ws.ci] : from_float<T>(0.f);
    }
  }
}

// Two values of a pixel pair, each rounded to T without bias (round_with_bits:
// conv_tile_kernel.cuh), packed low = first. One hash per pair: its low half
// rounds the first value, its high half the second. `key` names the pair (the
// first value's NHWC offset, low 32 bits, see the kGradOut epilogue).
template <typename T>
__device__ __forceinline__ uint32_t pack_rounded(float lo, float hi, uint32_t key) {
  const uint32_t r = mix32(key);
  const T a = round_with_bits<T>(lo, r), b = round_with_bits<T>(hi, r >> 16);
  return static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&a)) |
         static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&b)) << 16;
}

// The stage's 16-byte piece q: (pixel px, 8-channel group cg) and its offset.
// Rows: piece q = (q / 8, q % 8) at px * kStageRow + 16 cg. Core matrices
// (kGradOutW): pieces in the order they lie in the stage (offset 16 q), so
// that consecutive threads store to consecutive bytes.
template <bool kCoreMatrices>
__device__ __forceinline__ void stage_piece(int q, int& px, int& cg) {
  if constexpr (kCoreMatrices) {
    px = (q >> 6) * 8 + (q & 7);
    cg = (q >> 3) & 7;
  } else {
    px = q >> 3;
    cg = q & 7;
  }
}
template <bool kCoreMatrices>
__host__ __device__ constexpr int stage_offset(int px, int cg) {
  return kCoreMatrices ? (px >> 3) * kCmPixelGroup + cg * 128 + (px & 7) * 16
                       : px * kStageRow + cg * 16;
}

// Piece threadIdx.x + i*kThreads is this thread's first piece's pixel + 16 i,
// in the same channel group, in either layout (copy_grad addresses its pieces
// so).
static_assert(kThreads == 128 && kPix * 8 / kThreads == 8, "8 pieces per thread, 16 pixels apart");
// Writes the stage's pieces of the first `pixels` pixels and the block's
// `groups` channel groups to `dst` (pixel 0, channel c_base of an output row);
// NHWC pixels are C_out values apart, so for C_out = 64 the pieces are one
// contiguous run. (Addressed by constant strides like copy_grad, with the loop
// unrolled or not, ptxas serialised kGradOutW's MMAs, C7511.)
template <bool kCoreMatrices, typename T>
__device__ __forceinline__ void write_stage(const unsigned char* stage, T* __restrict__ dst,
                                            int c_out, int pixels, int groups) {
  for (int q = threadIdx.x; q < kPix * 8; q += kThreads) {
    int px, cg;
    stage_piece<kCoreMatrices>(q, px, cg);
    if (px < pixels && cg < groups) {
      *reinterpret_cast<uint4*>(dst + static_cast<int64_t>(px) * c_out + 8 * cg) =
          *reinterpret_cast<const uint4*>(stage + stage_offset<kCoreMatrices>(px, cg));
    }
  }
}

// Issues the 16-byte copies of one strip's input rows ih0.. and columns iw0..
// of image n into the slot at `dst` ([chunk][row][column][8 channels], zeros
// outside the image). Item order: chunk, column, row (consecutive threads read
// consecutive 16-byte pieces of an NHWC row), advanced by carries.
template <typename T>
__device__ __forceinline__ void copy_strip16(const T* __restrict__ x, const Rows16Shape& s,
                                             int64_t n, int ih0, int iw0, uint32_t dst) {
  const T* img = x + n * (static_cast<int64_t>(s.h) * s.w * s.c_in);
  // kThreads / planes < staged_w: one carry per digit and step suffices.
  int pl = threadIdx.x % s.planes, px = threadIdx.x / s.planes, sr = 0;
  for (int i = threadIdx.x; i < s.items; i += kThreads) {
    const int ih = ih0 + sr, iw = iw0 + px;
    const bool inside = static_cast<unsigned>(ih) < static_cast<unsigned>(s.h) &&
                        static_cast<unsigned>(iw) < static_cast<unsigned>(s.w);
    const T* src = inside ? img + (static_cast<int64_t>(ih) * s.w + iw) * s.c_in + 8 * pl : img;
    cp_async_16(dst + ((pl * s.staged_rows + sr) * s.staged_w + px) * kChunkBytes, src, inside);
    pl += kThreads % s.planes;
    px += kThreads / s.planes;
    if (pl >= s.planes) pl -= s.planes, ++px;
    if (px >= s.staged_w) px -= s.staged_w, ++sr;
  }
}
#endif

template <typename T, Rows16Mode kMode>
__global__ void __launch_bounds__(kThreads, min_blocks(kMode))
    conv_rows16_kernel(const T* __restrict__ x, const T* __restrict__ w, Rows16Shape s, BnFold f,
                       GradTerms gt, float* __restrict__ partials, T* __restrict__ out) {
#if FUSED_CONV_WGMMA
  constexpr bool kApply = kMode == Rows16Mode::kApply;
  constexpr bool kWeightGrad = kMode == Rows16Mode::kGradOutW;
  constexpr bool kGradOut = kMode == Rows16Mode::kGradOut || kWeightGrad;
  constexpr bool kGrad = kMode == Rows16Mode::kGradStats || kGradOut;
  constexpr int kSlots = ring_slots(kMode);
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* w_s = smem;
  unsigned char* ring = w_s + s.w_bytes;
  unsigned char* zero = ring + kSlots * s.slot_bytes;
  unsigned char* stage = zero + kZeroBytes;
  int* step_off = reinterpret_cast<int*>(stage + stage_count(kMode) * kStageBytes);
  int* step_lead = step_off + kMaxKSteps;
  const uint32_t ring_addr = static_cast<uint32_t>(__cvta_generic_to_shared(ring));
  const uint32_t zero_addr = static_cast<uint32_t>(__cvta_generic_to_shared(zero));
  const uint32_t stage_addr = static_cast<uint32_t>(__cvta_generic_to_shared(stage));

  // Warp index broadcast from lane 0: warp-uniform to the compiler, so that no
  // branch near the wgmmas looks divergent (ptxas would serialize them).
  const int warp = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x >> 5), 0);
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int c_base = blockIdx.y * kCo;
  const int taps = s.kh * s.kw;
  const int64_t step = gridDim.x;
  const int row_bytes = s.staged_w * kChunkBytes;

  const T* __restrict__ grad = static_cast<const T*>(gt.grad);
  const int groups = min(8, (s.c_out - c_base) / 8);  // the block's 8-channel groups
  // A strip's image n, first output row oh0 and first output column ow0.
  const auto origin = [&](int64_t strip, int64_t& n, int& oh0, int& ow0) {
    const int64_t row_tile = strip / s.tiles_w;
    ow0 = static_cast<int>(strip - row_tile * s.tiles_w) * kPix;
    n = row_tile / s.strips_h;
    oh0 = static_cast<int>(row_tile - n * s.strips_h) * s.rows;
  };
  const auto copy = [&](int64_t strip, int slot) {
    int64_t n;
    int oh0, ow0;
    origin(strip, n, oh0, ow0);
    copy_strip16<T>(x, s, n, oh0 - s.pad_h, ow0 - s.pad_w, ring_addr + slot * s.slot_bytes);
  };
  // kGrad: the g of the output row whose first NHWC pixel is row_pix (`pixels`
  // of them in the tile) into stage `buf`, at this thread's pieces' offsets
  // (zeros past the tile's pixels and the block's channels; see write_stage for
  // the constant strides).
  const auto copy_grad = [&](int64_t row_pix, int pixels, int buf) {
    int px, cg;
    stage_piece<kWeightGrad>(threadIdx.x, px, cg);
    const T* src = grad + row_pix * s.c_out + (px * s.c_out + c_base + 8 * cg);
    const int64_t src_stride = 16 * static_cast<int64_t>(s.c_out);
    const uint32_t dst = stage_addr + buf * kStageBytes + stage_offset<kWeightGrad>(px, cg);
    constexpr int kPieceStride = stage_offset<kWeightGrad>(16, 0);
#pragma unroll
    for (int i = 0; i < kPix * 8 / kThreads; ++i) {
      const bool inside = px + 16 * i < pixels && cg < groups;
      cp_async_16(dst + i * kPieceStride, inside ? src + i * src_stride : grad, inside);
    }
  };
  // kGrad: a strip's first NHWC pixel and its pixels in the tile.
  const auto strip_pixels = [&](int64_t strip, int64_t& pix, int& pixels) {
    int64_t n;
    int oh0, ow0;
    origin(strip, n, oh0, ow0);
    pix = (n * s.h_out + oh0) * s.w_out + ow0;
    pixels = min(s.w_out - ow0, kPix);
  };
  // A channels_last weight: its chunks by cp.async, in the first commit group
  // (which every block waits for before its first MMA); stage_weights16.
  if (s.w_chunked)
    stage_weights16<T>(w, s.ws, s.chunks, s.k_steps, taps, s.kw, s.c_out, c_base, w_s, true);
  // The first copies fly while the weights are staged: forward, the first
  // kSlots - 1 strips (one commit per strip); kGrad, the first strip and its
  // first row's g (then one commit per row).
  if constexpr (kGrad) {
    if (blockIdx.x < s.strips) {
      int64_t pix;
      int pixels;
      strip_pixels(blockIdx.x, pix, pixels);
      copy(blockIdx.x, 0);
      copy_grad(pix, pixels, 0);
    }
    cp_async_commit();
  } else {
#pragma unroll
    for (int i = 0; i < kSlots - 1; ++i) {
      if (blockIdx.x + i * step < s.strips) copy(blockIdx.x + i * step, i);
      cp_async_commit();
    }
  }

  if (!s.w_chunked)
    stage_weights16<T>(w, s.ws, s.chunks, s.k_steps, taps, s.kw, s.c_out, c_base, w_s, false);
  for (int i = threadIdx.x; i < kZeroBytes / 16; i += kThreads) {
    reinterpret_cast<uint4*>(zero)[i] = make_uint4(0, 0, 0, 0);
  }
  // Per k-step, the first chunk's core matrix relative to the strip slot (for
  // output row 0) and the distance to the second (-1: the zero region).
  if (threadIdx.x < s.k_steps) {
    const auto chunk_off = [&](int u) {
      const int p = u / taps, tap = u - p * taps, r = tap / s.kw, q = tap - r * s.kw;
      return ((p * s.staged_rows + r * s.dil_h) * s.staged_w + q * s.dil_w) * kChunkBytes;
    };
    const int u0 = 2 * threadIdx.x;
    step_off[threadIdx.x] = chunk_off(u0);
    step_lead[threadIdx.x] = u0 + 1 < s.chunks ? chunk_off(u0 + 1) - chunk_off(u0) : -1;
  }
  fence_proxy_async_shared();  // the weights and zeros, visible to wgmma

  // kGradOutW: each chunk's staged offset (the same as the k-step tables'; the
  // last repeated past the chunk count), and the weight-gradient accumulators:
  // dw[u] = (channel 16w + g, input channels 8p + 2t, +1 of chunk u = (p, tap)),
  // (channel + 8, ...): chunk u's 8 columns of the wgmma accumulator.
  int w_off[kWeightGrad ? kMaxWChunks + 1 : 1];  // in 16-byte chunks
  float dw[kWeightGrad ? kMaxWChunks : 1][4];
  if constexpr (kWeightGrad) {
#pragma unroll
    for (int u = 0; u <= kMaxWChunks; ++u) {
      const int uc = min(u, s.chunks - 1), p = uc / taps, tap = uc - p * taps;
      const int rr = tap / s.kw, q = tap - rr * s.kw;
      w_off[u] = (p * s.staged_rows + rr * s.dil_h) * s.staged_w + q * s.dil_w;
    }
#pragma unroll
    for (int u = 0; u < kMaxWChunks; ++u) dw[u][0] = dw[u][1] = dw[u][2] = dw[u][3] = 0.f;
  }

  const uint64_t a_desc = wgmma_desc_k_major(w_s, kCo * kChunkBytes, 128);
  constexpr uint32_t kAStep = 2 * kCo * kChunkBytes >> 4;  // one k-step of W, descriptor units

  RowStatistics stats;
  // Per channel of this thread (c_mine, c_mine + 8; zeros past C_out, whose
  // values are never stored): kApply the fold (fa, fd); kGrad the centre ctr
  // and kGradOut g_hat's coefficients (fa = A, fc = C, fd = D).
  const int c_mine = c_base + 16 * warp + g;
  float fa[2] = {0.f, 0.f}, fd[2] = {0.f, 0.f}, fc[2] = {0.f, 0.f}, ctr[2] = {0.f, 0.f};
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    const int c = c_mine + 8 * p;
    if (c >= s.c_out) continue;
    if constexpr (kApply) bn_fold_coefficients(f, c, fa[p], fd[p]);
    if constexpr (kGrad) ctr[p] = gt.center[c];
    if constexpr (kGradOut) {
      fa[p] = gt.coef_g[c];
      fc[p] = gt.coef_y[c];
      fd[p] = gt.coef_1[c];
    }
  }
  // kGradStats: this thread's running sums of g, g*(y - ctr), y - ctr per
  // channel (each row's float32 sums added in float64).
  double gs_g[2] = {0.0, 0.0}, gs_gy[2] = {0.0, 0.0}, gs_y[2] = {0.0, 0.0};
  // Not initialised: a row's first MMA has scale-d = 0 (ks == 0), and zeroing
  // instructions near the MMAs would make ptxas serialize them (C7515).
  float acc[16][4];

  int slot = 0, buf = 0;
  for (int64_t strip = blockIdx.x; strip < s.strips; strip += step) {
    int64_t n;
    int oh0, ow0;
    origin(strip, n, oh0, ow0);
    if constexpr (!kGrad) {
      // This strip's copies (all but the newest group) have landed for this
      // thread; the fence hands them to the async proxy, the barrier makes
      // everyone's visible, and every warp has retired the previous strip's
      // MMAs (wait_group 0 per row), so its slot may be refilled.
      cp_async_wait<kSlots - 2>();
      fence_proxy_async_shared();
      __syncthreads();
      const int refill = slot == 0 ? kSlots - 1 : slot - 1;
      if (strip + (kSlots - 1) * step < s.strips) copy(strip + (kSlots - 1) * step, refill);
      cp_async_commit();
    }

    const int rows = min(s.rows, s.h_out - oh0);
    const int lim = s.w_out - ow0;             // valid pixels of the tile (may exceed 128)
    float valid[16][2], cnt = 0.f, inv = 0.f;  // the statistics' pixel weights
    if constexpr (!kApply) row_pixel_weights(lim, t, valid, cnt, inv);
    const int pixels = min(lim, kPix);  // pixels of the tile to write
    const uint32_t slot_addr = ring_addr + slot * s.slot_bytes;
    for (int r = 0; r < rows; ++r) {
      const int64_t row_pix = (n * s.h_out + oh0 + r) * s.w_out + ow0;  // NHWC pixel index
      if constexpr (kGrad) {
        // The next row's g into the other stage, and at a strip's last row
        // the next strip into the other slot, with its first row's g: both
        // were last read by the previous row, which every warp has left. (The
        // strip origin's divisions run once per strip.) Then all but this
        // newest group have landed: this row's g and its strip.
        if (r + 1 < rows) {
          copy_grad(row_pix + s.w_out, pixels, buf ^ 1);
        } else if (strip + step < s.strips) {
          int64_t pix;
          int next_pixels;
          strip_pixels(strip + step, pix, next_pixels);
          copy(strip + step, slot ^ 1);
          copy_grad(pix, next_pixels, buf ^ 1);
        }
        cp_async_commit();
        cp_async_wait<1>();
        fence_proxy_async_shared();
        __syncthreads();
      }
      unsigned char* const stage_r = stage + buf * kStageBytes;  // this row's stage
      const uint32_t stage_r_addr = stage_addr + buf * kStageBytes;
      wgmma_fence();
      for (int ks = 0; ks < s.k_steps; ++ks) {
        const uint32_t b0 = slot_addr + step_off[ks] + r * row_bytes;
        const int lead = step_lead[ks];
        const uint32_t b_lead = lead >= 0 ? static_cast<uint32_t>(lead) : zero_addr - b0;
        wgmma_16bit_ss_n128<T>(acc, a_desc + ks * kAStep, desc_at(b0, b_lead, 128), ks);
      }
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_fence_accumulators(acc);

      if constexpr (kApply) {
        // Matrices (pixel group j, channel half p) and (j + 1, p) of this warp,
        // four per stmatrix: lane 8m + i supplies the stage address of pixel
        // 8(j + m/2) + i, channels 16*warp + 8(m % 2).
        const int m = lane >> 3, i = lane & 7;
#pragma unroll
        for (int j = 0; j < 16; j += 2) {
          uint32_t v[4];
#pragma unroll
          for (int mm = 0; mm < 4; ++mm) {
            const int jm = j + (mm >> 1), p = mm & 1;
            v[mm] = pack_pair<T>(fmaf(fa[p], acc[jm][2 * p], fd[p]),
                                 fmaf(fa[p], acc[jm][2 * p + 1], fd[p]));
          }
          const int px = 8 * (j + (m >> 1)) + i, ch = 16 * warp + 8 * (m & 1);
          stmatrix_x4_trans(stage_r_addr + px * kStageRow + ch * 2, v[0], v[1], v[2], v[3]);
        }
        __syncthreads();
        write_stage<false>(stage_r, out + row_pix * s.c_out + c_base, s.c_out, pixels, groups);
        __syncthreads();  // the stage is rewritten by the next row
      } else if constexpr (kGrad) {
        // g's pieces, copied into the stage, read back as fragments by
        // ldmatrix.trans (the stmatrix mapping in reverse): g at exactly the
        // accumulators' (channel, pixel) positions. Each warp reads (and,
        // kGradOut, rewrites in place) only its own 16 channels of the stage.
        const int m = lane >> 3, i = lane & 7;
        float row_g[2] = {0.f, 0.f}, row_gy[2] = {0.f, 0.f}, row_y[2] = {0.f, 0.f};
        // kGradOut: this lane's first pair key of the row, and the offset's
        // bits above 32 (hashed, as mix_bits does).
        const int64_t row_off = row_pix * s.c_out;
        const uint32_t row_key =
            static_cast<uint32_t>(row_off) + static_cast<uint32_t>(2 * t * s.c_out + c_mine);
        const uint32_t row_high = static_cast<uint32_t>(row_off >> 32) * 0x27D4EB2Du;
#pragma unroll
        for (int j = 0; j < 16; j += 2) {
          const uint32_t addr =
              stage_r_addr + stage_offset<kWeightGrad>(8 * (j + (m >> 1)) + i, 2 * warp + (m & 1));
          uint32_t gr[4];
          ldmatrix_x4_trans(addr, gr[0], gr[1], gr[2], gr[3]);
          uint32_t v[4];
#pragma unroll
          for (int mm = 0; mm < 4; ++mm) {
            const int jm = j + (mm >> 1), p = mm & 1;
            const float2 gv = unpack_pair<T>(gr[mm]);
            const float y0 = acc[jm][2 * p] - ctr[p], y1 = acc[jm][2 * p + 1] - ctr[p];
            if constexpr (kMode == Rows16Mode::kGradStats) {
              row_g[p] += gv.x + gv.y;
              row_gy[p] = fmaf(gv.x, y0, fmaf(gv.y, y1, row_gy[p]));
              row_y[p] = fmaf(valid[jm][0], y0, fmaf(valid[jm][1], y1, row_y[p]));
            } else {
              // The pair's key: its first NHWC offset in 32-bit arithmetic
              // (per element, a 64-bit offset and hash cost as much as the
              // rest of the epilogue), the high bits folded in once per row.
              const uint32_t key = row_key + static_cast<uint32_t>(8 * jm * s.c_out + 8 * p);
              v[mm] = pack_rounded<T>(fmaf(fa[p], gv.x, fmaf(fc[p], y0, fd[p])),
                                      fmaf(fa[p], gv.y, fmaf(fc[p], y1, fd[p])), key ^ row_high);
            }
          }
          if constexpr (kWeightGrad) {
            // g_hat of pixels past W_out is zero in the stage, so that the
            // weight gradient's MMAs below may run over the whole tile.
#pragma unroll
            for (int mm = 0; mm < 4; ++mm) {
              const int px = 8 * (j + (mm >> 1)) + 2 * t;
              v[mm] &= px + 1 < lim ? 0xFFFFFFFFu : px < lim ? 0x0000FFFFu : 0u;
            }
          }
          if constexpr (kGradOut) {
            stmatrix_x4_trans(addr, v[0], v[1], v[2], v[3]);
          }
        }
        if constexpr (kMode == Rows16Mode::kGradStats) {
#pragma unroll
          for (int p = 0; p < 2; ++p) {
            gs_g[p] += row_g[p];
            gs_gy[p] += row_gy[p];
            gs_y[p] += row_y[p];
          }
        } else {
          if constexpr (kWeightGrad) fence_proxy_async_shared();  // the stage, for wgmma
          __syncthreads();
          if constexpr (kWeightGrad) {
            // dW(64 channels x chunks' 8 input channels) += g_hat(64 x 128
            // pixels) * X(128 pixels x ...): per 16-pixel k-step, A = the
            // stage's two pixel groups; B = the strip at chunk u's offset for
            // this row, whose pixels are 16 bytes apart (MN-major, 8 input
            // channels per row) and whose tap columns q lie dil_w pixels apart,
            // so three chunks (p, r, q = 0..2) form one N = 24 operand.
            // Chunks past the last read the zero region instead (their
            // accumulators are never stored): no branch between the MMAs,
            // where ptxas would insert a warpgroup.arrive before each (C7519).
            // Descriptors by 32-bit addition to their low word (desc_join):
            // w_off and the k-step offsets are in 16-byte units.
            const uint32_t n_stride = (s.kw == 3 ? s.dil_w : 1) * kChunkBytes;
            const DescWords a0 = desc_mn_major_words(stage_r_addr, kCmPixelGroup, 128);
            const DescWords b0 =
                desc_mn_major_words(slot_addr + r * row_bytes, 8 * kChunkBytes, n_stride);
            const uint32_t b_zero = desc_mn_major_words(zero_addr, 8 * kChunkBytes, n_stride).lo;
            constexpr uint32_t kAStep = 2 * kCmPixelGroup / 16;  // 16 pixels of the stage
            constexpr uint32_t kBStep = 16 * kChunkBytes / 16;   // 16 pixels of the strip
            wgmma_fence();
            if (s.kw == 3) {
#pragma unroll
              for (int ks = 0; ks < kPix / 16; ++ks) {
#pragma unroll
                for (int u = 0; u < kMaxWChunks; u += 3) {
                  const uint32_t b = u < s.chunks ? b0.lo + w_off[u] + ks * kBStep : b_zero;
                  wgmma_16bit_ss_n24_mn_major<T>(dw[u], dw[u + 1], dw[u + 2],
                                                 desc_join(a0.lo + ks * kAStep, a0.hi),
                                                 desc_join(b, b0.hi));
                }
              }
            } else {
#pragma unroll
              for (int ks = 0; ks < kPix / 16; ++ks) {
#pragma unroll
                for (int u = 0; u < kMaxWChunks; ++u) {
                  const uint32_t b = u < s.chunks ? b0.lo + w_off[u] + ks * kBStep : b_zero;
                  wgmma_16bit_ss_n8_mn_major<T>(dw[u], desc_join(a0.lo + ks * kAStep, a0.hi),
                                                desc_join(b, b0.hi));
                }
              }
            }
            wgmma_commit();
          }
          write_stage<kWeightGrad>(stage_r, out + row_pix * s.c_out + c_base, s.c_out, pixels,
                                   groups);
          if constexpr (kWeightGrad) {
            wgmma_wait<0>();
            wgmma_fence_accumulators(dw);
          }
        }
        __syncthreads();  // the stage and slot are refilled by the next row
      } else {
        stats.add_row(acc, valid, cnt, inv);
      }
      if constexpr (kGrad) buf ^= 1;
    }
    slot = slot == kSlots - 1 ? 0 : slot + 1;
  }
  cp_async_wait<0>();  // no copy outlives the block (the last slots are empty groups)
  if constexpr (kMode == Rows16Mode::kStats) stats.write(partials, warp, g, t);
  if constexpr (kWeightGrad) {
    // partials[blockIdx.y][gridDim.x][64][taps * C_in] at column tap * C_in +
    // input channel, as reduce_weight_grad_kernel (conv_bn_backward.cu) reads them.
    const int k8 = taps * s.c_in;
    float* dst =
        partials +
        ((static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * kCo + 16 * warp + g) * k8;
#pragma unroll
    for (int u = 0; u < kMaxWChunks; ++u) {
      if (u < s.chunks) {
        const int p = u / taps, tap = u - p * taps, col = tap * s.c_in + 8 * p + 2 * t;
        dst[col] = dw[u][0];
        dst[col + 1] = dw[u][1];
        dst[8 * k8 + col] = dw[u][2];
        dst[8 * k8 + col + 1] = dw[u][3];
      }
    }
  }
  if constexpr (kMode == Rows16Mode::kGradStats) {
    // Sums over the quad's lanes (they share the channels), in a fixed order;
    // partials[blockIdx.y][gridDim.x][64][3] as finalize_grad_kernel reads them.
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      float sums[3] = {static_cast<float>(gs_g[p]), static_cast<float>(gs_gy[p]),
                       static_cast<float>(gs_y[p])};
#pragma unroll
      for (int e = 0; e < 3; ++e) {
        sums[e] += __shfl_xor_sync(0xffffffffu, sums[e], 1);
        sums[e] += __shfl_xor_sync(0xffffffffu, sums[e], 2);
      }
      if (t == 0) {
        float* dst = partials + ((static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * kCo +
                                 16 * warp + g + 8 * p) *
                                    3;
        dst[0] = sums[0];
        dst[1] = sums[1];
        dst[2] = sums[2];
      }
    }
  }
#else
  // Not compiled for sm_90a: conv_rows16_supports() never selects this kernel.
  __trap();
#endif
}

template <typename T, Rows16Mode kMode>
int launch_rows16(const Rows16Shape& r, const T* x, const T* w, const BnFold& f,
                  const GradTerms& gt, float* partials, T* out, bool dry_run) {
  auto kernel = conv_rows16_kernel<T, kMode>;
  const size_t smem = smem_bytes(r, kMode);
  const int grid_x =
      row_kernel_grid(reinterpret_cast<const void*>(kernel), kThreads, smem, r.c_out, r.strips);
  if (!dry_run) {
    const dim3 grid(grid_x, static_cast<unsigned>((r.c_out + kCo - 1) / kCo));
    kernel<<<grid, kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(x, w, r, f, gt, partials,
                                                                        out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return grid_x;
}

template <Rows16Mode kMode>
int run_rows16(const Rows16Shape& shape, const at::Tensor& x, const at::Tensor& w, const BnFold& f,
               const GradTerms& gt, float* partials, at::Tensor* out, bool dry_run) {
  Rows16Shape r = shape;
  r.ws = weight_strides(w);
  r.w_chunked = r.ws.ci == 1 && r.ws.co % 8 == 0 && r.ws.r % 8 == 0 && r.ws.q % 8 == 0 &&
                reinterpret_cast<uintptr_t>(w.const_data_ptr()) % 16 == 0;
  const auto launch = [&](auto tag) {
    using T = decltype(tag);
    return launch_rows16<T, kMode>(
        r, reinterpret_cast<const T*>(x.const_data_ptr()),
        reinterpret_cast<const T*>(w.const_data_ptr()), f, gt, partials,
        out != nullptr ? reinterpret_cast<T*>(out->mutable_data_ptr()) : nullptr, dry_run);
  };
  return x.scalar_type() == at::kBFloat16 ? launch(__nv_bfloat16{}) : launch(__half{});
}

// Per-block partials [ceil(C_out / 64)][grid][64][3] of the statistics modes.
template <Rows16Mode kMode>
std::pair<at::Tensor, int> rows16_partials(const ConvShape& s, const at::Tensor& x,
                                           const at::Tensor& w, const GradTerms& gt) {
  const Rows16Shape r = make_rows16_shape(s, rows_per_strip(kDefaultRows));
  const int grid_x = run_rows16<kMode>(r, x, w, BnFold{}, gt, nullptr, nullptr, true);
  const int64_t c_blocks = (s.c_out + kCo - 1) / kCo;
  at::Tensor partials = at::empty({c_blocks, grid_x, kCo, 3}, x.options().dtype(at::kFloat));
  run_rows16<kMode>(r, x, w, BnFold{}, gt, partials.mutable_data_ptr<float>(), nullptr, false);
  return {partials, grid_x};
}

void check_rows16_output(const ConvShape& s, const at::Tensor& x, const at::Tensor& out) {
  TORCH_CHECK(s.channels_last && out.scalar_type() == x.scalar_type() &&
                  out.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                  reinterpret_cast<uintptr_t>(out.const_data_ptr()) % 16 == 0,
              "fused_conv: the 16-bit row kernel writes 16-byte aligned channels_last outputs "
              "of the input's dtype");
}

}  // namespace

bool conv_rows16_supports(const ConvShape& s, const at::Tensor& x, int device) {
#ifndef FUSED_CONV_BUILT_SM90A
  (void)s, (void)x, (void)device;
  return false;  // no sm_90a code in this build (setup.py defines the macro)
#else
  if (std::strcmp(forward_kernel_choice(), "tile") == 0) return false;
  const at::ScalarType dtype = x.scalar_type();
  if ((dtype != at::kHalf && dtype != at::kBFloat16) || !s.channels_last || s.stride_h != 1 ||
      s.stride_w != 1 || s.c_in % 8 != 0 || s.c_out % 8 != 0 || s.w_out < kMinWidth ||
      reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 != 0) {
    return false;
  }
  // 32-bit weight offsets (WeightStrides).
  if (static_cast<int64_t>(s.c_out) * s.c_in * s.kh * s.kw >= (int64_t{1} << 31)) return false;
  if (compute_capability_major(device) != 9) return false;
  const Rows16Shape r = make_rows16_shape(s, rows_per_strip(kDefaultRows));
  const size_t bytes =
      std::max(smem_bytes(r, Rows16Mode::kApply), smem_bytes(r, Rows16Mode::kGradOutW));
  return r.k_steps <= kMaxKSteps && bytes <= kMaxSmem &&
         bytes <= static_cast<size_t>(max_shared_memory_per_block(device));
#endif
}

bool conv_rows16_apply_supports(const ConvShape& s, const at::Tensor& x, int device) {
  return std::strcmp(forward_kernel_choice(), "rows-stats") != 0 &&
         conv_rows16_supports(s, x, device);
}

std::pair<at::Tensor, int> conv_rows16_stats(const ConvShape& s, const at::Tensor& x,
                                             const at::Tensor& w) {
  return rows16_partials<Rows16Mode::kStats>(s, x, w, GradTerms{});
}

void conv_rows16_apply(const ConvShape& s, const at::Tensor& x, const at::Tensor& w,
                       const BnFold& f, at::Tensor& out) {
  check_rows16_output(s, x, out);
  const Rows16Shape r = make_rows16_shape(s, rows_per_strip(kDefaultRows));
  run_rows16<Rows16Mode::kApply>(r, x, w, f, GradTerms{}, nullptr, &out, false);
}

bool conv_rows16_grad_supports(const ConvShape& s, const at::Tensor& x, const at::Tensor& grad,
                               int device) {
  return conv_rows16_apply_supports(s, x, device) && grad.scalar_type() == x.scalar_type() &&
         grad.is_contiguous(at::MemoryFormat::ChannelsLast) &&
         reinterpret_cast<uintptr_t>(grad.const_data_ptr()) % 16 == 0;
}

std::pair<at::Tensor, int> conv_rows16_grad_stats(const ConvShape& s, const at::Tensor& x,
                                                  const at::Tensor& w, const GradTerms& gt) {
  return rows16_partials<Rows16Mode::kGradStats>(s, x, w, gt);
}

void conv_rows16_grad_out(const ConvShape& s, const at::Tensor& x, const at::Tensor& w,
                          const GradTerms& gt, at::Tensor& g_hat) {
  check_rows16_output(s, x, g_hat);
  const Rows16Shape r = make_rows16_shape(s, rows_per_strip(kDefaultRows));
  run_rows16<Rows16Mode::kGradOut>(r, x, w, BnFold{}, gt, nullptr, &g_hat, false);
}

bool conv_rows16_weight_grad_fusable(const ConvShape& s) {
  return s.kh * s.kw * (s.c_in / 8) <= kMaxWChunks;
}

std::pair<at::Tensor, int> conv_rows16_grad_out_w(const ConvShape& s, const at::Tensor& x,
                                                  const at::Tensor& w, const GradTerms& gt,
                                                  at::Tensor& g_hat) {
  check_rows16_output(s, x, g_hat);
  TORCH_CHECK(conv_rows16_weight_grad_fusable(s),
              "fused_conv: the 16-bit row kernel's weight gradient takes at most ", kMaxWChunks,
              " chunks of 8 input channels per tap set, got ", s.kh * s.kw * (s.c_in / 8));
  const Rows16Shape r = make_rows16_shape(s, rows_per_strip(kDefaultRows));
  const int grid_x = run_rows16<Rows16Mode::kGradOutW>(r, x, w, BnFold{}, gt, nullptr, nullptr,
                                                       /*dry_run=*/true);
  const int64_t c_blocks = (s.c_out + kCo - 1) / kCo;
  const int64_t k_total = static_cast<int64_t>(s.kh) * s.kw * s.c_in;
  at::Tensor partials = at::empty({c_blocks, grid_x, kCo, k_total}, x.options().dtype(at::kFloat));
  run_rows16<Rows16Mode::kGradOutW>(r, x, w, BnFold{}, gt, partials.mutable_data_ptr<float>(),
                                    &g_hat, false);
  return {partials, grid_x};
}

}  // namespace fused_conv::cuda
