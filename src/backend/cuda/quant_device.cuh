// Device decoding of every block format Kestrel supports (the layouts of format/quant/quant.h,
// bit for bit): slice s of a row -- elements 32s .. 32s + 31 -- into 32 floats. Used by the
// generic matmul paths (dequantize to f16 for tensor-core GEMMs, the small-batch kernel), by
// embedding lookups and by attention reading quantized KV rows. The scalar references in
// format/quant are the definition these are tested against (tests/backend_ops/test_gpu_ops*).
#pragma once

#include "backend/cuda/cuda_common.cuh"
#include "format/quant/quant.h"

namespace kestrel::backend::cuda {

using quant::DType;

// Bytes and elements of one block of each type, for device code.
template <DType T>
struct BlockOf;
template <>
struct BlockOf<DType::F32> {
  static constexpr int elems = 1, bytes = 4;
};
template <>
struct BlockOf<DType::F16> {
  static constexpr int elems = 1, bytes = 2;
};
template <>
struct BlockOf<DType::BF16> {
  static constexpr int elems = 1, bytes = 2;
};
template <>
struct BlockOf<DType::Q4_0> {
  static constexpr int elems = 32, bytes = 18;
};
template <>
struct BlockOf<DType::Q4_1> {
  static constexpr int elems = 32, bytes = 20;
};
template <>
struct BlockOf<DType::Q8_0> {
  static constexpr int elems = 32, bytes = 34;
};
template <>
struct BlockOf<DType::Q5_0> {
  static constexpr int elems = 32, bytes = 22;
};
template <>
struct BlockOf<DType::Q5_1> {
  static constexpr int elems = 32, bytes = 24;
};
template <>
struct BlockOf<DType::Q4_K> {
  static constexpr int elems = 256, bytes = 144;
};
template <>
struct BlockOf<DType::Q5_K> {
  static constexpr int elems = 256, bytes = 176;
};
template <>
struct BlockOf<DType::Q6_K> {
  static constexpr int elems = 256, bytes = 210;
};

__device__ __forceinline__ uint16_t load_u16(const uint8_t* p) {
  return static_cast<uint16_t>(p[0] | (p[1] << 8));
}
__device__ __forceinline__ float load_half(const uint8_t* p) {
  return half_bits_to_float(load_u16(p));
}

// 6-bit scale and min j of a K-quant superblock's 12 packed bytes.
__device__ __forceinline__ void k_scale_min(const uint8_t* s, int j, int* sc, int* mn) {
  if (j < 4) {
    *sc = s[j] & 63;
    *mn = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
    *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Elements 32s .. 32s+31 of `row` (row-major GGUF bytes of type T) into out[32].
template <DType T>
__device__ __forceinline__ void decode_slice(const uint8_t* row, int64_t s, float* out) {
  // The float types' slices are 16-byte aligned (rows of a multiple of 32 elements in
  // cudaMalloc'd buffers): vector loads.
  if constexpr (T == DType::F32) {
    const float4* p = reinterpret_cast<const float4*>(row) + 8 * s;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float4 v = p[i];
      out[4 * i] = v.x;
      out[4 * i + 1] = v.y;
      out[4 * i + 2] = v.z;
      out[4 * i + 3] = v.w;
    }
  } else if constexpr (T == DType::F16 || T == DType::BF16) {
    const uint4* p = reinterpret_cast<const uint4*>(row + 64 * s);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint4 v = p[i];
      const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint16_t lo = words[j] & 0xffff, hi = words[j] >> 16;
        if constexpr (T == DType::F16) {
          out[8 * i + 2 * j] = half_bits_to_float(lo);
          out[8 * i + 2 * j + 1] = half_bits_to_float(hi);
        } else {
          out[8 * i + 2 * j] = __uint_as_float(static_cast<uint32_t>(lo) << 16);
          out[8 * i + 2 * j + 1] = __uint_as_float(static_cast<uint32_t>(hi) << 16);
        }
      }
    }
  } else if constexpr (T == DType::Q4_0) {
    const uint8_t* b = row + 18 * s;
    const float d = load_half(b);
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      out[i] = static_cast<float>((b[2 + i] & 15) - 8) * d;
      out[i + 16] = static_cast<float>((b[2 + i] >> 4) - 8) * d;
    }
  } else if constexpr (T == DType::Q4_1) {
    const uint8_t* b = row + 20 * s;
    const float d = load_half(b), m = load_half(b + 2);
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      out[i] = static_cast<float>(b[4 + i] & 15) * d + m;
      out[i + 16] = static_cast<float>(b[4 + i] >> 4) * d + m;
    }
  } else if constexpr (T == DType::Q8_0) {
    const uint8_t* b = row + 34 * s;
    const float d = load_half(b);
#pragma unroll
    for (int i = 0; i < 32; ++i) out[i] = static_cast<float>(static_cast<int8_t>(b[2 + i])) * d;
  } else if constexpr (T == DType::Q5_0 || T == DType::Q5_1) {
    constexpr bool affine = T == DType::Q5_1;
    const uint8_t* b = row + (affine ? 24 : 22) * s;
    const float d = load_half(b);
    const float m = affine ? load_half(b + 2) : 0.0f;
    const uint8_t* qhp = b + (affine ? 4 : 2);
    const uint32_t qh =
        qhp[0] | (qhp[1] << 8) | (qhp[2] << 16) | (static_cast<uint32_t>(qhp[3]) << 24);
    const uint8_t* qs = qhp + 4;
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const int nib = i < 16 ? (qs[i] & 15) : (qs[i - 16] >> 4);
      const int q = nib | (((qh >> i) & 1) << 4);
      // Same float order as quant::decode_slice32: scale * (q + bias) + min.
      out[i] = d * static_cast<float>(q + (affine ? 0 : -16)) + m;
    }
  } else if constexpr (T == DType::Q4_K || T == DType::Q5_K) {
    constexpr bool five = T == DType::Q5_K;
    const uint8_t* b = row + (five ? 176 : 144) * (s / 8);
    const int j = static_cast<int>(s % 8);  // sub-block: i = j / 2, nibble j % 2
    const float d = load_half(b), dmin = load_half(b + 2);
    int sc, mn;
    k_scale_min(b + 4, j, &sc, &mn);
    const float scale = d * static_cast<float>(sc), minv = -(dmin * static_cast<float>(mn));
    const uint8_t* qh = b + 16;
    const uint8_t* qs = b + (five ? 48 : 16) + 32 * (j / 2);
    const int shift = 4 * (j % 2);
#pragma unroll
    for (int l = 0; l < 32; ++l) {
      int q = (qs[l] >> shift) & 15;
      if constexpr (five) q |= ((qh[l] >> j) & 1) << 4;
      out[l] = scale * static_cast<float>(q) + minv;
    }
  } else if constexpr (T == DType::Q6_K) {
    const uint8_t* b = row + 210 * (s / 8);
    const int e0 = static_cast<int>(s % 8) * 32;  // first element within the superblock
    const int h = e0 / 128, c = (e0 % 128) / 32;
    const float d = load_half(b + 208);
    const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
    const float s0 = d * static_cast<float>(scales[e0 / 16]);
    const float s1 = d * static_cast<float>(scales[e0 / 16 + 1]);
    const uint8_t* ql = b + 64 * h + 32 * (c % 2);
    const uint8_t* qh = b + 128 + 32 * h;
#pragma unroll
    for (int l = 0; l < 32; ++l) {
      const int lo = (ql[l] >> (4 * (c / 2))) & 15;
      const int hi = (qh[l] >> (2 * c)) & 3;
      out[l] = (l < 16 ? s0 : s1) * static_cast<float>((lo | (hi << 4)) - 32);
    }
  }
}

