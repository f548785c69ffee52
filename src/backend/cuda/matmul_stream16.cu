// Matmul for micro-batches of 5 to 16 tokens of Q4_0 weights on Hopper (sm_90a), built to stream
// the weights at memory bandwidth: the seed's case (-b 128 -ub 16) re-reads every weight for
// each micro-batch of 16, so a pass is ~3.8 GB of codes for llama2-7b whatever the kernel does
// with them, and the fragment kernel (matmul_frag_v2.cu) reached 1.3-1.8 TB/s of the H200's 4.8:
// latency-bound, with the one step of codes a warp holds in registers as all it has in flight
// (ncu: issue slots 25-34% busy, DRAM 16-26%; bench/NOTES.md).
//
// Here the copy engine (TMA) keeps the bytes in flight instead of the registers:
//  - one block an SM, persistent over its share of the rows: kWGs consumer warpgroups and one
//    producer warp. The producer's thread has the copy engine bring the block's rows in stages of
//    64 rows x 256 K (8 KB of codes in the 128-byte swizzled layout, 1 KB of scales), kStages a
//    warpgroup ahead: ~90 KB in flight an SM, where Little's law at 4.8 TB/s and ~2 us asks for
//    ~75 KB. The warpgroups take alternate steps of the same 64 rows and add their accumulators
//    at the group's end (through 4 KB of shared memory), so that any number of groups divides
//    evenly between them;
//  - the block's activations (16 tokens x its K range, f16, the 128-byte swizzled layout wgmma
//    reads through a matrix descriptor) are copied once at the start and stay: the weights are
//    the only stream (the v2 kernels re-read a step's activations from L2 with every row block);
//  - each consumer thread decodes its fragment of 64 rows x 64 K (rows g and g + 8 of its warp,
//    as matmul_wgmma.cu does) and the warpgroup issues wgmma m64n16k16 with A in registers, four
//    a 64 K, into 8 f32 accumulators a thread; a stage goes back to the producer as soon as it is
//    decoded (B is the resident activations);
//  - K is split over the blocks of a thread block cluster (grid.x = splits <= 8): each block
//    keeps its results for all its rows in shared memory and, after a cluster barrier, sums a
//    slice of them over the cluster's blocks in rank order (deterministic), through distributed
//    shared memory. No partials in global memory, no second launch.
// The host picks the split and the rows a cluster owns so that every SM streams about the same
// bytes (stream16_plan). Up to kMatvecMaxParts weights of one launch (Q, K, V; gate, up) share
// the activations; their row groups are numbered across the parts.
//
// Measured (bench/NOTES.md): the first version (1 box) as fast as the fragment kernel (H200,
// fourteenth session: gate/up at 16 tokens 29.6 against 30.3 us), so bytes in flight were not that
// kernel's limit; with 2 boxes and permuted activations (fewer decode instructions) faster on
// every shape (H100, fifteenth session: gate/up 26.8 against 29.9 us, qkv 16.3 against 21.8; the
// seed's b128 ub16 4,036 against 3,735 t/s): the default on sm_90a since then. ncu: 2.2 warps a
// scheduler, 0.38 of them eligible, an instruction every 3.3 cycles. Tried in the sixteenth
// session and removed (H100, 16 tokens, gate/up group 26.6 us as is): 3 consumer warpgroups
// 29.6, 4 (1 box) 26.4; a decode with ~40% fewer instructions (n d, the -8 d made up by one more
// wgmma a step; commit c60cb1e) 24.8 without its preparation of the activations and 26.3 with
// it in the kernel. So neither more warps nor fewer decode instructions are the lever.
// Seventeenth session: a launch takes ~6 us beyond its bytes at 3 TB/s (ncu, attn_q at 16 tokens:
// 11.6 us, DRAM 25% busy, SMs active 75% of the time), so the kernel goes as a programmatic
// dependent launch and its producer fills the rings before it waits for the kernel before (the
// norms, SwiGLU, attention let dependents start): the seed's b128 ub16 4,325 / 4,313 t/s against
// 4,109 / 4,106 with KESTREL_CUDA_STREAM16_PDL=0 (H200, alternating runs of 5). The output
// projection gains nothing from it: attention_rows_kernel's 16-token blocks hold all 64 K
// registers of their SMs (512 threads x 128), so no block of this kernel starts beside them (a
// plan of at most 176 KB, to fit beside their shared memory, lost: 4,137 against 4,350).
#include <cooperative_groups.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "backend/cuda/cuda_backend_impl.cuh"
#include "backend/cuda/frag_common.cuh"
#include "backend/cuda/wgmma_ops.cuh"

