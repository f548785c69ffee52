// The pieces of the tensor-core attention kernels (attention_mma.cu for prompt chunks,
// attention_tc16.cu for micro-batches) that are the same in both: f16 packing of f32 pairs
// (with the rounding error as a second part), shared-memory fragment loads, and the online
// softmax step of mma.sync m16n8k16 accumulators. A thread holds rows g = lane / 4 and g + 8 of
// a 16-row tile and, in an accumulator fragment of 8 columns, columns 2c and 2c + 1 (c = lane % 4).
#pragma once

#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

namespace kestrel::backend::cuda {

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);  // .x (the low 16 bits) = lo
  uint32_t u;
  memcpy(&u, &h, 4);
  return u;
}

// The f16 rounding errors of a and b (x - f16(x)), packed as pack_half2 packs them.
__device__ __forceinline__ uint32_t pack_half2_lo(float a, float b) {
  return pack_half2(a - __half2float(__float2half_rn(a)), b - __half2float(__float2half_rn(b)));
}

__device__ __forceinline__ uint32_t shared_word(const __half* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// The B fragments (k = 2c, 2c+1 and 2c+8, 2c+9; n = g) of a row-major [k][n] tile at p (row
// stride `stride` halfs), rows k = 0..15, columns n = 0..7: ldmatrix transposing 8 x 8 blocks.
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t& b0, uint32_t& b1, const __half* p) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(b0), "=r"(b1)
               : "r"(addr));
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// One online-softmax step for the thread's two rows (g: e = 0, 1; g + 8: e = 2, 3) over a key
// tile's scores s (already in log2 units, masked keys -inf): p = 2^(s - m) in place, the running
// max m, the thread's share of the row sums l, and the output rows rescaled.
template <int kNJ, int kNO>
__device__ __forceinline__ void softmax_step(float (&s)[kNJ][4], float (&m)[2], float (&l)[2],
                                             float (&o)[kNO][4]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < kNJ; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
    const float m_new = fmaxf(m[r], quad_max(mx));
    // A row that has seen no key yet keeps m = -inf: subtract 0 instead, so that every p is 0.
    const float base = m_new == -INFINITY ? 0.0f : m_new;
    const float alpha = exp2f(m[r] - base);  // 0 while m was -inf
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < kNJ; ++j) {
      s[j][2 * r] = exp2f(s[j][2 * r] - base);
      s[j][2 * r + 1] = exp2f(s[j][2 * r + 1] - base);
      sum += s[j][2 * r] + s[j][2 * r + 1];
    }
    l[r] = l[r] * alpha + sum;
    m[r] = m_new;
#pragma unroll
    for (int n = 0; n < kNO; ++n) {
      o[n][2 * r] *= alpha;
      o[n][2 * r + 1] *= alpha;
    }
  }
}

}  // namespace kestrel::backend::cuda
