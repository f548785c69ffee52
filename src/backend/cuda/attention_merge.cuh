// The merge of attention partials computed with the keys split among blocks (attention_split.cu,
// attention_tc16.cu): each block (head h, split s) leaves, per query token t, its running softmax
// as ml[s][t] = (max m in natural-log units, sum l) and part[s][t][0..D) = the unnormalized
// output sum_k exp(score_k - m) v_k; the last block of the head to arrive merges them into out.
#pragma once

#include "backend/cuda/acts_device.cuh"

namespace kestrel::backend::cuda {

// Called by every thread of a block of kThreads threads once its partial is written. kSlots:
// tokens a split's slot holds (part: head h's [splits][kSlots][D] partial outputs, ml: its
// [splits][kSlots] (m, l) pairs); nt: the tokens to merge; arrivals: n_head counters, zero between
// launches (the merging block sets its head's back); rows: kSlots * row_stride floats of shared
// memory the block no longer needs. A split without visible keys leaves m = -inf, l = 0, o = 0. out
// and the output projection's input (also) get rows 0 .. nt - 1 of head h.
template <int kThreads, int kSlots, int kMaxSplits>
__device__ __forceinline__ void merge_head_partials(int h, int splits, int nt, int D, int64_t q_dim,
                                                    const float* part, const float2* ml,
                                                    unsigned* arrivals, float* out,
                                                    MatmulInputOut also, float* rows,
                                                    int row_stride) {
  // The last split of the head to arrive merges (its reads bypass L1: other SMs wrote them).
  __shared__ bool last;
  __shared__ float weight[kMaxSplits][kSlots];  // exp(m_s - max) / sum, per split and token
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&arrivals[h], 1u) == static_cast<unsigned>(splits - 1);
  __syncthreads();
  if (!last) return;
  __threadfence();
  if (threadIdx.x == 0) arrivals[h] = 0;  // ready for the next launch
  // The loops over splits run to the compile-time bound (predicated), so that their loads are
  // all in flight at once: a loop to `splits` issued them one round of latency at a time
  // (~20 us a launch; first H100 run).
  if (threadIdx.x < nt) {
    const int t = threadIdx.x;
    float2 ms[kMaxSplits];
    float mx = -INFINITY;
#pragma unroll
    for (int sp = 0; sp < kMaxSplits; ++sp) {
      ms[sp] = sp < splits ? __ldcg(&ml[sp * kSlots + t]) : make_float2(-INFINITY, 0.0f);
      mx = fmaxf(mx, ms[sp].x);
    }
    float sum = 0.0f;
#pragma unroll
    for (int sp = 0; sp < kMaxSplits; ++sp) {
      ms[sp].x = ms[sp].y > 0.0f ? expf(ms[sp].x - mx) : 0.0f;
      sum += ms[sp].x * ms[sp].y;
    }
#pragma unroll
    for (int sp = 0; sp < kMaxSplits; ++sp) weight[sp][t] = ms[sp].x / sum;
  }
  __syncthreads();
  // The merged rows into rows, four elements a thread, then out row by row.
  const int d4 = D / 4;
  for (int e = threadIdx.x; e < nt * d4; e += kThreads) {
    const int t = e / d4, j = e % d4;
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
    for (int sp = 0; sp < kMaxSplits; ++sp) {
      const bool live = sp < splits;
      const float w = live ? weight[sp][t] : 0.0f;
      const float4 v =
          live ? __ldcg(reinterpret_cast<const float4*>(part + (sp * kSlots + t) * D) + j)
               : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      acc.x += w * v.x;
      acc.y += w * v.y;
      acc.z += w * v.z;
      acc.w += w * v.w;
    }
    reinterpret_cast<float4*>(rows + t * row_stride)[j] = acc;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < nt * D; e += kThreads) {  // whole warps: D % 32 == 0
    const int t = e / D, d = e % D;
    const int64_t i = t * q_dim + int64_t{h} * D + d;
    const float r = rows[t * row_stride + d];
    out[i] = r;
    // A warp's 32 values are one block of the output projection's input.
    write_matmul_input1(also, i, r);
  }
}

}  // namespace kestrel::backend::cuda
