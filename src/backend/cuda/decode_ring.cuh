// The fused decode layer's weights as one stream through a ring of shared-memory stages
// (decode_layer.cu). A block's items (tiles of whole rows of the layer's matrices, phase after
// phase: Q/K/V, output, gate/up, down) are fixed by its index, so the copy engine can be asked
// for the next ones while the block still works on an earlier phase or waits at a grid barrier:
// the weights depend on nothing the layer computes. A thread of the group that read item
// i asks for item i + stages as soon as the group is done with the stage (the group's barrier
// after the item's row sums), so the ring keeps `stages` items in flight across the barriers,
// the norms and attention.
//
// Why: the first fused layer (tenth session) read its weights straight into registers, 4 blocks
// a lane, and streamed at 1.2-2.2 TB/s (bench/NOTES.md): one block an SM keeps too few bytes in
// flight that way, and nothing is in flight while a block waits at a barrier. The ring holds
// ~150 KB an SM (19 MB on 132 SMs: all of the output projection while attention runs).
//
// An item is R rows (paired: R / 2 rows of gate, then the same rows of up), its codes then its
// scales contiguous in the stage (the repacked layout: one or two 1-D bulk copies each). The
// block's threads form `groups` groups of gsize (whole warps) that take the items of a phase in
// turn, each on its own: thread l of a group takes quant blocks l, l + gsize, ... (kpt of them,
// whose activations stay in registers for the phase) of every row of the item, the row sums meet
// in the group's warps (warp sums, then `red` and the group's named barrier), and thread j of the
// group finishes row j in a fixed order. Measured first with the whole block on each item (2
// terms a thread between two block barriers): ~2 us an item, tg128 208 t/s against 411 for the
// op sequence (bench/NOTES.md, twenty-second session).
#pragma once

#include "backend/cuda/acts_device.cuh"
#include "backend/cuda/matvec_device.cuh"
#include "backend/cuda/wgmma_ops.cuh"

namespace kestrel::backend::cuda {

constexpr int kRingMaxStages = 16;
constexpr int kRingMaxRows = 8;     // rows of an item (a thread's sums)
constexpr int kRingMaxGroups = 8;   // named barriers 1..8
constexpr int kRingMaxKpt = 2;      // quant blocks of a row a thread takes
constexpr int kRingPhases = 4;      // Q/K/V, output, gate/up, down
constexpr int kRingClockSlots = 6;  // ring_phase's clock: items, then the cycles of 5 steps
enum RingPhaseId { kRingQkv = 0, kRingOut = 1, kRingGateUp = 2, kRingDown = 3 };

struct RingMatrix {
  const uint8_t* qs = nullptr;
  const __half* d = nullptr;
  int64_t n_out = 0;
  const float* bias = nullptr;
  float* out = nullptr;  // Q/K/V's outputs (the other phases write x or hf)
  bool q8 = false;       // Q8_0, else Q4_0
};

struct RingPhase {
  RingMatrix parts[3];  // Q, K, V; gate, up (paired); or one matrix
  int n_parts = 0;
  bool paired = false;   // an item is copy_rows rows of parts[0], then the same rows of parts[1]
  int nb = 0;            // 32-weight blocks a row
  int kpt = 0;           // of them a thread takes (1 or 2)
  int gsize = 0;         // threads of a group: nb / kpt rounded up to whole warps (64 at least)
  int groups = 0;        // groups of the block (each takes whole items)
  int rows = 0;          // R: rows of an item
  int copy_rows = 0;     // rows of one part an item holds (R, or R / 2 when paired)
  int item_end[3] = {};  // one past each part's last item (numbered part after part)
  __host__ __device__ int n_items() const { return item_end[n_parts - 1]; }
};

struct RingShape {
  int stages = 0, stage_bytes = 0, code_cap = 0;  // a stage: codes (code_cap bytes), scales
  bool cp_async = false;  // the group's threads copy 16 bytes each (else one bulk copy each)
};

// This block's items of a phase with n items (blockIdx.x, + gridDim.x, ...).
__device__ __forceinline__ int ring_mine(int n) {
  const int b = static_cast<int>(blockIdx.x), g = static_cast<int>(gridDim.x);
  return n > b ? (n - 1 - b) / g + 1 : 0;
}

// The part of an item and the item's first row in it.
__device__ __forceinline__ int ring_part(const RingPhase& ph, int item, int64_t& row0) {
  const int p = item < ph.item_end[0] ? 0 : item < ph.item_end[1] ? 1 : 2;
  const int first = p == 0 ? 0 : ph.item_end[p - 1];
  row0 = static_cast<int64_t>(item - first) * ph.copy_rows;
  return p;
}

__device__ __forceinline__ RingMatrix ring_matrix(const RingPhase& ph, int p) {
  return p == 0 ? ph.parts[0] : p == 1 ? ph.parts[1] : ph.parts[2];
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900

// The bytes of `rows` rows of m from row0: codes, and scales rounded up to 16 (the copy's unit;
// the scales of a weight are followed by more memory of the same allocation or its padding).
__device__ __forceinline__ uint32_t ring_code_bytes(const RingMatrix& m, int rows, int nb) {
  return static_cast<uint32_t>(rows * nb * (m.q8 ? 32 : 16));
}
__device__ __forceinline__ uint32_t ring_scale_bytes(int rows, int nb) {
  return static_cast<uint32_t>((rows * nb * 2 + 15) & ~15);
}

// Copies `bytes` (a multiple of 16) from global src to shared dst: one bulk copy completing on
// the barrier at `bar` (thread l == 0), or 16 bytes a thread l of n (cp.async: the caller
// commits, waits and meets its group).
__device__ __forceinline__ void ring_copy(const RingShape& rs, uint32_t dst, const uint8_t* src,
                                          uint32_t bytes, uint32_t bar, int l, int n) {
  if (!rs.cp_async) {
    bulk_load(dst, src, bytes, bar);
    return;
  }
  for (uint32_t c = l; c < bytes / 16; c += n)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst + 16 * c),
                 "l"(src + 16 * c)
                 : "memory");
}

