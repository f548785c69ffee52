// Shared by the kernels that decode Q4_0 / Q8_0 weights straight into mma.sync fragments
// (matmul_frag_v2.cu, matmul_mma.cu): the m16n8k16 f16 product and the code-to-f16 decoding.
#pragma once

#include "backend/cuda/cuda_common.cuh"
#include "format/quant/types.h"

namespace kestrel::backend::cuda {

// c += a . b on the tensor cores (m16n8k16, f16 inputs, f32 accumulators).
__device__ __forceinline__ void mma_16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two codes (bits 0-7 and 16-23 of `pair`) as the half2 (q - offset) * d.
template <quant::DType T>
__device__ __forceinline__ uint32_t codes_to_half2(uint32_t pair, __half2 d) {
  const uint32_t bits = T == quant::DType::Q4_0 ? (pair & 0x000F000Fu) | 0x64006400u
                                                : (pair ^ 0x00800080u) | 0x64006400u;
  // 0x6400 | m is the half 1024 + m: subtract 1024 + 8 (Q4_0) or 1024 + 128 (Q8_0, biased).
  const __half2 offset = __half2half2(__ushort_as_half(T == quant::DType::Q4_0 ? 0x6408 : 0x6480));
  __half2 h;
  memcpy(&h, &bits, 4);
  h = __hmul2(__hsub2(h, offset), d);
  uint32_t out;
  memcpy(&out, &h, 4);
  return out;
}

}  // namespace kestrel::backend::cuda
