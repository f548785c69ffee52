// The building blocks of matmul_stream16.cu's kernel (its constants and arguments, the producer,
// the weights' decode into wgmma fragments, the results' stores and the cluster's sum); see that
// file for the design and its measurements. Included by that file alone: everything here is in
// an unnamed namespace.
#pragma once

#include <cooperative_groups.h>

#include <cstdint>
#include <cstring>

#include "backend/cuda/cuda_backend_impl.cuh"
#include "backend/cuda/frag_common.cuh"
#include "backend/cuda/kv_store_device.cuh"
#include "backend/cuda/rope_device.cuh"
#include "backend/cuda/wgmma_ops.cuh"

namespace kestrel::backend::cuda {
namespace {

using quant::DType;

constexpr int kBoxK = 256;            // K of a code box: 8 Q4_0 blocks a row
constexpr int kGroupRows = 64;        // rows a warpgroup item (wgmma's M)
constexpr int kBoxCodeBytes = 8192;   // a box's codes: 64 rows of 128 bytes, swizzled
constexpr int kBoxScaleBytes = 1024;  // its scales: 8 f16 a row
constexpr int kActBox = 16 * 64 * 2;  // 16 tokens x 64 K of f16: one swizzle atom column
constexpr int kMaxSplits = 8;         // the portable cluster size

// W consumer warpgroups (2; 3 and 4 were tried: above) and a producer warp. A stage: B boxes of
// K side by side (B x 128 contiguous bytes of each row, so that the memory reads B times longer
// runs of a row at once), kStages of them a warpgroup (the shared memory holds W x kStages).
template <int B, int W = 2>
struct Cfg {
  static constexpr int kThreads = 128 * W + 32;
  static constexpr int kStepK = kBoxK * B;
  static constexpr int kCodeBytes = kBoxCodeBytes * B;
  static constexpr int kStageBytes = kCodeBytes + kBoxScaleBytes * B;
  static constexpr int kStages = B == 1 ? 5 : B == 2 ? 3 : 2;
  static_assert(kStageBytes % 1024 == 0, "stages keep the swizzled codes 1024-aligned");
};

struct Stream16Part {
  int64_t n_out;
  float* out;
  const float* bias;
  int group_end;  // row groups of this part and the ones before it
};

struct Stream16Args {
  CUtensorMap act;                      // f16 [T][n_in], 64 x 16 boxes, 128-byte swizzle
  CUtensorMap codes[kMatvecMaxParts];   // u8 [n_out][n_in / 2], 128 x 64 boxes, swizzled
  CUtensorMap scales[kMatvecMaxParts];  // f16 [n_out][n_in / 32], 8 x 64 boxes
  Stream16Part parts[kMatvecMaxParts];
  int n_parts;
  int n_tokens;
  int steps;             // ceil(n_in / kStepK) (a last step past n_in reads zeros)
  int steps_per_split;   // K range of a block, in steps
  int groups_per_block;  // row groups of a cluster (each block of it: all of them, its K range)
  int groups;            // row groups of all parts
  uint32_t half2_magic;  // 0x64006400 (codes_to_half2)
  int act_steps;         // 1: a barrier for each step's activations (below), 0: one for all
  int relaxed_exit;      // 1: the cluster's last barrier without release semantics (the end)
  int own_groups;        // 1: the warpgroups take whole row groups where they pair up (above)
  unsigned long long* clock;  // KESTREL_CUDA_STREAM16_TIMING=1: this launch's shape's sums, or null
  int sum_mode;               // the cluster's sum: kSumPlain, kSumVec or kSumPush (below)
  Stream16Rope rope;  // cache_type != 0: parts Q, K, V, RoPE and the KV store in the sum (below)
};

// How a cluster's blocks sum their results: sum_cluster (remote loads one at a time),
// sum_cluster_vec (float4 loads, several in flight) or push_results + sum_pushed (each block
// stores the others' slices into their shared memory, which then sum alone; the default).
enum SumMode { kSumPlain = 0, kSumVec = 1, kSumPush = 2 };

constexpr int kGroupFloats = kGroupRows * 16;  // a group's results

// KESTREL_CUDA_STREAM16_TIMING's fields a shape (each launch counted by its first block).
enum ClockField {
  kClockLaunches,
  kClockBlocks,
  kClockEarly,     // kernel entry to grid_dependency_wait's return (warpgroup 0)
  kClockActs,      // to the first step's activations (warpgroup 0)
  kClockProducts,  // to the warpgroup's last group stored (2 fields: warpgroups 0, 1)
  kClockEnd = kClockProducts + 2,         // to the block's exit (after the cluster's sum)
  kClockMaxEnd,                           // the slowest block's
  kClockWeightWait,                       // waiting for full stages (2 fields)
  kClockGroupEnd = kClockWeightWait + 2,  // groups' ends: last wgmmas, exchange, store (2)
  kClockMet = kClockGroupEnd + 2,  // to every block's results there (the cluster's first barrier)
  kClockFields,
};
constexpr int kClockShapes = 8;

// A block's receive buffer for kSumPush: a slice of each other block's results (slices of
// ceil(results / splits) float4s, by the sender's rank), 128 bytes of slack for uneven slices.
__host__ __device__ inline size_t push_buffer_bytes(int groups_per_block) {
  return size_t(groups_per_block) * kGroupFloats * 4 + 128;
}

// Shared memory of a launch: the stages, the resident activations, the warpgroups' exchange, the
// results kept for the cluster's sum (splits > 1; with kSumPush also the receive buffer), the
// barriers (the rings', one for each step's activations, kSumPush's); 1024 bytes of alignment
// slack.
template <int B, int W>
size_t smem_bytes(int steps_per_split, int groups_per_block, int splits, bool push) {
  using C = Cfg<B, W>;
  return size_t{W} * C::kStages * C::kStageBytes + size_t(steps_per_split) * 4 * B * kActBox +
         size_t{W - 1} * kGroupFloats * 4 +
         (splits > 1 ? size_t(groups_per_block) * kGroupFloats * 4 : 0) +
         (splits > 1 && push ? push_buffer_bytes(groups_per_block) : 0) +
         (2 * W * C::kStages + steps_per_split + 1) * 8 + 1024;
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// The part of row group `group` and the group's first row in it.
__device__ __forceinline__ int part_of_group(const Stream16Args& a, int group, int& row0) {
  int p = 0, begin = 0;
#pragma unroll
  for (int i = 1; i < kMatvecMaxParts; ++i) {
    if (i < a.n_parts && group >= a.parts[i - 1].group_end) {
      p = i;
      begin = a.parts[i - 1].group_end;
    }
  }
  row0 = (group - begin) * kGroupRows;
  return p;
}

// The activations of the block's K range, once the kernel before this one has written them
// (a programmatic dependent launch gets here while it may still run): with a.act_steps each
// step's on its own barrier (bar + 8 i for step ks0 + i), so that the first products need only
// the first step's 16 KB (ncu, attn_q at 16 tokens: the consumers' wait for all 64 KB was 17% of
// the stall samples, the wait for weights 13%); else all on barrier bar.
template <int B>
__device__ void load_acts(const Stream16Args& a, int ks0, int ks1, uint32_t acts, uint32_t bar) {
  grid_dependency_wait();
  constexpr int kBoxes = 4 * B;  // activation boxes a step
  if (!a.act_steps) barrier_expect(bar, (ks1 - ks0) * kBoxes * kActBox);
  for (int i = 0; i < ks1 - ks0; ++i) {
    const uint32_t step_bar = a.act_steps ? bar + 8 * i : bar;
    if (a.act_steps) barrier_expect(step_bar, kBoxes * kActBox);
    for (int b = i * kBoxes; b < (i + 1) * kBoxes; ++b)
      tma_load(acts + b * kActBox, a.act, (ks0 * kBoxes + b) * 64, 0, step_bar);
  }
}

// Row groups [g0, g0 + owned) are taken whole, group g0 + j by warpgroup j % kWGs (own_groups:
// no exchange between the warpgroups); the rest, [g0 + owned, g1), step by step in turn.
__device__ __forceinline__ int owned_groups(const Stream16Args& a, int n_groups, int n_wgs) {
  return a.own_groups && n_groups >= n_wgs ? n_groups / n_wgs * n_wgs : 0;
}

// The producer thread: each step of the block's K range of each row group into the ring of the
// warpgroup that takes it, in the order that warpgroup takes them (owned groups: all their steps,
// the warpgroups' groups side by side; the others: steps ks0 + w, + kWGs, ...: warpgroup w). The
// weights depend on no kernel, so the rings fill first, then the activations come (load_acts):
// launched early, the block has its first ~100 KB of weights on the way while the kernel before
// it finishes.
template <int B, int kWGs>
__device__ void produce(const Stream16Args& a, int g0, int g1, int ks0, int ks1, uint32_t stages,
                        uint32_t full, uint32_t empty, uint32_t acts, uint32_t act_bar) {
  using C = Cfg<B, kWGs>;
  bool acts_loaded = false;
  int filled[kWGs] = {};
  const auto issue = [&](int w, int group, int ks) {
    int row0 = 0;
    const int p = part_of_group(a, group, row0);
    const int slot = filled[w] % C::kStages, use = filled[w] / C::kStages;
    const int stage = w * C::kStages + slot;
    if (use > 0) {
      if (!acts_loaded) load_acts<B>(a, ks0, ks1, acts, act_bar);
      acts_loaded = true;
      barrier_wait(empty + 8 * stage, (use - 1) & 1);
    }
    const uint32_t dst = stages + stage * C::kStageBytes, bar = full + 8 * stage;
    barrier_expect(bar, C::kStageBytes);
#pragma unroll
    for (int b = 0; b < B; ++b) {
      const int kb = ks * B + b;  // box of K (past n_in: zeros)
      tma_load(dst + b * kBoxCodeBytes, a.codes[p], kb * (kBoxK / 2), row0, bar);
      tma_load(dst + C::kCodeBytes + b * kBoxScaleBytes, a.scales[p], kb * (kBoxK / 32), row0, bar);
    }
    ++filled[w];
  };
  const int owned = owned_groups(a, g1 - g0, kWGs);
  for (int j = 0; j < owned; j += kWGs)
    for (int ks = ks0; ks < ks1; ++ks)
#pragma unroll
      for (int w = 0; w < kWGs; ++w) issue(w, g0 + j + w, ks);
  for (int group = g0 + owned; group < g1; ++group)
    for (int ks2 = ks0; ks2 < ks1; ks2 += kWGs)
#pragma unroll
      for (int w = 0; w < kWGs; ++w)
        if (ks2 + w < ks1) issue(w, group, ks2 + w);
  if (!acts_loaded) load_acts<B>(a, ks0, ks1, acts, act_bar);
}

// A of one 64-K slice pair (Q4_0 blocks 2 sub and 2 sub + 1 of the stage) for the thread's rows:
// A[4 s + i] is register i of the m64k16 fragment of K slice s (as decode_step in
// matmul_wgmma.cu). codes: the thread's first row's bytes 4 (t / 2) in the stage, whose 16-byte
// chunks are swizzled by the row's index mod 8 (= g); sc: the rows' eight scales.
__device__ __forceinline__ void decode_pair(const uint8_t* codes, int g, const uint4 (&sc)[2],
                                            int sub, uint32_t sel, uint32_t magic,
                                            uint32_t (&A)[16]) {
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    const uint32_t scw = sub == 0 ? sc[ri].x : sub == 1 ? sc[ri].y : sub == 2 ? sc[ri].z : sc[ri].w;
#pragma unroll
    for (int blk = 0; blk < 2; ++blk) {
      const uint8_t* cb = codes + ri * 8 * 128 + (((2 * sub + blk) ^ g) << 4);
      const uint32_t pair = __byte_perm(*reinterpret_cast<const uint32_t*>(cb),
                                        *reinterpret_cast<const uint32_t*>(cb + 8), sel);
      const uint32_t s2 = __byte_perm(scw, 0, blk ? 0x3232 : 0x1010);
      __half2 d;
      memcpy(&d, &s2, 4);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t w = h ? pair >> 4 : pair;
        A[4 * (2 * blk + h) + ri] = codes_to_half2<DType::Q4_0, 0x5150>(w, magic, d);
        A[4 * (2 * blk + h) + 2 + ri] = codes_to_half2<DType::Q4_0, 0x5352>(w, magic, d);
      }
    }
  }
}

// decode_pair for activations whose 16-element groups hold the even elements, then the odd ones
// (permute_acts): the thread's word of a block (bytes 4t .. 4t + 3: elements 4t .. 4t + 3 in the
// low nibbles, 16 + 4t .. in the high ones) gives its four halves of the two slices by a shift
// and one logic op each (low nibbles of bytes 0 and 2 are the elements for k-slots 2t, 2t + 1;
// of bytes 1 and 3 those for 2t + 8, 2t + 9), no byte permutes. codes: bytes 4t of the row.
__device__ __forceinline__ void decode_pair_perm(const uint8_t* codes, int g, const uint4 (&sc)[2],
                                                 int sub, uint32_t magic, uint32_t (&A)[16]) {
  const __half2 offset = __half2half2(__ushort_as_half(0x6408));  // 1024 + 8
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    const uint32_t scw = sub == 0 ? sc[ri].x : sub == 1 ? sc[ri].y : sub == 2 ? sc[ri].z : sc[ri].w;
#pragma unroll
    for (int blk = 0; blk < 2; ++blk) {
      const uint32_t word =
          *reinterpret_cast<const uint32_t*>(codes + ri * 8 * 128 + (((2 * sub + blk) ^ g) << 4));
      const uint32_t s2 = __byte_perm(scw, 0, blk ? 0x3232 : 0x1010);
      __half2 d;
      memcpy(&d, &s2, 4);
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // shift 0: slice low reg 0, 8: reg 2; 4, 12: the high slice
        const uint32_t bits = ((word >> (4 * i)) & 0x000F000Fu) | magic;
        __half2 h;
        memcpy(&h, &bits, 4);
        h = __hmul2(__hsub2(h, offset), d);
        uint32_t out;
        memcpy(&out, &h, 4);
        A[4 * (2 * blk + i % 2) + 2 * (i / 2) + ri] = out;
      }
    }
  }
}

