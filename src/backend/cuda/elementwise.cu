// Row-wise and element-wise ops: embedding lookup, RMS norm, RoPE, SwiGLU, add, get_rows.
// Each is a single pass over its rows; they are small next to the matmuls (see --profile).
#include <algorithm>
#include <cmath>

#include "backend/cuda/acts_device.cuh"
#include "backend/cuda/cuda_backend_impl.cuh"
#include "backend/cuda/quant_device.cuh"
#include "backend/cuda/rope_device.cuh"

namespace kestrel::backend::cuda {

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

// One block per token, up to 1024 threads, each with kVec float4 of the row (one for rows of up
// to 4096): in decode there is one block in all, so the row is spread over as many threads as
// it has float4 and every load (x, y, the weight) is issued before any is used -- with 256
// threads and the weight loaded after the reduction, a 4096-wide row took 4.4 us, and 7.7 us
// once it also wrote the int8 planes (ncu, H200: one SM running four dependent rounds).
// With y, the residual add comes first: x += y is stored (the block owns its row) and normed.
// Sums of squares in f32 per thread and warp, the block total and the scale in double as the CPU
// reference. The output is also written as the next matmul's input `also` (n a multiple of 32
// for the int8 planes).
constexpr int kNormMaxThreads = 1024, kNormMaxVec = 8;  // rows of up to 32768 floats
template <int kVec>
__global__ void __launch_bounds__(kNormMaxThreads)
    rms_norm_kernel(float* x, const float* y, int64_t n, const float* __restrict__ w, float eps,
                    float* out, MatmulInputOut also) {
  grid_dependents_launch();  // the next matmul may start streaming its weights
  grid_dependency_wait();    // (chained_launches: started before the kernel before ended)
  float4* xr = reinterpret_cast<float4*>(x + blockIdx.x * n);
  const float4* wr = reinterpret_cast<const float4*>(w);
  float4* o = reinterpret_cast<float4*>(out + blockIdx.x * n);
  const int nv = static_cast<int>(n / 4);
  float4 v[kVec], g[kVec];
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    const int i = threadIdx.x + blockDim.x * k;
    v[k] = make_float4(0, 0, 0, 0);
    if (i < nv) {
      v[k] = xr[i];
      g[k] = wr[i];
    }
  }
  if (y) {
    const float4* yr = reinterpret_cast<const float4*>(y + blockIdx.x * n);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const int i = threadIdx.x + blockDim.x * k;
      if (i < nv) {
        const float4 a = yr[i];
        v[k] = make_float4(v[k].x + a.x, v[k].y + a.y, v[k].z + a.z, v[k].w + a.w);
        xr[i] = v[k];
      }
    }
  }
  float ss = 0.0f;
#pragma unroll
  for (int k = 0; k < kVec; ++k)
    ss += v[k].x * v[k].x + v[k].y * v[k].y + v[k].z * v[k].z + v[k].w * v[k].w;
  ss = warp_sum(ss);
  __shared__ float red[kNormMaxThreads / 32];
  __shared__ float inv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) red[warp] = ss;
  __syncthreads();
  if (warp == 0) {
    double total = lane < static_cast<int>(blockDim.x / 32) ? red[lane] : 0.0;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) total += __shfl_xor_sync(0xffffffffu, total, off);
    if (lane == 0) inv = static_cast<float>(1.0 / sqrt(total / n + eps));
  }
  __syncthreads();
  const float f = inv;
  const bool fused = also.q1 || also.x16;
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    const int i = threadIdx.x + blockDim.x * k;
    float4 r = make_float4(0, 0, 0, 0);
    if (i < nv) {
      r = make_float4(v[k].x * f * g[k].x, v[k].y * f * g[k].y, v[k].z * f * g[k].z,
                      v[k].w * f * g[k].w);
      o[i] = r;
    }
    // Every lane of a warp takes part (the int8 planes reduce over 8 lanes), past the row too.
    if (fused && static_cast<int>(blockDim.x) * k < nv)
      write_matmul_input4(also, blockIdx.x * n + 4 * i, r, i < nv);
  }
}

// A block per (token, head), a thread per rotated pair; heads [0, heads0) of x0, then those of
// x1 (Q and K in one launch); the angles as rope_sincos forms them.
__global__ void rope_kernel(float* x0, int heads0, float* x1, int heads1, const int32_t* pos,
                            int head_dim, RopeTable table, bool neox) {
  const int half = head_dim / 2, i = threadIdx.x;
  if (i >= half) return;
  float sn, cn;
  rope_sincos(pos[blockIdx.x], table.inv_freq[i], sn, cn);
  const bool first = static_cast<int>(blockIdx.y) < heads0;
  const int h = first ? blockIdx.y : blockIdx.y - heads0;
  const int64_t row_len = int64_t{first ? heads0 : heads1} * head_dim;
  float* head = (first ? x0 : x1) + blockIdx.x * row_len + int64_t{h} * head_dim;
  const int i0 = neox ? i : 2 * i, i1 = neox ? i + half : 2 * i + 1;
  const float a = head[i0], b = head[i1];
  head[i0] = rope_rotate(a, b, sn, cn, true);
  head[i1] = rope_rotate(a, b, sn, cn, false);
}

