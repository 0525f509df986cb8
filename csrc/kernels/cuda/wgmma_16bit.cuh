// Hopper warpgroup MMA on float16 / bfloat16 operands with float32
// accumulation, both operands from shared memory (K-major core matrices of
// 8 rows x 16 bytes = 8 values of K), for the 16-bit row kernels
// (conv_rows16.cu, grad_input_rows16.cu); and stmatrix / ldmatrix, which store / load 8x8 16-bit
// tiles of an MMA fragment to / from shared memory (transposed on request) for
// its epilogues; the descriptor, copy and packing helpers both kernels use.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "kernels/cuda/wgmma_tf32.cuh"

namespace fused_conv::cuda {

#if FUSED_CONV_WGMMA
// A K-major descriptor from a shared-memory address (see wgmma_desc_k_major).
__device__ __forceinline__ uint64_t desc_at(uint32_t addr, uint32_t lead_bytes,
                                            uint32_t stride_bytes) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) |
         static_cast<uint64_t>((lead_bytes & 0x3FFFF) >> 4) << 16 |
         static_cast<uint64_t>((stride_bytes & 0x3FFFF) >> 4) << 32;
}

// An MN-major (transposed) operand's descriptor from the byte distances between
// core matrices adjacent in K and in M (or N). Without swizzling the leading
// byte offset is taken to be the K distance, as for K-major operands;
// docs/checks/wgmma_transpose_probe.cu tells on the device, and this constant
// is the one place to change if it says otherwise.
constexpr bool kMnMajorLeadIsK = true;
__device__ __forceinline__ uint64_t desc_mn_major(uint32_t addr, uint32_t k_bytes,
                                                  uint32_t mn_bytes) {
  return kMnMajorLeadIsK ? desc_at(addr, k_bytes, mn_bytes) : desc_at(addr, mn_bytes, k_bytes);
}

// A descriptor's two 32-bit words. The low word's start-address field (bits
// 0-13, in 16-byte units) holds any shared-memory address (< 256 KB) without
// overflow, so an operand offset by a multiple of 16 bytes is one 32-bit add to
// the low word: desc_words(addr + 16 k) = {lo + k, hi}.
struct DescWords {
  uint32_t lo, hi;
};
__device__ __forceinline__ DescWords desc_mn_major_words(uint32_t addr, uint32_t k_bytes,
                                                         uint32_t mn_bytes) {
  const uint64_t d = desc_mn_major(addr, k_bytes, mn_bytes);
  return {static_cast<uint32_t>(d), static_cast<uint32_t>(d >> 32)};
}
__device__ __forceinline__ uint64_t desc_join(uint32_t lo, uint32_t hi) {
  return static_cast<uint64_t>(hi) << 32 | lo;
}

// A 16-byte asynchronous copy global -> shared, zeros when !valid (src is
// then not read).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0));
}

// Two floats rounded to T (nearest) and packed, lo in the low half (the
// element order of an MMA fragment's register); unpack_pair undoes it.
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

template <typename T>
__device__ __forceinline__ float2 unpack_pair(uint32_t v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
  } else {
    return __half22float2(*reinterpret_cast<const __half2*>(&v));
  }
}

// The 64 accumulator operands %0..%63 of an m64n128 f32 fragment, d[j][e] =
// {D[g][8j+2t], D[g][8j+2t+1], D[g+8][8j+2t], D[g+8][8j+2t+1]} per warp.
#define FUSED_CONV_D128_OPERANDS(d)                                                               \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]),       \
      "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),   \
      "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]),   \
      "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),   \
      "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]),   \
      "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),   \
      "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), \
      "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]),             \
      "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]),             \
      "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]),             \
      "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]),             \
      "+f"(d[15][2]), "+f"(d[15][3])
#define FUSED_CONV_D128_LIST                                                         \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "          \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

// D(64 x 128) = A(64 x 16) * B(16 x 128) + (accumulate ? D : 0), A and B
// K-major in shared memory (no transpose), T = __half or __nv_bfloat16.
template <typename T>
__device__ __forceinline__ void wgmma_16bit_ss_n128(float (&d)[16][4], uint64_t a_desc,
                                                    uint64_t b_desc, int accumulate) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " FUSED_CONV_D128_LIST
        ", %64, %65, p, 1, 1, 0, 0;\n}\n"
        : FUSED_CONV_D128_OPERANDS(d)
        : "l"(a_desc), "l"(b_desc), "r"(accumulate));
  } else {
    static_assert(std::is_same_v<T, __half>, "float16 or bfloat16 operands");
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " FUSED_CONV_D128_LIST
        ", %64, %65, p, 1, 1, 0, 0;\n}\n"
        : FUSED_CONV_D128_OPERANDS(d)
        : "l"(a_desc), "l"(b_desc), "r"(accumulate));
  }
}
#undef FUSED_CONV_D128_OPERANDS
#undef FUSED_CONV_D128_LIST

// D(64 x 32) = A(64 x 16) * B(16 x 32) + (accumulate ? D : 0), both K-major
// in shared memory; d[j] = {D[16w+g][8j+2t], D[16w+g][8j+2t+1],
// D[16w+g+8][8j+2t], D[16w+g+8][8j+2t+1]} for lane (g, t) of warp w.
#define FUSED_CONV_D32_OPERANDS(d)                                                              \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]),     \
      "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), \
      "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3])