// Reorders every 16-element group of the resident activations (n_boxes boxes of 16 rows x 128
// swizzled bytes) into its even elements, then its odd ones, for decode_pair_perm: threads
// tid of n share the work; the caller makes the writes visible to wgmma (fence_acts).
__device__ __forceinline__ void permute_acts(uint8_t* acts, int n_boxes, int tid, int n) {
  for (int i = tid; i < n_boxes * 64; i += n) {
    const int q = i % 4, r = i / 4 % 16;
    uint8_t* row = acts + (i / 64) * kActBox + r * 128;
    uint4* p0 = reinterpret_cast<uint4*>(row + (((2 * q) ^ (r % 8)) << 4));
    uint4* p1 = reinterpret_cast<uint4*>(row + (((2 * q + 1) ^ (r % 8)) << 4));
    const uint4 a = *p0, b = *p1;
    *p0 = make_uint4(__byte_perm(a.x, a.y, 0x5410), __byte_perm(a.z, a.w, 0x5410),
                     __byte_perm(b.x, b.y, 0x5410), __byte_perm(b.z, b.w, 0x5410));
    *p1 = make_uint4(__byte_perm(a.x, a.y, 0x7632), __byte_perm(a.z, a.w, 0x7632),
                     __byte_perm(b.x, b.y, 0x7632), __byte_perm(b.z, b.w, 0x7632));
  }
}

