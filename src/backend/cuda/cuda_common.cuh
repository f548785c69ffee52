// Shared by the CUDA backend's files: checked CUDA calls that become Status errors naming the
// op, launch checks, and small device helpers.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "core/status.h"

namespace kestrel::backend::cuda {

inline Status cuda_status(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return Status::ok();
  return error("CUDA error in %s: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
}

// Every CUDA runtime call goes through CUDA_TRY; every kernel launch is followed by
// LAUNCH_CHECK(op name), so a bad launch is reported with the op that made it.
#define CUDA_TRY(call, what) KESTREL_TRY(::kestrel::backend::cuda::cuda_status((call), (what)))
#define LAUNCH_CHECK(what) \
  KESTREL_TRY(::kestrel::backend::cuda::cuda_status(cudaGetLastError(), (what)))

inline int ceil_div(int64_t a, int64_t b) {
  return static_cast<int>((a + b - 1) / b);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Position pos[lane] for lanes below n (n <= 32), -1 above, and one more than the largest of
// them (the keys a micro-batch sees) in max_plus_one: one round of loads for the warp, where a
// loop over the tokens waited for each load in turn. Every lane of the warp calls it.
__device__ __forceinline__ int warp_positions(const int32_t* pos, int n, int& max_plus_one) {
  const int lane = threadIdx.x % 32;
  const int p = lane < n ? pos[lane] : -1;
  max_plus_one = __reduce_max_sync(0xffffffffu, p) + 1;
  return p;
}

// Programmatic dependent launch (sm_90): a kernel launched with launch_dependent() may start
// while the kernel before it in the stream is still running, and must call this before it reads
// anything that kernel writes (or writes anything a later kernel's early part reads). Without
// the launch attribute, or before sm_90, it returns at once.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next kernel in the stream, when it is a programmatic dependent launch, start now (its
// blocks run up to their grid_dependency_wait(), e.g. streaming weights, while this one works).
// Called at the start of the kernels that precede matmuls; a no-op otherwise.
__device__ __forceinline__ void grid_dependents_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Asks L2 for the 128-byte line holding p (weights a kernel will read once its inputs are ready).
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// Whether the decode matvec goes as a programmatic dependent launch (KESTREL_CUDA_PDL=0: not):
// H200 tg128 398 t/s against 389 for the baseline row of the same run (bench/NOTES.md).
inline bool dependent_launches() {
  static const bool on = [] {
    const char* e = std::getenv("KESTREL_CUDA_PDL");
    return !(e && e[0] == '0' && e[1] == '\0');
  }();
  return on;
}

// Whether the kernels between the matmuls of a layer (norms, RoPE + KV store, attention,
// SwiGLU) go as programmatic dependent launches too, each waiting at its start for the kernel
// before (KESTREL_CUDA_PDL_CHAIN=0, or KESTREL_CUDA_PDL=0: not): the launch of each overlaps the
// end of the one before. Measured (H200, nineteenth session): the seed's b128 ub16 4,426 t/s
// against 4,308 without (+3%, about one sd); tg128 427 either way.
inline bool chained_launches() {
  static const bool on = [] {
    const char* e = std::getenv("KESTREL_CUDA_PDL_CHAIN");
    return dependent_launches() && !(e && e[0] == '0' && e[1] == '\0');
  }();
  return on;
}

// Lab switch, never for real use: KESTREL_CUDA_LAB_SKIP=norm,rope,attention,swiglu,matmul (or +
// between) makes the named ops launch nothing (their outputs keep whatever they held), so that a
// tg128 or seed row shows what those ops cost inside the recorded graph, gaps included. Results are
// wrong.
inline bool lab_skips(const char* op) {
  static const char* list = std::getenv("KESTREL_CUDA_LAB_SKIP");
  if (!list) return false;
  const size_t n = std::strlen(op);
  for (const char* p = list; (p = std::strstr(p, op)) != nullptr; p += n)
    if ((p == list || p[-1] == ',' || p[-1] == '+') && (p[n] == ',' || p[n] == '+' || !p[n]))
      return true;
  return false;
}

// Launches kernel<<<grid, block, smem, s>>>(args...), as a programmatic dependent launch when
// `early` is set: the kernel must call grid_dependency_wait() before it touches the previous
// kernel's outputs.
template <typename... Params, typename... Args>
cudaError_t launch_dependent_smem(bool early, void (*kernel)(Params...), dim3 grid, dim3 block,
                                  size_t smem, cudaStream_t s, Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attr;
  config.numAttrs = early ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

template <typename... Params, typename... Args>
cudaError_t launch_dependent(bool early, void (*kernel)(Params...), dim3 grid, dim3 block,
                             cudaStream_t s, Args&&... args) {
  return launch_dependent_smem(early, kernel, grid, block, 0, s, std::forward<Args>(args)...);
}

__device__ __forceinline__ float half_bits_to_float(uint16_t h) {
  return __half2float(__ushort_as_half(h));
}

}  // namespace kestrel::backend::cuda
