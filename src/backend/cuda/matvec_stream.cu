// Decode's matmul (one token, Q4_0 / Q8_0 weights) as a weight stream: one persistent block an
// SM, whose producer thread has the copy engine bring tiles of whole rows (codes and scales, each
// contiguous in the repacked layout, so two 1-D bulk copies a tile) into a ring of shared-memory
// stages, and whose 8 consumer warps take the tile's rows (a warp 1 or 2 rows, its lanes the
// rows' 32-weight blocks) with the dp4a arithmetic of matvec_int8.cu (matvec_device.cuh) against
// the activations' int8 planes, copied once into shared memory.
//
// Why (bench/NOTES.md, twenty-first session): the decode matvec (matvec_ksplit_kernel, a block
// of 4 rows that loads each row once and exits) streamed the layer's four products at 52-84% of
// the H100's bandwidth, worst where a launch is short (4096 x 4096: 58%) or the rows long (ffn
// down, 4096 x 11008: 52%): each block is one round of loads, so a launch is a ramp, one
// latency and a tail. Here the bytes in flight are the ring's (~100-130 KB an SM, several times
// what Little's law asks at 3.35 TB/s), and the blocks take tiles from a counter, so that they
// end together whatever the shape, and the ones that start late (their SM still running the kernel
// before) take fewer.
//
// As a programmatic dependent launch the ring fills while the kernel before (a norm, SwiGLU,
// attention) still runs: the weights depend on no kernel; only the consumers wait
// (grid_dependency_wait) before they read the activations.
//
// Tiles: rows of part p are cut into tiles of kConsumerWarps * RW rows; tiles are numbered part
// after part, and a counter in global memory hands them out (each block takes its first `stages`
// at once, then one at a time, each asked for a stage ahead). The block that finishes last sets
// the counter back to 0 (counters[1] counts the finished blocks), and each launch takes the next
// of kTicketSlots counter pairs, so a launch never meets a counter the one before it still uses.
#include <algorithm>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "backend/cuda/cuda_backend_impl.cuh"
#include "backend/cuda/matvec_device.cuh"
#include "backend/cuda/wgmma_ops.cuh"