namespace kestrel::backend::cuda {

using quant::DType;

namespace {

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
};

constexpr int kGroupFloats = kGroupRows * 16;  // a group's results

// KESTREL_CUDA_STREAM16_TIMING's fields a shape (launches are counted by the host).
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
  kClockFields = kClockGroupEnd + 2,
};
constexpr int kClockShapes = 8;

// Shared memory of a launch: the stages, the resident activations, the warpgroups' exchange, the
// results kept for the cluster's sum (splits > 1), the barriers (the rings', one for each step's
// activations); 1024 bytes of alignment slack.
template <int B, int W>
size_t smem_bytes(int steps_per_split, int groups_per_block, int splits) {
  using C = Cfg<B, W>;
  return size_t{W} * C::kStages * C::kStageBytes + size_t(steps_per_split) * 4 * B * kActBox +
         size_t{W - 1} * kGroupFloats * 4 +
         (splits > 1 ? size_t(groups_per_block) * kGroupFloats * 4 : 0) +
         (2 * W * C::kStages + steps_per_split) * 8 + 1024;
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

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// KESTREL_CUDA_STREAM16_TIMING=1: where a launch's time goes, in SM cycles summed over its blocks
// (clock64 of one SM; times from the block's grid_dependency_wait, when the kernel before has
// finished). Thread 0 (warpgroup 0) and thread 128 (warpgroup 1) record.
__device__ __forceinline__ void clock_add(unsigned long long* clk, int field, long long cycles) {
  if (clk) atomicAdd(clk + field, static_cast<unsigned long long>(cycles > 0 ? cycles : 0));
}

// kAccs accumulator sets taken in turn by the 64-K slices, added at the group's end: chains of
// dependent wgmmas kAccs times shorter. kPerm: the activations reordered once (permute_acts) so
// that the weights decode without byte permutes (decode_pair_perm).
template <int B, int kAccs, bool kPerm, int kWGs>
__global__ void __launch_bounds__(Cfg<B, kWGs>::kThreads, 1)
    matmul_stream16_kernel(const __grid_constant__ Stream16Args a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = Cfg<B, kWGs>;
  namespace cg = cooperative_groups;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = smem_addr(smem_raw);
  const uint32_t pad = ((raw + 1023) & ~1023u) - raw;
  uint8_t* base = smem_raw + pad;
  const uint32_t stages = raw + pad;
  const int ks0 = static_cast<int>(blockIdx.x) * a.steps_per_split;
  const int ks1 = min(a.steps, ks0 + a.steps_per_split);
  const int g0 = static_cast<int>(blockIdx.y) * a.groups_per_block;
  const int g1 = min(a.groups, g0 + a.groups_per_block);
  const bool split = gridDim.x > 1;
  const uint32_t acts = stages + kWGs * C::kStages * C::kStageBytes;
  const int act_bytes = a.steps_per_split * 4 * B * kActBox;
  // The warpgroups' exchange (warpgroup w > 0 leaves its accumulators there for warpgroup 0),
  // then the cluster's results, then the barriers.
  float* xch = reinterpret_cast<float*>(base + kWGs * C::kStages * C::kStageBytes + act_bytes);
  float* res = split ? xch + (kWGs - 1) * kGroupFloats : nullptr;
  const uint32_t full =
                     smem_addr(xch + (kWGs - 1 + (split ? a.groups_per_block : 0)) * kGroupFloats),
                 empty = full + 8 * kWGs * C::kStages, act_bar = empty + 8 * kWGs * C::kStages;
  const int tid = threadIdx.x;
  const long long c_start = clock64();
  long long c_dep = c_start;
  unsigned long long* const clk = a.clock && tid < kWGs * 128 && tid % 128 == 0 ? a.clock : nullptr;
  if (tid == 0) {
    for (int s = 0; s < kWGs * C::kStages; ++s) {
      barrier_init(full + 8 * s, 1);
      barrier_init(empty + 8 * s, 128);
    }
    for (int i = 0; i < max(1, ks1 - ks0); ++i) barrier_init(act_bar + 8 * i, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  if (tid == kWGs * 128) {
    produce<B, kWGs>(a, g0, g1, ks0, ks1, stages, full, empty, acts, act_bar);
  } else if (tid < kWGs * 128) {
    const int w = tid / 128, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int rig = 16 * (tid % 128 / 32) + g;  // the thread's rows in a group: rig, rig + 8
    const uint32_t sel = t % 2 ? 0x7632 : 0x5410;
    (void)sel;  // (not read with kPerm)
    float acc[kAccs][8];
    uint32_t A0[16], A1[16];
    int used = 0;  // stages of this warpgroup's ring consumed so far
    uint8_t* const act_smem = base + kWGs * C::kStages * C::kStageBytes;
    grid_dependency_wait();  // before any result is stored (the producer waited already)
    c_dep = clock64();
    if (w == 0) clock_add(clk, kClockEarly, c_dep - c_start);
    if (!a.act_steps) {
      barrier_wait(act_bar, 0);
      if constexpr (kPerm) {
        permute_acts(act_smem, (ks1 - ks0) * 4 * B, tid, kWGs * 128);
        fence_acts<2, kWGs * 128>();
      }
    }
    // One step of K (ks) into acc: its activations permuted where first met (the warpgroup's
    // first group; `together`: both warpgroups meet every step there and each permutes half of
    // its boxes, else each its own steps), then the stage's weights, 4 B wgmmas.
    const auto step = [&](int ks, bool first, bool together) {
      const int stage = w * C::kStages + used % C::kStages;
      if (a.act_steps && first) {
        barrier_wait(act_bar + 8 * (ks - ks0), 0);
        if (ks == ks0 && w == 0) clock_add(clk, kClockActs, clock64() - c_dep);
        if constexpr (kPerm) {
          static_assert(kWGs == 2, "a named barrier for each warpgroup");
          uint8_t* step_acts = act_smem + (ks - ks0) * 4 * B * kActBox;
          if (together) {
            permute_acts(step_acts + w * 2 * B * kActBox, 2 * B, tid % 128, 128);
            fence_acts<2, kWGs * 128>();
          } else {
            permute_acts(step_acts, 4 * B, tid % 128, 128);
            if (w == 0)
              fence_acts<3, 128>();
            else
              fence_acts<4, 128>();
          }
        }
      }
      const long long c_wait = clk ? clock64() : 0;
      barrier_wait(full + 8 * stage, (used / C::kStages) & 1);
      if (clk) clock_add(clk, kClockWeightWait + w, clock64() - c_wait);
      const uint8_t* st = base + stage * C::kStageBytes;
#pragma unroll
      for (int b = 0; b < B; ++b) {
        const uint8_t* codes = st + b * kBoxCodeBytes + rig * 128 + 4 * (kPerm ? t : t / 2);
        const uint8_t* scales = st + C::kCodeBytes + b * kBoxScaleBytes;
        uint4 sc[2];
        sc[0] = *reinterpret_cast<const uint4*>(scales + rig * 16);
        sc[1] = *reinterpret_cast<const uint4*>(scales + (rig + 8) * 16);
        const uint32_t act_box = acts + ((ks - ks0) * B + b) * 4 * kActBox;
#pragma unroll
        for (int sub = 0; sub < 4; ++sub) {
          uint32_t(&A)[16] = sub % 2 ? A1 : A0;
          wgmma_wait<1>();  // the wgmmas two slices back, which read this register set, are done
          if constexpr (kPerm)
            decode_pair_perm(codes, g, sc, sub, a.half2_magic, A);
          else
            decode_pair(codes, g, sc, sub, sel, a.half2_magic, A);
          if (b == B - 1 && sub == 3)
            barrier_arrive(empty + 8 * stage);  // decoded: the stage may refill
          uint64_t desc[4];
#pragma unroll
          for (int s = 0; s < 4; ++s) desc[s] = act_descriptor(act_box + sub * kActBox + 32 * s);
          wgmma_fence();
          wgmma_m64n16k64(acc[sub % kAccs], A, desc);
          wgmma_commit();
        }
      }
      ++used;
    };
    // The group's sums in acc[0], once its wgmmas are done.
    const auto finish_acc = [&] {
      wgmma_wait<0>();
#pragma unroll
      for (int e = 0; e < 8 * kAccs; ++e) fence_operand(acc[e / 8][e % 8]);
#pragma unroll
      for (int e = 0; e < 8 * (kAccs - 1); ++e) acc[0][e % 8] += acc[1 + e / 8][e % 8];
    };
    const auto clear_acc = [&] {
#pragma unroll
      for (int e = 0; e < 8 * kAccs; ++e) acc[e / 8][e % 8] = 0.0f;
    };
    const int owned = owned_groups(a, g1 - g0, kWGs);
    for (int j = w; j < owned; j += kWGs) {  // whole groups, stored by this warpgroup alone
      clear_acc();
      for (int ks = ks0; ks < ks1; ++ks) step(ks, j < kWGs, true);
      const long long c_end = clk ? clock64() : 0;
      finish_acc();
      store_group(a, g0 + j, acc[0], rig, t, res ? res + j * kGroupFloats : nullptr);
      if (clk) clock_add(clk, kClockGroupEnd + w, clock64() - c_end);
    }
    for (int group = g0 + owned; group < g1; ++group) {  // the warpgroups' steps in turn
      clear_acc();
      for (int ks = ks0 + w; ks < ks1; ks += kWGs) step(ks, group == g0, false);
      const long long c_end = clk ? clock64() : 0;
      finish_acc();
      // Warpgroup 0 adds the others' sums (thread i of each holds the same outputs) and stores.
      if (w > 0) {
#pragma unroll
        for (int e = 0; e < 8; ++e) xch[(w - 1) * kGroupFloats + e * 128 + tid % 128] = acc[0][e];
      }
      asm volatile("bar.sync 1, %0;\n" ::"n"(kWGs * 128) : "memory");
      if (w == 0) {
#pragma unroll
        for (int o = 1; o < kWGs; ++o)
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[0][e] += xch[(o - 1) * kGroupFloats + e * 128 + tid];
        store_group(a, group, acc[0], rig, t, res ? res + (group - g0) * kGroupFloats : nullptr);
      }
      asm volatile("bar.sync 1, %0;\n" ::"n"(kWGs * 128) : "memory");  // the exchange is free
      if (clk) clock_add(clk, kClockGroupEnd + w, clock64() - c_end);
    }
    clock_add(clk, kClockProducts + w, clock64() - c_dep);
  }
  // The products are done: the next kernel (RoPE + KV store, a norm, SwiGLU; with
  // chained_launches a dependent launch) may be scheduled while the results are summed and stored.
  grid_dependents_launch();
  __syncwarp();  // the producer's lane rejoins its warp before the cluster barrier
  if (split) {
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // every block's results are in its shared memory
    sum_cluster(a, g0, g1 - g0, res);
    // ... and stay there until every block has read them. cluster.sync() arrives with release
    // semantics: MEMBAR.ALL.GPU, which waits for this thread's stores to the output (ncu: its
    // ERRBAR took 3% of the stall samples). Nothing needs them ordered here, and the reads of
    // the other blocks' results are done (their values went into those stores), so with
    // a.relaxed_exit the arrive is relaxed.
    if (a.relaxed_exit)
      asm volatile("barrier.cluster.arrive.relaxed.aligned;\nbarrier.cluster.wait.aligned;\n" ::
                       : "memory");
    else
      cluster.sync();
  }
  if (tid == 0 && clk) {
    const long long span = clock64() - c_dep;
    clock_add(clk, kClockBlocks, 1);
    if (blockIdx.x == 0 && blockIdx.y == 0) clock_add(clk, kClockLaunches, 1);
    clock_add(clk, kClockEnd, span);
    atomicMax(clk + kClockMaxEnd, static_cast<unsigned long long>(span));
  }
#endif
}

// 1 when the kernel above was compiled for sm_90a.
__global__ void stream16_probe_kernel(int* flag) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *flag = 1;
#else
  *flag = 0;
#endif
}

}  // namespace

namespace {

// KESTREL_CUDA_STREAM16_SPLITS=N: N splits of K where they fit (tests, measurements); else the
// cheapest plan.
int forced_stream16_splits() {
  static const int n = [] {
    const char* e = std::getenv("KESTREL_CUDA_STREAM16_SPLITS");
    return e ? std::clamp(std::atoi(e), 0, kMaxSplits) : 0;
  }();
  return n;
}

cudaLaunchConfig_t launch_config(int splits, int clusters, size_t smem, int threads,
                                 cudaStream_t s) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(splits, clusters);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.stream = s;
  return config;
}

// Thread block clusters of the splits of a row range (grid.x).
cudaLaunchAttribute cluster_attr(int splits) {
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = splits;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  return attr;
}

// The kernel's variant as 10 x boxes + accumulator sets: KESTREL_CUDA_STREAM16_BOXES=1, 2 or 4
// (code boxes a stage, 128 contiguous bytes of a row each; 2 unless set) and
// KESTREL_CUDA_STREAM16_ACCS=1 or 2 (1 unless set; 2 only with 2 or 4 boxes), + 100 with
// permuted activations (2 or 4 boxes, one set; unless KESTREL_CUDA_STREAM16_PERM=0).
// Measured (H100, fifteenth session, 16 tokens, us: 1 box / 2 / 2 with two sets / 2 permuted):
// qkv group 18.3 / 17.4 / 18.0 / 16.0, gate/up group 28.8 / 29.7 / 30.5 / 27.2; 4 boxes do not
// fit the 11008-wide shapes; the fragment kernel 21.9 and 29.7.
int stream16_variant() {
  static const int n = [] {
    const char* e = std::getenv("KESTREL_CUDA_STREAM16_BOXES");
    const char* f = std::getenv("KESTREL_CUDA_STREAM16_ACCS");
    const char* g = std::getenv("KESTREL_CUDA_STREAM16_PERM");
    const int boxes = e && (std::atoi(e) == 1 || std::atoi(e) == 4) ? std::atoi(e) : 2;
    const bool accs2 = f && std::atoi(f) == 2 && boxes > 1;
    if (!(g && std::string(g) == "0") && !accs2 && boxes > 1) return 100 + 10 * boxes + 1;
    return 10 * boxes + (accs2 ? 2 : 1);
  }();
  return n;
}

// Whether the kernel goes as a programmatic dependent launch, streaming its first weights while
// the kernel before it (a norm, SwiGLU, attention: they let dependents start) finishes; not with
// KESTREL_CUDA_PDL=0 or KESTREL_CUDA_STREAM16_PDL=0.
bool stream16_early() {
  static const bool on = [] {
    const char* e = std::getenv("KESTREL_CUDA_STREAM16_PDL");
    return dependent_launches() && !(e && std::string(e) == "0");
  }();
  return on;
}

// Whether variable `name` is "1" (the opt-in variants not yet measured).
bool env_flag_on(const char* name) {
  const char* e = std::getenv(name);
  return e && std::string(e) == "1";
}

// Whether each step's activations have a barrier of their own (load_acts), so the first products
// wait for 16 KB, not 64: the default (the seed's b128 ub16 on an H200, nineteenth session: 4,578
// t/s against 4,426 with one barrier for all); KESTREL_CUDA_STREAM16_ACT_STEPS=0: one barrier.
bool stream16_act_steps() {
  static const bool on = [] {
    const char* e = std::getenv("KESTREL_CUDA_STREAM16_ACT_STEPS");
    return !(e && std::string(e) == "0");
  }();
  return on;
}

// Whether the warpgroups take whole row groups where a block's groups pair up
// (KESTREL_CUDA_STREAM16_OWN=1), instead of taking turns at the steps of each group and adding
// their sums through shared memory at its end (two warpgroup barriers a group).
bool stream16_own_groups() {
  static const bool on = env_flag_on("KESTREL_CUDA_STREAM16_OWN");
  return on;
}

// Clusters of `splits` blocks of `smem` bytes that can be resident at once: a cluster's blocks
// share a GPC, so 132 SMs do not hold 33 clusters of 4 one-SM blocks when their GPCs have 16 or
// 18 SMs. Queried once per (device, kernel, splits, shared memory).
template <int B, int kAccs, bool kPerm, int W>
int max_active_clusters(int splits, size_t smem) {
  static std::mutex mutex;
  static std::map<std::tuple<int, int, size_t>, int> known;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(device, splits, smem);
  if (const auto it = known.find(key); it != known.end()) return it->second;
  cudaLaunchConfig_t config = launch_config(splits, 1, smem, Cfg<B, W>::kThreads, nullptr);
  cudaLaunchAttribute attr = cluster_attr(splits);
  config.attrs = &attr;
  config.numAttrs = 1;
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, matmul_stream16_kernel<B, kAccs, kPerm, W>, &config) !=
      cudaSuccess) {
    cudaGetLastError();
    n = 0;
  }
  known[key] = n;
  return n;
}

