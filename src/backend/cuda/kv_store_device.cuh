// Quantize-on-write of one 32-element block of a KV cache row, shared by the KV store
// (attention.cu) and the fused RoPE + KV store (rope_kv_store.cu): the whole warp calls it, lane
// j holding element j. The scale rounds exactly as the scalar quantize_row does (q8_0: max|x| /
// 127; q4_0: the element of largest magnitude with its sign, the first one on ties, over -8).
#pragma once

#include "backend/cuda/cuda_common.cuh"
#include "format/quant/types.h"

namespace kestrel::backend::cuda {

template <quant::DType T>
__device__ __forceinline__ void store_kv_block(float x, int lane, uint8_t* row, int64_t b) {
  static_assert(T == quant::DType::Q8_0 || T == quant::DType::Q4_0);
  if constexpr (T == quant::DType::Q8_0) {
    const float amax = warp_max(fabsf(x));
    const __half dh = __float2half_rn(__fdiv_rn(amax, 127.0f));
    const float d = __half2float(dh);
    uint8_t* blk = row + 34 * b;
    if (lane == 0) *reinterpret_cast<__half*>(blk) = dh;  // blocks start at even offsets
    const float q = d == 0.0f ? 0.0f : fminf(fmaxf(roundf(__fdiv_rn(x, d)), -127.0f), 127.0f);
    blk[2 + lane] = static_cast<uint8_t>(static_cast<int8_t>(q));
  } else {
    // The signed element of largest magnitude, lowest lane on ties.
    float best = fabsf(x);
    int at = lane;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oa = __shfl_xor_sync(0xffffffffu, at, o);
      if (ob > best || (ob == best && oa < at)) {
        best = ob;
        at = oa;
      }
    }
    const float m = __shfl_sync(0xffffffffu, x, at);
    const __half dh = __float2half_rn(__fdiv_rn(m, -8.0f));
    const float d = __half2float(dh);
    uint8_t* blk = row + 18 * b;
    if (lane == 0) *reinterpret_cast<__half*>(blk) = dh;
    const int q =
        d == 0.0f ? 8 : static_cast<int>(fminf(fmaxf(roundf(__fdiv_rn(x, d)), -8.0f), 7.0f)) + 8;
    const int hi = __shfl_down_sync(0xffffffffu, q, 16);
    if (lane < 16) blk[2 + lane] = static_cast<uint8_t>(q | (hi << 4));
  }
}

}  // namespace kestrel::backend::cuda
