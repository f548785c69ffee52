// Activations in the forms the matmul kernels read, written by the kernel that produces them
// (RMS norm, SwiGLU) or by a conversion launch of their own: two int8 planes per 32-element
// block for the dp4a kernel (x ~= unit * (128 q1 + q2), see matvec_int8.cu) and f16 for the
// tensor-core kernels and cuBLAS. The int8 conversion kernel (matvec_int8.cu) uses these
// functions too, and f16 is __float2half_rn everywhere (to_f16_kernel), so a fused output is
// bit-identical to a converted one.
#pragma once

#include "backend/cuda/cuda_backend_impl.cuh"

namespace kestrel::backend::cuda {

// silu(g) * u, the same arithmetic in every SwiGLU (elementwise.cu, the fused decode layer).
__device__ __forceinline__ float silu_times(float g, float u) {
  return g / (1.0f + expf(-g)) * u;
}

__device__ __forceinline__ int warp_sum_int(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The unit of the second plane of a block whose largest magnitude is amax.
__device__ __forceinline__ float block_unit(float amax) {
  return amax / (127.0f * 128.0f);
}

// The two planes of v in a block whose largest magnitude is amax: a = round(v / (amax / 127)),
// then the residual in units of block_unit(amax).
__device__ __forceinline__ void quantize_two_planes(float v, float amax, int& a, int& b) {
  a = 0;
  b = 0;
  if (amax > 0.0f) {
    a = __float2int_rn(v * (127.0f / amax));
    const float residual = v - (amax / 127.0f) * static_cast<float>(a);
    b = min(127, max(-127, __float2int_rn(residual / block_unit(amax))));
  }
}

// Four consecutive values e0..e0+3 of a [T][k] activation (e0 = flat index, a multiple of 4)
// into the matmul input m; for the int8 planes the 8 lanes (aligned, consecutive) that hold one
// 32-element block call it together, every lane of the warp at once (values of lanes past the
// end are zeros, `store` false).
__device__ __forceinline__ void write_matmul_input4(const MatmulInputOut& m, int64_t e0, float4 v,
                                                    bool store) {
  if (m.x16) {
    if (store) {
      reinterpret_cast<__half2*>(m.x16 + e0)[0] = __floats2half2_rn(v.x, v.y);
      reinterpret_cast<__half2*>(m.x16 + e0)[1] = __floats2half2_rn(v.z, v.w);
    }
    return;
  }
  if (!m.q1) return;
  float amax = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
#pragma unroll
  for (int o = 1; o < 8; o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  int a[4], b[4];
  quantize_two_planes(v.x, amax, a[0], b[0]);
  quantize_two_planes(v.y, amax, a[1], b[1]);
  quantize_two_planes(v.z, amax, a[2], b[2]);
  quantize_two_planes(v.w, amax, a[3], b[3]);
  int sum = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) sum += 128 * a[j] + b[j];
#pragma unroll
  for (int o = 1; o < 8; o <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (!store) return;
  *reinterpret_cast<char4*>(m.q1 + e0) = make_char4(a[0], a[1], a[2], a[3]);
  *reinterpret_cast<char4*>(m.q2 + e0) = make_char4(b[0], b[1], b[2], b[3]);
  if (e0 % 32 == 0) m.meta[e0 / 32] = ActBlock{block_unit(amax), sum};
}

// One value at flat index i into m; for the int8 planes the whole warp calls it together with
// consecutive indices (i % 32 == lane: a warp is one block).
__device__ __forceinline__ void write_matmul_input1(const MatmulInputOut& m, int64_t i, float v) {
  if (m.x16) {
    m.x16[i] = __float2half_rn(v);
    return;
  }
  if (!m.q1) return;
  const float amax = warp_max(fabsf(v));
  int a, b;
  quantize_two_planes(v, amax, a, b);
  m.q1[i] = static_cast<int8_t>(a);
  m.q2[i] = static_cast<int8_t>(b);
  const int sum = warp_sum_int(128 * a + b);
  if (i % 32 == 0) m.meta[i / 32] = ActBlock{block_unit(amax), sum};
}

// Whether the calling warp's block (or tile) is the last of `writers` to count itself on
// *counter, after its lanes' stores of the rows it owns (every lane gets the answer; the last one
// then reads what the others wrote). One warp, so that the rest of a block need not wait for the
// fence and the atomic's round trips (bench/NOTES.md, twenty-seventh session: a K-split matvec
// block lives one round of loads, and whatever lengthens it slows the launch).
__device__ __forceinline__ bool last_to_arrive(unsigned* counter, unsigned writers, int lane) {
  __threadfence();  // this warp's rows, before they are counted
  __syncwarp();
  unsigned before = 0;
  if (lane == 0) before = atomicAdd(counter, 1u);
  const bool last = __shfl_sync(0xffffffffu, before, 0) == writers - 1;
  if (last) __threadfence();
  return last;
}

// The add and norm epilogue's work for 32-row block ab of x (AddNormOut), by one whole warp, once
// every row of the block is in x: its sum of squares and x * weight as the readers' planes; the
// block's counter back to zero for the next launch.
__device__ __forceinline__ void add_norm_block(const AddNormOut& o, int64_t ab, int lane) {
  const int64_t i = 32 * ab + lane;
  const float v = __ldcg(o.x + i);  // (other blocks wrote them: read past L1)
  const float ss = warp_sum(v * v);
  write_matmul_input1(o.planes, i, v * o.weight[i]);
  if (lane == 0) {
    o.ss[ab] = ss;
    o.arrivals[ab] = 0;
  }
}

}  // namespace kestrel::backend::cuda