// The permuted activations visible to wgmma (the async proxy) for the kThreads threads that
// meet at named barrier kId (immediates: a register id makes ptxas reserve all 16 barriers).
template <int kId, int kThreads>
__device__ __forceinline__ void fence_acts() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  asm volatile("bar.sync %0, %1;\n" ::"n"(kId), "n"(kThreads) : "memory");
}

// acc (row r, r + 8 of the thread; tokens 8 j + 2 t, + 1) into out (+ bias), or into the
// block's result buffer res[group][token][64] for the cluster's sum.
__device__ __forceinline__ void store_group(const Stream16Args& a, int group, const float (&acc)[8],
                                            int rig, int t, float* res) {
  if (res) {
#pragma unroll
    for (int e = 0; e < 8; ++e)
      res[(8 * (e / 4) + 2 * t + e % 2) * kGroupRows + rig + 8 * (e % 4 / 2)] = acc[e];
    return;
  }
  int row0 = 0;
  const Stream16Part& part = a.parts[part_of_group(a, group, row0)];
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const int tok = 8 * (e / 4) + 2 * t + e % 2;
    const int64_t r = row0 + rig + 8 * (e % 4 / 2);
    if (tok < a.n_tokens && r < part.n_out)
      part.out[tok * part.n_out + r] = acc[e] + (part.bias ? part.bias[r] : 0.0f);
  }
}

