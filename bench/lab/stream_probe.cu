// What one GPU gives a weight stream, by the way the bytes are asked for: the question under the
// fused decode layer (decode_ring.cuh: ~1.3-2 TB/s with 1-D bulk copies into a ring, one block
// an SM) and stream16 (2-D boxes, ~1.2-1.7 TB/s at 16 tokens), where the block-a-4-rows matvec
// with plain loads from many blocks an SM reaches ~2.8 TB/s (bench/NOTES.md, twenty-second and
// twenty-third sessions). Nothing is computed: each mode only moves a buffer much larger than L2
// into registers or shared memory, once a trial, and the table says GB/s for each.
//   ldg     plain 16-byte loads, `bps` blocks of 256 threads an SM, 4 loads in flight a thread
//   bulk    1-D bulk copies (cp.async.bulk) of `chunk` bytes into `stages` stages, one thread of
//           each block asking, chunks b, b + grid, ... (the fused layer's ring)
//   cpasync 16-byte cp.async by every thread of a 512-thread block into the same ring
//   box     2-D tensor copies of 64 rows x `width` bytes of a [rows][row_bytes] matrix, a block's
//           row groups contiguous and K walked inside each (stream16's boxes)
// Lab tool, not built by CMake: nvcc -O3 -std=c++17 -arch=sm_90a -Isrc bench/lab/stream_probe.cu
// -lcuda -o /tmp/stream_probe && /tmp/stream_probe [GiB a trial, default 2].
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "backend/cuda/wgmma_ops.cuh"

using namespace kestrel::backend::cuda;

#define CHECK(x)                                                                        \
  do {                                                                                  \
    cudaError_t e_ = (x);                                                               \
    if (e_ != cudaSuccess) {                                                            \
      std::fprintf(stderr, "%s: %s (line %d)\n", #x, cudaGetErrorString(e_), __LINE__); \
      std::exit(1);                                                                     \
    }                                                                                   \
  } while (0)

constexpr int kMaxStages = 32;

__global__ void ldg_kernel(const int4* src, int64_t n16, int* sink) {
  int acc = 0;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  for (; i + 3 * stride < n16; i += 4 * stride) {
    int4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = __ldcs(src + i + u * stride);
#pragma unroll
    for (int u = 0; u < 4; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n16; i += stride) acc ^= src[i].x;
  if (acc == 0x7fffffff) *sink = acc;  // keeps the loads
}

// One thread's ring of `stages` stages (barriers at bars): asks for items 0..stages-1, then for
// each item k waits for it and asks for k + stages (issue(k, stage) starts item k's copies).
template <class Issue>
__device__ void run_ring(uint32_t bars, int stages, int64_t mine, Issue issue) {
  for (int s = 0; s < stages; ++s) barrier_init(bars + 8 * s, 1);
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  for (int64_t k = 0; k < min(int64_t{stages}, mine); ++k) issue(k, static_cast<int>(k % stages));
  for (int64_t k = 0; k < mine; ++k) {
    barrier_wait(bars + 8 * (k % stages), static_cast<uint32_t>((k / stages) & 1));
    if (k + stages < mine) issue(k + stages, static_cast<int>(k % stages));
  }
}

// Chunks b, b + grid, ... of `chunk` bytes through `stages` stages; thread 0 asks and waits.
__global__ void bulk_kernel(const uint8_t* src, int64_t n_chunks, int chunk, int stages) {
  extern __shared__ __align__(128) uint8_t ring[];
  __shared__ __align__(8) unsigned long long full[kMaxStages];
  if (threadIdx.x != 0) return;
  const uint32_t base = smem_addr(ring), bars = smem_addr(full);
  const int64_t g = gridDim.x;
  const int64_t mine = n_chunks > blockIdx.x ? (n_chunks - 1 - blockIdx.x) / g + 1 : 0;
  run_ring(bars, stages, mine, [&](int64_t k, int s) {
    barrier_expect(bars + 8 * s, chunk);
    bulk_load(base + s * chunk, src + (blockIdx.x + k * g) * chunk, chunk, bars + 8 * s);
  });
}

// The same ring filled by every thread's 16-byte cp.async, a commit group a chunk.
template <int kDepthMinus1>
__global__ void cpasync_kernel(const uint8_t* src, int64_t n_chunks, int chunk) {
  extern __shared__ __align__(128) uint8_t ring[];
  constexpr int stages = kDepthMinus1 + 1;
  const uint32_t base = smem_addr(ring);
  const int64_t g = gridDim.x;
  const int64_t mine = n_chunks > blockIdx.x ? (n_chunks - 1 - blockIdx.x) / g + 1 : 0;
  for (int64_t k = 0; k < mine; ++k) {
    const uint8_t* from = src + (blockIdx.x + k * g) * chunk;
    const uint32_t to = base + static_cast<uint32_t>(k % stages) * chunk;
    for (int c = threadIdx.x; c < chunk / 16; c += blockDim.x)
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(to + 16 * c),
                   "l"(from + 16 * c)
                   : "memory");
    asm volatile("cp.async.commit_group;\n" ::: "memory");
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kDepthMinus1) : "memory");
  }
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

