// Decode's matmuls of long rows (one token, Q4_0 / Q8_0, 256-512 blocks of 32 weights a row:
// ffn down) as a weight stream: one persistent block an SM, whose producer thread has the copy
// engine bring tiles of 8 whole rows (codes and scales, each contiguous in the repacked layout,
// so two 1-D bulk copies a tile) into a ring of shared-memory stages, and whose 8 consumer warps
// each take a K slice of all 8 rows with the dp4a arithmetic of matvec_int8.cu
// (matvec_device.cuh); a lane's activations (two blocks of the slice) stay in registers for the
// whole launch, so a term costs one 16-byte and one 2-byte shared load. They are the int8 planes
// the kernel before wrote, or (swiglu_matmul, opt-in) silu(gate) * up quantized by the lane itself.
//
// Why (bench/NOTES.md, twenty-first session): matvec_ksplit_kernel (a block of 4 rows whose
// threads split K, each block one round of loads) takes a 4096 x 11008 ffn down in 14.7 us on
// the H100 (52% of the bandwidth), a 4096 x 14336 one (llama3-8b) in more rounds still; this
// kernel in 11.4 us. llama3-8b tg128 402 t/s against 383, llama2-7b even (its down is prefetched
// into L2 by the ksplit kernel's blocks while SwiGLU runs, which the isolated timing misses).
// Opt-in since the twenty-seventh session (KESTREL_CUDA_MATVEC_STREAM=1): with the decode graph
// as it is now the K-split matvec takes ffn down faster in the graph (H100 tg128: llama2-7b 475
// against 440, llama3-8b 400 against 396; ncu: this kernel 17.5 us a launch serialized).
// Measured and dropped: the same stream for every decode shape (4096-wide rows with the rows a
// warp, activations in shared memory, or two row groups a warp): slower than the ksplit kernel
// there (tg128 406 / 397 against 424 / 402), and deeper rings (200 KB) slower than 144 KB.
//
// As a programmatic dependent launch the ring fills while the kernel before (SwiGLU, or gate and
// up with the fused SwiGLU) still runs:
// the weights depend on no kernel; only the consumers wait (grid_dependency_wait) before they
// read the activations.
//
// Tiles are numbered part after part. A block's first `stages` tiles are fixed (blockIdx.x +
// i gridDim.x), the later ones come from a counter in global memory, each asked for a tile
// ahead. The block that finishes last sets the counter back to 0 (counters[1] counts the
// finished blocks), and each launch takes the next of kTicketSlots counter pairs, so a launch
// never meets a counter the one before it still uses.
#include <algorithm>
#include <cstdlib>

#include "backend/cuda/acts_device.cuh"
#include "backend/cuda/cuda_backend_impl.cuh"
#include "backend/cuda/matvec_device.cuh"
#include "backend/cuda/wgmma_ops.cuh"