template <int B, int kAccs, bool kPerm, int W>
Stream16Plan plan_boxes(int64_t n_in, int groups, int sms, size_t smem_limit) {
  const int steps = static_cast<int>(ceil_div(n_in, int64_t{Cfg<B, W>::kStepK}));
  Stream16Plan best;
  double best_cost = 0;
  const int forced = forced_stream16_splits();
  for (int pass = forced > 0 ? 0 : 1; pass < 2 && best.splits == 0; ++pass) {
    for (int splits = 1; splits <= std::min(kMaxSplits, steps); ++splits) {
      if (pass == 0 && splits != std::min(forced, steps)) continue;
      const int sps = ceil_div(steps, splits);
      const int used_splits = ceil_div(steps, sps);
      if (used_splits != splits)
        continue;  // rounding left a split empty: a smaller one is the same
      int gpb = ceil_div(groups, std::max(1, std::min(sms / splits, groups)));
      size_t smem = smem_bytes<B, W>(sps, gpb, splits);
      if (smem > smem_limit) continue;
      if (const int most = max_active_clusters<B, kAccs, kPerm, W>(splits, smem); most <= 0) {
        continue;
      } else if (ceil_div(groups, gpb) > most) {  // one wave: more rows a cluster
        gpb = ceil_div(groups, most);
        smem = smem_bytes<B, W>(sps, gpb, splits);
        if (smem > smem_limit) continue;
      }
      const int clusters = ceil_div(groups, gpb);
      // A block's time: the steps its busiest warpgroup takes (the groups it owns whole, then
      // its turns of the others); the cluster's sum reads every result once from each block
      // (about a quarter of a 256-K step a group).
      const int owned = stream16_own_groups() && gpb >= W ? gpb / W * W : 0;
      const double cost = (double(owned / W) * sps + double(gpb - owned) * ceil_div(sps, W)) * B +
                          (splits > 1 ? 0.25 * gpb : 0.0);
      if (best.splits == 0 || cost < best_cost * 0.97) {
        best = {splits, clusters, sps, gpb, smem};
        best_cost = cost;
      }
    }
  }
  return best;
}

