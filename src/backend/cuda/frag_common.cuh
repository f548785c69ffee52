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

// Two code bytes of `word` (bytes kSel & 0xF and (kSel >> 8) & 0xF: selector 0x5150 takes bytes
// 0 and 1, 0x5352 bytes 2 and 3) as the half2 (q - offset) * d. The byte permute places them in
// the low bytes of two halves whose high bytes come from 0x6400 (0x6400 | m is the half 1024 +
// m), so that one more logic op (Q4_0: mask the low nibble; Q8_0: bias the signed code) gives
// the bits: one LOP3 takes one immediate, and "(pair & mask) | 0x64006400" on a zero-extended
// pair compiled to two (64 more instructions a step in the 16-token kernel, cuobjdump).
// magic: 0x64006400 passed in by the caller from a kernel argument (FragV2Args::half2_magic): as a
// literal, ptxas kept it in a uniform register and copied it before every permute.
template <quant::DType T, uint32_t kSel>
__device__ __forceinline__ uint32_t codes_to_half2(uint32_t word, uint32_t magic, __half2 d) {
  const uint32_t placed = __byte_perm(word, magic, kSel);
  const uint32_t bits = T == quant::DType::Q4_0 ? placed & 0x640F640Fu : placed ^ 0x00800080u;
  // Subtract 1024 + 8 (Q4_0: codes 0..15 around 8) or 1024 + 128 (Q8_0, biased).
  const __half2 offset = __half2half2(__ushort_as_half(T == quant::DType::Q4_0 ? 0x6408 : 0x6480));
  __half2 h;
  memcpy(&h, &bits, 4);
  h = __hmul2(__hsub2(h, offset), d);
  uint32_t out;
  memcpy(&out, &h, 4);
  return out;
}

}  // namespace kestrel::backend::cuda