// Asks for item `item` of phase ph into stage `stage`: thread l of n (bulk copies: l == 0 only).
__device__ __noinline__ void ring_issue(const RingPhase& ph, const RingShape& rs, int item,
                                        int stage, uint32_t ring, uint32_t full, int l, int n) {
  int64_t row0;
  const int p = ring_part(ph, item, row0);
  const uint32_t dst = ring + stage * rs.stage_bytes, bar = full + 8 * stage;
  const int halves = ph.paired ? 2 : 1;
  if (!rs.cp_async) {
    uint32_t total = 0;
    for (int h = 0; h < halves; ++h) {
      const RingMatrix m = ring_matrix(ph, ph.paired ? h : p);
      const int rows = static_cast<int>(min(int64_t{ph.copy_rows}, m.n_out - row0));
      total += ring_code_bytes(m, rows, ph.nb) + ring_scale_bytes(rows, ph.nb);
    }
    barrier_expect(bar, static_cast<int>(total));
  }
  for (int h = 0; h < halves; ++h) {
    const RingMatrix m = ring_matrix(ph, ph.paired ? h : p);
    const int rows = static_cast<int>(min(int64_t{ph.copy_rows}, m.n_out - row0));
    const int64_t code_row = ph.nb * (m.q8 ? 32 : 16);
    ring_copy(rs, dst + h * ph.copy_rows * code_row, m.qs + row0 * code_row,
              ring_code_bytes(m, rows, ph.nb), bar, l, n);
    ring_copy(rs, dst + rs.code_cap + h * ph.copy_rows * ph.nb * 2,
              reinterpret_cast<const uint8_t*>(m.d + row0 * ph.nb), ring_scale_bytes(rows, ph.nb),
              bar, l, n);
  }
}

