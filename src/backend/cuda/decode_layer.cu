// The decode step of a whole layer (one token) as one persistent kernel: every SM runs one block
// that takes its share of each phase, and the phases meet at grid-wide barriers.
//
// Why: a decode step of llama2-7b ran ~290 kernels (9 a layer) whose weight streaming needs
// ~0.8 ms at the H200's bandwidth, and took ~2.3 ms (bench/NOTES.md, eighth session: the matvecs
// averaged 2.3 TB/s, each launch paying its ramp and tail, and the small kernels between them
// ~5 us each). Here a layer is one launch and the time between phases is a barrier, which the
// blocks that arrive early spend asking L2 for the next phase's weights (which do not depend on
// the barrier), so the memory stays busy across it.
//
// Phases (T = 1; E = n_embd, F = n_ff):
//   A  h = rms_norm(x (+ proj)) * attn_norm, quantized to int8 planes in each block's shared
//      memory (every block computes it: 2 x 16 KB from L2 instead of a barrier)
//   B  q, k, v = W{q,k,v} h
//   -- barrier --
//   C1 RoPE of k, then k and v stored into cache row pos; x += proj when it was pending
//   -- barrier --
//   C2 attention per head (attention_rows_block, q rotated as it is loaded), written in f32 and as
//      the output projection's int8 planes
//   -- barrier --
//   D  x += Wo att
//   -- barrier --
//   E  h = rms_norm(x) * ffn_norm as planes; g, u = Wgate h, Wup h for the same rows;
//      hf = silu(g) * u
//   -- barrier --
//   F  hf as planes in each block; x += Wdown hf
// The weights of B, D, E and F come through a ring of shared-memory stages that the copy engine
// keeps filling across the barriers (decode_ring.cuh), so the memory stays busy while the
// blocks norm, attend or wait. Each phase computes what the op-by-op path computes with the same
// device functions (the int8 planes, dp4a sums, RoPE, the cache quantization, attention), in
// another summation order for the matvecs' f32 sums. Opt-in (KESTREL_CUDA_FUSED_DECODE=1), sm_90
// (bulk copies); gpu-check.sh's gpu-tests-fused-decode and e2e-fused-decode stages and
// gpu_bench.py's A/B rows test and measure it (bench/NOTES.md, tenth and twenty-second sessions).
#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include "backend/cuda/acts_device.cuh"
#include "backend/cuda/attention_rows.cuh"
#include "backend/cuda/cuda_backend_impl.cuh"
#include "backend/cuda/decode_ring.cuh"
#include "backend/cuda/kv_store_device.cuh"
#include "backend/cuda/matvec_device.cuh"
#include "backend/cuda/rope_device.cuh"

namespace kestrel::backend::cuda {

using quant::DType;

namespace {

constexpr int kThreads = kRowsThreads;  // the attention phase is attention_rows_block's
constexpr int kWarps = kThreads / 32;
static_assert(kThreads == 512, "decode_ring.cuh's ring_phase takes 16 warps");

struct DecodeParams {
  float* x;           // [E] the residual
  const float* proj;  // [E] added to x first (the previous layer's pending add), or null
  const float* attn_norm;
  const float* ffn_norm;
  float eps;
  int64_t E, F;
  RingPhase phase[kRingPhases];  // Q/K/V, output, gate/up, down
  RingPhase next_qkv;            // the next decode layer's Q/K/V (asked of L2 at the end), or empty
  RingShape ring;
  int ring_offset;        // of the ring in dynamic shared memory (after the planes / attention)
  float* att;             // [q_dim]
  float *q, *k, *v;       // [q_dim], [kv_dim], [kv_dim]
  MatmulInputOut att_in;  // its int8 planes (global)
  float* hf;              // [F] silu(gate) * up
  const int32_t* pos;     // [1]
  uint8_t* k_cache;
  uint8_t* v_cache;
  int64_t k_row_bytes, v_row_bytes;
  int n_head, n_head_kv, D;
  float scale;
  bool neox;
  RopeTable rope;
  unsigned long long* barrier;  // arrivals at the grid barriers (0 between launches)
  unsigned long long* timing;   // PhaseClock's sums, or null
};

// The phase clock's sums (PhaseClock below): [kPhases][2], the launches and their blocks, then
// ring_phase's step clock of each ring phase (B, D, E, F).
constexpr int kBarriers = 5, kPhases = kBarriers + 1;
constexpr int kRingSlots = 2 * kPhases + 2;
constexpr int kTimingSlots = kRingSlots + kRingClockSlots * kRingPhases;

// The device code below needs sm_90 (decode_ring.cuh); for older devices the kernel is empty
// and decode_layer_available() says no.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900

// Shared-memory int8 planes of n activations (n a multiple of 32).
struct SmemActs {
  int8_t* q1;
  int8_t* q2;
  ActBlock* meta;
  __device__ MatmulInputOut out() const { return {q1, q2, meta, nullptr}; }
};

__device__ __forceinline__ SmemActs smem_acts(void* smem, int64_t n) {
  int8_t* q1 = static_cast<int8_t*>(smem);
  return {q1, q1 + n, reinterpret_cast<ActBlock*>(q1 + 2 * n)};
}

// KESTREL_CUDA_DECODE_TIMING=1: where a launch's time goes. Thread 0 of each block adds, per
// phase, the time from the phase's start to the block's arrival at the barrier after it (busy,
// summed over blocks) and block 0 the time between leaving two barriers (the phase's wall time);
// the backend prints the means when it is destroyed. acc: [kPhases][2] sums (ns), then the
// launches and the blocks they had.
struct PhaseClock {
  unsigned long long* acc;
  unsigned long long start = 0;
  int phase = 0;
  __device__ static unsigned long long now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
  }
  __device__ unsigned long long* ring(RingPhaseId ph) const {  // ring_phase's step clock
    return acc ? acc + kRingSlots + kRingClockSlots * ph : nullptr;
  }
  __device__ explicit PhaseClock(unsigned long long* a) : acc(a) {
    if (acc && threadIdx.x == 0) start = now();
  }
  __device__ void arrived() const {  // thread 0, every thread of the block done with the phase
    if (acc) atomicAdd(&acc[2 * phase + 1], now() - start);
  }
  __device__ void left() {  // thread 0, the barrier passed
    if (!acc) return;
    const unsigned long long t = now();
    if (blockIdx.x == 0) atomicAdd(&acc[2 * phase], t - start);
    start = t;
    ++phase;
  }
};

// All blocks of the grid (co-resident: a cooperative launch) arrive before any leaves. The
// counter starts each launch at 0 (grid_exit) and only grows within it: arrival `old` belongs to
// barrier old / gridDim.x, which ends when the count reaches the next multiple of gridDim.x.
__device__ __forceinline__ void grid_barrier(unsigned long long* counter, PhaseClock& clock) {
  __syncthreads();
  if (threadIdx.x == 0) {
    clock.arrived();
    __threadfence();
    const unsigned long long n = gridDim.x;
    const unsigned long long old = atomicAdd(counter, 1ull);
    const unsigned long long target = (old / n + 1) * n;
    unsigned long long now = 0;
    do {
      asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(now) : "l"(counter) : "memory");
    } while (now < target);
    __threadfence();
    clock.left();
  }
  __syncthreads();
}