namespace kestrel::backend::cuda {

using quant::DType;

namespace {

constexpr int kConsumerWarps = 8;
constexpr int kRows = 8;                             // a tile's
constexpr int kThreads = (kConsumerWarps + 1) * 32;  // the last warp's first lane produces
constexpr int kMaxStages = 8;
constexpr int kRedFloats = kMaxStages * kConsumerWarps * kRows;  // the warps' sums, a slot a stage

struct StreamPart {
  const uint8_t* qs;
  const __half* d;
  float* out;
  const float* bias;
  int64_t n_out;
  int tile_end;  // one past the part's last tile (tiles numbered part after part)
};

struct MatvecStreamArgs {
  StreamPart parts[kMatvecMaxParts];
  int n_parts;
  int nb;            // 32-weight blocks a row
  int n_tiles;       // of all parts
  int stages;        // of the ring
  int stage_bytes;   // codes (code_cap bytes), then scales
  int code_cap;      // kRows * nb * code bytes a block (a multiple of 16)
  const int8_t* q1;  // the activations' int8 planes (matvec_int8.cu), or
  const int8_t* q2;
  const ActBlock* meta;
  const float* gate;  // non-null: the activations are silu(gate) * up, quantized here
  const float* up;
  unsigned* counters;   // [0]: tiles handed out, [1]: blocks finished (both left 0)
  AddNormOut add_norm;  // arrivals non-null: rows added into x, then the norm's epilogue
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900

// The part of tile `tile` and its first row in that part.
__device__ __forceinline__ int part_of_tile(const MatvecStreamArgs& a, int tile, int rows,
                                            int64_t& row0) {
  int p = 0, begin = 0;
#pragma unroll
  for (int i = 1; i < kMatvecMaxParts; ++i) {
    if (i < a.n_parts && tile >= a.parts[i - 1].tile_end) {
      p = i;
      begin = a.parts[i - 1].tile_end;
    }
  }
  row0 = static_cast<int64_t>(tile - begin) * rows;
  return p;
}

// The fields of part p, picked without indexing the parameter array by a runtime value.
__device__ __forceinline__ StreamPart pick_part(const MatvecStreamArgs& a, int p) {
  StreamPart s = a.parts[0];
#pragma unroll
  for (int i = 1; i < kMatvecMaxParts; ++i)
    if (p == i) s = a.parts[i];
  return s;
}

// The producer: its first `stages` tiles are fixed (every block starts copying at once), the
// later ones come from the counter; when none is left, an empty stage (tile -1) tells the
// consumers to stop.
template <DType T>
__device__ void produce(const MatvecStreamArgs& a, uint32_t ring, int* tile_of, uint32_t full,
                        uint32_t empty) {
  constexpr int kCodeBytes = 4 * kQuantWords<T>;
  const int fixed = a.stages * static_cast<int>(gridDim.x);
  int ahead = fixed + static_cast<int>(atomicAdd(a.counters, 1u));
  for (int it = 0;; ++it) {
    const int stage = it % a.stages;
    int tile;
    if (it < a.stages) {
      tile = static_cast<int>(blockIdx.x) + it * static_cast<int>(gridDim.x);
    } else {
      tile = ahead;
      if (tile < a.n_tiles) ahead = fixed + static_cast<int>(atomicAdd(a.counters, 1u));
      barrier_wait(empty + 8 * stage, (it / a.stages - 1) & 1);
    }
    if (tile >= a.n_tiles) {
      tile_of[stage] = -1;
      barrier_arrive(full + 8 * stage);
      break;
    }
    int64_t row0;
    const StreamPart m = pick_part(a, part_of_tile(a, tile, kRows, row0));
    const int rows = static_cast<int>(min(int64_t{kRows}, m.n_out - row0));
    const uint32_t codes = static_cast<uint32_t>(rows * a.nb * kCodeBytes);
    const uint32_t scales = static_cast<uint32_t>((rows * a.nb * 2 + 15) & ~15);
    tile_of[stage] = tile;
    const uint32_t bar = full + 8 * stage, dst = ring + stage * a.stage_bytes;
    barrier_expect(bar, static_cast<int>(codes + scales));
    bulk_load(dst, m.qs + row0 * a.nb * kCodeBytes, codes, bar);
    bulk_load(dst + a.code_cap, m.d + row0 * a.nb, scales, bar);
  }
  // Every ticket asked for has come back (the last one unused) before this block is counted.
  asm volatile("" ::"r"(ahead));
  __threadfence();
  if (atomicAdd(a.counters + 1, 1u) == gridDim.x - 1) {  // the last block: counters back to 0
    atomicExch(a.counters, 0u);
    atomicExch(a.counters + 1, 0u);
  }
}

// The int8 planes (words of 4 elements) and ActBlock of one 32-element block of silu(g) * u, as
// SwiGLU's kernels write them (acts_device.cuh: the same functions, so the same bytes).
__device__ __forceinline__ void swiglu_block(const float* g, const float* u, int* a1, int* a2,
                                             ActBlock& am) {
  float v[32];
  float amax = 0.0f;
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    const float4 gq = reinterpret_cast<const float4*>(g)[q];
    const float4 uq = reinterpret_cast<const float4*>(u)[q];
    v[4 * q] = silu_times(gq.x, uq.x);
    v[4 * q + 1] = silu_times(gq.y, uq.y);
    v[4 * q + 2] = silu_times(gq.z, uq.z);
    v[4 * q + 3] = silu_times(gq.w, uq.w);
  }
#pragma unroll
  for (int e = 0; e < 32; ++e) amax = fmaxf(amax, fabsf(v[e]));
  int sum = 0;
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    uint32_t w1 = 0, w2 = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      int x1, x2;
      quantize_two_planes(v[4 * q + k], amax, x1, x2);
      sum += 128 * x1 + x2;
      w1 |= (static_cast<uint32_t>(x1) & 0xFFu) << (8 * k);
      w2 |= (static_cast<uint32_t>(x2) & 0xFFu) << (8 * k);
    }
    a1[q] = static_cast<int>(w1);
    a2[q] = static_cast<int>(w2);
  }
  am = ActBlock{block_unit(amax), sum};
}

