// Fused causal attention for prompt chunks over an f16 KV cache, on the tensor cores
// (FlashAttention-2's scheme with mma.sync m16n8k16): a block takes 64 queries of one head, its
// 4 warps 16 each; key tiles of 64 go through shared memory (cp.async), S = Q K^T and O += P V
// are tensor-core products with f32 accumulators, and the online softmax runs in the
// registers that hold S. The S accumulators of two adjacent 8-key tiles are, element for
// element, the A fragment of P for the next product, so P never leaves the registers.
//
// Why: with an f16 cache the cuBLAS path (attention.cu) writes the f32 score matrix and the f16
// probabilities to memory and reads them back ([heads][T][keys]: 128 MB per layer at 512 x 2048),
// and the f32 fused kernel (attention_flash.cu) does the products on the CUDA cores. Floor
// (llama2-7b, 32 layers, causal): 69 GFLOP at 512 tokens, 1.1 TFLOP at 2048; at ~400 TFLOP/s of
// mma.sync that is 0.2 and 2.8 ms.
//
// Precision: Q and P are rounded to f16 once, as in the cuBLAS path with an f16 cache (its single
// GEMM term); K and V are f16 already; scores, the softmax and the sums are f32.
#include <cuda_pipeline_primitives.h>

#include "backend/cuda/cuda_backend_impl.cuh"
#include "backend/cuda/frag_common.cuh"

namespace kestrel::backend::cuda {

namespace {

constexpr int kTileQ = 64, kTileK = 64, kWarps = 4, kThreads = 32 * kWarps;

// Rows of the shared tiles are D + 8 halfs: the 8 rows that one ldmatrix or one quarter warp's
// 4-byte loads touch then start in 8 distinct groups of 4 banks.
template <int D>
constexpr int row_halfs() {
  return D + 8;
}

template <int D>
constexpr size_t mma_smem_bytes() {
  return sizeof(__half) * (kTileQ + 2 * kTileK) * row_halfs<D>();
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);  // .x (the low 16 bits) = lo
  uint32_t u;
  memcpy(&u, &h, 4);
  return u;
}

__device__ __forceinline__ uint32_t shared_word(const __half* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// The B fragments (k = 2c, 2c+1 and 2c+8, 2c+9; n = g) of a row-major [k][n] tile at p (row
// stride `stride` halfs), rows k = 0..15, columns n = 0..7: ldmatrix transposing 8 x 8 blocks.
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t& b0, uint32_t& b1, const __half* p) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(b0), "=r"(b1)
               : "r"(addr));
}

// Rows r0 .. r0 + 63 of one KV head (elements first .. first + D - 1 of each cache row) into
// dst[64][D + 8] with cp.async; rows at or past n_valid are zeros (never NaN garbage times a
// masked zero).
template <int D>
__device__ __forceinline__ void load_tile(const __half* cache, int64_t row_elems, int64_t first,
                                          int64_t r0, int64_t n_valid, __half* dst) {
  constexpr int kChunks = kTileK * D / 8;  // 16-byte pieces
  for (int i = threadIdx.x; i < kChunks; i += kThreads) {
    const int r = i / (D / 8), c = i % (D / 8);
    const bool in = r0 + r < n_valid;
    const __half* src = in ? cache + (r0 + r) * row_elems + first + 8 * c : cache;
    __pipeline_memcpy_async(dst + r * row_halfs<D>() + 8 * c, src, 16, in ? 0 : 16);
  }
  __pipeline_commit();
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// One online-softmax step for the thread's two rows (g: e = 0, 1; g + 8: e = 2, 3) over a key
// tile's scores s (already in log2 units, masked keys -inf): p = 2^(s - m) in place, the running
// max m, the thread's share of the row sums l, and the output rows rescaled.
template <int D>
__device__ __forceinline__ void softmax_step(float (&s)[kTileK / 8][4], float (&m)[2],
                                             float (&l)[2], float (&o)[D / 8][4]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < kTileK / 8; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
    const float m_new = fmaxf(m[r], quad_max(mx));
    // A row that has seen no key yet keeps m = -inf: subtract 0 instead, so that every p is 0.
    const float base = m_new == -INFINITY ? 0.0f : m_new;
    const float alpha = exp2f(m[r] - base);  // 0 while m was -inf
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < kTileK / 8; ++j) {
      s[j][2 * r] = exp2f(s[j][2 * r] - base);
      s[j][2 * r + 1] = exp2f(s[j][2 * r + 1] - base);
      sum += s[j][2 * r] + s[j][2 * r + 1];
    }
    l[r] = l[r] * alpha + sum;
    m[r] = m_new;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o[n][2 * r] *= alpha;
      o[n][2 * r + 1] *= alpha;
    }
  }
}