#define FUSED_CONV_D32_LIST "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}"
template <typename T>
__device__ __forceinline__ void wgmma_16bit_ss_n32(float (&d)[4][4], uint64_t a_desc,
                                                   uint64_t b_desc, int accumulate) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 " FUSED_CONV_D32_LIST
        ", %16, %17, p, 1, 1, 0, 0;\n}\n"
        : FUSED_CONV_D32_OPERANDS(d)
        : "l"(a_desc), "l"(b_desc), "r"(accumulate));
  } else {
    static_assert(std::is_same_v<T, __half>, "float16 or bfloat16 operands");
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 " FUSED_CONV_D32_LIST
        ", %16, %17, p, 1, 1, 0, 0;\n}\n"
        : FUSED_CONV_D32_OPERANDS(d)
        : "l"(a_desc), "l"(b_desc), "r"(accumulate));
  }
}
#undef FUSED_CONV_D32_OPERANDS
#undef FUSED_CONV_D32_LIST

// D(64 x 8N) += A(64 x 16) * B(16 x 8N) with both operands MN-major in shared
// memory (the transpose flags set): A's core matrices are 8 rows of K, each 16
// bytes = 8 consecutive values of M, and B's likewise 8 rows of K with 8
// values of N. For the weight gradient, where M = output channels and N =
// input channels are the contiguous dimensions of the staged g_hat and input.
// Their descriptors come from desc_mn_major.
// d[j] = {D[16w+g][8j+2t], D[16w+g][8j+2t+1], D[16w+g+8][8j+2t],
// D[16w+g+8][8j+2t+1]} for lane (g, t) of warp w: per 8 columns the fragment
// of an m16n8 mma.sync.
template <typename T>
__device__ __forceinline__ void wgmma_16bit_ss_n8_mn_major(float (&d)[4], uint64_t a_desc,
                                                           uint64_t b_desc) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {%0, %1, %2, %3}, %4, %5, p, 1, 1, 1, "
        "1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "l"(a_desc), "l"(b_desc));
  } else {
    static_assert(std::is_same_v<T, __half>, "float16 or bfloat16 operands");
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n8k16.f32.f16.f16 {%0, %1, %2, %3}, %4, %5, p, 1, 1, 1, "
        "1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "l"(a_desc), "l"(b_desc));
  }
}
#define FUSED_CONV_D24_OPERANDS(d0, d1, d2)                                                  \
  "+f"(d0[0]), "+f"(d0[1]), "+f"(d0[2]), "+f"(d0[3]), "+f"(d1[0]), "+f"(d1[1]), "+f"(d1[2]), \
      "+f"(d1[3]), "+f"(d2[0]), "+f"(d2[1]), "+f"(d2[2]), "+f"(d2[3])
#define FUSED_CONV_D24_LIST "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11}"
// As wgmma_16bit_ss_n8_mn_major with N = 24, its three 8-column groups in d0, d1, d2.
template <typename T>
__device__ __forceinline__ void wgmma_16bit_ss_n24_mn_major(float (&d0)[4], float (&d1)[4],
                                                            float (&d2)[4], uint64_t a_desc,
                                                            uint64_t b_desc) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n24k16.f32.bf16.bf16 " FUSED_CONV_D24_LIST
        ", %12, %13, p, 1, 1, 1, 1;\n}\n"
        : FUSED_CONV_D24_OPERANDS(d0, d1, d2)
        : "l"(a_desc), "l"(b_desc));
  } else {
    static_assert(std::is_same_v<T, __half>, "float16 or bfloat16 operands");
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n24k16.f32.f16.f16 " FUSED_CONV_D24_LIST
        ", %12, %13, p, 1, 1, 1, 1;\n}\n"
        : FUSED_CONV_D24_OPERANDS(d0, d1, d2)
        : "l"(a_desc), "l"(b_desc));
  }
}
#undef FUSED_CONV_D24_OPERANDS
#undef FUSED_CONV_D24_LIST

// Stores four 8x8 16-bit matrices, transposed: register r[m] of lane l holds
// M_m[l / 4][2 (l % 4)], M_m[l / 4][2 (l % 4) + 1] (an MMA fragment), and row
// i of M_m^T (= column i of M_m, 16 bytes) goes to the address that lane
// 8m + i supplies.
__device__ __forceinline__ void stmatrix_x4_trans(uint32_t smem_addr, uint32_t r0, uint32_t r1,
                                                  uint32_t r2, uint32_t r3) {
  asm volatile(
      "stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(smem_addr),
      "r"(r0), "r"(r1), "r"(r2), "r"(r3)
      : "memory");
}
// The inverse: loads four 8x8 16-bit matrices whose rows (16 bytes each) lie at
// the addresses lanes 8m + i supply, transposed into fragments: register r[m]
// of lane l gets M_m^T[l / 4][2 (l % 4)], M_m^T[l / 4][2 (l % 4) + 1], where
// row i of M_m is the 16 bytes at lane 8m + i's address.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t smem_addr, uint32_t& r0, uint32_t& r1,
                                                  uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(smem_addr)
               : "memory");
}
#endif  // FUSED_CONV_WGMMA

}  // namespace fused_conv::cuda