// The last block to leave sets the counter back to 0 for the next launch (whose grid may differ):
// every block has passed every barrier by then, and the next launch starts after this one ends.
__device__ __forceinline__ void grid_exit(unsigned long long* counter, const PhaseClock& clock) {
  __syncthreads();
  if (threadIdx.x == 0) {
    clock.arrived();
    if (clock.acc && blockIdx.x == 0) {
      atomicAdd(&clock.acc[2 * kPhases], 1ull);
      atomicAdd(&clock.acc[2 * kPhases + 1], static_cast<unsigned long long>(gridDim.x));
    }
    const unsigned long long n = gridDim.x;
    if (atomicAdd(counter, 1ull) == (kBarriers + 1) * n - 1) atomicExch(counter, 0ull);
  }
}

// x (+ proj) as one float4 of the residual.
__device__ __forceinline__ float4 residual4(const float* x, const float* proj, int i) {
  float4 v = reinterpret_cast<const float4*>(x)[i];
  if (proj) {
    const float4 a = reinterpret_cast<const float4*>(proj)[i];
    v = make_float4(v.x + a.x, v.y + a.y, v.z + a.z, v.w + a.w);
  }
  return v;
}

// Phase A / E: rms_norm(x (+ proj)) * g of E values into the block's planes, as rms_norm_kernel
// computes it (f32 squares per thread and warp, the total and the scale in double).
__device__ __noinline__ void norm_to_planes(const float* x, const float* proj, const float* g,
                                            int64_t E, float eps, const SmemActs& a) {
  __shared__ float red[kWarps];
  __shared__ float inv;
  const int nv = static_cast<int>(E / 4), warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < nv; i += kThreads) {
    const float4 v = residual4(x, proj, i);
    ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
  }
  ss = warp_sum(ss);
  if (lane == 0) red[warp] = ss;
  __syncthreads();
  if (warp == 0) {
    double total = lane < kWarps ? red[lane] : 0.0;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) total += __shfl_xor_sync(0xffffffffu, total, off);
    if (lane == 0) inv = static_cast<float>(1.0 / sqrt(total / E + eps));
  }
  __syncthreads();
  const float f = inv;
  for (int i0 = 0; i0 < nv; i0 += kThreads) {  // whole warps: the planes reduce over 8 lanes
    const int i = i0 + threadIdx.x;
    float4 r = make_float4(0, 0, 0, 0);
    if (i < nv) {
      const float4 v = residual4(x, proj, i), w = reinterpret_cast<const float4*>(g)[i];
      r = make_float4(v.x * f * w.x, v.y * f * w.y, v.z * f * w.z, v.w * f * w.w);
    }
    write_matmul_input4(a.out(), 4 * int64_t{i}, r, i < nv);
  }
  __syncthreads();
}