template <int B, int kAccs, bool kPerm, int W>
Status launch_boxes(Stream16Args& a, int64_t n_in, const Stream16Plan& plan, cudaStream_t s) {
  a.steps = static_cast<int>(ceil_div(n_in, int64_t{Cfg<B, W>::kStepK}));
  a.steps_per_split = plan.steps_per_split;
  a.groups_per_block = plan.groups_per_block;
  cudaLaunchConfig_t config =
      launch_config(plan.splits, plan.clusters, plan.smem, Cfg<B, W>::kThreads, s);
  cudaLaunchAttribute attrs[2] = {cluster_attr(plan.splits), {}};
  attrs[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attrs[1].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attrs;
  config.numAttrs = stream16_early() ? 2 : 1;
  CUDA_TRY(cudaLaunchKernelEx(&config, matmul_stream16_kernel<B, kAccs, kPerm, W>, a),
           "matmul (stream16 launch)");
  LAUNCH_CHECK("matmul (stream16, Q4_0)");
  return Status::ok();
}

// The kernel variant of stream16_variant() as a type, for f (one switch for planning and launch).
template <int B, int A, bool P, int W = 2>
struct Variant {
  static constexpr int kBoxes = B, kAccs = A, kWGs = W;
  static constexpr bool kPerm = P;
};

template <class F>
auto with_variant(F&& f) {
  switch (stream16_variant()) {
    case 21:
      return f(Variant<2, 1, false>{});
    case 41:
      return f(Variant<4, 1, false>{});
    case 22:
      return f(Variant<2, 2, false>{});
    case 42:
      return f(Variant<4, 2, false>{});
    case 11:
      return f(Variant<1, 1, false>{});
    case 141:
      return f(Variant<4, 1, true>{});
    default:
      return f(Variant<2, 1, true>{});
  }
}

}  // namespace