// 2-D boxes (64 rows x box_w bytes, `boxes` side by side a stage) of a [rows][row_bytes] matrix:
// block b takes row groups [b * per, (b + 1) * per) and walks each one's K in steps.
__global__ void box_kernel(const __grid_constant__ CUtensorMap map, int64_t row_groups,
                           int row_bytes, int box_w, int boxes, int stages) {
  extern __shared__ __align__(128) uint8_t ring[];
  __shared__ __align__(8) unsigned long long full[kMaxStages];
  if (threadIdx.x != 0) return;
  const uint32_t base = smem_addr(ring), bars = smem_addr(full);
  const int steps = row_bytes / (box_w * boxes);
  const int box_bytes = 64 * box_w, stage_bytes = box_bytes * boxes;
  const int64_t per = (row_groups + gridDim.x - 1) / gridDim.x;
  const int64_t g0 = blockIdx.x * per, g1 = min(row_groups, g0 + per);
  const int64_t mine = g1 > g0 ? (g1 - g0) * steps : 0;
  run_ring(bars, stages, mine, [&](int64_t k, int s) {
    const int64_t rg = g0 + k / steps;
    const int step = static_cast<int>(k % steps);
    barrier_expect(bars + 8 * s, stage_bytes);
    for (int b = 0; b < boxes; ++b)
      tma_load(base + s * stage_bytes + b * box_bytes, map, (step * boxes + b) * box_w,
               static_cast<int>(rg * 64), bars + 8 * s);
  });
}

struct Timer {
  cudaEvent_t a, b;
  Timer() {
    CHECK(cudaEventCreate(&a));
    CHECK(cudaEventCreate(&b));
  }
  template <typename F>
  double best_ms(F launch, int reps = 5) {
    launch();  // warm
    CHECK(cudaDeviceSynchronize());
    double best = 1e30;
    for (int r = 0; r < reps; ++r) {
      CHECK(cudaEventRecord(a));
      launch();
      CHECK(cudaEventRecord(b));
      CHECK(cudaEventSynchronize(b));
      float ms = 0;
      CHECK(cudaEventElapsedTime(&ms, a, b));
      best = std::min(best, static_cast<double>(ms));
    }
    CHECK(cudaGetLastError());
    return best;
  }
};