// Block rank of a cluster: sums its slice of the cluster's results over every block's buffer,
// in rank order, into out (+ bias).
__device__ void sum_cluster(const Stream16Args& a, int g0, int n_groups, float* res) {
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const int splits = static_cast<int>(cluster.num_blocks()), rank = cluster.block_rank();
  const int n = n_groups * kGroupFloats, threads = static_cast<int>(blockDim.x);
  for (int i = rank * threads + static_cast<int>(threadIdx.x); i < n; i += splits * threads) {
    float v = 0.0f;
    for (int r = 0; r < splits; ++r) v += cluster.map_shared_rank(res, r)[i];
    const int group = g0 + i / kGroupFloats, tok = i / kGroupRows % 16;
    int row0 = 0;
    const Stream16Part& part = a.parts[part_of_group(a, group, row0)];
    const int64_t r = row0 + i % kGroupRows;
    if (tok < a.n_tokens && r < part.n_out)
      part.out[tok * part.n_out + r] = v + (part.bias ? part.bias[r] : 0.0f);
  }
}

// v + bias of rows r .. r + 3 (+ 0.0f without one, as the scalar stores add it), all in range.
__device__ __forceinline__ float4 add_bias4(const Stream16Part& part, int64_t r, float4 v) {
  if (part.bias) {
    v.x += part.bias[r], v.y += part.bias[r + 1], v.z += part.bias[r + 2], v.w += part.bias[r + 3];
  } else {
    v.x += 0.0f, v.y += 0.0f, v.z += 0.0f, v.w += 0.0f;
  }
  return v;
}