// Queries [64 * qt, +64) of head h (blockIdx.x; the tiles with the most keys first), causal over
// positions: query t sees cache rows 0 .. pos[t].
template <int D>
__global__ void __launch_bounds__(kThreads)
    attention_mma_kernel(const float* q, int n_tokens, const int32_t* pos, const __half* kc,
                         const __half* vc, int64_t kv_dim, int n_head, int group, float scale,
                         float* out) {
  constexpr int kS = row_halfs<D>();
  extern __shared__ float4 smem4[];
  __half* qs = reinterpret_cast<__half*>(smem4);  // [64][kS]
  __half* ks = qs + kTileQ * kS;                  // [64][kS]
  __half* vs = ks + kTileK * kS;                  // [64][kS]
  __shared__ int block_last;
  const int n_qtiles = (n_tokens + kTileQ - 1) / kTileQ;
  const int h = blockIdx.x % n_head, qt = n_qtiles - 1 - blockIdx.x / n_head;
  const int q0 = qt * kTileQ;
  const int64_t q_dim = int64_t{n_head} * D;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;

  // The thread's rows g and g + 8 of the warp's 16, their last visible key (-1: no query), the
  // warp's and the block's.
  const int row[2] = {q0 + 16 * warp + g, q0 + 16 * warp + g + 8};
  const int last[2] = {row[0] < n_tokens ? pos[row[0]] : -1, row[1] < n_tokens ? pos[row[1]] : -1};
  int warp_last = max(last[0], last[1]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    warp_last = max(warp_last, __shfl_xor_sync(0xffffffffu, warp_last, o));
  if (threadIdx.x == 0) block_last = -1;
  __syncthreads();
  if (lane == 0) atomicMax(&block_last, warp_last);

  // The Q tile in f16 (rows past the chunk are zeros), then the warp's A fragments.
  for (int i = threadIdx.x; i < kTileQ * D / 4; i += kThreads) {
    const int r = i / (D / 4), c4 = i % (D / 4);
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (q0 + r < n_tokens) v = reinterpret_cast<const float4*>(q + (q0 + r) * q_dim + h * D)[c4];
    *reinterpret_cast<uint2*>(qs + r * kS + 4 * c4) =
        make_uint2(pack_half2(v.x, v.y), pack_half2(v.z, v.w));
  }
  __syncthreads();
  const int64_t n_kv = block_last + 1;
  uint32_t qf[D / 16][4];
  const __half* qw = qs + 16 * warp * kS;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    qf[kk][0] = shared_word(qw + g * kS + 16 * kk + 2 * c);
    qf[kk][1] = shared_word(qw + (g + 8) * kS + 16 * kk + 2 * c);
    qf[kk][2] = shared_word(qw + g * kS + 16 * kk + 8 + 2 * c);
    qf[kk][3] = shared_word(qw + (g + 8) * kS + 16 * kk + 8 + 2 * c);
  }

  float o[D / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  const float scale_log2 = scale * 1.44269504088896341f;  // exp(x) = 2^(x log2 e)
  const int64_t first = int64_t{h / group} * D;
  for (int64_t k0 = 0; k0 < n_kv; k0 += kTileK) {
    load_tile<D>(kc, kv_dim, first, k0, n_kv, ks);
    load_tile<D>(vc, kv_dim, first, k0, n_kv, vs);
    __pipeline_wait_prior(1);  // K has landed; V may still be in flight
    __syncthreads();
    const bool sees = k0 <= warp_last;  // the warp has a visible key in this tile (warp-uniform)
    float s[kTileK / 8][4] = {};
    if (sees) {
      // S = Q K^T: B fragment (k = dims 16kk + 2c.., n = key 8j + g) from K's row-major tile.
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
        for (int j = 0; j < kTileK / 8; ++j) {
          const __half* kr = ks + (8 * j + g) * kS + 16 * kk + 2 * c;
          mma_16816(s[j], qf[kk], shared_word(kr), shared_word(kr + 8));
        }
        // C fragment: s[j][0..1] row g, keys 8j + 2c, +1; s[j][2..3] row g + 8.
#pragma unroll
      for (int j = 0; j < kTileK / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t key = k0 + 8 * j + 2 * c + e % 2;
          s[j][e] = key <= last[e / 2] ? s[j][e] * scale_log2 : -INFINITY;
        }
      softmax_step<D>(s, m, l, o);
    }
    __pipeline_wait_prior(0);  // V has landed
    __syncthreads();
    if (sees) {
      // O += P V over the tile's keys in steps of 16: P's A fragment is the S accumulators of
      // key tiles 2kk and 2kk + 1; V's B fragments come transposed by ldmatrix.
#pragma unroll
      for (int kk = 0; kk < kTileK / 16; ++kk) {
        const uint32_t pf[4] = {pack_half2(s[2 * kk][0], s[2 * kk][1]),
                                pack_half2(s[2 * kk][2], s[2 * kk][3]),
                                pack_half2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                pack_half2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
          uint32_t b0, b1;
          ldmatrix_x2_trans(b0, b1, vs + (16 * kk + lane % 16) * kS + 8 * n);
          mma_16816(o[n], pf, b0, b1);
        }
      }
    }
    __syncthreads();  // the next tile overwrites ks and vs
  }

  // out = O / l for the thread's rows: o[n][0..1] row g, dims 8n + 2c, +1; [2..3] row g + 8.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row[r] >= n_tokens) continue;
    const float sum = quad_sum(l[r]);
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    float* dst = out + row[r] * q_dim + h * D + 2 * c;
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<float2*>(dst + 8 * n) =
          make_float2(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
  }
}

template <int D>
Status launch_mma(const float* q, int n_tokens, const int32_t* pos, const Tensor& kc,
                  const Tensor& vc, const AttentionParams& p, float* out, cudaStream_t s) {
  constexpr size_t smem = mma_smem_bytes<D>();
  CUDA_TRY(
      cudaFuncSetAttribute(attention_mma_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(smem)),
      "attention (tensor cores): shared memory size");
  const int blocks = ceil_div(n_tokens, kTileQ) * p.n_head;
  attention_mma_kernel<D><<<blocks, kThreads, smem, s>>>(
      q, n_tokens, pos, static_cast<const __half*>(kc.data), static_cast<const __half*>(vc.data),
      kc.cols, p.n_head, p.n_head / p.n_head_kv, p.scale, out);
  LAUNCH_CHECK("attention (tensor cores)");
  return Status::ok();
}

}  // namespace

bool mma_attention_fits(const AttentionParams& p, const Tensor& kc, const Tensor& vc) {
  return (p.head_dim == 64 || p.head_dim == 128) && kc.type == quant::DType::F16 &&
         vc.type == quant::DType::F16 && kc.cols == vc.cols && kc.cols % 8 == 0;
}

Status launch_attention_mma(const float* q, int n_tokens, const int32_t* pos, const Tensor& kc,
                            const Tensor& vc, const AttentionParams& p, float* out,
                            cudaStream_t s) {
  if (!mma_attention_fits(p, kc, vc))
    return error(
        "attention (tensor cores): needs f16 caches of one width and head size 64 or "
        "128 (got %s / %s, head size %d)",
        quant::type_name(kc.type), quant::type_name(vc.type), p.head_dim);
  if (p.head_dim == 64) return launch_mma<64>(q, n_tokens, pos, kc, vc, p, out, s);
  return launch_mma<128>(q, n_tokens, pos, kc, vc, p, out, s);
}

}  // namespace kestrel::backend::cuda
