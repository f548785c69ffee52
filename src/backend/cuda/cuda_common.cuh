// Shared by the CUDA backend's files: checked CUDA calls that become Status errors naming the
// op, launch checks, and small device helpers.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

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

__device__ __forceinline__ float half_bits_to_float(uint16_t h) {
  return __half2float(__ushort_as_half(h));
}

}  // namespace kestrel::backend::cuda
