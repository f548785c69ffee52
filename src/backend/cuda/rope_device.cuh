// RoPE shared by the rope kernel (elementwise.cu) and the fused RoPE + KV store
// (rope_kv_store.cu): the frequency table and the rotation angle of one pair.
#pragma once

#include <cmath>

#include "backend/backend.h"
#include "backend/cuda/cuda_common.cuh"

namespace kestrel::backend::cuda {

// RoPE frequencies base^(-2i/head_dim), passed by value to the kernels.
constexpr int kRopeMaxPairs = 128;
struct RopeTable {
  double inv_freq[kRopeMaxPairs];
};

// The table of the last (base, head size) asked for: a model uses one, so it is computed once
// (double pow, as on the CPU).
inline const RopeTable& rope_table(float freq_base, int head_dim) {
  thread_local RopeTable table;
  thread_local float table_base = 0.0f;
  thread_local int table_dim = 0;
  if (table_base != freq_base || table_dim != head_dim) {
    for (int i = 0; i < head_dim / 2; ++i)
      table.inv_freq[i] = std::pow(static_cast<double>(freq_base), -2.0 * i / head_dim);
    table_base = freq_base;
    table_dim = head_dim;
  }
  return table;
}

// The sine and cosine of pair i's angle at position pos: pos * inv_freq (thousands of radians)
// formed and reduced modulo 2 pi in double; the reduced angle's sine and cosine in f32 are
// within an ulp or two.
__device__ __forceinline__ void rope_sincos(int pos, double inv_freq, float& sn, float& cn) {
  constexpr double kTwoPi = 6.283185307179586476925;
  const double theta = pos * inv_freq;
  const float r = static_cast<float>(theta - rint(theta * (1.0 / kTwoPi)) * kTwoPi);
  sincosf(r, &sn, &cn);
}

// Element e of a rotated pair (a, b): a cos - b sin for the pair's first element, a sin + b cos
// for its second. Each product and the sum rounded apart (no fused multiply-add the compiler may
// or may not form), so that the rope kernel and the fused RoPE + KV store agree bit for bit.
__device__ __forceinline__ float rope_rotate(float a, float b, float sn, float cn, bool first) {
  return first ? __fsub_rn(__fmul_rn(a, cn), __fmul_rn(b, sn))
               : __fadd_rn(__fmul_rn(a, sn), __fmul_rn(b, cn));
}

}  // namespace kestrel::backend::cuda
