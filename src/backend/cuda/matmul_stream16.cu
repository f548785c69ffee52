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
//    ~75 KB. Each warpgroup takes whole row groups (64 rows, all of the block's K) in turn; an
//    odd last group (or a block's only one) the two take alternate steps of and add their
//    accumulators at its end (through 4 KB of shared memory), so that the groups divide evenly;
//  - the block's activations (16 tokens x its K range, f16, the 128-byte swizzled layout wgmma
//    reads through a matrix descriptor) are copied once at the start and stay: the weights are
//    the only stream (the v2 kernels re-read a step's activations from L2 with every row block);
//  - each consumer thread decodes its fragment of 64 rows x 64 K (rows g and g + 8 of its warp,
//    as matmul_wgmma.cu does) and the warpgroup issues wgmma m64n16k16 with A in registers, four
//    a 64 K, into 8 f32 accumulators a thread; a stage goes back to the producer as soon as it is
//    decoded (B is the resident activations);
//  - K is split over the blocks of a thread block cluster (grid.x = splits <= 8): each block
//    keeps its results for all its rows in shared memory, stores every other block's slice of
//    them into that block's shared memory (st.async, counted on its barrier) and sums its own
//    slice over the cluster's blocks in rank order (deterministic) once the others' parts are in.
//    No partials in global memory, no second launch, no cluster barrier at the end.
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
#include "backend/cuda/stream16_device.cuh"
#include "backend/cuda/wgmma_ops.cuh"

