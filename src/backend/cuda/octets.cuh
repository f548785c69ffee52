// Octets: runs of 8 consecutive weights of a row (e0 a multiple of 8) of the types with fused
// kernels -- Q4_0 and Q8_0 (repacked by load_weight: quants apart from the fp16 scales) and F16.
// Consecutive threads take consecutive octets, so that loads of weights and activations and
// stores of f16 tiles are coalesced across the warp (a thread per 32-element slice strides its
// warp's accesses by 64-128 bytes and was bound by L1 wavefronts: 7.8 ms per decoded token).
// The raw bytes are loaded apart from their decoding so that a thread can have several loads in
// flight before it needs any.
#pragma once

#include "backend/cuda/cuda_common.cuh"
#include "format/quant/types.h"

namespace kestrel::backend::cuda {

using quant::DType;

constexpr bool has_octets(DType t) {
  return t == DType::Q4_0 || t == DType::Q8_0 || t == DType::F16;
}

// The raw bytes of an octet: F16 takes all 16 bytes; Q4_0 / Q8_0 keep 8 quant bytes in x, y
// and the fp16 scale's bits in z.
template <DType T>
__device__ __forceinline__ uint4 load_raw_octet(const uint8_t* qs, const __half* d, int64_t n_in,
                                                int64_t r, int64_t e0) {
  if constexpr (T == DType::F16) {
    return *reinterpret_cast<const uint4*>(qs + (r * n_in + e0) * 2);
  } else {
    const int64_t nb = n_in / 32, b = e0 / 32;
    const int o = static_cast<int>(e0 % 32);
    const uint2 q = T == DType::Q4_0
                        ? *reinterpret_cast<const uint2*>(qs + (r * nb + b) * 16 + (o % 16))
                        : *reinterpret_cast<const uint2*>(qs + (r * nb + b) * 32 + o);
    return make_uint4(q.x, q.y, __half_as_ushort(d[r * nb + b]), 0);
  }
}

template <DType T>
__device__ __forceinline__ void decode_raw_octet(const uint4& raw, int64_t e0, float* w) {
  if constexpr (T == DType::F16) {
    const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(h[i]);
      w[2 * i] = f.x;
      w[2 * i + 1] = f.y;
    }
  } else {
    const float scale = __half2float(__ushort_as_half(static_cast<unsigned short>(raw.z)));
    const int shift = T == DType::Q4_0 && (e0 % 32) >= 16 ? 4 : 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint32_t word = i < 4 ? raw.x : raw.y;
      const int byte = static_cast<int>((word >> (8 * (i % 4))) & 255);
      w[i] = T == DType::Q4_0 ? static_cast<float>(((byte >> shift) & 15) - 8) * scale
                              : static_cast<float>(static_cast<int8_t>(byte)) * scale;
    }
  }
}

// The decoded octet as 8 halfs in one 16-byte word (for f16 tiles). Integer codes become halfs
// by bit placement: 0x6400 | m is the half 1024 + m, so two codes placed in the low mantissa
// bits of a half2 need one subtraction to become exact small integers, and one half2 multiply by
// the scale rounds (q - 8) * d (or q * d) to f16 exactly once, as the float path did -- at about
// a third of its instructions (the mid-batch kernel is bound by instruction issue).
template <DType T>
__device__ __forceinline__ uint4 octet_to_f16(const uint4& raw, int64_t e0) {
  if constexpr (T == DType::F16) {
    return raw;
  } else {
    const __half2 scale = __half2half2(__ushort_as_half(static_cast<unsigned short>(raw.z)));
    // 1024 + 8 (Q4_0: codes 0..15 around 8) or 1024 + 128 (Q8_0: int8 codes biased by 128).
    const __half2 offset = __half2half2(__ushort_as_half(T == DType::Q4_0 ? 0x6408 : 0x6480));
    const int shift = T == DType::Q4_0 && (e0 % 32) >= 16 ? 4 : 0;
    uint4 out;
    uint32_t* o = reinterpret_cast<uint32_t*>(&out);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t word = j < 2 ? raw.x : raw.y;
      // bytes 2j and 2j+1 of the octet into bits 0-7 and 16-23
      const uint32_t pair = __byte_perm(word, 0, j % 2 ? 0x4342 : 0x4140);
      const uint32_t bits = T == DType::Q4_0 ? ((pair >> shift) & 0x000F000Fu) | 0x64006400u
                                             : (pair ^ 0x00800080u) | 0x64006400u;
      __half2 h;
      memcpy(&h, &bits, 4);
      h = __hmul2(__hsub2(h, offset), scale);
      memcpy(o + j, &h, 4);
    }
    return out;
  }
}

}  // namespace kestrel::backend::cuda