Stream16Plan stream16_plan(const MatvecPart* parts, int n_parts, int n_tokens, int sms,
                           size_t smem_limit) {
  if (n_tokens < kFragMinTokens || n_tokens > 16 || n_parts < 1 || n_parts > kMatvecMaxParts)
    return {};
  int groups = 0;
  for (int i = 0; i < n_parts; ++i) {
    if (parts[i].w->type != DType::Q4_0 || parts[i].w->n_in % kBoxK != 0 ||
        parts[i].w->n_in != parts[0].w->n_in)
      return {};
    groups += static_cast<int>(ceil_div(parts[i].w->n_out, kGroupRows));
  }
  const int64_t n_in = parts[0].w->n_in;
  return with_variant([&](auto v) {
    using V = decltype(v);
    return plan_boxes<V::kBoxes, V::kAccs, V::kPerm, V::kWGs>(n_in, groups, sms, smem_limit);
  });
}

Expected<bool> stream16_available(int device) {
  cudaDeviceProp prop{};
  CUDA_TRY(cudaGetDeviceProperties(&prop, device), "stream16 probe (device properties)");
  if (prop.major != 9 || prop.minor != 0) return false;
  KESTREL_ASSIGN_OR_RETURN(const bool compiled,
                           probe_says_compiled(stream16_probe_kernel, "stream16 probe"));
  if (!compiled) return false;
  const int smem = static_cast<int>(prop.sharedMemPerBlockOptin);
  for (const void* kernel : {reinterpret_cast<const void*>(matmul_stream16_kernel<1, 1, false, 2>),
                             reinterpret_cast<const void*>(matmul_stream16_kernel<2, 1, false, 2>),
                             reinterpret_cast<const void*>(matmul_stream16_kernel<4, 1, false, 2>),
                             reinterpret_cast<const void*>(matmul_stream16_kernel<2, 2, false, 2>),
                             reinterpret_cast<const void*>(matmul_stream16_kernel<4, 2, false, 2>),
                             reinterpret_cast<const void*>(matmul_stream16_kernel<2, 1, true, 2>),
                             reinterpret_cast<const void*>(matmul_stream16_kernel<4, 1, true, 2>)})
    CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
             "stream16 matmul (shared memory limit)");
  return true;
}