// The cluster's sum of float4 i of the block's results (4 consecutive rows of one token) into
// out (+ bias).
__device__ __forceinline__ void store_sum4(const Stream16Args& a, int g0, int i4, float4 v) {
  const int i = 4 * i4;
  const int group = g0 + i / kGroupFloats, tok = i / kGroupRows % 16;
  if (tok >= a.n_tokens) return;
  int row0 = 0;
  const Stream16Part& part = a.parts[part_of_group(a, group, row0)];
  const int64_t r = row0 + i % kGroupRows;
  float* dst = part.out + tok * part.n_out + r;
  if (r + 3 < part.n_out && (reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
    // One 16-byte store instead of four (outputs of a width that is a multiple of 4).
    *reinterpret_cast<float4*>(dst) = add_bias4(part, r, v);
    return;
  }
  const float vs[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int c = 0; c < 4; ++c)
    if (r + c < part.n_out) dst[c] = vs[c] + (part.bias ? part.bias[r + c] : 0.0f);
}

// store_kv_block for a 32-element block held by 8 lanes (an aligned group of a warp), lane k of
// them holding elements 4 k .. 4 k + 3 in v: 3 shuffle rounds instead of the redistribution to a
// lane an element and 5. The same arithmetic and tie rule (the first element of largest
// magnitude), so the same bytes. The whole warp calls it; `valid` is uniform in each 8 lanes.
template <quant::DType T>
__device__ __forceinline__ void store_kv_block8(float4 v, int k, bool valid, uint8_t* row,
                                                int64_t b) {
  static_assert(T == quant::DType::Q8_0 || T == quant::DType::Q4_0);
  const float x[4] = {v.x, v.y, v.z, v.w};
  if constexpr (T == quant::DType::Q8_0) {
    float amax = fmaxf(fmaxf(fabsf(x[0]), fabsf(x[1])), fmaxf(fabsf(x[2]), fabsf(x[3])));
#pragma unroll
    for (int o = 4; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const __half dh = __float2half_rn(__fdiv_rn(amax, 127.0f));
    const float d = __half2float(dh);
    if (!valid) return;
    uint8_t* blk = row + 34 * b;
    if (k == 0) *reinterpret_cast<__half*>(blk) = dh;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const float q = d == 0.0f ? 0.0f : fminf(fmaxf(roundf(__fdiv_rn(x[c], d)), -127.0f), 127.0f);
      blk[2 + 4 * k + c] = static_cast<uint8_t>(static_cast<int8_t>(q));
    }
  } else {
    float best = fabsf(x[0]), m = x[0];
    int at = 4 * k;
#pragma unroll
    for (int c = 1; c < 4; ++c)
      if (fabsf(x[c]) > best) best = fabsf(x[c]), m = x[c], at = 4 * k + c;
#pragma unroll
    for (int o = 4; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const float om = __shfl_xor_sync(0xffffffffu, m, o);
      const int oa = __shfl_xor_sync(0xffffffffu, at, o);
      if (ob > best || (ob == best && oa < at)) best = ob, m = om, at = oa;
    }
    const __half dh = __float2half_rn(__fdiv_rn(m, -8.0f));
    const float d = __half2float(dh);
    uint32_t q4 = 0;  // the four 4-bit codes of this lane, code c in bits 8 c .. 8 c + 3
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int q =
          d == 0.0f ? 8
                    : static_cast<int>(fminf(fmaxf(roundf(__fdiv_rn(x[c], d)), -8.0f), 7.0f)) + 8;
      q4 |= static_cast<uint32_t>(q) << (8 * c);
    }
    // Byte j of the block's codes: element j low, j + 16 high; lane k < 4's partner is k + 4.
    const uint32_t hi = __shfl_down_sync(0xffffffffu, q4, 4);
    if (!valid || k >= 4) return;
    uint8_t* blk = row + 18 * b;
    if (k == 0) *reinterpret_cast<__half*>(blk) = dh;
    const uint32_t bytes = q4 | (hi << 4);
#pragma unroll
    for (int c = 0; c < 4; ++c) blk[2 + 4 * k + c] = static_cast<uint8_t>(bytes >> (8 * c));
  }
}

