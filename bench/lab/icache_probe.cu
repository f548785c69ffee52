// What a kernel's own code costs when it is not in the SM's instruction cache: the question the
// fused decode layer raised (285 KB of machine code, every step of an item thousands of cycles:
// bench/NOTES.md, twenty-third session) and that the op sequence's small kernels may share
// (rms_norm 15-65 KB, rope_kv_store ~54 KB, attention_tc16 ~58 KB of code for ~1 us of work).
//
// straight_kernel<N> runs N straight-line instructions (FMAs on 8 independent accumulators, so
// issue and not latency sets the warm pace), one warp a block, one block an SM. Each size is timed
//   warm  launched again at once (its code in the instruction caches and L2),
//   l2    after a kernel of other code ran (this code in L2, not in the SMs' caches),
//   dram  after a 256 MB stream evicted L2 too (the code from memory, as after a layer's weights),
// and the table gives us a launch and ns per KB of code beyond warm.
// Lab tool, not built by CMake: nvcc -O3 -std=c++17 -arch=sm_90a bench/lab/icache_probe.cu -o
// /tmp/icache_probe && /tmp/icache_probe
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#define CHECK(x)                                                                        \
  do {                                                                                  \
    cudaError_t e_ = (x);                                                               \
    if (e_ != cudaSuccess) {                                                            \
      std::fprintf(stderr, "%s: %s (line %d)\n", #x, cudaGetErrorString(e_), __LINE__); \
      std::exit(1);                                                                     \
    }                                                                                   \
  } while (0)

// N / 8 rounds of 8 FMAs and the round constants: ~18 bytes of code an FMA (readelf of the cubin:
// 295,680 bytes for N = 16384).
template <int N>
__global__ void straight_kernel(float* out, float a, float b) {
  float x[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) x[i] = threadIdx.x + i;
#pragma unroll
  for (int r = 0; r < N / 8; ++r)
#pragma unroll
    for (int i = 0; i < 8; ++i) x[i] = fmaf(x[i], a, b + r);  // r: no two rounds alike
  float s = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) s += x[i];
  if (s == 1234.5f) out[threadIdx.x] = s;  // keeps the work
}

// Other code of the same size (evicts this one from the SMs' caches, not from L2).
template <int N>
__global__ void other_kernel(float* out, float a, float b) {
  float x[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) x[i] = threadIdx.x - i;
#pragma unroll
  for (int r = 0; r < N / 8; ++r)
#pragma unroll
    for (int i = 0; i < 8; ++i) x[i] = fmaf(x[i], b, a - r);
  float s = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) s += x[i];
  if (s == 4321.5f) out[threadIdx.x] = s;
}

__global__ void stream_kernel(const int4* src, int64_t n16, int* sink) {
  int acc = 0;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n16;
       i += int64_t{gridDim.x} * blockDim.x)
    acc ^= __ldcs(src + i).x;
  if (acc == 0x7fffffff) *sink = acc;
}

struct Probe {
  int sms;
  float* out;
  int4* big;
  int64_t big16;
  int* sink;
  cudaEvent_t a, b;

  template <class F>
  float time_us(F launch) {
    CHECK(cudaEventRecord(a));
    launch();
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    return 1000 * ms;
  }

  template <int N>
  void row() {
    const auto run = [&] { straight_kernel<N><<<sms, 32>>>(out, 1.0001f, 0.5f); };
    float warm = 0, l2 = 0, dram = 0;
    const int reps = 7;
    for (int r = 0; r < reps; ++r) {
      run();
      warm += time_us(run);
      other_kernel<N><<<sms, 32>>>(out, 1.0001f, 0.5f);
      l2 += time_us(run);
      stream_kernel<<<sms * 8, 256>>>(big, big16, sink);
      dram += time_us(run);
    }
    CHECK(cudaGetLastError());
    warm /= reps, l2 /= reps, dram /= reps;
    const double kb = N * 18.0 / 1024;  // about
    std::printf("%9.0f %10.2f %10.2f %10.2f %12.1f %12.1f\n", kb, warm, l2, dram,
                1000 * (l2 - warm) / kb, 1000 * (dram - warm) / kb);
    std::fflush(stdout);
  }
};

int main() {
  Probe p{};
  int dev = 0;
  CHECK(cudaGetDevice(&dev));
  CHECK(cudaDeviceGetAttribute(&p.sms, cudaDevAttrMultiProcessorCount, dev));
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, dev));
  p.big16 = (int64_t{256} << 20) / 16;
  CHECK(cudaMalloc(&p.big, p.big16 * 16));
  CHECK(cudaMemset(p.big, 1, p.big16 * 16));
  CHECK(cudaMalloc(&p.out, 1024 * sizeof(float)));
  CHECK(cudaMalloc(&p.sink, sizeof(int)));
  CHECK(cudaEventCreate(&p.a));
  CHECK(cudaEventCreate(&p.b));
  std::printf("icache_probe: %s, %d SMs, one warp an SM, mean of 7 (us a launch)\n", prop.name,
              p.sms);
  std::printf("%9s %10s %10s %10s %12s %12s\n", "code KB", "warm", "l2", "dram", "l2 ns/KB",
              "dram ns/KB");
  p.row<64>();
  p.row<256>();
  p.row<1024>();
  p.row<2048>();
  p.row<4096>();
  p.row<8192>();
  p.row<16384>();
  return 0;
}
