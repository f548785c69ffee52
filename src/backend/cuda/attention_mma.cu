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
// Precision: with an f16 cache Q and P are rounded to f16 once, as in the cuBLAS path (its single
// GEMM term); K and V are f16 already; scores, the softmax and the sums are f32. A quantized
// cache is expanded to f16 hi + lo parts first (attention.cu) and every product is taken as
// hi.hi + lo.hi + hi.lo, as exact as f32 arithmetic: there a single f16 rounding of Q or P
// flips q4_0 steps of the next layer's K/V (attention.cu says why).
#include <cuda_pipeline_primitives.h>

#include "backend/cuda/attention_frag.cuh"
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

// Shared memory: the Q tile, then K and V tiles (hi parts, and lo parts with kLo).
template <int D, bool kLo>
constexpr size_t mma_smem_bytes() {
  return sizeof(__half) * (kTileQ + (kLo ? 4 : 2) * kTileK) * row_halfs<D>();
}

// Rows r0 .. r0 + 63 of one KV head (elements first .. first + D - 1 of each row of a
// [rows][row_elems] f16 matrix) into dst[64][D + 8] with cp.async; rows at or past n_valid are
// zeros (never NaN garbage times a masked zero). The caller commits.
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
}

// The kernel's inputs: K and V as f16 [rows][kv_dim] matrices (an f16 cache itself, or a
// quantized cache expanded to hi + lo parts).
struct MmaAttentionArgs {
  const float* q;
  int n_tokens;
  const int32_t* pos;
  const __half *k_hi, *k_lo, *v_hi, *v_lo;
  int64_t kv_dim;
  int n_head, group;
  float scale;
  float* out;
};

// The warp's Q rows as A fragments (hi parts, or with lo the rounding errors), through qs.
template <int D, bool kLoPart>
__device__ __forceinline__ void q_fragments(const MmaAttentionArgs& a, int q0, int h, __half* qs,
                                            uint32_t (&qf)[D / 16][4]) {
  constexpr int kS = row_halfs<D>();
  const int64_t q_dim = int64_t{a.n_head} * D;
  const int warp = threadIdx.x / 32, g = threadIdx.x % 32 / 4, c = threadIdx.x % 4;
  __syncthreads();  // qs is free
  for (int i = threadIdx.x; i < kTileQ * D / 4; i += kThreads) {
    const int r = i / (D / 4), c4 = i % (D / 4);
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (q0 + r < a.n_tokens)
      v = reinterpret_cast<const float4*>(a.q + (q0 + r) * q_dim + h * D)[c4];
    *reinterpret_cast<uint2*>(qs + r * kS + 4 * c4) =
        kLoPart ? make_uint2(pack_half2_lo(v.x, v.y), pack_half2_lo(v.z, v.w))
                : make_uint2(pack_half2(v.x, v.y), pack_half2(v.z, v.w));
  }
  __syncthreads();
  const __half* qw = qs + 16 * warp * kS;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    qf[kk][0] = shared_word(qw + g * kS + 16 * kk + 2 * c);
    qf[kk][1] = shared_word(qw + (g + 8) * kS + 16 * kk + 2 * c);
    qf[kk][2] = shared_word(qw + g * kS + 16 * kk + 8 + 2 * c);
    qf[kk][3] = shared_word(qw + (g + 8) * kS + 16 * kk + 8 + 2 * c);
  }
}