// Phase F: n values of src into the block's planes.
__device__ void values_to_planes(const float* src, int64_t n, const SmemActs& a) {
  const int nv = static_cast<int>(n / 4);
  for (int i0 = 0; i0 < nv; i0 += kThreads) {
    const int i = i0 + threadIdx.x;
    const float4 r = i < nv ? reinterpret_cast<const float4*>(src)[i] : make_float4(0, 0, 0, 0);
    write_matmul_input4(a.out(), 4 * int64_t{i}, r, i < nv);
  }
  __syncthreads();
}

// Phase D: the attention output's planes (global, written by phase C2) into the block's.
__device__ void copy_planes(const MatmulInputOut& src, int64_t n, const SmemActs& a) {
  const int n16 = static_cast<int>(n / 16);
  for (int i = threadIdx.x; i < n16; i += kThreads) {
    reinterpret_cast<int4*>(a.q1)[i] = reinterpret_cast<const int4*>(src.q1)[i];
    reinterpret_cast<int4*>(a.q2)[i] = reinterpret_cast<const int4*>(src.q2)[i];
  }
  for (int i = threadIdx.x; i < n / 32; i += kThreads) a.meta[i] = src.meta[i];
  __syncthreads();
}

__device__ __forceinline__ int global_warp() {
  return static_cast<int>(blockIdx.x) * kWarps + static_cast<int>(threadIdx.x) / 32;
}
__device__ __forceinline__ int grid_warps() {
  return static_cast<int>(gridDim.x) * kWarps;
}

// Asks L2 for the block's first `count` items of ph (the next layer's first ring fill).
__device__ void prefetch_items(const RingPhase& ph, int count) {
  if (ph.n_parts == 0) return;
  count = min(count, ring_mine(ph.n_items()));
  for (int k = 0; k < count; ++k) {
    int64_t row0;
    const int item = static_cast<int>(blockIdx.x) + k * static_cast<int>(gridDim.x);
    const RingMatrix m = ring_matrix(ph, ring_part(ph, item, row0));
    const int rows = static_cast<int>(min(int64_t{ph.copy_rows}, m.n_out - row0));
    const int64_t code_row = int64_t{ph.nb} * (m.q8 ? 32 : 16);
    const uint8_t* q = m.qs + row0 * code_row;
    for (int64_t off = 128 * threadIdx.x; off < rows * code_row; off += 128 * kThreads)
      prefetch_l2(q + off);
    const uint8_t* d = reinterpret_cast<const uint8_t*>(m.d + row0 * ph.nb);
    if (128 * threadIdx.x < rows * ph.nb * 2) prefetch_l2(d + 128 * threadIdx.x);
  }
}

// Phase C1: RoPE of k and the store of k and v into row pos (rope_kv_store_kernel's arithmetic:
// rope_rotate, store_kv_block), a warp per 32-element block; the pending residual add.
template <DType CT>
__device__ void store_phase(const DecodeParams& p) {
  const int pos = p.pos[0], D = p.D, half = D / 2, lane = threadIdx.x % 32;
  const int kv_blocks = p.n_head_kv * D / 32;
  for (int u = global_warp(); u < 2 * kv_blocks; u += grid_warps()) {
    const bool is_k = u < kv_blocks;
    const int c = 32 * (is_k ? u : u - kv_blocks) + lane;
    float val;
    if (is_k) {
      const int d = static_cast<int>(c % D);
      const int i = p.neox ? d % half : d / 2;
      const int i0 = p.neox ? i : 2 * i, i1 = p.neox ? i + half : 2 * i + 1;
      float sn, cn;
      rope_sincos(pos, p.rope.inv_freq[i], sn, cn);
      const float* head = p.k + (c - d);
      val = rope_rotate(head[i0], head[i1], sn, cn, d == i0);
    } else {
      val = p.v[c];
    }
    uint8_t* row = is_k ? p.k_cache + pos * p.k_row_bytes : p.v_cache + pos * p.v_row_bytes;
    if constexpr (CT == DType::F16)
      reinterpret_cast<__half*>(row)[c] = __float2half_rn(val);
    else
      store_kv_block<CT>(val, lane, row, c / 32);
  }
  if (p.proj) {
    const int64_t stride = int64_t{gridDim.x} * kThreads;
    for (int64_t i = int64_t{blockIdx.x} * kThreads + threadIdx.x; i < p.E; i += stride)
      p.x[i] += p.proj[i];
  }
}

// Phase C2: a block per head; q rotated as attention_rows_block loads it.
template <DType CT>
__device__ void attention_phase(const DecodeParams& p, float* smem) {
  const int pos = p.pos[0], D = p.D, half = D / 2;
  for (int h = blockIdx.x; h < p.n_head; h += gridDim.x) {
    const float* qh = p.q + int64_t{h} * D;
    const auto q_at = [&](int, int d) {
      const int i = p.neox ? d % half : d / 2;
      const int i0 = p.neox ? i : 2 * i, i1 = p.neox ? i + half : 2 * i + 1;
      float sn, cn;
      rope_sincos(pos, p.rope.inv_freq[i], sn, cn);
      return rope_rotate(qh[i0], qh[i1], sn, cn, d == i0);
    };
    attention_rows_block<CT, CT, 1, decltype(q_at), 1>(
        h, 0, q_at, 1, p.pos, p.k_cache, p.k_row_bytes, p.v_cache, p.v_row_bytes, p.n_head,
        p.n_head / p.n_head_kv, D, kRowsMaxKeys, p.scale, p.att, p.att_in, smem);
    __syncthreads();  // the next head reuses the shared memory
  }
}

