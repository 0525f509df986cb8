// Device probe: what the leading / stride byte offsets (LBO / SBO) of a
// no-swizzle shared-memory descriptor mean when a 16-bit wgmma operand is
// MN-major (the transpose flag set). The weight gradient on warpgroup MMAs
// (benchmarks/NOTES.md, twelfth session) needs one MN-major operand, and
// getting the meaning wrong gives silently wrong products.
//
//   nvcc -std=c++17 -gencode arch=compute_90a,code=sm_90a
//        -o /tmp/wgmma_probe docs/checks/wgmma_transpose_probe.cu    (one line)
//   /tmp/wgmma_probe
//
// One warpgroup computes D(64 x 8) = A(64 x 16) * B(16 x 8) in bfloat16 with
// float32 accumulation, from small integers (exact in bfloat16 and float32),
// for each operand layout and each reading of LBO / SBO, and prints which
// readings reproduce the host product exactly; then the weight gradient's own
// pattern (strip_kernel) the same way.
//
// Core matrices (no swizzle) are 8 x 8 values in 128 contiguous bytes:
//   K-major:  8 rows of M (or N), each 16 bytes = 8 consecutive K values;
//   MN-major: 8 rows of K, each 16 bytes = 8 consecutive M (or N) values.
// The probe places core matrices at byte stride `mn_stride` along M/N and
// `k_stride` along K (two different numbers), then tries the descriptor with
// (LBO, SBO) = (k_stride, mn_stride) and (mn_stride, k_stride).
#include <cuda_bf16.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

constexpr int kM = 64, kN = 8, kK = 16;
constexpr int kSmemBytes = 16384;

__device__ uint64_t make_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) |
         static_cast<uint64_t>((lbo & 0x3FFFF) >> 4) << 16 |
         static_cast<uint64_t>((sbo & 0x3FFFF) >> 4) << 32;
}

// Copies the two operand images (bytes, built on the host) into the two
// halves of shared memory, visible to wgmma; returns their shared addresses.
__device__ uint2 stage_operands(const uint8_t* a_img, int a_bytes, const uint8_t* b_img,
                                int b_bytes) {
  extern __shared__ __align__(128) uint8_t smem[];
  for (int i = threadIdx.x; i < a_bytes; i += blockDim.x) smem[i] = a_img[i];
  for (int i = threadIdx.x; i < b_bytes; i += blockDim.x) smem[kSmemBytes / 2 + i] = b_img[i];
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
  const auto base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  return make_uint2(base, base + kSmemBytes / 2);
}

// a_img / b_img: the operands' shared-memory images (bytes), built on the host.
template <int kTransA, int kTransB>
__global__ void probe_kernel(const uint8_t* a_img, int a_bytes, uint32_t a_lbo, uint32_t a_sbo,
                             const uint8_t* b_img, int b_bytes, uint32_t b_lbo, uint32_t b_sbo,
                             float* d_out) {
  const uint2 addr = stage_operands(a_img, a_bytes, b_img, b_bytes);
  const uint64_t da = make_desc(addr.x, a_lbo, a_sbo);
  const uint64_t db = make_desc(addr.y, b_lbo, b_sbo);
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 0, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3}, %4, %5, p, 1, 1, %6, %7;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "l"(da), "l"(db), "n"(kTransA), "n"(kTransB));
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  // Accumulator fragment of m64nN: warp w, lane l hold rows 16w + l/4 (+8),
  // columns 2(l%4) (+1).
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = 16 * warp + lane / 4, c = 2 * (lane % 4);
  d_out[r * kN + c] = d[0];
  d_out[r * kN + c + 1] = d[1];
  d_out[(r + 8) * kN + c] = d[2];
  d_out[(r + 8) * kN + c + 1] = d[3];
}

uint16_t to_bf16_bits(float v) {  // exact for the small integers used here
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return static_cast<uint16_t>(u >> 16);
}

// Byte image of an R x C operand (R = M or N, C = K) in core matrices placed
// at mn_stride (per 8 of R) and k_stride (per 8 of K); k_major picks the
// orientation inside a core matrix.
std::vector<uint8_t> image(const std::vector<float>& v, int rows, int cols, bool k_major,
                           int mn_stride, int k_stride, int bytes) {
  std::vector<uint8_t> img(bytes, 0);
  for (int r = 0; r < rows; ++r) {
    for (int k = 0; k < cols; ++k) {
      const int core = (r / 8) * mn_stride + (k / 8) * k_stride;
      const int inside = k_major ? (r % 8) * 16 + (k % 8) * 2 : (k % 8) * 16 + (r % 8) * 2;
      const uint16_t bits = to_bf16_bits(v[r * cols + k]);
      std::memcpy(&img[core + inside], &bits, 2);
    }
  }
  return img;
}

