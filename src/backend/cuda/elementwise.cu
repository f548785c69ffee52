// Row-wise and element-wise ops: embedding lookup, RMS norm, RoPE, SwiGLU, add, get_rows.
// Each is a single pass over its rows; they are small next to the matmuls (see --profile).
#include <cmath>

#include "backend/cuda/acts_device.cuh"
#include "backend/cuda/cuda_backend_impl.cuh"
#include "backend/cuda/quant_device.cuh"

namespace kestrel::backend::cuda {

// RoPE frequencies base^(-2i/head_dim), passed by value to the kernel.
constexpr int kRopeMaxPairs = 128;
struct RopeTable {
  double inv_freq[kRopeMaxPairs];
};

namespace {

// One block per token, one thread per 32-element slice of the table row.
template <DType T>
__global__ void embed_kernel(const uint8_t* table, int64_t row_bytes, int64_t n_embd,
                             const int32_t* tokens, float* out) {
  const int t = blockIdx.x;
  const uint8_t* row = table + static_cast<int64_t>(tokens[t]) * row_bytes;
  for (int64_t s = threadIdx.x; s < n_embd / 32; s += blockDim.x) {
    float w[32];
    decode_slice<T>(row, s, w);
    float4* dst = reinterpret_cast<float4*>(out + t * n_embd + 32 * s);
#pragma unroll
    for (int j = 0; j < 8; ++j)
      dst[j] = make_float4(w[4 * j], w[4 * j + 1], w[4 * j + 2], w[4 * j + 3]);
  }
}

// One block per token. Every load of the row is issued before any is used (float4, unrolled):
// with one block per token, a loop of dependent loads would cost a memory latency per step
// (16 us per decode step was measured). Sums of squares in f32 per thread and warp, the block
// total and the scale in double as the CPU reference. The output is also written as the next
// matmul's input `also` (n a multiple of 32 for the int8 planes).
constexpr int kNormThreads = 256, kNormMaxVec = 8;  // rows of up to 8192 floats in registers
__global__ void __launch_bounds__(kNormThreads)
    rms_norm_kernel(const float* __restrict__ x, int64_t n, const float* __restrict__ w, float eps,
                    float* __restrict__ out, MatmulInputOut also) {
  const float4* xr = reinterpret_cast<const float4*>(x + blockIdx.x * n);
  const float4* wr = reinterpret_cast<const float4*>(w);
  float4* o = reinterpret_cast<float4*>(out + blockIdx.x * n);
  const int nv = static_cast<int>(n / 4);
  float4 v[kNormMaxVec];
  float ss = 0.0f;
#pragma unroll
  for (int k = 0; k < kNormMaxVec; ++k) {
    const int i = threadIdx.x + kNormThreads * k;
    v[k] = i < nv ? xr[i] : make_float4(0, 0, 0, 0);
  }
#pragma unroll
  for (int k = 0; k < kNormMaxVec; ++k)
    ss += v[k].x * v[k].x + v[k].y * v[k].y + v[k].z * v[k].z + v[k].w * v[k].w;
  ss = warp_sum(ss);
  __shared__ float red[kNormThreads / 32];
  __shared__ float inv;
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = ss;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0;
    for (int i = 0; i < kNormThreads / 32; ++i) total += red[i];
    inv = static_cast<float>(1.0 / sqrt(total / n + eps));
  }
  __syncthreads();
  const float f = inv;
  const bool fused = also.q1 || also.x16;
#pragma unroll
  for (int k = 0; k < kNormMaxVec; ++k) {
    const int i = threadIdx.x + kNormThreads * k;
    float4 r = make_float4(0, 0, 0, 0);
    if (i < nv) {
      const float4 g = wr[i];
      r = make_float4(v[k].x * f * g.x, v[k].y * f * g.y, v[k].z * f * g.z, v[k].w * f * g.w);
      o[i] = r;
    }
    // Every lane of a warp takes part (the int8 planes reduce over 8 lanes), past the row too.
    if (fused && kNormThreads * k < nv)
      write_matmul_input4(also, blockIdx.x * n + 4 * i, r, i < nv);
  }
}

// A block per (token, head), a thread per rotated pair. The angle pos * inv_freq (thousands of
// radians) is formed and reduced modulo 2 pi in double, with inv_freq from the host (double
// pow, as on the CPU); the reduced angle's sine and cosine in f32 are within an ulp or two.
__global__ void rope_kernel(float* x, int64_t row_len, const int32_t* pos, int head_dim,
                            RopeTable table, bool neox) {
  const int half = head_dim / 2, i = threadIdx.x;
  if (i >= half) return;
  constexpr double kTwoPi = 6.283185307179586476925;
  const double theta = pos[blockIdx.x] * table.inv_freq[i];
  const float r = static_cast<float>(theta - rint(theta * (1.0 / kTwoPi)) * kTwoPi);
  float sn, cn;
  sincosf(r, &sn, &cn);
  float* head = x + blockIdx.x * row_len + static_cast<int64_t>(blockIdx.y) * head_dim;
  const int i0 = neox ? i : 2 * i, i1 = neox ? i + half : 2 * i + 1;
  const float a = head[i0], b = head[i1];
  head[i0] = a * cn - b * sn;
  head[i1] = a * sn + b * cn;
}

// The output is also written as the next matmul's input `also` (n a multiple of 32 for the int8
// planes: a warp is one block, wholly inside or outside).
__global__ void swiglu_kernel(const float* gate, const float* up, int64_t n, float* out,
                              MatmulInputOut also) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) {
    const float g = gate[i];
    const float r = g / (1.0f + expf(-g)) * up[i];
    out[i] = r;
    write_matmul_input1(also, i, r);
  }
}