#endif  // !__CUDA_ARCH__ || __CUDA_ARCH__ >= 900

template <DType CT>
__global__ void __launch_bounds__(kThreads, 1)
    decode_layer_kernel(const __grid_constant__ DecodeParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) uint8_t smem[];  // planes / attention, then the ring
  __shared__ float red[2 * kWarps][kRingMaxRows];   // ring_phase's row sums, two items in turn
  __shared__ __align__(8) unsigned long long bars[kRingMaxStages];
  // The ring's phases in shared memory: ring_phase (not inlined) reads them through pointers,
  // which would otherwise be generic loads of the kernel's parameters.
  __shared__ RingPhase ph[kRingPhases];
  if (threadIdx.x < kRingPhases) ph[threadIdx.x] = p.phase[threadIdx.x];
  const int64_t q_dim = int64_t{p.n_head} * p.D;
  PhaseClock clock(p.timing);
  Ring ring{smem + p.ring_offset, smem_addr(smem + p.ring_offset), smem_addr(bars), p.ring};
  if (threadIdx.x == 0) {
    for (int s = 0; s < p.ring.stages; ++s) barrier_init(ring.full + 8 * s, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  // The first items (weights need no input): bulk copies a thread a stage, so that the norm
  // does not wait for one thread asking for all of them; cp.async: every thread a part of each.
  const RingSeq seq(ph);
  if (p.ring.cp_async) {
    for (int s = 0; s < p.ring.stages; ++s)
      seq.issue(ph, p.ring, s, ring.base_addr, ring.full, static_cast<int>(threadIdx.x), kThreads);
    asm volatile("cp.async.commit_group;\n" ::: "memory");
  } else if (static_cast<int>(threadIdx.x) < p.ring.stages) {
    seq.issue(ph, p.ring, static_cast<int>(threadIdx.x), ring.base_addr, ring.full);
  }
  float* x = p.x;
  const SmemActs h = smem_acts(smem, p.E);
  norm_to_planes(x, p.proj, p.attn_norm, p.E, p.eps, h);                             // A
  ring_phase(ph[kRingQkv], ph, ring, h.q1, h.q2, h.meta, red, clock.ring(kRingQkv),  // B
             {RingFinish::kStore, nullptr, 0});
  grid_barrier(p.barrier, clock);
  store_phase<CT>(p);  // C1
  grid_barrier(p.barrier, clock);
  attention_phase<CT>(p, reinterpret_cast<float*>(smem));  // C2
  grid_barrier(p.barrier, clock);
  const SmemActs att = smem_acts(smem, q_dim);
  copy_planes(p.att_in, q_dim, att);  // D
  ring_phase(ph[kRingOut], ph, ring, att.q1, att.q2, att.meta, red, clock.ring(kRingOut),
             {RingFinish::kAddTo, x, p.E});
  grid_barrier(p.barrier, clock);
  norm_to_planes(x, nullptr, p.ffn_norm, p.E, p.eps, h);  // E
  ring_phase(ph[kRingGateUp], ph, ring, h.q1, h.q2, h.meta, red, clock.ring(kRingGateUp),
             {RingFinish::kSwiglu, p.hf, p.F});
  grid_barrier(p.barrier, clock);
  const SmemActs hf = smem_acts(smem, p.F);
  values_to_planes(p.hf, p.F, hf);  // F
  ring_phase(ph[kRingDown], ph, ring, hf.q1, hf.q2, hf.meta, red, clock.ring(kRingDown),
             {RingFinish::kAddTo, x, p.E});
  prefetch_items(p.next_qkv, p.ring.stages);  // the next layer's first ring fill, from L2
  grid_exit(p.barrier, clock);
#endif
}

// 1 when the kernel above was compiled for the running device (sm_90 or later).
__global__ void decode_layer_probe_kernel(int* flag) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  *flag = 1;
#else
  *flag = 0;
#endif
}

}  // namespace

