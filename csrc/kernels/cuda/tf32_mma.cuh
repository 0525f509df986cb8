// Tensor-core building blocks: TF32 rounding/splitting and the m16n8k8 TF32 MMA.
//
// 3xTF32: a float x is split into big = tf32(x) and small = tf32(x - big), so
// x*y ~= big_x*big_y + big_x*small_y + small_x*big_y with a relative error near
// 2^-21 (the dropped small*small term and the rounding of small), i.e. float32
// accuracy at tensor-core rates. Float16/bfloat16 values are exact in TF32, so
// one MMA per product is exact for them.
#pragma once

#include <cstdint>

namespace fused_conv::cuda {

__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

// big/small halves of the 3xTF32 split, as the bit patterns the MMA consumes.
// It sits in the conv's inner loop, so it is three integer/float instructions
// rather than two cvt.rna.tf32 (each emulated on sm_90 with an Inf test):
//   big   = x rounded to TF32 (nearest, ties away) by adding half of the dropped
//           13-bit field and masking it off;
//   small = x - big, exact in float32 and passed unrounded: the tensor core reads
//           only the top 19 bits of a TF32 operand, i.e. truncates small, an error
//           below 2^-10 * |small| <= 2^-21 * |x|.
// Inf and NaN still reach the result: x = Inf gives big = Inf; a NaN gives a NaN
// in big or, where the carry wraps its pattern (0x7fffffff), in small.
__device__ __forceinline__ void split_tf32(float x, uint32_t& big, uint32_t& small) {
  big = (__float_as_uint(x) + 0x1000u) & 0xFFFFE000u;
  small = __float_as_uint(x - __uint_as_float(big));
}

// D += A(16x8, row) * B(8x8, col), fp32 accumulate. Fragment ownership, with
// g = lane / 4 and t = lane % 4 (PTX ISA, mma.m16n8k8 .tf32):
//   a0 = A[g][t], a1 = A[g+8][t], a2 = A[g][t+4], a3 = A[g+8][t+4]
//   b0 = B[t][g], b1 = B[t+4][g]
//   d0 = D[g][2t], d1 = D[g][2t+1], d2 = D[g+8][2t], d3 = D[g+8][2t+1]
__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  // Not volatile: a pure function of its operands, so the compiler may schedule
  // shared-memory loads of the next k-step around it.
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 4-byte asynchronous global->shared copy; src_bytes = 0 writes a zero (conv padding).
__device__ __forceinline__ void cp_async_f32(float* smem_dst, const float* gmem_src, bool valid) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  const int src_bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(gmem_src),
               "r"(src_bytes));
}

// kVec-float (4, 2 or 1) asynchronous copy; a zero vector where !valid (padding).
// The addresses are aligned to the vector.
template <int kVec>
__device__ __forceinline__ void cp_async_vec(float* smem_dst, const float* gmem_src, bool valid) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  if constexpr (kVec == 4) {  // 16 bytes may bypass L1 (.cg): streamed data
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src),
                 "r"(valid ? 16 : 0));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst), "l"(gmem_src),
                 "n"(4 * kVec), "r"(valid ? 4 * kVec : 0));
  }
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

}  // namespace fused_conv::cuda