// The block's item sequence over the layer's phases: seq -> (phase, item).
struct RingSeq {
  int count[kRingPhases];  // this block's items of each phase
  int total;
  __device__ explicit RingSeq(const RingPhase (&ph)[kRingPhases]) : total(0) {
#pragma unroll
    for (int i = 0; i < kRingPhases; ++i) {
      count[i] = ring_mine(ph[i].n_items());
      total += count[i];
    }
  }
  // Asks for item seq of the sequence (if there is one) into its stage: thread l of n.
  __device__ void issue(const RingPhase (&ph)[kRingPhases], const RingShape& rs, int seq,
                        uint32_t ring, uint32_t full, int l = 0, int n = 1) const {
    if (seq >= total) return;
    int k = seq;
#pragma unroll
    for (int i = 0; i < kRingPhases; ++i) {
      if (k < count[i]) {
        ring_issue(ph[i], rs, static_cast<int>(blockIdx.x) + k * static_cast<int>(gridDim.x),
                   seq % rs.stages, ring, full, l, n);
        return;
      }
      k -= count[i];
    }
  }
};

// One quant block's term from the stage (codes at c, 16-byte aligned).
template <quant::DType T>
__device__ __forceinline__ float ring_term(const uint8_t* c, float dw, const int* a1, const int* a2,
                                           const ActBlock& am) {
  constexpr int kWords = kQuantWords<T>;
  int w[kWords];
#pragma unroll
  for (int v = 0; v < kWords / 4; ++v) {
    const int4 q = reinterpret_cast<const int4*>(c)[v];
    w[4 * v] = q.x, w[4 * v + 1] = q.y, w[4 * v + 2] = q.z, w[4 * v + 3] = q.w;
  }
  return block_term<T>(w, dw, a1, a2, am);
}

// Waits until at most n of the thread's cp.async groups are pending (n: 0, 1, 3, 7 or 15).
__device__ __forceinline__ void ring_cp_async_wait(int n) {
  switch (n) {
    case 1:
      asm volatile("cp.async.wait_group 1;\n" ::: "memory");
      break;
    case 3:
      asm volatile("cp.async.wait_group 3;\n" ::: "memory");
      break;
    case 7:
      asm volatile("cp.async.wait_group 7;\n" ::: "memory");
      break;
    case 15:
      asm volatile("cp.async.wait_group 15;\n" ::: "memory");
      break;
    default:
      asm volatile("cp.async.wait_group 0;\n" ::: "memory");
      break;
  }
}

// The block's ring: its stages in shared memory, their barriers, and the next item to read.
struct Ring {
  const uint8_t* base;
  uint32_t base_addr, full;
  RingShape shape;
  int seq = 0;  // the next item of the block's sequence to read
};

// What a group does with an item's row sums (ring_phase's finish): one function for every phase,
// so that the kernel holds one copy of ring_phase (a copy a call site made the kernel 285 KB of
// code, which the instruction cache could not hold: bench/NOTES.md, twenty-third session).
enum class RingFinish { kStore, kAddTo, kSwiglu };
struct RingOut {
  RingFinish kind;
  float* dst;  // kAddTo: the residual; kSwiglu: silu(gate) * up (kStore: the part's out)
  int64_t n;   // dst's length (kAddTo, kSwiglu)
};

// Row r of the phase's part p is done: sum s (and u, gate/up's up row); old: dst[r] read before
// the item's sums (kAddTo), so that the finishing thread does not wait for it.
__device__ __forceinline__ void ring_finish(const RingPhase& ph, const RingOut& out, int p,
                                            int64_t r, float s, float u, float old) {
  if (out.kind == RingFinish::kStore) {
    const RingMatrix m = ring_matrix(ph, p);
    if (r < m.n_out) m.out[r] = s + (m.bias ? m.bias[r] : 0.0f);
  } else if (r < out.n) {
    out.dst[r] = out.kind == RingFinish::kAddTo ? old + s : silu_times(s, u);
  }
}