// After the tile's finisher warp added its kRows rows into x: the last of the 32 / kRows tiles of
// a 32-row block to arrive runs the add and norm epilogue for it (matvec_int8.cu's K-split kernel
// does the same with its blocks).
__device__ __forceinline__ void add_norm_tile(const AddNormOut& o, int64_t row0, int lane) {
  const int64_t ab = row0 / 32;
  if (last_to_arrive(&o.arrivals[ab], 32 / kRows, lane)) add_norm_block(o, ab, lane);
}

// The consumers: warp w takes the K slice [w nb / 8, (w + 1) nb / 8) (32-64 blocks) of every row
// of the tile, lane i the slice's blocks i and i + 32, whose activations stay in registers. The
// 8 warps' sums of a row meet in `red` (a slot a stage) and one warp, in turn, adds them in a
// fixed order.
template <DType T>
__device__ void consume(const MatvecStreamArgs& a, const uint8_t* ring, float* red,
                        const int* tile_of, uint32_t full, uint32_t empty, uint32_t sums, int warp,
                        int lane) {
  constexpr int kWords = kQuantWords<T>;
  const int nb = a.nb, slice = nb / kConsumerWarps;
  const int bq[2] = {warp * slice + lane, warp * slice + lane + 32};
  const bool second = lane + 32 < slice;
  int a1[2][8], a2[2][8];
  ActBlock am[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int b = j == 0 || second ? bq[j] : bq[0];
    if (a.gate) {
      swiglu_block(a.gate + 32 * b, a.up + 32 * b, a1[j], a2[j], am[j]);
      continue;
    }
    const int4* p1 = reinterpret_cast<const int4*>(a.q1 + 32 * b);
    const int4* p2 = reinterpret_cast<const int4*>(a.q2 + 32 * b);
#pragma unroll
    for (int v = 0; v < 2; ++v) {
      const int4 x1 = p1[v], x2 = p2[v];
      a1[j][4 * v] = x1.x, a1[j][4 * v + 1] = x1.y, a1[j][4 * v + 2] = x1.z,
                a1[j][4 * v + 3] = x1.w;
      a2[j][4 * v] = x2.x, a2[j][4 * v + 1] = x2.y, a2[j][4 * v + 2] = x2.z,
                a2[j][4 * v + 3] = x2.w;
    }
    am[j] = a.meta[b];
  }
  for (int it = 0;; ++it) {
    const int stage = it % a.stages;
    barrier_wait(full + 8 * stage, (it / a.stages) & 1);
    const int tile = tile_of[stage];
    if (tile < 0) break;
    int64_t row0;
    const StreamPart m = pick_part(a, part_of_tile(a, tile, kRows, row0));
    const uint8_t* codes = ring + stage * a.stage_bytes;
    const __half* scales = reinterpret_cast<const __half*>(codes + a.code_cap);
    float acc[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      acc[r] = 0.0f;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        if (j == 1 && !second) break;
        const int i = r * nb + bq[j];  // rows past the part's end: never stored
        int w[kWords];
        const int4* c = reinterpret_cast<const int4*>(codes + i * 4 * kWords);
#pragma unroll
        for (int v = 0; v < kWords / 4; ++v) {
          const int4 q = c[v];
          w[4 * v] = q.x, w[4 * v + 1] = q.y, w[4 * v + 2] = q.z, w[4 * v + 3] = q.w;
        }
        acc[r] += block_term<T>(w, __half2float(scales[i]), a1[j], a2[j], am[j]);
      }
    }
    // The warp's sums into the stage's slot, counted on the stage's `sums` barrier. Warp
    // it % kConsumerWarps finishes the tile; the others go on to the next stage at once (with a
    // block barrier here every warp waited each tile for the finisher's stores, and with the
    // add + norm epilogue for its fence and atomic too).
    float* slot = red + stage * kConsumerWarps * kRows;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float v = warp_sum(acc[r]);
      if (lane == 0) slot[warp * kRows + r] = v;
    }
    const bool finishes = it % kConsumerWarps == warp;
    if (lane == 0) {
      // The stage's codes are read; the finisher gives it back only once it has read the slot
      // too (the slot's next writers wait for the stage's next fill).
      if (!finishes) barrier_arrive(empty + 8 * stage);
      barrier_arrive(sums + 8 * stage);
    }
    if (!finishes) continue;
    barrier_wait(sums + 8 * stage, (it / a.stages) & 1);
    float v = 0.0f;
    if (lane < kRows) {
#pragma unroll
      for (int w = 0; w < kConsumerWarps; ++w) v += slot[w * kRows + lane];
    }
    __syncwarp();
    if (lane == 0) barrier_arrive(empty + 8 * stage);
    const int64_t r = row0 + lane;
    if (lane < kRows && r < m.n_out) {
      v += m.bias ? m.bias[r] : 0.0f;
      if (a.add_norm.arrivals)
        a.add_norm.x[r] += v;
      else
        m.out[r] = v;
    }
    if (a.add_norm.arrivals) add_norm_tile(a.add_norm, row0, lane);
  }
}