namespace kestrel::backend::cuda {

using quant::DType;

namespace {

constexpr int kConsumerWarps = 8;
constexpr int kThreads = (kConsumerWarps + 1) * 32;  // the last warp's first lane produces
constexpr int kMaxStages = 8;
constexpr int kRedFloats = kMaxStages * kConsumerWarps * 2 * kConsumerWarps;  // consume_slices'

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
  int nb;           // 32-weight blocks a row
  int n_tiles;      // of all parts
  int stages;       // of the ring
  int stage_bytes;  // codes (code_cap bytes), then scales
  int code_cap;     // rows a tile * nb * code bytes a block (a multiple of 16)
  const int8_t* q1;
  const int8_t* q2;
  const ActBlock* meta;
  unsigned* counters;  // [0]: tiles handed out, [1]: blocks finished (both left 0)
  int chunk;           // bytes a bulk copy at most (measurements: KESTREL_CUDA_MVS_CHUNK)
  int dry;             // 1: no arithmetic, wrong results (measurements: KESTREL_CUDA_MVS_DRY)
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900

// The copy engine brings `bytes` (a multiple of 16) from global src to shared dst, completing on
// the barrier at `bar`.
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes,
                                          uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::
          "r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}

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

// The producer: its first `stages` tiles are fixed (blockIdx.x + i gridDim.x: every block starts
// copying at once, and a small matrix is shared out evenly), the later ones come from the
// counter, each asked for a tile ahead; when none is left, an empty stage (tile -1) tells the
// consumers to stop.
template <DType T, int RW>
__device__ void produce(const MatvecStreamArgs& a, uint32_t ring, int* tile_of, uint32_t full,
                        uint32_t empty) {
  constexpr int kRows = kConsumerWarps * RW;
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
    const uint8_t* src = m.qs + row0 * a.nb * kCodeBytes;
    for (uint32_t off = 0; off < codes; off += a.chunk)
      bulk_load(dst + off, src + off, min(codes - off, static_cast<uint32_t>(a.chunk)), bar);
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

// The activations' planes into shared memory: block b's 32 bytes of plane q as two 16-byte
// halves lo[b], hi[b] (lane-consecutive reads), then the blocks' ActBlock.
__device__ void load_acts(const MatvecStreamArgs& a, int4* planes, ActBlock* meta, int tid) {
  const int nb = a.nb;
  const int4* q1 = reinterpret_cast<const int4*>(a.q1);
  const int4* q2 = reinterpret_cast<const int4*>(a.q2);
  for (int c = tid; c < 2 * nb; c += kConsumerWarps * 32) {
    const int b = c / 2, half = c % 2;
    planes[half * nb + b] = q1[c];
    planes[(2 + half) * nb + b] = q2[c];
  }
  const int2* m = reinterpret_cast<const int2*>(a.meta);
  for (int b = tid; b < nb; b += kConsumerWarps * 32) reinterpret_cast<int2*>(meta)[b] = m[b];
}

template <DType T, int RW>
__device__ void consume(const MatvecStreamArgs& a, const uint8_t* ring, const int4* planes,
                        const ActBlock* meta, const int* tile_of, uint32_t full, uint32_t empty,
                        int warp, int lane) {
  constexpr int kRows = kConsumerWarps * RW;
  constexpr int kWords = kQuantWords<T>;
  const int nb = a.nb;
  for (int it = 0;; ++it) {
    const int stage = it % a.stages;
    barrier_wait(full + 8 * stage, (it / a.stages) & 1);
    const int tile = tile_of[stage];
    if (tile < 0) break;
    int64_t row0;
    const StreamPart m = pick_part(a, part_of_tile(a, tile, kRows, row0));
    // The warp's rows' codes and scales in the stage (32-bit offsets: a stage is < 227 KB).
    const uint8_t* codes = ring + stage * a.stage_bytes + warp * RW * nb * 4 * kWords;
    const __half* scales =
        reinterpret_cast<const __half*>(ring + stage * a.stage_bytes + a.code_cap) + warp * RW * nb;
    float acc[RW] = {};
#pragma unroll 2
    for (int b = a.dry ? nb : lane; b < nb; b += 32) {
      int a1[8], a2[8];
      const int4 l1 = planes[b], h1 = planes[nb + b], l2 = planes[2 * nb + b],
                 h2 = planes[3 * nb + b];
      a1[0] = l1.x, a1[1] = l1.y, a1[2] = l1.z, a1[3] = l1.w;
      a1[4] = h1.x, a1[5] = h1.y, a1[6] = h1.z, a1[7] = h1.w;
      a2[0] = l2.x, a2[1] = l2.y, a2[2] = l2.z, a2[3] = l2.w;
      a2[4] = h2.x, a2[5] = h2.y, a2[6] = h2.z, a2[7] = h2.w;
      const ActBlock am = meta[b];
#pragma unroll
      for (int rr = 0; rr < RW; ++rr) {
        // Rows past the part's end read stage bytes that no copy wrote: finite or not, their sums
        // are never stored.
        const int i = rr * nb + b;
        int w[kWords];
        const int4* c = reinterpret_cast<const int4*>(codes + i * 4 * kWords);
#pragma unroll
        for (int v = 0; v < kWords / 4; ++v) {
          const int4 q = c[v];
          w[4 * v] = q.x, w[4 * v + 1] = q.y, w[4 * v + 2] = q.z, w[4 * v + 3] = q.w;
        }
        acc[rr] += block_term<T>(w, __half2float(scales[i]), a1, a2, am);
      }
    }
    __syncwarp();
    if (lane == 0) barrier_arrive(empty + 8 * stage);  // the warp has read the stage
#pragma unroll
    for (int rr = 0; rr < RW; ++rr) {
      const float v = warp_sum(acc[rr]);
      const int64_t r = row0 + warp * RW + rr;
      if (lane == 0 && r < m.n_out) m.out[r] = v + (m.bias ? m.bias[r] : 0.0f);
    }
  }
}

// The consumers for long rows (tiles of 8 G rows): warp w takes the K slice [w nb / 8,
// (w + 1) nb / 8) of every row of the tile; its lanes form G groups of 32 / G, group g the rows
// g, g + G, ..., and lane i of a group the slice's blocks i and i + 32 / G, whose activations stay
// in registers for the whole launch. So a term costs one 16-byte and one 2-byte shared load, not
// the five loads of its activations besides (the row-a-warp consumers above: ffn down at 12.7 us
// against 9.9 us for the copies alone, H100). G = 1 for rows of 256-512 blocks, 2 for 128-255.
// The 8 warps' sums of a row meet in `red` (a slot a stage) and warp 0 adds them in a fixed order.
template <DType T, int G>
__device__ void consume_slices(const MatvecStreamArgs& a, const uint8_t* ring, float* red,
                               const int* tile_of, uint32_t full, uint32_t empty, int warp,
                               int lane) {
  constexpr int kRows = kConsumerWarps * G, kLanes = 32 / G;
  constexpr int kWords = kQuantWords<T>;
  const int nb = a.nb, slice = nb / kConsumerWarps, g = lane / kLanes, li = lane % kLanes;
  const int bq[2] = {warp * slice + li, warp * slice + li + kLanes};
  const bool second = li + kLanes < slice;
  int a1[2][8], a2[2][8];
  ActBlock am[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int b = j == 0 || second ? bq[j] : bq[0];
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
    float acc[kConsumerWarps];  // rows g + G k
#pragma unroll
    for (int k = 0; k < kConsumerWarps; ++k) {
      acc[k] = 0.0f;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        if (j == 1 && !second) break;
        const int i = (g + G * k) * nb + bq[j];  // rows past the part's end: never stored
        int w[kWords];
        const int4* c = reinterpret_cast<const int4*>(codes + i * 4 * kWords);
#pragma unroll
        for (int v = 0; v < kWords / 4; ++v) {
          const int4 q = c[v];
          w[4 * v] = q.x, w[4 * v + 1] = q.y, w[4 * v + 2] = q.z, w[4 * v + 3] = q.w;
        }
        acc[k] += block_term<T>(w, __half2float(scales[i]), a1[j], a2[j], am[j]);
      }
    }
    __syncwarp();
    if (lane == 0) barrier_arrive(empty + 8 * stage);  // the warp has read the stage
    float* slot = red + stage * kConsumerWarps * kRows;
#pragma unroll
    for (int k = 0; k < kConsumerWarps; ++k) {
      float v = acc[k];
#pragma unroll
      for (int o = kLanes / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (li == 0) slot[warp * kRows + g + G * k] = v;
    }
    asm volatile("bar.sync 1, %0;\n" ::"n"(kConsumerWarps * 32) : "memory");
    if (warp == 0 && lane < kRows) {
      float v = 0.0f;
#pragma unroll
      for (int w = 0; w < kConsumerWarps; ++w) v += slot[w * kRows + lane];
      const int64_t r = row0 + lane;
      if (r < m.n_out) m.out[r] = v + (m.bias ? m.bias[r] : 0.0f);
    }
  }
}

#endif  // __CUDA_ARCH__ >= 900

// Tiles of 8 RW rows; kSlices: the consumers of consume_slices (RW row groups a warp), else
// those of consume (RW rows a warp).
template <DType T, int RW, bool kSlices>
__global__ void __launch_bounds__(kThreads, 2)
    matvec_stream_kernel(const __grid_constant__ MatvecStreamArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(16) uint8_t smem[];
  // Ring; activation planes (4 x nb int4) and ActBlocks (nb) unless kSlices; the warps' row sums
  // (kSlices); tile ids; barriers.
  uint8_t* ring = smem;
  int4* planes = reinterpret_cast<int4*>(smem + a.stages * a.stage_bytes);
  ActBlock* meta = reinterpret_cast<ActBlock*>(planes + (kSlices ? 0 : 4 * a.nb));
  float* red = reinterpret_cast<float*>(meta + (kSlices ? 0 : a.nb));
  int* tile_of = reinterpret_cast<int*>(red + (kSlices ? kRedFloats : 0));
  const uint32_t full = (smem_addr(tile_of + kMaxStages) + 7) & ~7u, empty = full + 8 * kMaxStages;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  if (tid == 0) {
    for (int s = 0; s < a.stages; ++s) {
      barrier_init(full + 8 * s, 1);
      barrier_init(empty + 8 * s, kConsumerWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  if (warp == kConsumerWarps) {
    if (lane == 0) produce<T, RW>(a, smem_addr(ring), tile_of, full, empty);
  } else {
    grid_dependency_wait();  // the activations are the kernel before's output
    if constexpr (kSlices) {
      consume_slices<T, RW>(a, ring, red, tile_of, full, empty, warp, lane);
    } else {
      load_acts(a, planes, meta, tid);
      asm volatile("bar.sync 1, %0;\n" ::"n"(kConsumerWarps * 32) : "memory");
      consume<T, RW>(a, ring, planes, meta, tile_of, full, empty, warp, lane);
    }
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

// Settings for measurements: KESTREL_CUDA_MVS_RW=1|2 (rows a consumer warp takes from a tile,
// default 1: tiles of 8 rows), KESTREL_CUDA_MVS_BPS=1|2 (blocks an SM, default 2 where each
// block's ring has 3 stages), KESTREL_CUDA_MVS_SMEM_KB (shared memory of an SM's blocks together,
// default 144 KB, so that they fit beside one block of the f16-cache attention, 78 KB, and start
// while it runs).
int env_int(const char* name, int lo, int hi, int fallback) {
  const char* e = std::getenv(name);
  return e ? std::clamp(std::atoi(e), lo, hi) : fallback;
}

// The launch's shape: tiles of 8 rw rows, the slice consumers or not, blocks an SM, stages of
// stage_bytes, shared memory a block.
struct StreamPlan {
  int rw = 0, bps = 0, stages = 0, stage_bytes = 0, code_cap = 0;
  bool slices = false;
  size_t smem = 0;
};

// Rows of 256-512 blocks (n_in 8192-16384: ffn down) take the slice consumers in tiles of 8
// rows, rows of 128-255 blocks (=1 only) in tiles of 16, one block an SM with
// KESTREL_CUDA_MVS_SLICE_KB of shared memory (default 144: ffn down at 11.4 us on the H100
// against 13.0 with 200 KB, whose deeper ring asks DRAM for more streams at once); other rows the
// row-a-warp consumers, two blocks an SM where each has three stages.
StreamPlan plan_stream(int nb, int code_bytes, size_t optin) {
  static const int rw_env = env_int("KESTREL_CUDA_MVS_RW", 1, 2, 1);
  static const int bps_env = env_int("KESTREL_CUDA_MVS_BPS", 0, 2, 0);
  static const size_t sm_kb =
      static_cast<size_t>(env_int("KESTREL_CUDA_MVS_SMEM_KB", 32, 227, 144));
  static const size_t slice_kb =
      static_cast<size_t>(env_int("KESTREL_CUDA_MVS_SLICE_KB", 32, 227, 144));
  static const bool no_short_slices = env_int("KESTREL_CUDA_MVS_NO_SHORT_SLICES", 0, 1, 0) == 1;
  StreamPlan p;
  const int slice = nb / kConsumerWarps;
  p.slices = slice >= 16 && slice <= 64 && !(slice < 32 && no_short_slices);
  const size_t fixed =
      (p.slices ? sizeof(float) * kRedFloats : size_t(nb) * (64 + sizeof(ActBlock))) +
      4 * kMaxStages + 16 * kMaxStages + 16;
  p.rw = p.slices ? (slice < 32 ? 2 : 1) : rw_env;
  const int rows = kConsumerWarps * p.rw;
  p.code_cap = rows * nb * code_bytes;
  p.stage_bytes = p.code_cap + ((rows * nb * 2 + 15) & ~15);
  for (int bps = 2; bps >= 1; --bps) {
    if ((bps_env != 0 && bps != bps_env) || (p.slices && bps == 2)) continue;
    const size_t budget = std::min((p.slices ? slice_kb : sm_kb) * 1024 / bps, optin);
    if (budget < fixed) continue;
    const int stages =
        static_cast<int>(std::min<size_t>(kMaxStages, (budget - fixed) / p.stage_bytes));
    if (stages < (bps == 2 && bps_env == 0 ? 3 : 2)) continue;
    p.bps = bps;
    p.stages = stages;
    p.smem = fixed + size_t(stages) * p.stage_bytes;
    return p;
  }
  p.stages = 0;  // nothing fits
  return p;
}

template <DType T>
constexpr int kBlockBytes = 4 * kQuantWords<T> + 2;  // codes and scale of a 32-weight block

}  // namespace

// KESTREL_CUDA_MATVEC_STREAM=0: never; =1: every shape it takes; default: rows of 256 blocks or
// more (the slice consumers), where the block-a-4-rows kernel of matvec_int8.cu streams worst.
int matvec_stream_mode() {
  static const int mode = [] {
    const char* e = std::getenv("KESTREL_CUDA_MATVEC_STREAM");
    if (e && std::string(e) == "0") return 0;
    return e && std::string(e) == "1" ? 1 : 2;
  }();
  return mode;
}

bool matvec_stream_enabled() {
  return matvec_stream_mode() != 0;
}

Expected<bool> matvec_stream_available(int device) {
  cudaDeviceProp prop{};
  CUDA_TRY(cudaGetDeviceProperties(&prop, device), "matvec stream probe (device properties)");
  if (prop.major < 9) return false;
  int* flag = nullptr;
  CUDA_TRY(cudaMalloc(&flag, sizeof(int)), "matvec stream probe (allocation)");
  int host = 0;
  matvec_stream_probe_kernel<<<1, 1>>>(flag);
  cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) e = cudaMemcpy(&host, flag, sizeof(int), cudaMemcpyDeviceToHost);
  cudaFree(flag);
  CUDA_TRY(e, "matvec stream probe");
  if (host != 1) return false;
  const int smem = static_cast<int>(prop.sharedMemPerBlockOptin);
  for (const void* kernel :
       {reinterpret_cast<const void*>(matvec_stream_kernel<DType::Q4_0, 1, false>),
        reinterpret_cast<const void*>(matvec_stream_kernel<DType::Q4_0, 2, false>),
        reinterpret_cast<const void*>(matvec_stream_kernel<DType::Q4_0, 1, true>),
        reinterpret_cast<const void*>(matvec_stream_kernel<DType::Q4_0, 2, true>),
        reinterpret_cast<const void*>(matvec_stream_kernel<DType::Q8_0, 1, false>),
        reinterpret_cast<const void*>(matvec_stream_kernel<DType::Q8_0, 2, false>),
        reinterpret_cast<const void*>(matvec_stream_kernel<DType::Q8_0, 1, true>),
        reinterpret_cast<const void*>(matvec_stream_kernel<DType::Q8_0, 2, true>)})
    CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
             "matvec stream (shared memory limit)");
  return true;
}

int matvec_stream_counter_pairs() {
  return kTicketSlots;
}

Status launch_matvec_stream(const MatvecPart* parts, int n_parts, const QuantizedActs& acts,
                            unsigned* counters, int sms, size_t smem_optin, cudaStream_t s,
                            bool& launched) {
  launched = false;
  const CudaWeight& w0 = *parts[0].w;
  const DType type = w0.type;
  if ((type != DType::Q4_0 && type != DType::Q8_0) || w0.n_in % 256 != 0 || n_parts < 1 ||
      n_parts > kMatvecMaxParts)
    return Status::ok();
  const int nb = static_cast<int>(w0.n_in / 32);
  const int code_bytes =
      (type == DType::Q4_0 ? kBlockBytes<DType::Q4_0> : kBlockBytes<DType::Q8_0>)-2;
  const StreamPlan plan = plan_stream(nb, code_bytes, smem_optin);
  if (plan.stages == 0 || (matvec_stream_mode() == 2 && !(plan.slices && plan.rw == 1)))
    return Status::ok();
  const int rows = kConsumerWarps * plan.rw;

  MatvecStreamArgs a{};
  int tiles = 0;
  for (int p = 0; p < n_parts; ++p) {
    const CudaWeight& w = *parts[p].w;
    if (w.type != type || w.n_in != w0.n_in ||
        (reinterpret_cast<uintptr_t>(w.qs) | reinterpret_cast<uintptr_t>(w.d)) % 16 != 0)
      return Status::ok();
    tiles += static_cast<int>(ceil_div(w.n_out, int64_t{rows}));
    a.parts[p] = {w.qs, w.d, parts[p].out, parts[p].bias, w.n_out, tiles};
  }
  a.n_parts = n_parts;
  a.nb = nb;
  a.n_tiles = tiles;
  a.stages = plan.stages;
  a.stage_bytes = plan.stage_bytes;
  a.code_cap = plan.code_cap;
  a.q1 = acts.q1;
  a.q2 = acts.q2;
  a.meta = acts.meta;
  a.counters = counters;
  static const int chunk = env_int("KESTREL_CUDA_MVS_CHUNK", 1, 1 << 20, 1 << 20) & ~15;
  static const int dry = env_int("KESTREL_CUDA_MVS_DRY", 0, 1, 0);
  a.chunk = std::max(chunk, 16);
  a.dry = dry;
  const int grid = std::min(sms * plan.bps, tiles);
  auto go = [&](auto kernel) {
    return launch_dependent_smem(dependent_launches(), kernel, dim3(grid), dim3(kThreads),
                                 plan.smem, s, a);
  };
  auto pick = [&](auto t) {
    constexpr DType T = decltype(t)::value;
    if (plan.slices)
      return plan.rw == 2 ? go(matvec_stream_kernel<T, 2, true>)
                          : go(matvec_stream_kernel<T, 1, true>);
    return plan.rw == 2 ? go(matvec_stream_kernel<T, 2, false>)
                        : go(matvec_stream_kernel<T, 1, false>);
  };
  const cudaError_t e = type == DType::Q4_0 ? pick(std::integral_constant<DType, DType::Q4_0>{})
                                            : pick(std::integral_constant<DType, DType::Q8_0>{});
  CUDA_TRY(e, "matmul (decode weight stream)");
  LAUNCH_CHECK("matmul (decode weight stream)");
  launched = true;
  return Status::ok();
}

}  // namespace kestrel::backend::cuda