namespace {

// Dynamic shared memory before the ring: the largest activation planes (2 n + n / 32 ActBlocks)
// or attention_rows_block's q, partial outputs and scores of kRowsMaxKeys keys.
int64_t decode_union_bytes(int64_t E, int64_t q_dim, int64_t F, int D) {
  const int64_t n = std::max({E, q_dim, F});
  const int64_t planes = 2 * n + (n / 32) * static_cast<int64_t>(sizeof(ActBlock));
  const int64_t attention =
      static_cast<int64_t>(sizeof(float)) * (int64_t{D} * (1 + kWarps) + kRowsMaxKeys);
  return (std::max(planes, attention) + 127) / 128 * 128;
}

const CudaWeight* quant_weight(const Weight* w) {
  const auto* cw = dynamic_cast<const CudaWeight*>(w);
  if (!cw || (cw->type != DType::Q4_0 && cw->type != DType::Q8_0)) return nullptr;
  return cw;
}

RingMatrix ring_matrix_of(const Weight* w, const Tensor* bias, Tensor* out) {
  const CudaWeight& cw = *quant_weight(w);
  return {cw.qs,
          cw.d,
          cw.n_out,
          bias ? static_cast<const float*>(bias->data) : nullptr,
          out ? static_cast<float*>(out->data) : nullptr,
          cw.type == DType::Q8_0};
}

// Codes of an item aimed at (bytes; KESTREL_CUDA_DECODE_ITEM_KB, default 18: 8 rows of 4096
// Q4_0 weights, 3 of 11008, about an eighth of the default ring).
int64_t item_code_bytes() {
  static const int64_t kb = [] {
    const char* e = std::getenv("KESTREL_CUDA_DECODE_ITEM_KB");
    return int64_t{e ? std::clamp(std::atoi(e), 1, 64) : 18};
  }();
  return kb * 1024;
}

// Fills ph's layout from its parts (set by the caller, all n_in wide): the groups of threads and
// the rows of an item (the most whose codes stay within item_code_bytes(), else the fewest that
// fit) such that an item's scales are whole 16-byte units at 16-byte offsets, and the items of
// each part. False: the width is not one the ring takes (more than 1024 blocks a row, or no row
// count aligns).
bool plan_phase(RingPhase& ph, int64_t n_in) {
  if (n_in % 32 != 0 || n_in / 32 > kRingMaxKpt * kThreads || ph.n_parts < 1) return false;
  const int nb = static_cast<int>(n_in / 32);
  int code_bytes = 16;
  for (int i = 0; i < ph.n_parts; ++i)
    if (ph.parts[i].q8) code_bytes = 32;
  ph.nb = nb;
  // Two quant blocks a thread for rows of more than 256 (ffn down), so that two groups work at
  // once; groups of at least two warps, at most kRingMaxGroups.
  // KESTREL_CUDA_DECODE_KPT=2: two for every width (groups of half the threads, twice as many).
  static const int forced_kpt = [] {
    const char* e = std::getenv("KESTREL_CUDA_DECODE_KPT");
    return e ? std::clamp(std::atoi(e), 1, kRingMaxKpt) : 0;
  }();
  ph.kpt = forced_kpt ? forced_kpt : nb > kThreads / 2 ? 2 : 1;
  if (nb > ph.kpt * kThreads) return false;
  const int per_thread = std::max((nb + ph.kpt - 1) / ph.kpt, kThreads / kRingMaxGroups);
  ph.gsize = (per_thread + 31) / 32 * 32;
  if (ph.gsize > kThreads) return false;
  ph.groups = kThreads / ph.gsize;
  ph.rows = 0;
  for (int R = 1; R <= kRingMaxRows; ++R) {
    const int copy = ph.paired ? R / 2 : R;
    if ((ph.paired && R % 2 != 0) || (int64_t{copy} * nb) % 8 != 0) continue;
    if (ph.rows == 0 || int64_t{R} * nb * code_bytes <= item_code_bytes()) ph.rows = R;
  }
  if (ph.rows == 0) return false;
  ph.copy_rows = ph.paired ? ph.rows / 2 : ph.rows;
  int items = 0;
  for (int i = 0; i < ph.n_parts; ++i) {
    if (ph.paired && i > 0) break;  // gate and up share their items
    items += static_cast<int>((ph.parts[i].n_out + ph.copy_rows - 1) / ph.copy_rows);
    ph.item_end[i] = items;
  }
  if (ph.paired) ph.n_parts = 1;  // items are numbered over gate's rows (up rides along)
  return true;
}

// The ring's phases and stages for a layer; stages == 0 when the layer does not fit.
// KESTREL_CUDA_DECODE_RING_KB: the ring's shared memory (default 152: 8 stages of 18.5 KB).
struct RingPlan {
  RingPhase phase[kRingPhases];
  RingShape shape;
  int64_t union_bytes = 0;
  size_t smem = 0;
};

RingPlan plan_ring(const DecodeLayer& L, size_t smem_optin) {
  static const int64_t ring_kb = [] {
    const char* e = std::getenv("KESTREL_CUDA_DECODE_RING_KB");
    return int64_t{e ? std::clamp(std::atoi(e), 16, 227) : 152};
  }();
  RingPlan plan;
  RingPhase* ph = plan.phase;
  ph[kRingQkv].parts[0] = ring_matrix_of(L.wq, L.bq, L.q);
  ph[kRingQkv].parts[1] = ring_matrix_of(L.wk, L.bk, L.k);
  ph[kRingQkv].parts[2] = ring_matrix_of(L.wv, L.bv, L.v);
  ph[kRingQkv].n_parts = 3;
  ph[kRingOut].parts[0] = ring_matrix_of(L.wo, nullptr, nullptr);
  ph[kRingOut].n_parts = 1;
  ph[kRingGateUp].parts[0] = ring_matrix_of(L.w_gate, nullptr, nullptr);
  ph[kRingGateUp].parts[1] = ring_matrix_of(L.w_up, nullptr, nullptr);
  ph[kRingGateUp].n_parts = 2;
  ph[kRingGateUp].paired = true;
  ph[kRingDown].parts[0] = ring_matrix_of(L.w_down, nullptr, nullptr);
  ph[kRingDown].n_parts = 1;
  const int64_t widths[kRingPhases] = {quant_weight(L.wq)->n_in, quant_weight(L.wo)->n_in,
                                       quant_weight(L.w_gate)->n_in, quant_weight(L.w_down)->n_in};
  int64_t code_cap = 0, scale_cap = 0;
  for (int i = 0; i < kRingPhases; ++i) {
    if (!plan_phase(ph[i], widths[i])) return RingPlan{};
    const int64_t R = ph[i].rows;
    int code_bytes = 16;
    for (const RingMatrix& m : ph[i].parts)
      if (m.qs && m.q8) code_bytes = 32;
    code_cap = std::max(code_cap, R * ph[i].nb * code_bytes);
    scale_cap = std::max(scale_cap, (R * ph[i].nb * 2 + 15) / 16 * 16);
  }
  const AttentionParams& a = L.attn;
  plan.union_bytes =
      decode_union_bytes(L.x->cols, int64_t{a.n_head} * a.head_dim, widths[kRingDown], a.head_dim);
  RingShape& rs = plan.shape;
  // KESTREL_CUDA_DECODE_CP_ASYNC=1: the ring filled by the groups' threads, 16 bytes each,
  // instead of bulk copies (whose rate at one block an SM, ~10-19 GB/s an SM in every kernel
  // that used them for decode, bounds the ring: bench/NOTES.md, twenty-second session).
  static const bool cp_async = [] {
    const char* e = std::getenv("KESTREL_CUDA_DECODE_CP_ASYNC");
    return e && e[0] == '1' && e[1] == '\0';
  }();
  rs.cp_async = cp_async;
  rs.code_cap = static_cast<int>(code_cap);
  rs.stage_bytes = static_cast<int>((code_cap + scale_cap + 127) / 128 * 128);
  // What the kernel's static shared memory (the row sums, the barriers, the norm's) leaves.
  const int64_t room = static_cast<int64_t>(smem_optin) - plan.union_bytes - 2048;
  const int64_t budget = std::min(ring_kb * 1024, room);
  rs.stages = static_cast<int>(std::min<int64_t>(kRingMaxStages, budget / rs.stage_bytes));
  // Stage = item % stages with stages a multiple of every phase's groups: within a phase each
  // stage then belongs to one group, which reads its items in order (a group two rounds ahead
  // of another could otherwise wait on a stage whose barrier has not reached the earlier item's
  // phase yet, and take its parity for done).
  int groups = 1;
  for (const RingPhase& p : plan.phase) groups = std::max(groups, p.groups);
  rs.stages -= rs.stages % groups;
  if (rs.stages < groups || rs.stages < 2) return RingPlan{};
  plan.smem = static_cast<size_t>(plan.union_bytes + int64_t{rs.stages} * rs.stage_bytes);
  return plan;
}

// A cooperative launch of one block per SM (or as many as fit): the grid barriers need every
// block resident at once.
template <DType CT>
cudaError_t launch_decode_layer(const DecodeParams& p, size_t smem, int sm_count, size_t& sized,
                                int& per_sm, cudaStream_t s) {
  const auto kernel = decode_layer_kernel<CT>;
  // The shared-memory limit and the occupancy asked once per size (sized, per_sm: the backend's,
  // so per device; the first pass of a key runs eagerly, so a recording finds them set): two
  // driver calls a layer a token otherwise.
  if (smem != sized) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
    if (e == cudaSuccess)
      e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
    if (e != cudaSuccess) return e;
    sized = smem;
  }
  if (per_sm < 1) return cudaErrorCooperativeLaunchTooLarge;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(sm_count * std::min(per_sm, 2));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, p);
}

}  // namespace