namespace {

// KESTREL_CUDA_STREAM16_TIMING's shapes (parts, n_in, rows of all parts), in the order first met.
struct ClockShapes {
  std::mutex mutex;
  std::vector<std::tuple<int, int64_t, int64_t>> keys;
  int slot(int n_parts, int64_t n_in, int64_t rows) {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto key = std::make_tuple(n_parts, n_in, rows);
    for (size_t i = 0; i < keys.size(); ++i)
      if (keys[i] == key) return static_cast<int>(i);
    if (keys.size() == kClockShapes) return -1;
    keys.push_back(key);
    return static_cast<int>(keys.size()) - 1;
  }
};

ClockShapes& clock_shapes() {
  static ClockShapes shapes;
  return shapes;
}

}  // namespace

size_t stream16_timing_bytes() {
  return sizeof(unsigned long long) * kClockShapes * kClockFields;
}

void print_stream16_timing(const unsigned long long* timing) {
  std::vector<unsigned long long> acc(kClockShapes * kClockFields);
  if (cudaMemcpy(acc.data(), timing, stream16_timing_bytes(), cudaMemcpyDeviceToHost) !=
      cudaSuccess)
    return;
  ClockShapes& shapes = clock_shapes();
  const std::lock_guard<std::mutex> lock(shapes.mutex);
  std::fprintf(stderr,
               "stream16 timing (KESTREL_CUDA_STREAM16_TIMING=1), SM cycles a block from its "
               "grid dependency wait:\n%-24s %8s %6s %8s %8s %8s %8s %8s %8s %8s %8s %8s %8s\n",
               "parts x rows x n_in", "launches", "blocks", "early", "acts", "prod0", "prod1",
               "end", "max-end", "wwait0", "wwait1", "gend0", "gend1");
  for (size_t i = 0; i < shapes.keys.size(); ++i) {
    const unsigned long long* c = acc.data() + i * kClockFields;
    const double n = static_cast<double>(std::max(c[kClockBlocks], 1ull));
    char name[64];
    std::snprintf(name, sizeof(name), "%d x %lld x %lld", std::get<0>(shapes.keys[i]),
                  static_cast<long long>(std::get<2>(shapes.keys[i])),
                  static_cast<long long>(std::get<1>(shapes.keys[i])));
    std::fprintf(stderr,
                 "%-24s %8llu %6.0f %8.0f %8.0f %8.0f %8.0f %8.0f %8llu %8.0f %8.0f %8.0f %8.0f\n",
                 name, c[kClockLaunches], n / std::max(c[kClockLaunches], 1ull), c[kClockEarly] / n,
                 c[kClockActs] / n, c[kClockProducts] / n, c[kClockProducts + 1] / n,
                 c[kClockEnd] / n, c[kClockMaxEnd], c[kClockWeightWait] / n,
                 c[kClockWeightWait + 1] / n, c[kClockGroupEnd] / n, c[kClockGroupEnd + 1] / n);
  }
}

