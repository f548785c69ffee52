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
//   B  q, k, v = W{q,k,v} h                    (warps take units of two rows)
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
// Each phase computes what the op-by-op path computes with the same device functions (the int8
// planes, dp4a sums, RoPE, the cache quantization, attention), in another summation order for
// the matvecs' f32 sums. Opt-in (KESTREL_CUDA_FUSED_DECODE=1): written in a session that had no
// GPU, so it has not run yet; gpu-check.sh's gpu-tests-fused-decode and e2e-fused-decode stages
// and gpu_bench.py's A/B rows test and measure it (bench/NOTES.md, tenth session).
#include <algorithm>
#include <cstdio>

#include "backend/cuda/acts_device.cuh"
#include "backend/cuda/attention_rows.cuh"
#include "backend/cuda/cuda_backend_impl.cuh"
#include "backend/cuda/kv_store_device.cuh"
#include "backend/cuda/matvec_device.cuh"
#include "backend/cuda/rope_device.cuh"

namespace kestrel::backend::cuda {

using quant::DType;

namespace {

constexpr int kThreads = kRowsThreads;  // the attention phase is attention_rows_block's
constexpr int kWarps = kThreads / 32;
constexpr int kUnitRows = 2;  // rows of a warp's unit in the matvec phases
constexpr int kPrefetchUnits = 2;

struct LayerMatrix {
  const uint8_t* qs = nullptr;
  const __half* d = nullptr;
  int64_t n_out = 0, n_in = 0;
  const float* bias = nullptr;
  bool q8 = false;  // Q8_0, else Q4_0
};

struct DecodeParams {
  float* x;           // [E] the residual
  const float* proj;  // [E] added to x first (the previous layer's pending add), or null
  const float* attn_norm;
  const float* ffn_norm;
  float eps;
  int64_t E, F;
  LayerMatrix wqkv[3], wo, wg, wu, wd;
  LayerMatrix next_qkv[3];  // the next decode layer's Q, K, V (asked of L2 at the end), or empty
  float *q, *k, *v;         // [q_dim], [kv_dim], [kv_dim]
  float* att;               // [q_dim]
  MatmulInputOut att_in;    // its int8 planes (global)
  float* hf;                // [F] silu(gate) * up
  const int32_t* pos;       // [1]
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
constexpr int kBarriers = 5, kPhases = kBarriers + 1;
constexpr int kTimingSlots = 2 * kPhases + 2;
struct PhaseClock {
  unsigned long long* acc;
  unsigned long long start = 0;
  int phase = 0;
  __device__ static unsigned long long now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
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
__device__ void norm_to_planes(const float* x, const float* proj, const float* g, int64_t E,
                               float eps, const SmemActs& a) {
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

struct RowRef {
  const uint8_t* qs;
  const __half* d;
  int64_t r;
};

// The warp's sums of kRows rows (nb quant blocks each) against the block's planes, in every lane.
// Lanes take blocks lane, lane + 32, ... (the decode matvec's scheme).
template <DType T, int kRows>
__device__ __forceinline__ void rows_dot(const RowRef (&rows)[kRows], int64_t nb, const SmemActs& a,
                                         float (&acc)[kRows]) {
  constexpr int kWords = kQuantWords<T>;
  // Blocks of every row loaded before any is used: 4 Q4_0 blocks a lane in all (2 a row at 2
  // rows, 1 at 4), half as many Q8_0 (the same bytes). More made the kernel spill at its 128
  // registers (512 threads an SM).
  constexpr int kAhead = 4 / kRows / (kWords / 4) > 0 ? 4 / kRows / (kWords / 4) : 1;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int rr = 0; rr < kRows; ++rr) acc[rr] = 0.0f;
  for (int64_t b0 = lane; b0 < nb; b0 += 32 * kAhead) {
    int w[kAhead][kRows][kWords];
    float dw[kAhead][kRows];
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      const int64_t b = b0 + 32 * u;
#pragma unroll
      for (int rr = 0; rr < kRows; ++rr)
        if (b < nb)
          dw[u][rr] = load_quant_block<T>(rows[rr].qs, rows[rr].d, nb, rows[rr].r, b, w[u][rr]);
    }
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      const int64_t b = b0 + 32 * u;
      if (b >= nb) break;
      int a1[8], a2[8];
      load_act_planes(a.q1, a.q2, b, a1, a2);
      const ActBlock am = a.meta[b];
#pragma unroll
      for (int rr = 0; rr < kRows; ++rr) acc[rr] += block_term<T>(w[u][rr], dw[u][rr], a1, a2, am);
    }
  }
#pragma unroll
  for (int rr = 0; rr < kRows; ++rr) acc[rr] = warp_sum(acc[rr]);
}

template <int kRows>
__device__ __forceinline__ void rows_dot(bool q8, const RowRef (&rows)[kRows], int64_t nb,
                                         const SmemActs& a, float (&acc)[kRows]) {
  if (q8)
    rows_dot<DType::Q8_0, kRows>(rows, nb, a, acc);
  else
    rows_dot<DType::Q4_0, kRows>(rows, nb, a, acc);
}

// Asks L2 for rows [r0, r0 + n) of m (quants and scales), spread over the warp's lanes. Rows and
// byte counts fit an int (the loops stay short and 32-bit: a unit's rows are a few KB).
__device__ __forceinline__ void prefetch_rows(const LayerMatrix& m, int r0, int n) {
  if (r0 >= m.n_out) return;
  n = min(n, static_cast<int>(m.n_out) - r0);
  const int lane = threadIdx.x % 32;
  const int row_bytes = static_cast<int>(m.q8 ? m.n_in : m.n_in / 2),
            nb = static_cast<int>(m.n_in / 32);
  const uint8_t* q = m.qs + int64_t{r0} * row_bytes;
#pragma unroll 1
  for (int off = 128 * lane; off < n * row_bytes; off += 32 * 128) prefetch_l2(q + off);
  const uint8_t* d = reinterpret_cast<const uint8_t*>(m.d + int64_t{r0} * nb);
#pragma unroll 1
  for (int off = 128 * lane; off < n * nb * 2; off += 32 * 128) prefetch_l2(d + off);
}

__device__ __forceinline__ int global_warp() {
  return static_cast<int>(blockIdx.x) * kWarps + static_cast<int>(threadIdx.x) / 32;
}
__device__ __forceinline__ int grid_warps() {
  return static_cast<int>(gridDim.x) * kWarps;
}

// Unit u of Q, K and V: rows 2u, 2u + 1 of the three stacked (each has an even row count), the
// matrix chosen by value (no pointer into the parameters, whose loads would be generic).
struct QkvUnit {
  LayerMatrix m;
  float* out;
  int r;
};
__device__ __forceinline__ QkvUnit qkv_unit(const LayerMatrix (&w)[3], float* const (&out)[3],
                                            int u) {
  const int r = kUnitRows * u, n0 = static_cast<int>(w[0].n_out), n1 = static_cast<int>(w[1].n_out);
  if (r < n0) return {w[0], out[0], r};
  if (r < n0 + n1) return {w[1], out[1], r - n0};
  return {w[2], out[2], r - n0 - n1};
}

__device__ __forceinline__ int qkv_units(const LayerMatrix (&w)[3]) {
  return static_cast<int>((w[0].n_out + w[1].n_out + w[2].n_out) / kUnitRows);
}

// The warp's first kPrefetchUnits units of Q, K and V (this layer's, or the next one's).
__device__ void prefetch_qkv(const LayerMatrix (&w)[3]) {
  const int units = qkv_units(w);
  float* const none[3] = {nullptr, nullptr, nullptr};
#pragma unroll 1
  for (int i = 0; i < kPrefetchUnits; ++i) {
    const int u = global_warp() + i * grid_warps();
    if (u >= units) break;
    const QkvUnit q = qkv_unit(w, none, u);
    prefetch_rows(q.m, q.r, kUnitRows);
  }
}

// Phase B.
__device__ void qkv_phase(const DecodeParams& p, const SmemActs& a) {
  const int units = qkv_units(p.wqkv);
  const int lane = threadIdx.x % 32;
  float* const out[3] = {p.q, p.k, p.v};
  for (int u = global_warp(); u < units; u += grid_warps()) {
    // The loads in flight a warp are few (registers): L2 is asked for the units ahead.
    if (const int next = u + kPrefetchUnits * grid_warps(); next < units) {
      const QkvUnit n = qkv_unit(p.wqkv, out, next);
      prefetch_rows(n.m, n.r, kUnitRows);
    }
    const QkvUnit q = qkv_unit(p.wqkv, out, u);
    const LayerMatrix& m = q.m;
    const RowRef rows[kUnitRows] = {{m.qs, m.d, q.r}, {m.qs, m.d, q.r + 1}};
    float acc[kUnitRows];
    rows_dot<kUnitRows>(m.q8, rows, m.n_in / 32, a, acc);
    if (lane < kUnitRows) {
      const int r = q.r + lane;
      q.out[r] = (lane == 0 ? acc[0] : acc[1]) + (m.bias ? m.bias[r] : 0.0f);
    }
  }
}

// Phases D and F: x[r] += (m . planes)[r].
__device__ void residual_phase(const LayerMatrix& m, float* x, const SmemActs& a) {
  const int units = static_cast<int>(m.n_out / kUnitRows);
  const int lane = threadIdx.x % 32;
  for (int u = global_warp(); u < units; u += grid_warps()) {
    const int r0 = kUnitRows * u;
    prefetch_rows(m, r0 + kUnitRows * kPrefetchUnits * grid_warps(), kUnitRows);
    const RowRef rows[kUnitRows] = {{m.qs, m.d, r0}, {m.qs, m.d, r0 + 1}};
    float acc[kUnitRows];
    rows_dot<kUnitRows>(m.q8, rows, m.n_in / 32, a, acc);
    if (lane < kUnitRows) x[r0 + lane] += lane == 0 ? acc[0] : acc[1];
  }
}

// The warp's first `rounds` units of m (and of `also`, the same rows).
__device__ void prefetch_units(const LayerMatrix& m, const LayerMatrix* also,
                               int rounds = kPrefetchUnits) {
#pragma unroll 1
  for (int i = 0; i < rounds; ++i) {
    const int r0 = kUnitRows * (global_warp() + i * grid_warps());
    prefetch_rows(m, r0, kUnitRows);
    if (also) prefetch_rows(*also, r0, kUnitRows);
  }
}

// Phase E: a unit is rows r0, r0 + 1 of gate and of up.
__device__ void gate_up_phase(const DecodeParams& p, const SmemActs& a) {
  const int units = static_cast<int>(p.wg.n_out / kUnitRows);
  const int lane = threadIdx.x % 32;
  for (int u = global_warp(); u < units; u += grid_warps()) {
    const int r0 = kUnitRows * u, ahead = r0 + kUnitRows * kPrefetchUnits * grid_warps();
    prefetch_rows(p.wg, ahead, kUnitRows);
    prefetch_rows(p.wu, ahead, kUnitRows);
    const RowRef rows[2 * kUnitRows] = {{p.wg.qs, p.wg.d, r0},
                                        {p.wg.qs, p.wg.d, r0 + 1},
                                        {p.wu.qs, p.wu.d, r0},
                                        {p.wu.qs, p.wu.d, r0 + 1}};
    float acc[2 * kUnitRows];
    rows_dot<2 * kUnitRows>(p.wg.q8, rows, p.wg.n_in / 32, a, acc);
    if (lane == 0) p.hf[r0] = silu_times(acc[0], acc[2]);
    if (lane == 1) p.hf[r0 + 1] = silu_times(acc[1], acc[3]);
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
    attention_rows_block<CT, CT, 1>(h, 0, q_at, 1, p.pos, p.k_cache, p.k_row_bytes, p.v_cache,
                                    p.v_row_bytes, p.n_head, p.n_head / p.n_head_kv, D,
                                    kRowsMaxKeys, p.scale, p.att, p.att_in, smem);
    __syncthreads();  // the next head reuses the shared memory
  }
}

template <DType CT>
__global__ void __launch_bounds__(kThreads, 1)
    decode_layer_kernel(const __grid_constant__ DecodeParams p) {
  extern __shared__ int4 smem4[];
  void* smem = smem4;
  const int64_t q_dim = int64_t{p.n_head} * p.D;
  PhaseClock clock(p.timing);
  prefetch_qkv(p.wqkv);
  norm_to_planes(p.x, p.proj, p.attn_norm, p.E, p.eps, smem_acts(smem, p.E));  // A
  qkv_phase(p, smem_acts(smem, p.E));                                          // B
  prefetch_units(p.wo, nullptr);
  grid_barrier(p.barrier, clock);
  store_phase<CT>(p);  // C1
  grid_barrier(p.barrier, clock);
  attention_phase<CT>(p, static_cast<float*>(smem));  // C2
  // The blocks without a head (most: one a head) ask for gate and up while attention runs.
  if (static_cast<int>(blockIdx.x) >= p.n_head) prefetch_units(p.wg, &p.wu, 1);
  grid_barrier(p.barrier, clock);
  copy_planes(p.att_in, q_dim, smem_acts(smem, q_dim));  // D
  residual_phase(p.wo, p.x, smem_acts(smem, q_dim));
  prefetch_units(p.wg, &p.wu);
  grid_barrier(p.barrier, clock);
  norm_to_planes(p.x, nullptr, p.ffn_norm, p.E, p.eps, smem_acts(smem, p.E));  // E
  gate_up_phase(p, smem_acts(smem, p.E));
  prefetch_units(p.wd, nullptr);
  grid_barrier(p.barrier, clock);
  values_to_planes(p.hf, p.F, smem_acts(smem, p.F));  // F
  residual_phase(p.wd, p.x, smem_acts(smem, p.F));
  prefetch_qkv(p.next_qkv);  // warps done early: the next layer's first units, while others finish
  grid_exit(p.barrier, clock);
}

}  // namespace

namespace {

// Dynamic shared memory of the kernel: the largest activation planes (2 n + n / 32 ActBlocks)
// or attention_rows_block's q, partial outputs and scores of kRowsMaxKeys keys.
size_t decode_smem_bytes(int64_t E, int64_t q_dim, int64_t F, int D) {
  const int64_t n = std::max({E, q_dim, F});
  const int64_t planes = 2 * n + (n / 32) * static_cast<int64_t>(sizeof(ActBlock));
  const int64_t attention =
      static_cast<int64_t>(sizeof(float)) * (int64_t{D} * (1 + kWarps) + kRowsMaxKeys);
  return static_cast<size_t>((std::max(planes, attention) + 15) / 16 * 16);
}

const CudaWeight* quant_weight(const Weight* w) {
  const auto* cw = dynamic_cast<const CudaWeight*>(w);
  if (!cw || (cw->type != DType::Q4_0 && cw->type != DType::Q8_0)) return nullptr;
  return cw;
}

LayerMatrix layer_matrix(const Weight* w, const Tensor* bias) {
  const CudaWeight& cw = *quant_weight(w);
  return {cw.qs,
          cw.d,
          cw.n_out,
          cw.n_in,
          bias ? static_cast<const float*>(bias->data) : nullptr,
          cw.type == DType::Q8_0};
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
    const double busy = static_cast<double>(acc[2 * i + 1]) / blocks / 1e3;
    if (i + 1 < kPhases)
      std::fprintf(stderr, "%-22s %14.2f %16.2f\n", kNames[i],
                   static_cast<double>(acc[2 * i]) / launches / 1e3, busy);
    else  // no barrier after it: its wall time is the slowest block's busy time
      std::fprintf(stderr, "%-22s %14s %16.2f\n", kNames[i], "-", busy);
  }
}

bool CudaBackend::fuses_decode_layer(const DecodeLayer& L) const {
  if (!fused_decode_ || !decode_barrier_ || !L.x || !L.x->data) return false;
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
  // Units of two rows: every row count even. Widths: whole quant blocks (the weights' types).
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
  // Shared memory within what any sm_80+ block can have (the activation planes grow with n_ff).
  if (decode_smem_bytes(E, q_dim, F, D) > 160 * 1024) return false;
  return L.h && L.q && L.k && L.v && L.att && L.gate && L.up && L.gate->cols >= F;
}

Status CudaBackend::decode_layer(const DecodeLayer& L) {
  forget_activations();
  if (!fuses_decode_layer(L))
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
  p.wqkv[0] = layer_matrix(L.wq, L.bq);
  p.wqkv[1] = layer_matrix(L.wk, L.bk);
  p.wqkv[2] = layer_matrix(L.wv, L.bv);
  // The layer that followed this one in the previous pass (decode passes repeat their order):
  // its Q, K and V are asked of L2 at the end of this one.
  const CudaWeight* wq = quant_weight(L.wq);
  if (decode_last_wq_) decode_next_[decode_last_wq_] = {L.wq, L.wk, L.wv};
  decode_last_wq_ = wq;
  if (const auto it = decode_next_.find(wq); it != decode_next_.end())
    for (int i = 0; i < 3; ++i) p.next_qkv[i] = layer_matrix(it->second[i], nullptr);
  p.wo = layer_matrix(L.wo, nullptr);
  p.wg = layer_matrix(L.w_gate, nullptr);
  p.wu = layer_matrix(L.w_up, nullptr);
  p.wd = layer_matrix(L.w_down, nullptr);
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
  const size_t smem = decode_smem_bytes(p.E, q_dim, p.F, p.D);
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