Expected<bool> decode_layer_available(int device) {
  cudaDeviceProp prop{};
  CUDA_TRY(cudaGetDeviceProperties(&prop, device), "decode layer probe (device properties)");
  if (prop.major < 9 || !prop.cooperativeLaunch) return false;
  return probe_says_compiled(decode_layer_probe_kernel, "decode layer probe");
}

Status CudaBackend::init_decode_timing() {
  const size_t bytes = sizeof(unsigned long long) * kTimingSlots;
  KESTREL_ASSIGN_OR_RETURN(void* acc, device_alloc(bytes, "decode timing"));
  CUDA_TRY(cudaMemset(acc, 0, bytes), "cudaMemset");
  decode_timing_ = static_cast<unsigned long long*>(acc);
  return Status::ok();
}

void CudaBackend::print_decode_timing() const {
  unsigned long long acc[kTimingSlots] = {};
  if (!decode_timing_ ||
      cudaMemcpy(acc, decode_timing_, sizeof(acc), cudaMemcpyDeviceToHost) != cudaSuccess)
    return;
  const double launches = static_cast<double>(acc[2 * kPhases]);
  const double blocks = static_cast<double>(acc[2 * kPhases + 1]);
  if (launches == 0) return;
  static const char* const kNames[kPhases] = {"A+B norm, Q K V", "C1 RoPE, K/V store",
                                              "C2 attention",    "D output projection",
                                              "E norm, gate/up", "F down projection"};
  std::fprintf(stderr,
               "decode_layer timing (KESTREL_CUDA_DECODE_TIMING=1): %.0f launches of %.0f "
               "blocks\n%-22s %14s %16s\n",
               launches, blocks / launches, "phase", "wall us/layer", "busy us/block");
  for (int i = 0; i < kPhases; ++i) {
    char wall[32] = "-";  // no barrier after F: its wall time is the slowest block's busy time
    if (i + 1 < kPhases)
      std::snprintf(wall, sizeof(wall), "%.2f", static_cast<double>(acc[2 * i]) / launches / 1e3);
    std::fprintf(stderr, "%-22s %14s %16.2f\n", kNames[i], wall,
                 static_cast<double>(acc[2 * i + 1]) / blocks / 1e3);
  }
  // ring_phase's steps, measured by each group's first thread (SM cycles an item).
  static const char* const kRingNames[kRingPhases] = {"B", "D", "E", "F"};
  std::fprintf(stderr, "ring phase: items/block, then SM cycles an item: %s\n",
               "wait for stage, sums, group barrier, ask next, finish rows");
  for (int r = 0; r < kRingPhases; ++r) {
    const unsigned long long* c = acc + kRingSlots + kRingClockSlots * r;
    const double items = static_cast<double>(std::max(c[0], 1ull));
    std::fprintf(stderr, "ring %s %8.2f %8.0f %8.0f %8.0f %8.0f %8.0f\n", kRingNames[r],
                 static_cast<double>(c[0]) / blocks, c[1] / items, c[2] / items, c[3] / items,
                 c[4] / items, c[5] / items);
  }
}

