// The dp4a arithmetic of one 32-weight block against one block of int8 activations (two planes,
// x ~= unit * (128 q1 + q2): acts_device.cuh), shared by the decode matvec (matvec_int8.cu) and
// the fused decode layer (decode_layer.cu), so that both sum the same integers.
#pragma once

#include "backend/cuda/cuda_backend_impl.cuh"

namespace kestrel::backend::cuda {

// Sum over the block of weight codes (Q4_0: 0..15, offset by 8 outside; Q8_0: signed) times one
// activation plane (words a[0..7], elements 4i..4i+3 in a[i]).
template <quant::DType T>
__device__ __forceinline__ int block_dot(const int* w, const int* a) {
  int s = 0;
  if constexpr (T == quant::DType::Q4_0) {
    // Byte j of the 16 quant bytes holds element j (low nibble) and j + 16 (high nibble).
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      s = __dp4a(w[i] & 0x0F0F0F0F, a[i], s);
      s = __dp4a((w[i] >> 4) & 0x0F0F0F0F, a[4 + i], s);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) s = __dp4a(w[i], a[i], s);
  }
  return s;
}

// Block b's contribution to one row and token: dw * unit * (128 q1.w + q2.w - 8 sum for Q4_0).
template <quant::DType T>
__device__ __forceinline__ float block_term(const int* w, float dw, const int* a1, const int* a2,
                                            const ActBlock& m) {
  int s = 128 * block_dot<T>(w, a1) + block_dot<T>(w, a2);
  if constexpr (T == quant::DType::Q4_0) s -= 8 * m.sum;
  return dw * m.unit * static_cast<float>(s);
}

// 32-bit words of quants per block of a repacked Q4_0 / Q8_0 weight (CudaWeight::qs).
template <quant::DType T>
constexpr int kQuantWords = T == quant::DType::Q4_0 ? 4 : 8;

// The quant words and the scale of block b of row r of a repacked weight with nb blocks a row.
template <quant::DType T>
__device__ __forceinline__ float load_quant_block(const uint8_t* qs, const __half* d, int64_t nb,
                                                  int64_t r, int64_t b, int* w) {
  constexpr int kWords = kQuantWords<T>;
  const int4* p = reinterpret_cast<const int4*>(qs + (r * nb + b) * (4 * kWords));
#pragma unroll
  for (int v = 0; v < kWords / 4; ++v) {
    const int4 q = p[v];
    w[4 * v] = q.x, w[4 * v + 1] = q.y, w[4 * v + 2] = q.z, w[4 * v + 3] = q.w;
  }
  return __half2float(d[r * nb + b]);
}

// The two activation planes of block b (words a1[i], a2[i] hold elements 4i..4i+3) from shared
// memory (the decode matvec reads its planes from global memory through the read-only path).
__device__ __forceinline__ void load_act_planes(const int8_t* q1, const int8_t* q2, int64_t b,
                                                int* a1, int* a2) {
  const int4* p1 = reinterpret_cast<const int4*>(q1 + 32 * b);
  const int4* p2 = reinterpret_cast<const int4*>(q2 + 32 * b);
#pragma unroll
  for (int v = 0; v < 2; ++v) {
    const int4 x1 = p1[v], x2 = p2[v];
    a1[4 * v] = x1.x, a1[4 * v + 1] = x1.y, a1[4 * v + 2] = x1.z, a1[4 * v + 3] = x1.w;
    a2[4 * v] = x2.x, a2[4 * v + 1] = x2.y, a2[4 * v + 2] = x2.z, a2[4 * v + 3] = x2.w;
  }
}

}  // namespace kestrel::backend::cuda