#endif  // __CUDA_ARCH__ >= 900

template <DType T>
__global__ void __launch_bounds__(kThreads, 2)
    matvec_stream_kernel(const __grid_constant__ MatvecStreamArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(16) uint8_t smem[];
  // The ring, the warps' row sums, the tile ids, the barriers.
  uint8_t* ring = smem;
  float* red = reinterpret_cast<float*>(smem + a.stages * a.stage_bytes);
  int* tile_of = reinterpret_cast<int*>(red + kRedFloats);
  const uint32_t full = (smem_addr(tile_of + kMaxStages) + 7) & ~7u, empty = full + 8 * kMaxStages,
                 sums = empty + 8 * kMaxStages;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  if (tid == 0) {
    for (int s = 0; s < a.stages; ++s) {
      barrier_init(full + 8 * s, 1);
      barrier_init(empty + 8 * s, kConsumerWarps);
      barrier_init(sums + 8 * s, kConsumerWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  if (warp == kConsumerWarps) {
    if (lane == 0) produce<T>(a, smem_addr(ring), tile_of, full, empty);
  } else {
    grid_dependency_wait();  // the activations are the kernel before's output
    consume<T>(a, ring, red, tile_of, full, empty, sums, warp, lane);
  }
  // Every weight is asked for: the next kernel (a programmatic dependent launch waiting for this
  // one to end) may be scheduled.
  grid_dependents_launch();
#endif
}

// 1 when the kernel above was compiled for the running device (sm_90 or later).
__global__ void matvec_stream_probe_kernel(int* flag) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  *flag = 1;
#else
  *flag = 0;
#endif
}

constexpr int kTicketSlots = 64;

// The launch's shape: stages of stage_bytes (codes, code_cap bytes, then scales), shared memory.
struct StreamPlan {
  int stages = 0, stage_bytes = 0, code_cap = 0;
  size_t smem = 0;
};

// KESTREL_CUDA_MVS_SMEM_KB: shared memory a block (default 144: ffn down at 11.4 us on the H100
// against 13.0 with 200 KB, whose deeper ring asks DRAM for more streams at once; 100 KB, two
// stages of 8 x 11008 weights, 14.8). stages == 0: the row width is not one the consumers take.
StreamPlan plan_stream(int nb, int code_bytes, size_t optin) {
  static const size_t kb = [] {
    const char* e = std::getenv("KESTREL_CUDA_MVS_SMEM_KB");
    return static_cast<size_t>(e ? std::clamp(std::atoi(e), 32, 227) : 144);
  }();
  StreamPlan p;
  if (nb < 32 * kConsumerWarps || nb > 64 * kConsumerWarps || nb % kConsumerWarps != 0) return p;
  const size_t fixed = sizeof(float) * kRedFloats + 4 * kMaxStages + 24 * kMaxStages + 16;
  p.code_cap = kRows * nb * code_bytes;
  p.stage_bytes = p.code_cap + ((kRows * nb * 2 + 15) & ~15);
  const size_t budget = std::min(kb * 1024, optin);
  if (budget < fixed + 2 * size_t(p.stage_bytes)) return p;
  p.stages = static_cast<int>(std::min<size_t>(kMaxStages, (budget - fixed) / p.stage_bytes));
  p.smem = fixed + size_t(p.stages) * p.stage_bytes;
  return p;
}

}  // namespace

Expected<bool> matvec_stream_available(int device) {
  cudaDeviceProp prop{};
  CUDA_TRY(cudaGetDeviceProperties(&prop, device), "matvec stream probe (device properties)");
  if (prop.major < 9) return false;
  KESTREL_ASSIGN_OR_RETURN(const bool compiled,
                           probe_says_compiled(matvec_stream_probe_kernel, "matvec stream probe"));
  if (!compiled) return false;
  const int smem = static_cast<int>(prop.sharedMemPerBlockOptin);
  for (const void* kernel : {reinterpret_cast<const void*>(matvec_stream_kernel<DType::Q4_0>),
                             reinterpret_cast<const void*>(matvec_stream_kernel<DType::Q8_0>)})
    CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
             "matvec stream (shared memory limit)");
  return true;
}