// store_sum4 of a launch of Q, K and V (parts 0, 1, 2; a.rope.cache_type set) that also rotates
// Q and K (RoPE, the normal layout: pairs of adjacent rows) and stores the rotated K and V in the
// caches at row pos[token]: the rope_kv_store op's work (rope_kv_store.cu), with its functions, so
// the same results bit for bit. The whole warp calls it, lane l on float4 i4 = 32 q + l: 2 tokens
// x 64 rows of one group (one part), 4 quant blocks of the cache row of 8 lanes each (the host
// takes this path only where every slice is whole runs of 32 float4s and parts whole groups).
__device__ __forceinline__ void store_sum4_rope(const Stream16Args& a, int g0, int i4, float4 v) {
  const Stream16Rope& rp = a.rope;
  const int i = 4 * i4, lane = threadIdx.x % 32;
  const int group = g0 + i / kGroupFloats, tok = i / kGroupRows % 16;
  int row0 = 0;
  const int p = part_of_group(a, group, row0);  // warp-uniform
  const Stream16Part& part = a.parts[p];
  const int64_t r = row0 + i % kGroupRows;
  const bool valid = tok < a.n_tokens;  // uniform in each 8 lanes (one token's 32 rows)
  const int pos = valid ? rp.pos[tok] : 0;
  v = add_bias4(part, r, v);
  if (p < 2 && valid) {  // RoPE of Q and K: pairs (r, r + 1), (r + 2, r + 3) of their head
    const int pair = static_cast<int>(r % rp.head_dim) / 2;
    float sn, cn;
    rope_sincos(pos, rp.table.inv_freq[pair], sn, cn);
    const float x0 = rope_rotate(v.x, v.y, sn, cn, true), x1 = rope_rotate(v.x, v.y, sn, cn, false);
    rope_sincos(pos, rp.table.inv_freq[pair + 1], sn, cn);
    const float x2 = rope_rotate(v.z, v.w, sn, cn, true), x3 = rope_rotate(v.z, v.w, sn, cn, false);
    v = make_float4(x0, x1, x2, x3);
  }
  if (valid) *reinterpret_cast<float4*>(part.out + tok * part.n_out + r) = v;
  if (p == 0) return;
  uint8_t* const cache = p == 1 ? rp.k_cache : rp.v_cache;
  if (rp.cache_type == static_cast<int>(DType::F16)) {
    if (valid) {
      __half2* dst = reinterpret_cast<__half2*>(cache + int64_t{pos} * rp.row_bytes + 2 * r);
      dst[0] = __floats2half2_rn(v.x, v.y);
      dst[1] = __floats2half2_rn(v.z, v.w);
    }
    return;
  }
  // Quant blocks: each 8 lanes' float4s are one 32-element block of one token's row (element
  // 4 (lane % 8) + c in component c), quantized by those 8 lanes together with
  // store_kv_block's arithmetic and tie rule (kv_store_device.cuh: bit for bit its bytes).
  uint8_t* row = cache + int64_t{pos} * rp.row_bytes;
  if (rp.cache_type == static_cast<int>(DType::Q8_0))
    store_kv_block8<DType::Q8_0>(v, lane % 8, valid, row, r / 32);
  else
    store_kv_block8<DType::Q4_0>(v, lane % 8, valid, row, r / 32);
}