// The output is also written as the next matmul's input `also` (n a multiple of 32 for the int8
// planes: a warp is one block, wholly inside or outside).
__global__ void swiglu_kernel(const float* gate, const float* up, int64_t n, float* out,
                              MatmulInputOut also) {
  grid_dependents_launch();  // the down projection may start streaming its weights
  grid_dependency_wait();    // (chained_launches: started before the kernel before ended)
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) {
    const float r = silu_times(gate[i], up[i]);
    out[i] = r;
    write_matmul_input1(also, i, r);
  }
}

// Four values a thread (n % 4 == 0), for prompt chunks: the thread-per-value kernel moved ~2.6 TB/s
// at 512 tokens x 11008 (30 us, ncu on an H200). The same values and matmul inputs bit for bit
// (write_matmul_input4 quantizes the same 32-value blocks; every lane of a warp takes part).
__global__ void swiglu4_kernel(const float4* gate, const float4* up, int64_t n4, float4* out,
                               MatmulInputOut also) {
  grid_dependents_launch();
  grid_dependency_wait();  // (chained_launches: started before the kernel before ended)
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool in = i < n4;
  float4 r = make_float4(0, 0, 0, 0);
  if (in) {
    const float4 g = gate[i], u = up[i];
    r = make_float4(silu_times(g.x, u.x), silu_times(g.y, u.y), silu_times(g.z, u.z),
                    silu_times(g.w, u.w));
    out[i] = r;
  }
  write_matmul_input4(also, 4 * i, r, in);
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

Status launch_rms_norm(float* x, const float* y, int n_tokens, int64_t n, const float* w, float eps,
                       float* out, const MatmulInputOut& also, cudaStream_t s) {
  if (n_tokens <= 0) return Status::ok();
  if (n % 4 != 0 || n > int64_t{4} * kNormMaxThreads * kNormMaxVec)
    return error("rms_norm: rows of %lld are not supported (a multiple of 4, at most %d)",
                 static_cast<long long>(n), 4 * kNormMaxThreads * kNormMaxVec);
  if ((also.q1 || also.x16) && n % 32 != 0)
    return error("rms_norm: rows of %lld cannot be written as int8 blocks of 32",
                 static_cast<long long>(n));
  const int nv = static_cast<int>(n / 4);
  const int threads = std::min(kNormMaxThreads, static_cast<int>(ceil_div(nv, 32)) * 32);
  const int vec = static_cast<int>(ceil_div(nv, threads));
  auto* kernel = vec <= 1   ? rms_norm_kernel<1>
                 : vec <= 2 ? rms_norm_kernel<2>
                 : vec <= 4 ? rms_norm_kernel<4>
                            : rms_norm_kernel<kNormMaxVec>;
  CUDA_TRY(launch_dependent(chained_launches(), kernel, dim3(n_tokens), dim3(threads), s, x, y, n,
                            w, eps, out, also),
           y ? "add_rms_norm" : "rms_norm");
  LAUNCH_CHECK(y ? "add_rms_norm" : "rms_norm");
  return Status::ok();
}

Status launch_rope(float* x, float* x1, int heads1, int n_tokens, const int32_t* pos,
                   const RopeParams& p, cudaStream_t s) {
  if (n_tokens <= 0) return Status::ok();
  if (p.head_dim > 2 * kRopeMaxPairs || p.head_dim % 2 != 0)
    return error("rope: head size %d is not supported (even, at most %d)", p.head_dim,
                 2 * kRopeMaxPairs);
  const RopeTable& table = rope_table(p.freq_base, p.head_dim);
  rope_kernel<<<dim3(n_tokens, p.n_heads + (x1 ? heads1 : 0)), p.head_dim / 2, 0, s>>>(
      x, p.n_heads, x1, heads1, pos, p.head_dim, table, p.layout == RopeLayout::NeoX);
  LAUNCH_CHECK("rope");
  return Status::ok();
}

Status launch_swiglu(const float* gate, const float* up, int64_t n, float* out,
                     const MatmulInputOut& also, bool vec4, cudaStream_t s) {
  if (n <= 0) return Status::ok();
  if (also.q1 && n % 32 != 0)
    return error("swiglu: %lld values cannot be written as int8 blocks of 32",
                 static_cast<long long>(n));
  if (n % 4 == 0 && vec4) {
    CUDA_TRY(launch_dependent(chained_launches(), swiglu4_kernel, dim3(ceil_div(n / 4, 256)),
                              dim3(256), s, reinterpret_cast<const float4*>(gate),
                              reinterpret_cast<const float4*>(up), n / 4,
                              reinterpret_cast<float4*>(out), also),
             "swiglu");
  } else {
    CUDA_TRY(launch_dependent(chained_launches(), swiglu_kernel, dim3(ceil_div(n, 256)), dim3(256),
                              s, gate, up, n, out, also),
             "swiglu");
  }
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
