// Fused causal attention for prompt chunks, in f32 on the CUDA cores: scores, softmax and P.V
// stay on the SM (online softmax over 64-key tiles), and the KV cache is decoded tile by tile as
// it is read, so a quantized cache needs neither the f16 hi + lo expansion nor the three
// tensor-core products per GEMM of the cuBLAS path (attention.cu), whose many small launches
// cost 0.25 ms per layer at the seed's 327 tokens over a q4_0 cache.
//
// Floor (llama2-7b, 327 tokens, 32 layers): causal Q.K and P.V over 64 x 64 tiles are 21 tiles
// per head, 2.1 MFLOP each: 45 GFLOP, 0.7 ms at the H100/H200 FP32 rate (~67 TFLOP/s).
//
// Block: 256 threads on a tile of 64 queries of one head, as a 16 x 16 grid (ty, tx). Scores:
// thread (ty, tx) holds queries 4ty..4ty+3 x keys 4tx..4tx+3 of the tile. P.V: thread (ty, tx)
// holds the same queries x head dims 4tx + 64c + (0..3). The 16 threads of one ty (a half warp)
// hold the same four query rows in both, so the running max, the sum and the rescale factor of a
// row stay in their registers (reduced over the half warp with shuffles).
//
// Each thread decodes a 32-element slice of one key row, so a warp's loads touch 32 rows at
// once. A version reading K and V rows coalesced (a thread per element, one buffer for K then V,
// keys tx + 16j over padded rows) measured slower on the H200: the seed's defaults 16,528 t/s
// against 19,013 (bench/NOTES.md, 2026-12-03 fourth session), and was removed.
#include <algorithm>

#include "backend/cuda/cuda_backend_impl.cuh"
#include "backend/cuda/quant_device.cuh"

namespace kestrel::backend::cuda {

namespace {

constexpr int kFlashQ = 64, kFlashK = 64, kFlashThreads = 256;

__device__ __forceinline__ float half_warp_max(float v) {
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float half_warp_sum(float v) {
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// This thread's query rows (4ty + i of the tile at q0): their last visible key in last[] (-1 for
// rows past the chunk). Returns the keys any query of the tile sees.
__device__ __forceinline__ int64_t tile_keys(const int32_t* pos, int n_tokens, int q0, int ty,
                                             int (&last)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int t = q0 + 4 * ty + i;
    last[i] = t < n_tokens ? pos[t] : -1;
  }
  int64_t n_kv = 0;
  for (int t = q0; t < min(q0 + kFlashQ, n_tokens); ++t)
    n_kv = max(n_kv, static_cast<int64_t>(pos[t]) + 1);
  return n_kv;
}

// One tile's step of the online softmax over scores s[i][j] of keys key0 + step * j: masked
// scores are -inf (p exactly 0); rows that see no key (past the chunk) keep a max of 0 so that no
// inf - inf appears. s becomes p; the running max m, sum l and the outputs o are rescaled.
template <int kDH>
__device__ __forceinline__ void online_softmax(float (&s)[4][4], int64_t key0, int step,
                                               const int (&last)[4], float scale, float (&m)[4],
                                               float (&l)[4], float (&o)[4][4 * kDH]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t key = key0 + step * j;
      s[i][j] = key <= last[i] ? s[i][j] * scale : -INFINITY;
      mx = fmaxf(mx, s[i][j]);
    }
    const float m_new = fmaxf(m[i], half_warp_max(mx));
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;
    const float alpha = expf(m[i] - m_use);  // 0 on the first tile (m = -inf)
    m[i] = m_new;
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      s[i][j] = expf(s[i][j] - m_use);
      sum += s[i][j];
    }
    l[i] = l[i] * alpha + sum;  // this thread's keys only: reduced at the end
#pragma unroll
    for (int j = 0; j < 4 * kDH; ++j) o[i][j] *= alpha;
  }
}

// The thread's rows of the output, o / l (l summed over the half warp), into out (the head's
// first column) with rows q_dim apart.
template <int D>
__device__ __forceinline__ void write_rows(const float (&o)[4][4 * (D / 64)], const float (&l)[4],
                                           int q0, int ty, int tx, int n_tokens, float* out,
                                           int64_t q_dim) {
  constexpr int kDH = D / 64;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float total = half_warp_sum(l[i]);
    const int t = q0 + 4 * ty + i;
    if (t >= n_tokens) continue;
    const float inv = 1.0f / total;
    float* dst = out + t * q_dim;
#pragma unroll
    for (int c = 0; c < kDH; ++c)
      reinterpret_cast<float4*>(dst + 64 * c)[tx] = make_float4(
          o[i][4 * c] * inv, o[i][4 * c + 1] * inv, o[i][4 * c + 2] * inv, o[i][4 * c + 3] * inv);
  }
}