// The item's row sums of this thread's quant blocks (rows j >= R left 0): the rows unrolled, so
// that their loads and dp4a chains overlap.
template <quant::DType T>
__device__ __forceinline__ void ring_item_terms(const uint8_t* codes, const __half* scales,
                                                const RingPhase& ph, int l,
                                                const int (&a1)[kRingMaxKpt][8],
                                                const int (&a2)[kRingMaxKpt][8],
                                                const ActBlock (&am)[kRingMaxKpt],
                                                float (&v)[kRingMaxRows]) {
  constexpr int kBytes = T == quant::DType::Q8_0 ? 32 : 16;
#pragma unroll
  for (int j = 0; j < kRingMaxRows; ++j) {
    v[j] = 0.0f;
#pragma unroll
    for (int i = 0; i < kRingMaxKpt; ++i) {
      const int kb = l + i * ph.gsize;
      if (j < ph.rows && i < ph.kpt && kb < ph.nb) {
        const int e = j * ph.nb + kb;
        v[j] += ring_term<T>(codes + kBytes * e, __half2float(scales[e]), a1[i], a2[i], am[i]);
      }
    }
  }
}

// The warp's sums of 8 values a lane: 9 shuffles, not 8 x 5. Each step a lane keeps half of its
// values and adds its partner's other half; lane l ends with the sum of value
// 4 (l >> 4 & 1) + 2 (l >> 3 & 1) + (l >> 2 & 1).
__device__ __forceinline__ float warp_sum8(const float (&v)[8], int lane) {
  const bool h16 = lane & 16, h8 = lane & 8, h4 = lane & 4;
  float a[4], b[2];
#pragma unroll
  for (int i = 0; i < 4; ++i)
    a[i] = (h16 ? v[i + 4] : v[i]) + __shfl_xor_sync(0xffffffffu, h16 ? v[i] : v[i + 4], 16);
#pragma unroll
  for (int i = 0; i < 2; ++i)
    b[i] = (h8 ? a[i + 2] : a[i]) + __shfl_xor_sync(0xffffffffu, h8 ? a[i] : a[i + 2], 8);
  float c = (h4 ? b[1] : b[0]) + __shfl_xor_sync(0xffffffffu, h4 ? b[0] : b[1], 4);
  c += __shfl_xor_sync(0xffffffffu, c, 2);
  return c + __shfl_xor_sync(0xffffffffu, c, 1);
}

