// Row-wise and element-wise ops: embedding lookup, RMS norm, RoPE, SwiGLU, add, get_rows.
// Each is a single pass over its rows; they are small next to the matmuls (see --profile).
#include <cmath>

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

// One block per token. Sums of squares in f32 per thread and warp (a few hundred terms each,
// relative error ~1e-7), the block total and the scale in double as the CPU reference.
__global__ void rms_norm_kernel(const float* x, int64_t n, const float* w, float eps, float* out) {
  const float* xr = x + blockIdx.x * n;
  float* o = out + blockIdx.x * n;
  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) ss += xr[i] * xr[i];
  ss = warp_sum(ss);
  __shared__ float red[32];
  __shared__ float inv;
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = ss;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0;
    for (int i = 0; i < static_cast<int>(blockDim.x / 32); ++i) total += red[i];
    inv = static_cast<float>(1.0 / sqrt(total / n + eps));
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) o[i] = xr[i] * inv * w[i];
}

// One block per token: (cos, sin) of each pair index into shared memory, then every thread
// rotates pairs of all heads. The angle pos * inv_freq (thousands of radians) is formed and
// reduced modulo 2 pi in double, with inv_freq from the host (double pow, as on the CPU); the
// reduced angle's sine and cosine in f32 are then within an ulp or two.
__global__ void rope_kernel(float* x, int64_t row_len, const int32_t* pos, int n_heads,
                            int head_dim, RopeTable table, bool neox) {
  extern __shared__ float2 cs[];  // [head_dim / 2]
  const int half = head_dim / 2;
  constexpr double kTwoPi = 6.283185307179586476925;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const double theta = pos[blockIdx.x] * table.inv_freq[i];
    const float r = static_cast<float>(theta - rint(theta * (1.0 / kTwoPi)) * kTwoPi);
    float sn, cn;
    sincosf(r, &sn, &cn);
    cs[i] = make_float2(cn, sn);
  }
  __syncthreads();
  float* row = x + blockIdx.x * row_len;
  for (int k = threadIdx.x; k < n_heads * half; k += blockDim.x) {
    const int h = k / half, i = k % half;
    float* head = row + h * head_dim;
    const int i0 = neox ? i : 2 * i, i1 = neox ? i + half : 2 * i + 1;
    const float a = head[i0], b = head[i1];
    head[i0] = a * cs[i].x - b * cs[i].y;
    head[i1] = a * cs[i].y + b * cs[i].x;
  }
}

__global__ void swiglu_kernel(const float* gate, const float* up, int64_t n, float* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) {
    const float g = gate[i];
    out[i] = g / (1.0f + expf(-g)) * up[i];
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
                       float* out, cudaStream_t s) {
  if (n_tokens <= 0) return Status::ok();
  rms_norm_kernel<<<n_tokens, 256, 0, s>>>(x, n, w, eps, out);
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
  rope_kernel<<<n_tokens, 256, sizeof(float2) * (p.head_dim / 2), s>>>(
      x, row, pos, p.n_heads, p.head_dim, table, p.layout == RopeLayout::NeoX);
  LAUNCH_CHECK("rope");
  return Status::ok();
}

Status launch_swiglu(const float* gate, const float* up, int64_t n, float* out, cudaStream_t s) {
  if (n <= 0) return Status::ok();
  swiglu_kernel<<<ceil_div(n, 256), 256, 0, s>>>(gate, up, n, out);
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