namespace {

// Whether the layer's weights, shapes and cache are ones the kernel takes.
bool decode_layer_shapes_fit(const DecodeLayer& L) {
  if (!L.x || !L.x->data) return false;
  const CudaWeight *wq = quant_weight(L.wq), *wk = quant_weight(L.wk), *wv = quant_weight(L.wv),
                   *wo = quant_weight(L.wo), *wg = quant_weight(L.w_gate),
                   *wu = quant_weight(L.w_up), *wd = quant_weight(L.w_down);
  if (!wq || !wk || !wv || !wo || !wg || !wu || !wd || wg->type != wu->type) return false;
  const AttentionParams& a = L.attn;
  const int D = a.head_dim;
  if (a.n_head <= 0 || a.n_head_kv <= 0 || a.n_head % a.n_head_kv != 0 || D % 32 != 0 ||
      D > kRowsMaxDim || D / 2 > kRopeMaxPairs)
    return false;
  const RopeParams &rq = L.rope_q, &rk = L.rope_k;
  if (rq.head_dim != D || rk.head_dim != D || rq.freq_base != rk.freq_base ||
      rq.layout != rk.layout)
    return false;
  const int64_t E = L.x->cols, q_dim = int64_t{a.n_head} * D, kv_dim = int64_t{a.n_head_kv} * D;
  const int64_t F = wg->n_out;
  // Widths: whole quant blocks (the weights' types).
  if (E % 32 != 0 || F % 32 != 0) return false;
  if (wq->n_in != E || wk->n_in != E || wv->n_in != E || wg->n_in != E || wu->n_in != E ||
      wo->n_in != q_dim || wd->n_in != F || wq->n_out != q_dim || wk->n_out != kv_dim ||
      wv->n_out != kv_dim || wo->n_out != E || wu->n_out != F || wd->n_out != E)
    return false;
  const Tensor *kc = L.k_cache, *vc = L.v_cache;
  if (!kc || !vc || kc->type != vc->type || kc->cols != kv_dim || vc->cols != kv_dim ||
      (kc->type != DType::F16 && kc->type != DType::Q8_0 && kc->type != DType::Q4_0))
    return false;
  if (L.pos < 0 || L.pos >= std::min(kc->rows, vc->rows) || L.pos + 1 > kRowsMaxKeys) return false;
  if (L.pending_add && !L.proj) return false;
  if (!(L.h && L.q && L.k && L.v && L.att && L.gate && L.up && L.gate->cols >= F)) return false;
  // The ring's bulk copies: 16-byte aligned codes and scales.
  for (const CudaWeight* w : {wq, wk, wv, wo, wg, wu, wd})
    if ((reinterpret_cast<uintptr_t>(w->qs) | reinterpret_cast<uintptr_t>(w->d)) % 16 != 0)
      return false;
  return true;
}

// The layer's ring; stages == 0 when the layer cannot run as one kernel. Planned once a call of
// fuses_decode_layer and of decode_layer (host integer work; once a recording under graphs).
RingPlan plan_decode_layer(const DecodeLayer& L, size_t smem_optin) {
  return decode_layer_shapes_fit(L) ? plan_ring(L, smem_optin) : RingPlan{};
}

}  // namespace