int main(int argc, char** argv) {
  const double gib = argc > 1 ? std::atof(argv[1]) : 2.0;
  const int64_t bytes = static_cast<int64_t>(gib * (1 << 30)) / (1 << 20) * (1 << 20);
  int dev = 0, sms = 0, smem_optin = 0;
  CHECK(cudaGetDevice(&dev));
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  smem_optin -= 1024;  // the kernels' static shared memory
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, dev));
  uint8_t* buf = nullptr;
  int* sink = nullptr;
  CHECK(cudaMalloc(&buf, bytes));
  CHECK(cudaMalloc(&sink, sizeof(int)));
  CHECK(cudaMemset(buf, 1, bytes));
  std::printf("stream_probe: %s, %d SMs, %.2f GiB a trial, best of 5\n", prop.name, sms,
              bytes / double(1 << 30));
  std::printf("%-8s %9s %7s %4s %12s %9s\n", "mode", "chunk", "stages", "bps", "flight/SM KB",
              "GB/s");
  Timer t;
  const auto row = [&](const char* mode, const char* chunk, int stages, int bps, double flight_kb,
                       double ms) {
    std::printf("%-8s %9s %7d %4d %12.0f %9.0f\n", mode, chunk, stages, bps, flight_kb,
                bytes / ms / 1e6);
    std::fflush(stdout);
  };
  for (int bps : {1, 2, 4, 8, 16}) {
    const double ms = t.best_ms([&] {
      ldg_kernel<<<sms * bps, 256>>>(reinterpret_cast<const int4*>(buf), bytes / 16, sink);
    });
    row("ldg", "16x4", 0, bps, bps * 256 * 64 / 1024.0, ms);
  }
  CHECK(cudaFuncSetAttribute(bulk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_optin));
  for (int chunk_kb : {4, 8, 16, 32})
    for (int ring_kb : {32, 64, 96, 144, 192})
      for (int bps : {1, 2, 4}) {
        const int chunk = chunk_kb * 1024, stages = ring_kb / chunk_kb;
        if (stages < 2 || stages > kMaxStages || int64_t{bps} * (ring_kb + 1) > 227) continue;
        const int64_t n_chunks = bytes / chunk;
        const double ms = t.best_ms(
            [&] { bulk_kernel<<<sms * bps, 32, ring_kb * 1024>>>(buf, n_chunks, chunk, stages); });
        char c[16];
        std::snprintf(c, sizeof(c), "%dK", chunk_kb);
        row("bulk", c, stages, bps, double(bps) * ring_kb, ms);
      }
  const auto cpasync = [&](auto kernel, int stages) {
    CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_optin));
    for (int chunk_kb : {8, 16})
      for (int bps : {1, 2}) {
        const int chunk = chunk_kb * 1024;
        if (int64_t{bps} * stages * chunk_kb > 220) continue;
        const double ms = t.best_ms(
            [&] { kernel<<<sms * bps, 512 / bps, stages * chunk>>>(buf, bytes / chunk, chunk); });
        char c[16];
        std::snprintf(c, sizeof(c), "%dK", chunk_kb);
        row("cpasync", c, stages, bps, double(bps) * stages * chunk_kb, ms);
      }
  };
  cpasync(cpasync_kernel<3>, 4);
  cpasync(cpasync_kernel<7>, 8);
  cpasync(cpasync_kernel<11>, 12);
  // Boxes: the matrix's rows as Q4_0 codes of K = 4096 and 11008 (2048 and 5504 bytes a row).
  CHECK(cudaFuncSetAttribute(box_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_optin));
  for (int row_bytes : {2048, 5504}) {
    const int64_t rows = bytes / row_bytes / 64 * 64;
    CUtensorMap map{};
    const cuuint64_t dims[2] = {static_cast<cuuint64_t>(row_bytes), static_cast<cuuint64_t>(rows)};
    const cuuint64_t strides[1] = {static_cast<cuuint64_t>(row_bytes)};
    for (int box_w : {128, 256}) {
      const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_w), 64};
      const cuuint32_t elem[2] = {1, 1};
      const CUresult r = cuTensorMapEncodeTiled(
          &map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, buf, dims, strides, box, elem,
          CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
          CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
      if (r != CUDA_SUCCESS) {
        std::printf("box %d: cuTensorMapEncodeTiled failed (%d)\n", box_w, static_cast<int>(r));
        continue;
      }
      for (int boxes : {1, 2, 4})
        for (int ring_kb : {64, 96, 144, 192}) {
          const int stage_kb = 64 * box_w * boxes / 1024, stages = ring_kb / stage_kb;
          if (row_bytes % (box_w * boxes) != 0 || stages < 2 || stages > kMaxStages) continue;
          const double ms = t.best_ms([&] {
            box_kernel<<<sms, 32, stages * stage_kb * 1024>>>(map, rows / 64, row_bytes, box_w,
                                                              boxes, stages);
          });
          char c[24];
          std::snprintf(c, sizeof(c), "%dx%dx%d", row_bytes, box_w, boxes);
          row("box", c, stages, 1, double(stages) * stage_kb,
              ms * bytes / double(rows * row_bytes));
        }
    }
  }
  CHECK(cudaFree(buf));
  CHECK(cudaFree(sink));
  return 0;
}