int matvec_stream_counter_pairs() {
  return kTicketSlots;
}

namespace {

StreamPlan plan_for(const CudaWeight& w, size_t smem_optin) {
  if ((w.type != DType::Q4_0 && w.type != DType::Q8_0) || w.n_in % 32 != 0 ||
      (reinterpret_cast<uintptr_t>(w.qs) | reinterpret_cast<uintptr_t>(w.d)) % 16 != 0)
    return StreamPlan{};
  const int code_bytes =
      4 * (w.type == DType::Q4_0 ? kQuantWords<DType::Q4_0> : kQuantWords<DType::Q8_0>);
  return plan_stream(static_cast<int>(w.n_in / 32), code_bytes, smem_optin);
}

}  // namespace

bool matvec_stream_takes(const CudaWeight& w, size_t smem_optin) {
  return plan_for(w, smem_optin).stages > 0;
}

Status launch_matvec_stream(const MatvecPart* parts, int n_parts, const MatvecStreamInput& in,
                            unsigned* counters, int sms, size_t smem_optin, cudaStream_t s,
                            bool& launched) {
  launched = false;
  if (n_parts < 1 || n_parts > kMatvecMaxParts) return Status::ok();
  const CudaWeight& w0 = *parts[0].w;
  const DType type = w0.type;
  const int nb = static_cast<int>(w0.n_in / 32);
  const StreamPlan plan = plan_for(w0, smem_optin);
  if (plan.stages == 0) return Status::ok();
  MatvecStreamArgs a{};
  int tiles = 0;
  for (int p = 0; p < n_parts; ++p) {
    const CudaWeight& w = *parts[p].w;
    if (w.type != type || w.n_in != w0.n_in || plan_for(w, smem_optin).stages == 0)
      return Status::ok();
    tiles += static_cast<int>(ceil_div(w.n_out, int64_t{kRows}));
    a.parts[p] = {w.qs, w.d, parts[p].out, parts[p].bias, w.n_out, tiles};
  }
  a.n_parts = n_parts;
  a.nb = nb;
  a.n_tiles = tiles;
  a.stages = plan.stages;
  a.stage_bytes = plan.stage_bytes;
  a.code_cap = plan.code_cap;
  a.q1 = in.acts.q1;
  a.q2 = in.acts.q2;
  a.meta = in.acts.meta;
  a.gate = in.gate;
  a.up = in.up;
  a.counters = counters;
  a.add_norm = in.add_norm;
  if (in.add_norm.arrivals && (n_parts != 1 || w0.n_out % 32 != 0)) return Status::ok();
  const int grid = std::min(sms, tiles);
  const cudaError_t e =
      type == DType::Q4_0
          ? launch_dependent_smem(dependent_launches(), matvec_stream_kernel<DType::Q4_0>,
                                  dim3(grid), dim3(kThreads), plan.smem, s, a)
          : launch_dependent_smem(dependent_launches(), matvec_stream_kernel<DType::Q8_0>,
                                  dim3(grid), dim3(kThreads), plan.smem, s, a);
  CUDA_TRY(e, "matmul (decode weight stream)");
  LAUNCH_CHECK("matmul (decode weight stream)");
  launched = true;
  return Status::ok();
}

}  // namespace kestrel::backend::cuda