Status launch_matmul_stream16(WgmmaMapCache& maps, const MatvecPart* parts, int n_parts,
                              const __half* x16, int n_tokens, const Stream16Plan& plan,
                              unsigned long long* timing, cudaStream_t s) {
  if (plan.splits == 0) return error("matmul (stream16): launched without a plan");
  const int64_t n_in = parts[0].w->n_in;
  Stream16Args a{};
  int groups = 0;
  for (int i = 0; i < n_parts; ++i) {
    const CudaWeight& w = *parts[i].w;
    groups += static_cast<int>(ceil_div(w.n_out, kGroupRows));
    KESTREL_ASSIGN_OR_RETURN(a.codes[i],
                             wgmma_tensor_map(maps, kMapCodes128x64, w.qs, n_in, w.n_out));
    KESTREL_ASSIGN_OR_RETURN(a.scales[i],
                             wgmma_tensor_map(maps, kMapScales8x64, w.d, n_in, w.n_out));
    a.parts[i] = {w.n_out, parts[i].out, parts[i].bias, groups};
  }
  KESTREL_ASSIGN_OR_RETURN(a.act, wgmma_tensor_map(maps, kMapActs64x16, x16, n_in, n_tokens));
  a.n_parts = n_parts;
  a.n_tokens = n_tokens;
  a.groups = groups;
  a.half2_magic = 0x64006400u;
  a.act_steps = stream16_act_steps() ? 1 : 0;
  static const bool relaxed_exit = env_flag_on("KESTREL_CUDA_STREAM16_RELAXED_EXIT");
  a.relaxed_exit = relaxed_exit ? 1 : 0;
  a.own_groups = stream16_own_groups() ? 1 : 0;
  if (timing) {
    int64_t rows = 0;
    for (int i = 0; i < n_parts; ++i) rows += parts[i].w->n_out;
    const int slot = clock_shapes().slot(n_parts, n_in, rows);
    a.clock = slot < 0 ? nullptr : timing + slot * kClockFields;
  }
  return with_variant([&](auto v) {
    using V = decltype(v);
    return launch_boxes<V::kBoxes, V::kAccs, V::kPerm, V::kWGs>(a, n_in, plan, s);
  });
}

}  // namespace kestrel::backend::cuda