// sum_cluster with the loads of several places in flight at once: each thread takes 4
// consecutive results (a float4 of each block's buffer) at kUnroll places, and all of a rank's
// loads are issued before their sums. The same sums in the same order (0, + rank 0, + rank 1,
// ...), so the same results bit for bit. Why: KESTREL_CUDA_STREAM16_TIMING (H100, the seed's
// b128 ub16) gave 5.8-12 k cycles a block from the products' end to the exit, most of it
// sum_cluster's loop of one dependent distributed load at a time (3-7 us a launch).
template <int kUnroll = 4>
__device__ void sum_cluster_vec(const Stream16Args& a, int g0, int n_groups, float* res) {
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const int splits = static_cast<int>(cluster.num_blocks()), rank = cluster.block_rank();
  const int stride = splits * static_cast<int>(blockDim.x);
  const int n4 = n_groups * kGroupFloats / 4;
  for (int base = rank * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x); base < n4;
       base += kUnroll * stride) {
    float4 v[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) v[k] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int b = 0; b < splits; ++b) {
      const float4* buf = reinterpret_cast<const float4*>(cluster.map_shared_rank(res, b));
      float4 x[kUnroll];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k)
        x[k] = base + k * stride < n4 ? buf[base + k * stride] : make_float4(0, 0, 0, 0);
#pragma unroll
      for (int k = 0; k < kUnroll; ++k)
        v[k] = make_float4(v[k].x + x[k].x, v[k].y + x[k].y, v[k].z + x[k].z, v[k].w + x[k].w);
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k)
      if (base + k * stride < n4) store_sum4(a, g0, base + k * stride, v[k]);
  }
}

// st.async: 16 bytes into another block's shared memory (a shared::cluster address), counted on
// its barrier `bar` (a shared::cluster address too) as they land.
__device__ __forceinline__ void store_remote(uint32_t addr, float4 v, uint32_t bar) {
  asm volatile(
      "st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.f32 [%0], {%1, %2, %3, %4}, "
      "[%5];\n" ::"r"(addr),
      "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w), "r"(bar)
      : "memory");
}