// Queries [64 * qt, +64) of head h (blockIdx.x; the tiles with the most keys first), causal over
// positions: query t sees cache rows 0 .. pos[t]. With kLo every f32 operand is f16 hi + lo and
// the products hi.hi + lo.hi + hi.lo are summed in f32 (as exact as f32 arithmetic, ~2^-22).
template <int D, bool kLo>
__global__ void __launch_bounds__(kThreads, kLo ? 2 : 3)
    attention_mma_kernel(const MmaAttentionArgs a) {
  constexpr int kS = row_halfs<D>();
  extern __shared__ float4 smem4[];
  __half* qs = reinterpret_cast<__half*>(smem4);  // [64][kS]
  __half* ks = qs + kTileQ * kS;                  // [64][kS] each: K hi, V hi, K lo, V lo
  __half* vs = ks + kTileK * kS;
  __half* ks_lo = vs + kTileK * kS;
  __half* vs_lo = ks_lo + kTileK * kS;
  __shared__ int block_last;
  const int n_tokens = a.n_tokens;
  const int n_qtiles = (n_tokens + kTileQ - 1) / kTileQ;
  const int h = blockIdx.x % a.n_head, qt = n_qtiles - 1 - blockIdx.x / a.n_head;
  const int q0 = qt * kTileQ;
  const int64_t q_dim = int64_t{a.n_head} * D;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;

  // The thread's rows g and g + 8 of the warp's 16, their last visible key (-1: no query), the
  // warp's and the block's.
  const int row[2] = {q0 + 16 * warp + g, q0 + 16 * warp + g + 8};
  const int last[2] = {row[0] < n_tokens ? a.pos[row[0]] : -1,
                       row[1] < n_tokens ? a.pos[row[1]] : -1};
  int warp_last = max(last[0], last[1]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    warp_last = max(warp_last, __shfl_xor_sync(0xffffffffu, warp_last, o));
  if (threadIdx.x == 0) block_last = -1;
  __syncthreads();
  if (lane == 0) atomicMax(&block_last, warp_last);
  uint32_t qf[D / 16][4], qf_lo[kLo ? D / 16 : 1][4];
  q_fragments<D, false>(a, q0, h, qs, qf);
  if constexpr (kLo) q_fragments<D, true>(a, q0, h, qs, qf_lo);
  const int64_t n_kv = block_last + 1;  // read after q_fragments' barriers

  float o[D / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  const float scale_log2 = a.scale * 1.44269504088896341f;  // exp(x) = 2^(x log2 e)
  const int64_t first = int64_t{h / a.group} * D;
  auto load_k = [&](int64_t k0) {
    load_tile<D>(a.k_hi, a.kv_dim, first, k0, n_kv, ks);
    if constexpr (kLo) load_tile<D>(a.k_lo, a.kv_dim, first, k0, n_kv, ks_lo);
    __pipeline_commit();
  };
  auto load_v = [&](int64_t k0) {
    load_tile<D>(a.v_hi, a.kv_dim, first, k0, n_kv, vs);
    if constexpr (kLo) load_tile<D>(a.v_lo, a.kv_dim, first, k0, n_kv, vs_lo);
    __pipeline_commit();
  };
  // Two copy groups in flight at a time: the next tile's K loads while this tile's P.V runs, its
  // V while the next S = Q K^T runs (a tile past n_kv loads zeros only: no reads).
  load_k(0);
  load_v(0);
  for (int64_t k0 = 0; k0 < n_kv; k0 += kTileK) {
    __pipeline_wait_prior(1);  // this tile's K has landed; its V may still be in flight
    __syncthreads();
    const bool sees = k0 <= warp_last;  // the warp has a visible key in this tile (warp-uniform)
    float s[kTileK / 8][4] = {};
    if (sees) {
      // S = Q K^T: B fragment (k = dims 16kk + 2c.., n = key 8j + g) from K's row-major tile.
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
        for (int j = 0; j < kTileK / 8; ++j) {
          const int at = (8 * j + g) * kS + 16 * kk + 2 * c;
          const uint32_t b0 = shared_word(ks + at), b1 = shared_word(ks + at + 8);
          mma_16816(s[j], qf[kk], b0, b1);
          if constexpr (kLo) {
            mma_16816(s[j], qf_lo[kk], b0, b1);
            mma_16816(s[j], qf[kk], shared_word(ks_lo + at), shared_word(ks_lo + at + 8));
          }
        }
        // C fragment: s[j][0..1] row g, keys 8j + 2c, +1; s[j][2..3] row g + 8.
#pragma unroll
      for (int j = 0; j < kTileK / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t key = k0 + 8 * j + 2 * c + e % 2;
          s[j][e] = key <= last[e / 2] ? s[j][e] * scale_log2 : -INFINITY;
        }
      softmax_step(s, m, l, o);
    }
    __syncthreads();  // every warp is done with the K tiles
    load_k(k0 + kTileK);
    __pipeline_wait_prior(1);  // this tile's V has landed
    __syncthreads();
    if (sees) {
      // O += P V over the tile's keys in steps of 16: P's A fragment is the S accumulators of
      // key tiles 2kk and 2kk + 1; V's B fragments come transposed by ldmatrix.
#pragma unroll
      for (int kk = 0; kk < kTileK / 16; ++kk) {
        const float* s0 = s[2 * kk];
        const float* s1 = s[2 * kk + 1];
        const uint32_t pf[4] = {pack_half2(s0[0], s0[1]), pack_half2(s0[2], s0[3]),
                                pack_half2(s1[0], s1[1]), pack_half2(s1[2], s1[3])};
        uint32_t pf_lo[4] = {};
        if constexpr (kLo) {
          pf_lo[0] = pack_half2_lo(s0[0], s0[1]);
          pf_lo[1] = pack_half2_lo(s0[2], s0[3]);
          pf_lo[2] = pack_half2_lo(s1[0], s1[1]);
          pf_lo[3] = pack_half2_lo(s1[2], s1[3]);
        }
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
          const int at = (16 * kk + lane % 16) * kS + 8 * n;
          uint32_t b0, b1;
          ldmatrix_x2_trans(b0, b1, vs + at);
          mma_16816(o[n], pf, b0, b1);
          if constexpr (kLo) {
            mma_16816(o[n], pf_lo, b0, b1);
            ldmatrix_x2_trans(b0, b1, vs_lo + at);
            mma_16816(o[n], pf, b0, b1);
          }
        }
      }
    }
    __syncthreads();  // every warp is done with the V tiles
    load_v(k0 + kTileK);
  }
  __pipeline_wait_prior(0);  // the last (empty) tiles' copies, before the block exits

  // out = O / l for the thread's rows: o[n][0..1] row g, dims 8n + 2c, +1; [2..3] row g + 8.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row[r] >= n_tokens) continue;
    const float sum = quad_sum(l[r]);
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    float* dst = a.out + row[r] * q_dim + h * D + 2 * c;
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<float2*>(dst + 8 * n) =
          make_float2(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
  }
}

template <int D, bool kLo>
Status launch_mma(const MmaAttentionArgs& a, cudaStream_t s) {
  constexpr size_t smem = mma_smem_bytes<D, kLo>();
  CUDA_TRY(
      cudaFuncSetAttribute(attention_mma_kernel<D, kLo>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
      "attention (tensor cores): shared memory size");
  const int blocks = ceil_div(a.n_tokens, kTileQ) * a.n_head;
  attention_mma_kernel<D, kLo><<<blocks, kThreads, smem, s>>>(a);
  LAUNCH_CHECK("attention (tensor cores)");
  return Status::ok();
}

}  // namespace

bool mma_attention_fits(const AttentionParams& p, int64_t kv_dim) {
  return (p.head_dim == 64 || p.head_dim == 128) && kv_dim % 8 == 0;
}

Status launch_attention_mma(const float* q, int n_tokens, const int32_t* pos, const __half* k_hi,
                            const __half* k_lo, const __half* v_hi, const __half* v_lo,
                            int64_t kv_dim, const AttentionParams& p, float* out, cudaStream_t s) {
  if (!mma_attention_fits(p, kv_dim) || (k_lo == nullptr) != (v_lo == nullptr))
    return error(
        "attention (tensor cores): head size %d and width %lld (64 or 128, and a "
        "multiple of 8), lo parts for both or neither",
        p.head_dim, static_cast<long long>(kv_dim));
  const MmaAttentionArgs a{q,       n_tokens, pos,    k_hi,     k_lo,
                           v_hi,    v_lo,     kv_dim, p.n_head, p.n_head / p.n_head_kv,
                           p.scale, out};
  const bool lo = k_lo != nullptr;
  if (p.head_dim == 64) return lo ? launch_mma<64, true>(a, s) : launch_mma<64, false>(a, s);
  return lo ? launch_mma<128, true>(a, s) : launch_mma<128, false>(a, s);
}

}  // namespace kestrel::backend::cuda