bool CudaBackend::fuses_decode_layer(const DecodeLayer& L) const {
  return fused_decode_ && decode_barrier_ && plan_decode_layer(L, smem_optin_).shape.stages > 0;
}

Status CudaBackend::decode_layer(const DecodeLayer& L) {
  forget_activations();
  const RingPlan plan =
      fused_decode_ && decode_barrier_ ? plan_decode_layer(L, smem_optin_) : RingPlan{};
  if (plan.shape.stages == 0)
    return error("decode_layer: this layer's weights, shapes or cache cannot run as one kernel");
  KESTREL_ASSIGN_OR_RETURN(const int32_t* pos_dev, upload_ints(&L.pos, 1));
  const AttentionParams& a = L.attn;
  const int64_t q_dim = int64_t{a.n_head} * a.head_dim;
  KESTREL_ASSIGN_OR_RETURN(void* acts, scratch(kActs, QuantizedActs::bytes(1, q_dim)));
  if (mode_ == Mode::Stage) return Status::ok();
  DecodeParams p{};
  p.x = static_cast<float*>(L.x->data);
  p.proj = L.pending_add ? static_cast<const float*>(L.proj->data) : nullptr;
  p.attn_norm = static_cast<const float*>(L.attn_norm->data);
  p.ffn_norm = static_cast<const float*>(L.ffn_norm->data);
  p.eps = L.rms_eps;
  p.E = L.x->cols;
  p.F = L.w_gate->n_out;
  std::copy(plan.phase, plan.phase + kRingPhases, p.phase);
  p.ring = plan.shape;
  p.ring_offset = static_cast<int>(plan.union_bytes);
  // The layer that followed this one in the previous pass (decode passes repeat their order):
  // its first items are asked of L2 at the end of this one.
  const CudaWeight* wq = quant_weight(L.wq);
  if (decode_last_wq_) decode_next_[decode_last_wq_] = {L.wq, L.wk, L.wv};
  decode_last_wq_ = wq;
  if (const auto it = decode_next_.find(wq); it != decode_next_.end()) {
    RingPhase& n = p.next_qkv;
    for (int i = 0; i < 3; ++i) n.parts[i] = ring_matrix_of(it->second[i], nullptr, nullptr);
    n.n_parts = 3;
    if (!plan_phase(n, quant_weight(it->second[0])->n_in)) n = RingPhase{};
  }
  p.q = static_cast<float*>(L.q->data);
  p.k = static_cast<float*>(L.k->data);
  p.v = static_cast<float*>(L.v->data);
  p.att = static_cast<float*>(L.att->data);
  p.att_in = QuantizedActs::in(acts, 1, q_dim).as_output();
  p.hf = static_cast<float*>(L.gate->data);
  p.pos = pos_dev;
  p.k_cache = static_cast<uint8_t*>(L.k_cache->data);
  p.v_cache = static_cast<uint8_t*>(L.v_cache->data);
  p.k_row_bytes = static_cast<int64_t>(L.k_cache->row_bytes());
  p.v_row_bytes = static_cast<int64_t>(L.v_cache->row_bytes());
  p.n_head = a.n_head;
  p.n_head_kv = a.n_head_kv;
  p.D = a.head_dim;
  p.scale = a.scale;
  p.neox = L.rope_q.layout == RopeLayout::NeoX;
  p.rope = rope_table(L.rope_q.freq_base, a.head_dim);
  p.barrier = decode_barrier_;
  p.timing = decode_timing_;
  const size_t smem = plan.smem;
  cudaError_t e = cudaErrorInvalidValue;
  switch (L.k_cache->type) {
    case DType::F16:
      e = launch_decode_layer<DType::F16>(p, smem, sm_count_, decode_smem_set_[0],
                                          decode_per_sm_[0], stream_);
      break;
    case DType::Q8_0:
      e = launch_decode_layer<DType::Q8_0>(p, smem, sm_count_, decode_smem_set_[1],
                                           decode_per_sm_[1], stream_);
      break;
    default:
      e = launch_decode_layer<DType::Q4_0>(p, smem, sm_count_, decode_smem_set_[2],
                                           decode_per_sm_[2], stream_);
      break;
  }
  if (e == cudaErrorCooperativeLaunchTooLarge || e == cudaErrorNotSupported ||
      e == cudaErrorStreamCaptureUnsupported || e == cudaErrorInvalidConfiguration) {
    // The device cannot run the grid as one cooperative launch here (or a graph cannot hold
    // one): decode steps go op by op from now on, this one included. A capture this failed in
    // is invalid; run_recorded then runs the pass again eagerly, without the fused layer.
    cudaGetLastError();
    fused_decode_ = false;
    drop_graphs_pending_ = true;  // recordings that hold fused layers stage other inputs
    std::fprintf(
        stderr,
        "kestrel: cuda: the fused decode layer cannot launch (%s); decode steps run op by op\n",
        cudaGetErrorString(e));
    return Backend::decode_layer(L);
  }
  CUDA_TRY(e, "decode_layer (launch)");
  LAUNCH_CHECK("decode_layer");
  return Status::ok();
}

}  // namespace kestrel::backend::cuda