// Consumes the block's items of phase ph: for each item, thread j < R (paired: j < R / 2) of the
// group that took it finishes row j (ring_finish: out says how), while the first thread of the
// group's second warp (cp.async: all its threads) asks for the item `stages` ahead, once the
// group has read the stage. Activations: the planes `a1p`, `a2p`, `meta` (nb blocks) in shared
// memory. red: [2][16 warps][kRingMaxRows]. clock (the phase clock's, or null):
// [kRingClockSlots] sums over the groups' first threads: the items, then the SM cycles of their
// steps (waiting for the stage, the sums, the group's barrier, asking for the next item (bulk
// copies: the second warp's, so ~0 here), finishing the rows), which tell a ring the copies hold
// back from consumers that do.
__device__ __noinline__ void ring_phase(const RingPhase& ph, const RingPhase (&all)[kRingPhases],
                                        Ring& ring, const int8_t* a1p, const int8_t* a2p,
                                        const ActBlock* meta, float (*red)[kRingMaxRows],
                                        unsigned long long* clock, RingOut out) {
  constexpr int kWarps = 16;  // decode_layer_kernel's 512 threads
  const int nb = ph.nb, R = ph.rows, t = static_cast<int>(threadIdx.x);
  const int fin_rows = ph.paired ? R / 2 : R;  // rows a group's item finishes
  const int g = t / ph.gsize, l = t % ph.gsize, warp = t / 32, lane = t % 32;
  const int n = ring_mine(ph.n_items()), first_seq = ring.seq;
  ring.seq += n;  // every thread: the sequence after this phase
  const bool cp_async = ring.shape.cp_async;
  // cp.async: the items asked for before this phase (by other threads) have landed and are seen.
  // A group then waits for its own copies: those of round r were asked for at round r - depth.
  const int depth = ring.shape.stages / ph.groups;
  if (cp_async) {
    ring_cp_async_wait(0);
    __syncthreads();
  }
  if (g >= ph.groups) return;
  int a1[kRingMaxKpt][8] = {}, a2[kRingMaxKpt][8] = {};
  ActBlock am[kRingMaxKpt] = {};
#pragma unroll
  for (int i = 0; i < kRingMaxKpt; ++i) {
    const int kb = l + i * ph.gsize;
    if (i < ph.kpt && kb < nb) {
      load_act_planes(a1p, a2p, kb, a1[i], a2[i]);
      am[i] = meta[kb];
    }
  }
  const RingSeq seq_of(all);
  const int warps = ph.gsize / 32, w0 = g * warps;
  const bool timed = clock && l == 0;
  long long steps[kRingClockSlots] = {}, c0 = 0;
  const auto lap = [&](int slot) {  // the step just done, in SM cycles
    if (!timed) return;
    const long long c = clock64();
    if (slot > 0) steps[slot] += c - c0;
    c0 = c;
  };
  for (int k = g, round = 0; k < n; k += ph.groups, ++round) {
    const int seq = first_seq + k, stage = seq % ring.shape.stages;
    lap(0);
    ++steps[0];
    if (!cp_async) {
      barrier_wait(ring.full + 8 * stage, (seq / ring.shape.stages) & 1);
    } else if (round >= depth) {
      ring_cp_async_wait(depth - 1);
      asm volatile("bar.sync %0, %1;\n" ::"r"(1 + g), "r"(ph.gsize) : "memory");
    }
    lap(1);
    const int item = static_cast<int>(blockIdx.x) + k * static_cast<int>(gridDim.x);
    int64_t row0;
    const int p = ring_part(ph, item, row0);
    const bool q8 = ring_matrix(ph, p).q8;
    const uint8_t* codes = ring.base + stage * ring.shape.stage_bytes;
    const __half* scales = reinterpret_cast<const __half*>(codes + ring.shape.code_cap);
    float(*slot)[kRingMaxRows] = red + (round & 1) * kWarps;
    float old = 0.0f;  // the finishing thread's row of x, asked for before the sums
    if (out.kind == RingFinish::kAddTo && l < fin_rows && row0 + l < out.n) old = out.dst[row0 + l];
    float v[kRingMaxRows];
    if (q8)
      ring_item_terms<quant::DType::Q8_0>(codes, scales, ph, l, a1, a2, am, v);
    else
      ring_item_terms<quant::DType::Q4_0>(codes, scales, ph, l, a1, a2, am, v);
    const float sum = warp_sum8(v, lane);
    if (const int j = 4 * (lane >> 4 & 1) + 2 * (lane >> 3 & 1) + (lane >> 2 & 1);
        lane % 4 == 0 && j < R)
      slot[warp][j] = sum;
    lap(2);
    // The group has read the stage and written its sums.
    asm volatile("bar.sync %0, %1;\n" ::"r"(1 + g), "r"(ph.gsize) : "memory");
    lap(3);
    if (cp_async) {  // every thread commits a group, empty or not, so the counts stay in step
      seq_of.issue(all, ring.shape, seq + ring.shape.stages, ring.base_addr, ring.full, l,
                   ph.gsize);
      asm volatile("cp.async.commit_group;\n" ::: "memory");
    } else if (l == 32) {  // the group's second warp; the first finishes the rows meanwhile
      seq_of.issue(all, ring.shape, seq + ring.shape.stages, ring.base_addr, ring.full);
    }
    lap(4);
    if (l < fin_rows) {
      const auto row_sum = [&](int j) {  // the group's warps in a fixed order
        float s = 0.0f;
        for (int w = w0; w < w0 + warps; ++w) s += slot[w][j];
        return s;
      };
      ring_finish(ph, out, p, row0 + l, row_sum(l), ph.paired ? row_sum(l + R / 2) : 0.0f, old);
    }
    lap(5);
  }
  if (timed)
    for (int i = 0; i < kRingClockSlots; ++i)
      atomicAdd(clock + i, static_cast<unsigned long long>(steps[i]));
}

#endif  // !__CUDA_ARCH__ || __CUDA_ARCH__ >= 900

}  // namespace kestrel::backend::cuda