__global__ void add_kernel(float* x, const float* y, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) x[i] += y[i];
}

__global__ void get_rows_kernel(const float* x, int64_t n_cols, const int32_t* rows, float* out) {
  const float* src = x + static_cast<int64_t>(rows[blockIdx.x]) * n_cols;
  float* dst = out + static_cast<int64_t>(blockIdx.x) * n_cols;
  for (int64_t i = threadIdx.x; i < n_cols; i += blockDim.x) dst[i] = src[i];
}

}  // namespace

Status launch_embed(DType t, const uint8_t* table, int64_t row_bytes, int64_t n_embd,
                    const int32_t* tokens, int n_tokens, float* out, cudaStream_t s) {
  if (n_tokens <= 0) return Status::ok();
  if (n_embd % 32 != 0)
    return error("embed: rows of %lld are not a multiple of 32", static_cast<long long>(n_embd));
  bool ok;
  KESTREL_CUDA_FOR_TYPE(
      t, ok, embed_kernel<K><<<n_tokens, 128, 0, s>>>(table, row_bytes, n_embd, tokens, out));
  if (!ok) return error("embed: type %s is not supported on CUDA", quant::type_name(t));
  LAUNCH_CHECK("embed");
  return Status::ok();
}

Status launch_rms_norm(const float* x, int n_tokens, int64_t n, const float* w, float eps,
                       float* out, const MatmulInputOut& also, cudaStream_t s) {
  if (n_tokens <= 0) return Status::ok();
  if (n % 4 != 0 || n > int64_t{4} * kNormThreads * kNormMaxVec)
    return error("rms_norm: rows of %lld are not supported (a multiple of 4, at most %d)",
                 static_cast<long long>(n), 4 * kNormThreads * kNormMaxVec);
  if ((also.q1 || also.x16) && n % 32 != 0)
    return error("rms_norm: rows of %lld cannot be written as int8 blocks of 32",
                 static_cast<long long>(n));
  rms_norm_kernel<<<n_tokens, kNormThreads, 0, s>>>(x, n, w, eps, out, also);
  LAUNCH_CHECK("rms_norm");
  return Status::ok();
}

Status launch_rope(float* x, int n_tokens, const int32_t* pos, const RopeParams& p,
                   cudaStream_t s) {
  if (n_tokens <= 0) return Status::ok();
  const int64_t row = int64_t{p.n_heads} * p.head_dim;
  if (p.head_dim > 2 * kRopeMaxPairs || p.head_dim % 2 != 0)
    return error("rope: head size %d is not supported (even, at most %d)", p.head_dim,
                 2 * kRopeMaxPairs);
  // The table of the last (base, head size): a model uses one, so it is computed once.
  thread_local RopeTable table;
  thread_local float table_base = 0.0f;
  thread_local int table_dim = 0;
  if (table_base != p.freq_base || table_dim != p.head_dim) {
    for (int i = 0; i < p.head_dim / 2; ++i)
      table.inv_freq[i] = std::pow(static_cast<double>(p.freq_base), -2.0 * i / p.head_dim);
    table_base = p.freq_base;
    table_dim = p.head_dim;
  }
  rope_kernel<<<dim3(n_tokens, p.n_heads), p.head_dim / 2, 0, s>>>(x, row, pos, p.head_dim, table,
                                                                   p.layout == RopeLayout::NeoX);
  LAUNCH_CHECK("rope");
  return Status::ok();
}

Status launch_swiglu(const float* gate, const float* up, int64_t n, float* out,
                     const MatmulInputOut& also, cudaStream_t s) {
  if (n <= 0) return Status::ok();
  if (also.q1 && n % 32 != 0)
    return error("swiglu: %lld values cannot be written as int8 blocks of 32",
                 static_cast<long long>(n));
  swiglu_kernel<<<ceil_div(n, 256), 256, 0, s>>>(gate, up, n, out, also);
  LAUNCH_CHECK("swiglu");
  return Status::ok();
}

Status launch_add(float* x, const float* y, int64_t n, cudaStream_t s) {
  if (n <= 0) return Status::ok();
  add_kernel<<<ceil_div(n, 256), 256, 0, s>>>(x, y, n);
  LAUNCH_CHECK("add");
  return Status::ok();
}

Status launch_get_rows(const float* x, int64_t n_cols, const int32_t* rows, int n_rows, float* out,
                       cudaStream_t s) {
  if (n_rows <= 0) return Status::ok();
  get_rows_kernel<<<n_rows, 256, 0, s>>>(x, n_cols, rows, out);
  LAUNCH_CHECK("get_rows");
  return Status::ok();
}

}  // namespace kestrel::backend::cuda