// The shared::cluster address of `addr` (this block's shared memory) in block `rank`.
__device__ __forceinline__ uint32_t cluster_address(uint32_t addr, int rank) {
  uint32_t out;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(out) : "r"(addr), "r"(rank));
  return out;
}

// kSumPush, a block's slice of the results (float4 indices) and its size in float4s.
__device__ __forceinline__ int push_slice(int n4, int splits, int rank, int& lo) {
  const int size = (n4 + splits - 1) / splits;
  lo = min(n4, rank * size);
  return min(n4, lo + size) - lo;
}

// kSumPush, first half: this block's results of every other block's slice into that block's
// receive buffer (rcv, at [this rank][slice index]), each store counted on its barrier rcv_bar.
// Fire and forget: the stores need no answer, and no block reads another's memory afterwards, so
// no cluster barrier at the exit (sum_cluster's second one). The caller has waited for the
// cluster's barrier inits (barrier.cluster.wait) and for its block's results (__syncthreads).
__device__ void push_results(int n_groups, const float* res, uint32_t rcv, uint32_t rcv_bar) {
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const int splits = static_cast<int>(cluster.num_blocks()), rank = cluster.block_rank();
  const int n4 = n_groups * kGroupFloats / 4, size = (n4 + splits - 1) / splits;
  const float4* res4 = reinterpret_cast<const float4*>(res);
  for (int i = static_cast<int>(threadIdx.x); i < n4; i += static_cast<int>(blockDim.x)) {
    const int owner = i / size;
    if (owner == rank) continue;
    const uint32_t dst = rcv + (rank * size + i - owner * size) * 16;
    store_remote(cluster_address(dst, owner), res4[i], cluster_address(rcv_bar, owner));
  }
}

// kSumPush, second half: once the other blocks' parts of this block's slice are in
// (wait_pushed), their sum with this block's own in rank order (the order of sum_cluster: bit for
// bit its results) into out (+ bias).
template <bool kRope>
__device__ void sum_pushed(const Stream16Args& a, int g0, int n_groups, const float* res,
                           const float* rcv) {
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const int splits = static_cast<int>(cluster.num_blocks()), rank = cluster.block_rank();
  const int n4 = n_groups * kGroupFloats / 4, size = (n4 + splits - 1) / splits;
  int lo = 0;
  const int count = push_slice(n4, splits, rank, lo);
  const float4* res4 = reinterpret_cast<const float4*>(res);
  const float4* rcv4 = reinterpret_cast<const float4*>(rcv);
  for (int j = static_cast<int>(threadIdx.x); j < count; j += static_cast<int>(blockDim.x)) {
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int r = 0; r < splits; ++r) {
      const float4 x = r == rank ? res4[lo + j] : rcv4[r * size + j];
      v = make_float4(v.x + x.x, v.y + x.y, v.z + x.z, v.w + x.w);
    }
    if constexpr (kRope)
      store_sum4_rope(a, g0, lo + j, v);
    else
      store_sum4(a, g0, lo + j, v);
  }
}

// kSumPush: waits for the other blocks' parts of this block's slice (rcv_bar's first phase: its
// thread 0 expected their bytes at the start).
__device__ __forceinline__ void wait_pushed(uint32_t rcv_bar) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "WAIT_PUSH:\n"
      "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%0], 0;\n"
      "@p bra DONE_PUSH;\n"
      "bra WAIT_PUSH;\n"
      "DONE_PUSH:\n}\n" ::"r"(rcv_bar)
      : "memory");
}

// The bytes block `rank` receives under kSumPush: the other blocks' parts of its slice.
__device__ __forceinline__ int push_bytes(int n_groups, int splits, int rank) {
  int lo = 0;
  return (splits - 1) * push_slice(n_groups * kGroupFloats / 4, splits, rank, lo) * 16;
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace
}  // namespace kestrel::backend::cuda