// Runs the statements after `ok` once for the run-time type t, with the compile-time type
// named K (a switch over every supported type); ok = false for an unsupported type.
#define KESTREL_CUDA_FOR_TYPE(t, ok, ...)       \
  do {                                          \
    ok = true;                                  \
    switch (t) {                                \
      KESTREL_CUDA_TYPE_CASE(F32, __VA_ARGS__)  \
      KESTREL_CUDA_TYPE_CASE(F16, __VA_ARGS__)  \
      KESTREL_CUDA_TYPE_CASE(BF16, __VA_ARGS__) \
      KESTREL_CUDA_TYPE_CASE(Q4_0, __VA_ARGS__) \
      KESTREL_CUDA_TYPE_CASE(Q4_1, __VA_ARGS__) \
      KESTREL_CUDA_TYPE_CASE(Q8_0, __VA_ARGS__) \
      KESTREL_CUDA_TYPE_CASE(Q5_0, __VA_ARGS__) \
      KESTREL_CUDA_TYPE_CASE(Q5_1, __VA_ARGS__) \
      KESTREL_CUDA_TYPE_CASE(Q4_K, __VA_ARGS__) \
      KESTREL_CUDA_TYPE_CASE(Q5_K, __VA_ARGS__) \
      KESTREL_CUDA_TYPE_CASE(Q6_K, __VA_ARGS__) \
      default:                                  \
        ok = false;                             \
    }                                           \
  } while (0)
#define KESTREL_CUDA_TYPE_CASE(name, ...) \
  case DType::name: {                     \
    constexpr DType K = DType::name;      \
    __VA_ARGS__;                          \
    break;                                \
  }

// Element e of row r of a KV cache (f16, q8_0 or q4_0 rows), as the scalar dequantization gives it.
template <DType T>
__device__ __forceinline__ float cache_value(const uint8_t* cache, int64_t row_bytes, int64_t r,
                                             int64_t e) {
  const uint8_t* row = cache + r * row_bytes;
  if constexpr (T == DType::F16) {
    return __half2float(reinterpret_cast<const __half*>(row)[e]);
  } else if constexpr (T == DType::Q8_0) {
    const uint8_t* b = row + 34 * (e / 32);
    return static_cast<float>(static_cast<int8_t>(b[2 + e % 32])) *
           __half2float(*reinterpret_cast<const __half*>(b));
  } else {
    const uint8_t* b = row + 18 * (e / 32);
    const int i = static_cast<int>(e % 32);
    const int nib = i < 16 ? (b[2 + i] & 15) : (b[2 + i - 16] >> 4);
    return static_cast<float>(nib - 8) * __half2float(*reinterpret_cast<const __half*>(b));
  }
}

}  // namespace kestrel::backend::cuda
