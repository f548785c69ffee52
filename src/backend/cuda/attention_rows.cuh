// Attention of a few query tokens over the whole cache, one block per (head, group of tokens):
// the body of attention.cu's attention_rows_kernel, shared with the fused decode layer
// (decode_layer.cu) so that both compute the same values.
#pragma once

#include "backend/cuda/acts_device.cuh"
#include "backend/cuda/quant_device.cuh"

namespace kestrel::backend::cuda {

// Few query tokens (decode, small micro-batches): one block per (head, group of kTB tokens)
// computes those attention rows in f32 in one launch, each K/V value decoded once for the
// group. Scores: a few lanes per key, a 32-element slice each (below); P.V: each of the 16
// warps takes every 16th key with a lane per output element (coalesced), partial sums reduced in
// shared memory. Decode has only n_head blocks, so each needs many warps: 4 -> 8 -> 16 warps
// took tg128 from 219 to 240 to 250 t/s on the H100. Shared memory: q[kTB][D], partial outputs
// [warps][kTB][D], scores [kTB][n_kv].
// The block (kRowsThreads threads) computes head h for tokens t0..t0 + kTB - 1; q_at(tb, d) gives
// element d of the head's query for token t0 + tb (the fused decode layer rotates it there), smem
// the dynamic shared memory. Every thread of the block calls it.
constexpr int kRowsThreads = 512, kRowsMaxDim = 256;
// Keys whose scores fit the shared memory of attention_rows_block.
constexpr int64_t kRowsMaxKeys = 8192;
// kKeyUnroll: keys of the P.V loop unrolled (the fused decode layer takes 1: its kernel must stay
// small enough for the instruction cache; the same sums in the same order either way).
template <quant::DType KT, quant::DType VT, int kTB, class QAt, int kKeyUnroll = 4>
__device__ __forceinline__ void attention_rows_block(int h, int t0, const QAt& q_at, int n_tokens,
                                                     const int32_t* pos, const uint8_t* kc,
                                                     int64_t k_row_bytes, const uint8_t* vc,
                                                     int64_t v_row_bytes, int n_head, int group,
                                                     int D, int64_t kv_stride, float scale,
                                                     float* out, MatmulInputOut also, float* smem) {
  constexpr int kWarps = kRowsThreads / 32;
  const int g = h / group;
  const int nt = min(kTB, n_tokens - t0);
  const int64_t q_dim = int64_t{n_head} * D;
  int n_seen = 0;
  (void)warp_positions(pos + t0, nt, n_seen);
  const int64_t n_kv = n_seen;
  float* qs = smem;                     // [kTB][D]
  float* part = qs + kTB * D;           // [kWarps][kTB][D]
  float* sc = part + kWarps * kTB * D;  // [kTB][kv_stride]
  // q is stored swizzled: float4 j of slice s (32 elements) at float4 8 s + (j ^ s % 8), so that
  // the lanes of one key below, which read the same j of different slices, hit different banks.
  for (int e = threadIdx.x; e < kTB * D; e += kRowsThreads) {
    const int tb = e / D, d = e % D, sl = d / 32, j = d % 32 / 4;
    qs[tb * D + 32 * sl + 4 * (j ^ (sl % 8)) + d % 4] = tb < nt ? q_at(tb, d) : 0.0f;
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t slice0 = int64_t{g} * D / 32;
  // Scores: a group of G lanes per key (G: D / 32 rounded up to a power of two), one 32-element
  // slice each, so that a key's row is read by neighbouring lanes at once and its sum met by
  // shuffles. (A thread per key decoded its D / 32 slices one after another: that many dependent
  // rounds of memory latency, and only n_kv of the 512 threads busy in decode; H200, same run:
  // tg128 423 -> 434 t/s, the seed's b128 ub16 3,887 -> 4,020.) The loop runs
  // while any key of the warp is left, so that every lane takes part in the shuffles.
  const int n_sl = D / 32;
  int G = 1;
  while (G < n_sl) G *= 2;
  const int sub = lane % G;
  const int keys_per_pass = kRowsThreads / G, warp_first = warp * (32 / G);
  for (int64_t base = 0; base + warp_first < n_kv; base += keys_per_pass) {
    const int64_t k = base + threadIdx.x / G;
    float acc[kTB];
#pragma unroll
    for (int tb = 0; tb < kTB; ++tb) acc[tb] = 0.0f;
    if (sub < n_sl) {
      float w[32];
      decode_slice<KT>(kc + min(k, n_kv - 1) * k_row_bytes, slice0 + sub, w);
#pragma unroll
      for (int tb = 0; tb < kTB; ++tb) {
        const float4* qv = reinterpret_cast<const float4*>(qs + tb * D + 32 * sub);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float4 v = qv[j ^ (sub % 8)];
          acc[tb] += v.x * w[4 * j] + v.y * w[4 * j + 1] + v.z * w[4 * j + 2] + v.w * w[4 * j + 3];
        }
      }
    }
#pragma unroll
    for (int tb = 0; tb < kTB; ++tb)
      for (int off = G / 2; off > 0; off /= 2)
        acc[tb] += __shfl_xor_sync(0xffffffffu, acc[tb], off);
    if (sub == 0 && k < n_kv) {
#pragma unroll
      for (int tb = 0; tb < kTB; ++tb)
        sc[tb * kv_stride + k] =
            tb < nt && k <= pos[t0 + tb] ? acc[tb] * scale : -INFINITY;  // causal mask
    }
  }
  __syncthreads();
  // Softmax of each row: p = exp(s - max), 1 / sum kept for the end. The rows go together
  // through each reduction (3 barriers in all, not 4 a row; the same operations in the same
  // order for each row as one row at a time).
  __shared__ float red_max[kWarps][kTB], red_sum[kWarps][kTB];
  __shared__ float inv_sum[kTB];
  float m[kTB];
#pragma unroll
  for (int tb = 0; tb < kTB; ++tb) {
    m[tb] = -INFINITY;
    if (tb < nt)
      for (int64_t k = threadIdx.x; k < n_kv; k += kRowsThreads)
        m[tb] = fmaxf(m[tb], sc[tb * kv_stride + k]);
    m[tb] = warp_max(m[tb]);
    if (lane == 0) red_max[warp][tb] = m[tb];
  }
  __syncthreads();
#pragma unroll
  for (int tb = 0; tb < kTB; ++tb) {
    m[tb] = red_max[0][tb];
    for (int i = 1; i < kWarps; ++i) m[tb] = fmaxf(m[tb], red_max[i][tb]);
    float sum = 0.0f;
    if (tb < nt) {
      float* row = sc + tb * kv_stride;
      for (int64_t k = threadIdx.x; k < n_kv; k += kRowsThreads) {
        const float e = expf(row[k] - m[tb]);  // 0 for masked keys
        row[k] = e;
        sum += e;
      }
    }
    sum = warp_sum(sum);
    if (lane == 0) red_sum[warp][tb] = sum;
  }
  __syncthreads();
  if (threadIdx.x < nt) {
    float total = 0.0f;
    for (int i = 0; i < kWarps; ++i) total += red_sum[i][threadIdx.x];
    inv_sum[threadIdx.x] = 1.0f / total;
  }
  __syncthreads();
  float acc[kTB][kRowsMaxDim / 32];
#pragma unroll
  for (int tb = 0; tb < kTB; ++tb)
#pragma unroll
    for (int j = 0; j < kRowsMaxDim / 32; ++j) acc[tb][j] = 0.0f;
#pragma unroll kKeyUnroll
  for (int64_t k = warp; k < n_kv; k += kWarps) {
#pragma unroll
    for (int j = 0; j < kRowsMaxDim / 32; ++j) {
      if (32 * j >= D) break;
      const float v = cache_value<VT>(vc, v_row_bytes, k, int64_t{g} * D + 32 * j + lane);
#pragma unroll
      for (int tb = 0; tb < kTB; ++tb) acc[tb][j] += sc[tb * kv_stride + k] * v;
    }
  }
#pragma unroll
  for (int tb = 0; tb < kTB; ++tb)
#pragma unroll
    for (int j = 0; j < kRowsMaxDim / 32; ++j)
      if (32 * j < D) part[(warp * kTB + tb) * D + 32 * j + lane] = acc[tb][j];
  __syncthreads();
  for (int e = threadIdx.x; e < nt * D; e += kRowsThreads) {
    const int tb = e / D, d = e % D;
    float o = 0.0f;
    for (int w = 0; w < kWarps; ++w) o += part[(w * kTB + tb) * D + d];
    const int64_t i = (t0 + tb) * q_dim + int64_t{h} * D + d;
    const float r = o * inv_sum[tb];
    out[i] = r;
    // A warp's 32 values are one block of the output projection's input (D % 32 == 0).
    write_matmul_input1(also, i, r);
  }
}

}  // namespace kestrel::backend::cuda