#define CHECK(call)                                                                       \
  do {                                                                                    \
    cudaError_t e = (call);                                                               \
    if (e != cudaSuccess) {                                                               \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e), __FILE__, __LINE__); \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

template <int kTransA, int kTransB>
bool run(const char* name, const std::vector<float>& a, const std::vector<float>& b,
         const std::vector<float>& want, bool swap_a, bool swap_b) {
  // A is M x K (64 x 16), B is stored as N x K (8 x 16): both "rows x K".
  // Distinct strides, no overlap: M groups at 256-byte steps fill [0, 2048);
  // the second K group starts at 2176.
  const int a_mn = 256, a_k = 2176;
  const int b_mn = 512, b_k = 256;
  const int a_bytes = (kM / 8 - 1) * a_mn + a_k + 128;
  const int b_bytes = (kN / 8 - 1) * b_mn + b_k + 128;
  const auto a_img = image(a, kM, kK, kTransA == 0, a_mn, a_k, a_bytes);
  const auto b_img = image(b, kN, kK, kTransB == 0, b_mn, b_k, b_bytes);
  uint8_t *a_d, *b_d;
  float* d_d;
  CHECK(cudaMalloc(&a_d, a_bytes));
  CHECK(cudaMalloc(&b_d, b_bytes));
  CHECK(cudaMalloc(&d_d, kM * kN * sizeof(float)));
  CHECK(cudaMemcpy(a_d, a_img.data(), a_bytes, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(b_d, b_img.data(), b_bytes, cudaMemcpyHostToDevice));
  CHECK(cudaMemset(d_d, 0xFF, kM * kN * sizeof(float)));  // NaN until written
  const uint32_t a_lbo = swap_a ? a_mn : a_k, a_sbo = swap_a ? a_k : a_mn;
  const uint32_t b_lbo = swap_b ? b_mn : b_k, b_sbo = swap_b ? b_k : b_mn;
  CHECK(cudaFuncSetAttribute(probe_kernel<kTransA, kTransB>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  probe_kernel<kTransA, kTransB>
      <<<1, 128, kSmemBytes>>>(a_d, a_bytes, a_lbo, a_sbo, b_d, b_bytes, b_lbo, b_sbo, d_d);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  std::vector<float> got(kM * kN);
  CHECK(cudaMemcpy(got.data(), d_d, got.size() * sizeof(float), cudaMemcpyDeviceToHost));
  int bad = 0;
  for (int i = 0; i < kM * kN; ++i) bad += !(got[i] == want[i]);
  std::printf("%-28s A %s (LBO=%s)  B %s (LBO=%s): %s (%d of %d wrong)\n", name,
              kTransA ? "MN-major" : "K-major ", swap_a ? "MN stride" : "K stride ",
              kTransB ? "MN-major" : "K-major ", swap_b ? "MN stride" : "K stride ",
              bad ? "no " : "YES", bad, kM * kN);
  CHECK(cudaFree(a_d));
  CHECK(cudaFree(b_d));
  CHECK(cudaFree(d_d));
  return bad == 0;
}

// The weight gradient's own pattern (conv_rows16.cu, kGradOutW): A = g_hat as
// MN-major core matrices (channel groups 128 bytes apart, pixel groups 1 KB
// apart), B = an input strip of pixels 16 bytes apart, 8 channels each, read
// as N = 24 for three tap columns one pixel (16 bytes) apart, so that the three
// N groups' core matrices overlap. D[m][8q + e] = sum_k A[m][k] * x[k + q][e].
__global__ void strip_kernel(const uint8_t* a_img, int a_bytes, const uint8_t* x_img, int x_bytes,
                             bool swap, float* d_out) {
  const uint2 addr = stage_operands(a_img, a_bytes, x_img, x_bytes);
  // (K distance, MN distance) as (LBO, SBO), or swapped.
  const uint64_t da = swap ? make_desc(addr.x, 128, 1024) : make_desc(addr.x, 1024, 128);
  const uint64_t db = swap ? make_desc(addr.y, 16, 128) : make_desc(addr.y, 128, 16);
  float d[12] = {};
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 0, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n24k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11}, %12, %13, p, 1, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11])
      : "l"(da), "l"(db));
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = 16 * warp + lane / 4, c = 2 * (lane % 4);
  for (int j = 0; j < 3; ++j) {
    d_out[r * 24 + 8 * j + c] = d[4 * j];
    d_out[r * 24 + 8 * j + c + 1] = d[4 * j + 1];
    d_out[(r + 8) * 24 + 8 * j + c] = d[4 * j + 2];
    d_out[(r + 8) * 24 + 8 * j + c + 1] = d[4 * j + 3];
  }
}