// v1 (the default): K transposed in shared memory, a thread per (key row, 32-element slice).
// Shared memory: qT[D][64], kT[D][64] (transposed: float4 reads along queries / keys),
// v[64][D + 4] (padded: the (key, slice) writes of one warp spread over the banks),
// pT[64 keys][64 queries].
template <int D>
constexpr size_t flash_v1_smem_bytes() {
  return sizeof(float) * (2 * D * kFlashQ + kFlashK * (D + 4) + kFlashK * kFlashQ);
}

// One (row, 32-element slice) per thread: rows at or past n_valid (beyond the keys any query of
// the tile may see, possibly past the cache's end) are zeros, so that masked P entries (exact
// zeros) never meet a NaN.
template <DType T, int D, bool kTransposed>
__device__ __forceinline__ void load_tile(const uint8_t* base, int64_t row_bytes, int64_t slice0,
                                          int64_t r0, int64_t n_valid, float* dst) {
  constexpr int kSlices = D / 32;
  for (int job = threadIdx.x; job < 64 * kSlices; job += kFlashThreads) {
    const int r = job % 64, s = job / 64;
    float w[32];
    if (r0 + r < n_valid) {
      decode_slice<T>(base + (r0 + r) * row_bytes, slice0 + s, w);
    } else {
#pragma unroll
      for (int i = 0; i < 32; ++i) w[i] = 0.0f;
    }
    if constexpr (kTransposed) {
#pragma unroll
      for (int i = 0; i < 32; ++i) dst[(32 * s + i) * 64 + r] = w[i];  // [D][64]
    } else {
      float4* row = reinterpret_cast<float4*>(dst + r * (D + 4) + 32 * s);  // [64][D + 4]
#pragma unroll
      for (int i = 0; i < 8; ++i)
        row[i] = make_float4(w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]);
    }
  }
}

template <DType KT, DType VT, int D>
__global__ void __launch_bounds__(kFlashThreads, 2)
    attention_flash_kernel(const float* q, int n_tokens, const int32_t* pos, const uint8_t* kc,
                           int64_t k_row_bytes, const uint8_t* vc, int64_t v_row_bytes, int n_head,
                           int group, float scale, float* out) {
  constexpr int kDH = D / 64;  // float4 column groups per thread in P.V (1 or 2)
  extern __shared__ float4 smem4[];
  float* qT = reinterpret_cast<float*>(smem4);  // [D][64]
  float* kT = qT + D * kFlashQ;                 // [D][64]
  float* vs = kT + D * kFlashK;                 // [64][D + 4]
  float* pT = vs + kFlashK * (D + 4);           // [64 keys][64 queries]
  // Heaviest tiles (the last queries see the most keys) first, across all heads.
  const int n_qtiles = (n_tokens + kFlashQ - 1) / kFlashQ;
  const int h = blockIdx.x % n_head, qt = n_qtiles - 1 - blockIdx.x / n_head;
  const int q0 = qt * kFlashQ, g = h / group;
  const int64_t q_dim = int64_t{n_head} * D;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;

  int last[4];
  const int64_t n_kv = tile_keys(pos, n_tokens, q0, ty, last);

  // Q tile, transposed; rows past the chunk are zeros.
  for (int job = threadIdx.x; job < kFlashQ * (D / 4); job += kFlashThreads) {
    const int r = job % kFlashQ, c = job / kFlashQ;  // query, float4 column
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (q0 + r < n_tokens)
      v = reinterpret_cast<const float4*>(q + (q0 + r) * q_dim + int64_t{h} * D)[c];
    qT[(4 * c) * kFlashQ + r] = v.x;
    qT[(4 * c + 1) * kFlashQ + r] = v.y;
    qT[(4 * c + 2) * kFlashQ + r] = v.z;
    qT[(4 * c + 3) * kFlashQ + r] = v.w;
  }

  float o[4][4 * kDH], m[4], l[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
#pragma unroll
    for (int j = 0; j < 4 * kDH; ++j) o[i][j] = 0.0f;
  }
  const int64_t slice0 = int64_t{g} * D / 32;
  for (int64_t k0 = 0; k0 < n_kv; k0 += kFlashK) {
    load_tile<KT, D, true>(kc, k_row_bytes, slice0, k0, n_kv, kT);
    load_tile<VT, D, false>(vc, v_row_bytes, slice0, k0, n_kv, vs);
    __syncthreads();

    // s = scale * Q K^T over the 4 x 4 sub-tile.
    float s[4][4] = {};
#pragma unroll 8
    for (int d = 0; d < D; ++d) {
      const float4 a = reinterpret_cast<const float4*>(qT + d * kFlashQ)[ty];
      const float4 b = reinterpret_cast<const float4*>(kT + d * kFlashK)[tx];
      const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) s[i][j] += av[i] * bv[j];
    }

    online_softmax<kDH>(s, k0 + 4 * tx, 1, last, scale, m, l, o);
#pragma unroll
    for (int j = 0; j < 4; ++j)
      reinterpret_cast<float4*>(pT + (4 * tx + j) * kFlashQ)[ty] =
          make_float4(s[0][j], s[1][j], s[2][j], s[3][j]);
    __syncthreads();

    // o += P V over the tile's keys (those past n_kv have p = 0 and v = 0).
#pragma unroll 4
    for (int k = 0; k < kFlashK; ++k) {
      const float4 p = reinterpret_cast<const float4*>(pT + k * kFlashQ)[ty];
      const float pv[4] = {p.x, p.y, p.z, p.w};
#pragma unroll
      for (int c = 0; c < kDH; ++c) {
        const float4 v = reinterpret_cast<const float4*>(vs + k * (D + 4) + 64 * c)[tx];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          o[i][4 * c] += pv[i] * v.x;
          o[i][4 * c + 1] += pv[i] * v.y;
          o[i][4 * c + 2] += pv[i] * v.z;
          o[i][4 * c + 3] += pv[i] * v.w;
        }
      }
    }
    __syncthreads();  // the next tile overwrites kT, vs and pT
  }

  write_rows<D>(o, l, q0, ty, tx, n_tokens, out + int64_t{h} * D, q_dim);
}