namespace kestrel::backend::cuda {

using quant::DType;

namespace {

// KESTREL_CUDA_STREAM16_TIMING=1: where a launch's time goes, in SM cycles summed over its blocks
// (clock64 of one SM; times from the block's grid_dependency_wait, when the kernel before has
// finished). Thread 0 (warpgroup 0) and thread 128 (warpgroup 1) record.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void clock_add(unsigned long long* clk, int field, long long cycles) {
  if (clk) atomicAdd(clk + field, static_cast<unsigned long long>(cycles > 0 ? cycles : 0));
}
#endif

// kAccs accumulator sets taken in turn by the 64-K slices, added at the group's end: chains of
// dependent wgmmas kAccs times shorter. kPerm: the activations reordered once (permute_acts) so
// that the weights decode without byte permutes (decode_pair_perm).
// kRope: the Q, K, V launch with RoPE and the KV store in its pushed sum (a.rope; the default
// variant only), an instance of its own so that the other launches' code stays as measured.
template <int B, int kAccs, bool kPerm, int kWGs, bool kRope = false>
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
  // With kSumPush the receive buffer follows the results, and its barrier the activations'.
  const bool push = split && a.sum_mode == kSumPush;
  float* res = split ? xch + (kWGs - 1) * kGroupFloats : nullptr;
  float* rcv = push ? res + a.groups_per_block * kGroupFloats : nullptr;
  const uint32_t full =
                     smem_addr(xch + (kWGs - 1 + (split ? a.groups_per_block : 0)) * kGroupFloats) +
                     (push ? static_cast<uint32_t>(push_buffer_bytes(a.groups_per_block)) : 0),
                 empty = full + 8 * kWGs * C::kStages, act_bar = empty + 8 * kWGs * C::kStages,
                 rcv_bar = act_bar + 8 * a.steps_per_split;
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
    if (push) {  // its one phase ends when the other blocks' parts of this block's slice are in
      barrier_init(rcv_bar, 1);
      barrier_expect(rcv_bar, push_bytes(g1 - g0, static_cast<int>(gridDim.x),
                                         static_cast<int>(cg::this_cluster().block_rank())));
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  // kSumPush: the other blocks may store into this one's receive buffer once its barrier is
  // initialized; the wait for theirs is at the end, so that this costs nothing here.
  if (push) asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
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
  if (push) {
    asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");  // every block's barrier init
    __syncthreads();  // the block's results are all in res
    push_results(g1 - g0, res, smem_addr(rcv), rcv_bar);
    wait_pushed(rcv_bar);
    if (tid == 0) clock_add(clk, kClockMet, clock64() - c_dep);
    sum_pushed<kRope>(a, g0, g1 - g0, res, rcv);
  } else if (split) {
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // every block's results are in its shared memory
    if (tid == 0) clock_add(clk, kClockMet, clock64() - c_dep);
    if (a.sum_mode == kSumVec)
      sum_cluster_vec(a, g0, g1 - g0, res);
    else
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

// Whether the warpgroups take whole row groups where a block's groups pair up, instead of taking
// turns at the steps of each group and adding their sums through shared memory at its end (two
// warpgroup barriers a group; KESTREL_CUDA_STREAM16_OWN=0). H100, the seed's b128 ub16 in one
// call: 4,298 / 4,232 t/s against 4,105 / 4,146; gate/up at 16 tokens 30.1 against 32.2 us.
bool stream16_own_groups() {
  static const bool on = [] {
    const char* e = std::getenv("KESTREL_CUDA_STREAM16_OWN");
    return !(e && std::string(e) == "0");
  }();
  return on;
}

// How a cluster's blocks sum their results (SumMode): by default each block pushes the others'
// slices into their shared memory (push_results + sum_pushed); KESTREL_CUDA_STREAM16_PUSH=0: the
// float4 loads of sum_cluster_vec; with KESTREL_CUDA_STREAM16_SUM_VEC=0 too, sum_cluster's one
// load at a time. H100, the seed's b128 ub16 (thirtieth session, alternating rows of one call
// each): sum_cluster 4,457 / 4,386 t/s, sum_cluster_vec 4,527 / 4,564 (next call 4,564 / 4,575),
// push 4,780 / 4,789.
int stream16_sum_mode() {
  static const int mode = [] {
    const char* push = std::getenv("KESTREL_CUDA_STREAM16_PUSH");
    if (!(push && std::string(push) == "0")) return int{kSumPush};
    const char* e = std::getenv("KESTREL_CUDA_STREAM16_SUM_VEC");
    return e && std::string(e) == "0" ? int{kSumPlain} : int{kSumVec};
  }();
  return mode;
}

// The plan's cost of the cluster's sum for a row group, in 256-K steps: 0.25 unless
// KESTREL_CUDA_STREAM16_SUM_COST says otherwise (lab: whether plans of more splits pay now that
// the sum is pushed).
double stream16_sum_cost() {
  static const double cost = [] {
    const char* e = std::getenv("KESTREL_CUDA_STREAM16_SUM_COST");
    return e ? std::clamp(std::atof(e), 0.0, 8.0) : 0.25;
  }();
  return cost;
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
  const bool push = stream16_sum_mode() == kSumPush;
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
      size_t smem = smem_bytes<B, W>(sps, gpb, splits, push);
      if (smem > smem_limit) continue;
      if (const int most = max_active_clusters<B, kAccs, kPerm, W>(splits, smem); most <= 0) {
        continue;
      } else if (ceil_div(groups, gpb) > most) {  // one wave: more rows a cluster
        gpb = ceil_div(groups, most);
        smem = smem_bytes<B, W>(sps, gpb, splits, push);
        if (smem > smem_limit) continue;
      }
      const int clusters = ceil_div(groups, gpb);
      // A block's time: the steps its busiest warpgroup takes (the groups it owns whole, then
      // its turns of the others); the cluster's sum reads every result once from each block
      // (about a quarter of a 256-K step a group; KESTREL_CUDA_STREAM16_SUM_COST, lab).
      const int owned = stream16_own_groups() && gpb >= W ? gpb / W * W : 0;
      const double cost = (double(owned / W) * sps + double(gpb - owned) * ceil_div(sps, W)) * B +
                          (splits > 1 ? stream16_sum_cost() * gpb : 0.0);
      if (best.splits == 0 || cost < best_cost * 0.97) {
        best = {splits, clusters, sps, gpb, smem};
        best_cost = cost;
      }
    }
  }
  return best;
}

// The variant that has a kRope instance: the default (2 boxes, one set, permuted, 2 warpgroups).
template <int B, int kAccs, bool kPerm, int W>
constexpr bool kRopeVariant = kPerm ? B == 2 && kAccs == 1 && W == 2 : false;

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
  if (a.rope.cache_type) {
    if constexpr (kRopeVariant<B, kAccs, kPerm, W>) {
      CUDA_TRY(cudaLaunchKernelEx(&config, matmul_stream16_kernel<B, kAccs, kPerm, W, true>, a),
               "matmul (stream16 launch, RoPE and KV store)");
    } else {
      return error("matmul (stream16): RoPE and the KV store asked of another kernel variant");
    }
  } else {
    CUDA_TRY(cudaLaunchKernelEx(&config, matmul_stream16_kernel<B, kAccs, kPerm, W>, a),
             "matmul (stream16 launch)");
  }
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
  for (const void* kernel :
       {reinterpret_cast<const void*>(matmul_stream16_kernel<1, 1, false, 2>),
        reinterpret_cast<const void*>(matmul_stream16_kernel<2, 1, false, 2>),
        reinterpret_cast<const void*>(matmul_stream16_kernel<4, 1, false, 2>),
        reinterpret_cast<const void*>(matmul_stream16_kernel<2, 2, false, 2>),
        reinterpret_cast<const void*>(matmul_stream16_kernel<4, 2, false, 2>),
        reinterpret_cast<const void*>(matmul_stream16_kernel<2, 1, true, 2>),
        reinterpret_cast<const void*>(matmul_stream16_kernel<4, 1, true, 2>),
        reinterpret_cast<const void*>(matmul_stream16_kernel<2, 1, true, 2, true>)})
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
               "grid dependency wait:\n%-24s %8s %6s %8s %8s %8s %8s %8s %8s %8s %8s %8s %8s "
               "%8s\n",
               "parts x rows x n_in", "launches", "blocks", "early", "acts", "prod0", "prod1",
               "met", "end", "max-end", "wwait0", "wwait1", "gend0", "gend1");
  for (size_t i = 0; i < shapes.keys.size(); ++i) {
    const unsigned long long* c = acc.data() + i * kClockFields;
    const double n = static_cast<double>(std::max(c[kClockBlocks], 1ull));
    char name[64];
    std::snprintf(name, sizeof(name), "%d x %lld x %lld", std::get<0>(shapes.keys[i]),
                  static_cast<long long>(std::get<2>(shapes.keys[i])),
                  static_cast<long long>(std::get<1>(shapes.keys[i])));
    std::fprintf(stderr,
                 "%-24s %8llu %6.0f %8.0f %8.0f %8.0f %8.0f %8.0f %8.0f %8llu %8.0f %8.0f %8.0f "
                 "%8.0f\n",
                 name, c[kClockLaunches], n / std::max(c[kClockLaunches], 1ull), c[kClockEarly] / n,
                 c[kClockActs] / n, c[kClockProducts] / n, c[kClockProducts + 1] / n,
                 c[kClockMet] / n, c[kClockEnd] / n, c[kClockMaxEnd], c[kClockWeightWait] / n,
                 c[kClockWeightWait + 1] / n, c[kClockGroupEnd] / n, c[kClockGroupEnd + 1] / n);
  }
}

bool stream16_takes_rope(const Stream16Plan& plan) {
  return stream16_sum_mode() == kSumPush && stream16_variant() == 121 &&
         (plan.splits == 2 || plan.splits == 4 || plan.splits == 8);
}

Status launch_matmul_stream16(WgmmaMapCache& maps, const MatvecPart* parts, int n_parts,
                              const __half* x16, int n_tokens, const Stream16Plan& plan,
                              unsigned long long* timing, cudaStream_t s,
                              const Stream16Rope* rope) {
  if (plan.splits == 0) return error("matmul (stream16): launched without a plan");
  if (rope && (n_parts != 3 || !stream16_takes_rope(plan)))
    return error(
        "matmul (stream16): RoPE and the KV store asked of a launch that cannot take them");
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
  a.sum_mode = stream16_sum_mode();
  if (rope) a.rope = *rope;
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