bool run_strip(const std::vector<float>& a, bool swap) {
  // A (64 x 16): element (m, k) at (k / 8) * 1024 + (m / 8) * 128 + (k % 8) * 16 + (m % 8) * 2.
  const int a_bytes = 2048;
  std::vector<uint8_t> a_img(a_bytes, 0);
  for (int m = 0; m < kM; ++m) {
    for (int k = 0; k < kK; ++k) {
      const uint16_t bits = to_bf16_bits(a[m * kK + k]);
      std::memcpy(&a_img[(k / 8) * 1024 + (m / 8) * 128 + (k % 8) * 16 + (m % 8) * 2], &bits, 2);
    }
  }
  // The strip: 18 pixels (16 + two more tap columns) x 8 channels.
  const int pixels = kK + 2, x_bytes = pixels * 16;
  std::vector<float> x(pixels * 8);
  std::vector<uint8_t> x_img(x_bytes, 0);
  for (int px = 0; px < pixels; ++px) {
    for (int e = 0; e < 8; ++e) {
      x[px * 8 + e] = static_cast<float>((px * 3 + e * 5) % 11 - 5);
      const uint16_t bits = to_bf16_bits(x[px * 8 + e]);
      std::memcpy(&x_img[px * 16 + e * 2], &bits, 2);
    }
  }
  std::vector<float> want(kM * 24, 0.f);
  for (int m = 0; m < kM; ++m)
    for (int n = 0; n < 24; ++n)
      for (int k = 0; k < kK; ++k) want[m * 24 + n] += a[m * kK + k] * x[(k + n / 8) * 8 + n % 8];
  uint8_t *a_d, *x_d;
  float* d_d;
  CHECK(cudaMalloc(&a_d, a_bytes));
  CHECK(cudaMalloc(&x_d, x_bytes));
  CHECK(cudaMalloc(&d_d, kM * 24 * sizeof(float)));
  CHECK(cudaMemcpy(a_d, a_img.data(), a_bytes, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(x_d, x_img.data(), x_bytes, cudaMemcpyHostToDevice));
  CHECK(cudaMemset(d_d, 0xFF, kM * 24 * sizeof(float)));
  strip_kernel<<<1, 128, kSmemBytes>>>(a_d, a_bytes, x_d, x_bytes, swap, d_d);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  std::vector<float> got(kM * 24);
  CHECK(cudaMemcpy(got.data(), d_d, got.size() * sizeof(float), cudaMemcpyDeviceToHost));
  int bad = 0;
  for (int i = 0; i < kM * 24; ++i) bad += !(got[i] == want[i]);
  std::printf("%-28s m64n24k16, both MN-major, LBO = %s: %s (%d of %d wrong)\n",
              "weight-gradient pattern", swap ? "MN stride" : "K stride ", bad ? "no " : "YES", bad,
              kM * 24);
  CHECK(cudaFree(a_d));
  CHECK(cudaFree(x_d));
  CHECK(cudaFree(d_d));
  return bad == 0;
}

}  // namespace

int main() {
  std::vector<float> a(kM * kK), b(kN * kK), want(kM * kN, 0.f);
  for (int m = 0; m < kM; ++m)
    for (int k = 0; k < kK; ++k) a[m * kK + k] = static_cast<float>((m * 7 + k * 3) % 9 - 4);
  for (int n = 0; n < kN; ++n)
    for (int k = 0; k < kK; ++k) b[n * kK + k] = static_cast<float>((n * 5 + k * 11) % 7 - 3);
  for (int m = 0; m < kM; ++m)
    for (int n = 0; n < kN; ++n)
      for (int k = 0; k < kK; ++k) want[m * kN + n] += a[m * kK + k] * b[n * kK + k];
  // The first line is the layout the project's kernels already use (a control).
  run<0, 0>("control", a, b, want, false, false);
  run<1, 0>("A transposed", a, b, want, false, false);
  run<1, 0>("A transposed", a, b, want, true, false);
  run<0, 1>("B transposed", a, b, want, false, false);
  run<0, 1>("B transposed", a, b, want, false, true);
  run<1, 1>("both transposed", a, b, want, false, false);
  run<1, 1>("both transposed", a, b, want, true, true);
  run_strip(a, false);
  run_strip(a, true);
  return 0;
}