template <DType KT, DType VT, int D>
Status launch_flash(const float* q, int n_tokens, const int32_t* pos, const Tensor& kc,
                    const Tensor& vc, const AttentionParams& p, float* out, cudaStream_t s) {
  const size_t smem = flash_v1_smem_bytes<D>();
  auto kernel = attention_flash_kernel<KT, VT, D>;
  CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                static_cast<int>(smem)),
           "attention (flash): shared memory size");
  const int blocks = ceil_div(n_tokens, kFlashQ) * p.n_head;
  kernel<<<blocks, kFlashThreads, smem, s>>>(
      q, n_tokens, pos, static_cast<const uint8_t*>(kc.data), static_cast<int64_t>(kc.row_bytes()),
      static_cast<const uint8_t*>(vc.data), static_cast<int64_t>(vc.row_bytes()), p.n_head,
      p.n_head / p.n_head_kv, p.scale, out);
  LAUNCH_CHECK("attention (flash)");
  return Status::ok();
}

template <DType KT, DType VT>
Status launch_flash_d(const float* q, int n_tokens, const int32_t* pos, const Tensor& kc,
                      const Tensor& vc, const AttentionParams& p, float* out, cudaStream_t s) {
  if (p.head_dim == 64) return launch_flash<KT, VT, 64>(q, n_tokens, pos, kc, vc, p, out, s);
  return launch_flash<KT, VT, 128>(q, n_tokens, pos, kc, vc, p, out, s);
}

template <DType KT>
Status launch_flash_v(const float* q, int n_tokens, const int32_t* pos, const Tensor& kc,
                      const Tensor& vc, const AttentionParams& p, float* out, cudaStream_t s) {
  switch (vc.type) {
    case DType::F16:
      return launch_flash_d<KT, DType::F16>(q, n_tokens, pos, kc, vc, p, out, s);
    case DType::Q8_0:
      return launch_flash_d<KT, DType::Q8_0>(q, n_tokens, pos, kc, vc, p, out, s);
    case DType::Q4_0:
      return launch_flash_d<KT, DType::Q4_0>(q, n_tokens, pos, kc, vc, p, out, s);
    default:
      return error("attention: V cache type %s is not supported", quant::type_name(vc.type));
  }
}

}  // namespace

bool flash_attention_fits(const AttentionParams& p) {
  return p.head_dim == 64 || p.head_dim == 128;
}

Status launch_attention_flash(const float* q, int n_tokens, const int32_t* pos, const Tensor& kc,
                              const Tensor& vc, const AttentionParams& p, float* out,
                              cudaStream_t s) {
  if (!flash_attention_fits(p))
    return error("attention (flash): head size %d (64 or 128 only)", p.head_dim);
  switch (kc.type) {
    case DType::F16:
      return launch_flash_v<DType::F16>(q, n_tokens, pos, kc, vc, p, out, s);
    case DType::Q8_0:
      return launch_flash_v<DType::Q8_0>(q, n_tokens, pos, kc, vc, p, out, s);
    case DType::Q4_0:
      return launch_flash_v<DType::Q4_0>(q, n_tokens, pos, kc, vc, p, out, s);
    default:
      return error("attention: K cache type %s is not supported", quant::type_name(kc.type));
  }
}

}  // namespace kestrel::backend::cuda
