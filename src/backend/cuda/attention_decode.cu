// Attention of one query token (a decode step) over the cache (f16, q8_0 or q4_0) in f32,
// without the tensor cores: grid (KV head, split), 128 threads a block, every query head of the
// KV head's group in the same block (GQA: the cache is read once for all of them).
//
// Why: a decode step's attention cost 9.6 us a layer inside the tg128 graph (llama2-7b, <= 128
// keys; bench/NOTES.md, twenty-fourth session: tg128 469.7 t/s with it skipped against 410.5)
// for ~2 MB of f16 K/V, 0.6 us at 3.35 TB/s. attention_tc16.cu runs one token as the first row of
// a 16-row mma tile and walks a chain of round trips: Q's fragments, a barrier, the K/V copies,
// the mma, the block's combine, then with more than 64 keys a second block's partial written,
// counted and read back by the merge. Here a pass is one round trip: each thread loads its key's
// whole K slice into registers while the pass's V rows come into shared memory (cp.async), the
// scores meet in two block reductions (max, sum) and P V reads V from shared memory. A split
// takes at least min_keys keys (one to a few passes of 128), so the short caches of a decode
// step run as one split per KV head, and the merge (attention_merge.cuh) is left to long caches.
//
// Floor (llama2-7b, tg128: 32 KV heads, <= 128 keys, f16): 2 MB a layer, 0.6 us at full
// bandwidth; a block is ~3 dependent global round trips (positions, K + V + Q, the output).
// Precision: f32 products and sums (the softmax in log2 units with Q prescaled by scale log2 e).
#include <cuda_pipeline_primitives.h>

#include <algorithm>
#include <cstdlib>

#include "backend/cuda/acts_device.cuh"
#include "backend/cuda/attention_merge.cuh"
#include "backend/cuda/cuda_backend_impl.cuh"
#include "backend/cuda/kv_store_device.cuh"
#include "backend/cuda/rope_device.cuh"

namespace kestrel::backend::cuda {

using quant::DType;

namespace {

constexpr int kThreads = 128;        // a thread a key in the score pass
constexpr int kPassKeys = kThreads;  // keys a pass
constexpr int kMaxGroup = 8;         // query heads a KV head serves
constexpr int kMaxSplits = 16;
constexpr int kWarps = kThreads / 32;

template <DType T, int D>
constexpr int slice_bytes() {
  return cache_slice_bytes<T, D>();
}

// Shared memory: Q ([kMaxGroup][D] f32), P ([kMaxGroup][kPassKeys]), the key groups' outputs
// ([kThreads / (D / 2)][kMaxGroup][D]), then the pass's V rows.
template <DType VT, int D>
constexpr size_t decode_smem_bytes() {
  return sizeof(float) * (kMaxGroup * D + kMaxGroup * kPassKeys + 2 * kThreads * kMaxGroup) +
         size_t{kPassKeys} * slice_bytes<VT, D>();
}

struct DecodeAttnArgs {
  const float* q;
  const int32_t* pos;
  const uint8_t *kc, *vc;
  int64_t k_row_bytes, v_row_bytes;
  int n_head, group;
  float scale;
  int min_keys;  // keys a split takes at least (a multiple of kPassKeys)
  float* part;   // [n_head][splits][D]
  float2* ml;    // [n_head][splits]
  unsigned* arrivals;
  float* out;
  MatmulInputOut also;
  // With rope: q, k_new and v_new are unrotated; the kernel rotates Q and K and stores K and V
  // at the token's position (kc_w, vc_w: the caches) as rope_kv_store_kernel would.
  bool rope, neox;
  const float *k_new, *v_new;
  uint8_t *kc_w, *vc_w;
  RopeTable table;
};

// Element col of a cache row (quantized: the whole warp calls it, lane j holding element j of
// a 32-element block), as the KV store writes it.
template <DType T>
__device__ __forceinline__ void store_cache_element(uint8_t* row, int64_t col, float x) {
  if constexpr (T == DType::F16)
    reinterpret_cast<__half*>(row)[col] = __float2half_rn(x);
  else
    store_kv_block<T>(x, static_cast<int>(col % 32), row, col / 32);
}

// Byte i of a slice held as 32-bit words (i a compile-time constant after unrolling).
template <int N>
__device__ __forceinline__ uint32_t slice_byte(const uint32_t (&w)[N], int i) {
  return (w[i / 4] >> (8 * (i % 4))) & 0xffu;
}
__device__ __forceinline__ float slice_half(uint32_t lo, uint32_t hi) {
  return half_bits_to_float(static_cast<uint16_t>(lo | (hi << 8)));
}

// Elements 32 b .. 32 b + 31 of a K slice held in registers.
template <DType T, int N>
__device__ __forceinline__ void slice_block(const uint32_t (&w)[N], int b, float (&x)[32]) {
  if constexpr (T == DType::F16) {
#pragma unroll
    for (int e = 0; e < 32; e += 2) {
      const uint32_t pair = w[(64 * b + 2 * e) / 4];
      x[e] = half_bits_to_float(static_cast<uint16_t>(pair & 0xffffu));
      x[e + 1] = half_bits_to_float(static_cast<uint16_t>(pair >> 16));
    }
  } else if constexpr (T == DType::Q8_0) {
    const int o = 34 * b;
    const float d = slice_half(slice_byte(w, o), slice_byte(w, o + 1));
#pragma unroll
    for (int e = 0; e < 32; ++e)
      x[e] = d * static_cast<float>(static_cast<int8_t>(slice_byte(w, o + 2 + e)));
  } else {  // Q4_0: byte c holds element c (low nibble) and c + 16 (high)
    const int o = 18 * b;
    const float d = slice_half(slice_byte(w, o), slice_byte(w, o + 1));
#pragma unroll
    for (int c = 0; c < 16; ++c) {
      const uint32_t v = slice_byte(w, o + 2 + c);
      x[c] = d * static_cast<float>(static_cast<int>(v & 15u) - 8);
      x[c + 16] = d * static_cast<float>(static_cast<int>(v >> 4) - 8);
    }
  }
}

// Elements 2j and 2j + 1 of a V row in shared memory.
template <DType T, int D>
__device__ __forceinline__ float2 v_pair(const uint8_t* row, int j) {
  if constexpr (T == DType::F16) {
    return __half22float2(*reinterpret_cast<const __half2*>(row + 4 * j));
  } else {
    const int b = j / 16, e = 2 * j % 32;
    const uint8_t* blk = row + b * (T == DType::Q8_0 ? 34 : 18);
    const float d = __half2float(*reinterpret_cast<const __half*>(blk));
    const uint32_t pair =
        *reinterpret_cast<const uint16_t*>(blk + 2 + (T == DType::Q8_0 ? e : e % 16));
    if constexpr (T == DType::Q8_0)
      return make_float2(d * static_cast<float>(static_cast<int8_t>(pair & 0xffu)),
                         d * static_cast<float>(static_cast<int8_t>(pair >> 8)));
    const uint32_t n = e < 16 ? pair : pair >> 4;  // low nibbles, or the high ones from 16
    return make_float2(d * static_cast<float>(static_cast<int>(n & 15u) - 8),
                       d * static_cast<float>(static_cast<int>((n >> 8) & 15u) - 8));
  }
}

// V rows k0 .. k0 + nk - 1 of KV head kvh into dst (a row every slice_bytes) with cp.async, but
// for row `skip` (-1: none); the caller commits.
template <DType T, int D>
__device__ __forceinline__ void copy_v_rows(const uint8_t* cache, int64_t row_bytes, int kvh,
                                            int k0, int nk, uint8_t* dst, int skip = -1) {
  constexpr int kChunk = T == DType::F16 ? 16 : 4;  // quantized slices: 4-byte aligned only
  constexpr int kPer = slice_bytes<T, D>() / kChunk;
  for (int i = threadIdx.x; i < nk * kPer; i += kThreads) {
    const int r = i / kPer, ch = i % kPer;
    if (k0 + r == skip) continue;
    __pipeline_memcpy_async(
        dst + r * slice_bytes<T, D>() + ch * kChunk,
        cache + (k0 + r) * row_bytes + int64_t{kvh} * slice_bytes<T, D>() + ch * kChunk, kChunk);
  }
}

// The block's (max or sum) of v per query head: every thread gets the totals.
template <bool kMax>
__device__ __forceinline__ void block_reduce(float (&v)[kMaxGroup], int g, float (*red)[kMaxGroup],
                                             float (&total)[kMaxGroup]) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h) {
    if (h >= g) break;
    const float r = kMax ? warp_max(v[h]) : warp_sum(v[h]);
    if (lane == 0) red[warp][h] = r;
  }
  __syncthreads();
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h) {
    if (h >= g) break;
    float r = red[0][h];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) r = kMax ? fmaxf(r, red[w][h]) : r + red[w][h];
    total[h] = r;
  }
}

// The K slice of key k0 + t (t < nk, else key k0's: every thread loads) into registers, every load
// issued before any is used.
template <DType KT, int D>
__device__ __forceinline__ void load_k_slice(const DecodeAttnArgs& a, int kvh, int k0, int nk,
                                             uint32_t (&kw)[slice_bytes<KT, D>() / 4]) {
  constexpr int kSlice = slice_bytes<KT, D>(), kWords = kSlice / 4;
  const int t = threadIdx.x;
  const uint32_t* krow = reinterpret_cast<const uint32_t*>(
      a.kc + int64_t{t < nk ? k0 + t : k0} * a.k_row_bytes + int64_t{kvh} * kSlice);
  if constexpr (KT == DType::F16) {
#pragma unroll
    for (int i = 0; i < kWords / 4; ++i) {
      const uint4 v = reinterpret_cast<const uint4*>(krow)[i];
      kw[4 * i] = v.x, kw[4 * i + 1] = v.y, kw[4 * i + 2] = v.z, kw[4 * i + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kWords; ++i) kw[i] = krow[i];
  }
}

// kEarly (KESTREL_CUDA_ATT_DECODE_EARLY=1, with RoPE only; written, not yet run on a GPU): the
// block's first pass of K and V is asked for before grid_dependency_wait, since every cache row
// it reads but the token's own was written by earlier passes (and the positions by a copy before
// the Q/K/V launch), and the token's own K and V rows, which this kernel stores, come to the
// block through shared memory instead of being fenced and read back. The default's chain after
// the wait is positions -> q, k, v -> store + fence -> K; this one's is q, k, v -> shared memory.
// The same bytes meet the same arithmetic: bit for bit the default's results.
template <DType KT, DType VT, int D, bool kEarly>
__global__ void __launch_bounds__(kThreads) attention_decode_kernel(const DecodeAttnArgs a) {
  grid_dependents_launch();  // the output projection may start streaming its weights
  if (!kEarly)
    grid_dependency_wait();  // (chained_launches: started before the kernel before ended)
  constexpr int kSlice = slice_bytes<KT, D>(), kWords = kSlice / 4;
  constexpr int kPairs = D / 2, kKeyGroups = kThreads / kPairs;  // P V: a thread a dim pair
  extern __shared__ float4 smem4[];
  float* qs = reinterpret_cast<float*>(smem4);  // [kMaxGroup][D], prescaled
  float* ps = qs + kMaxGroup * D;               // [kMaxGroup][kPassKeys]
  float* os = ps + kMaxGroup * kPassKeys;       // [kKeyGroups][kMaxGroup][D]
  uint8_t* own = reinterpret_cast<uint8_t*>(os + kKeyGroups * kMaxGroup * D);  // kEarly: the
  uint8_t* own_v = own + 2 * D;  // token's K and V slices (2 D bytes hold any cache type's)
  uint8_t* vs = kEarly ? own + 4 * D : own;
  __shared__ float red_max[kWarps][kMaxGroup], red_sum[kWarps][kMaxGroup];
  const int kvh = blockIdx.x, split = blockIdx.y, g = a.group;
  const int t = threadIdx.x, j = t % kPairs, kg = t / kPairs;
  int n_kv = 0;
  (void)warp_positions(a.pos, 1, n_kv);
  // Keys a split: min_keys or an even share, whole passes; splits past the keys have none (the
  // grid is sized for the longest cache; a replayed graph meets shorter).
  const int share = (n_kv + gridDim.y - 1) / gridDim.y;
  const int per = max(a.min_keys, (share + kPassKeys - 1) / kPassKeys * kPassKeys);
  const int splits = (n_kv + per - 1) / per;
  if (split >= splits) return;
  const int k_begin = split * per, k_end = min(n_kv, k_begin + per);
  const int64_t q_dim = int64_t{a.n_head} * D;
  const float* q = a.q + int64_t{kvh} * g * D;              // the group's heads are adjacent
  const float scale_log2 = a.scale * 1.44269504088896341f;  // exp(x) = 2^(x log2 e)
  // kEarly: the token's key (the last, n_kv - 1) where this block holds it, else -1.
  const int own_key = kEarly && split == splits - 1 ? n_kv - 1 : -1;
  uint32_t kw[kWords];
  if constexpr (kEarly) {
    const int nk = min(kPassKeys, k_end - k_begin);
    copy_v_rows<VT, D>(a.vc, a.v_row_bytes, kvh, k_begin, nk, vs, own_key);
    __pipeline_commit();
    load_k_slice<KT, D>(a, kvh, k_begin, nk, kw);
    grid_dependency_wait();  // q, k and v of the token: the Q/K/V launch's
  }
  if (a.rope) {
    const int p = n_kv - 1;  // the token's position: its key is the last
    if (t < D) {             // element t of each head, rotated as rope_kv_store_kernel does
      const int half = D / 2, i = a.neox ? t % half : t / 2;
      const int i0 = a.neox ? i : 2 * i, i1 = a.neox ? i + half : 2 * i + 1;
      float sn, cn;
      rope_sincos(p, a.table.inv_freq[i], sn, cn);
      for (int h = 0; h < g; ++h)
        qs[h * D + t] = rope_rotate(q[h * D + i0], q[h * D + i1], sn, cn, t == i0) * scale_log2;
      if (split == splits - 1) {  // the split holding the token's key stores its K and V rows
        const float* kh = a.k_new + int64_t{kvh} * D;
        const int64_t col = int64_t{kvh} * D + t;
        const float k_rot = rope_rotate(kh[i0], kh[i1], sn, cn, t == i0), v_new = a.v_new[col];
        store_cache_element<KT>(a.kc_w + p * a.k_row_bytes, col, k_rot);
        store_cache_element<VT>(a.vc_w + p * a.v_row_bytes, col, v_new);
        if constexpr (kEarly) {  // the same bytes, for this block (no other block reads them)
          store_cache_element<KT>(own, t, k_rot);
          store_cache_element<VT>(own_v, t, v_new);
        } else {
          __threadfence();
        }
      }
    }
    __syncthreads();  // the stored rows before any thread reads the cache
  } else {
    for (int i = t; i < g * D; i += kThreads) qs[i] = q[i] * scale_log2;
  }

  float m_run[kMaxGroup], l_run[kMaxGroup], o[kMaxGroup][2];
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h)
    m_run[h] = -INFINITY, l_run[h] = 0.0f, o[h][0] = o[h][1] = 0.0f;
  for (int k0 = k_begin; k0 < k_end; k0 += kPassKeys) {
    const int nk = min(kPassKeys, k_end - k0);
    if (!kEarly || k0 != k_begin) {  // (kEarly: the first pass was asked for before the wait)
      copy_v_rows<VT, D>(a.vc, a.v_row_bytes, kvh, k0, nk, vs, own_key);
      __pipeline_commit();
      // The thread's key: its whole K slice in registers, every load issued before any is used.
      load_k_slice<KT, D>(a, kvh, k0, nk, kw);
    }
    const bool live = t < nk;
    if (kEarly && k0 + t == own_key) {  // (published by the barrier after the RoPE above)
#pragma unroll
      for (int i = 0; i < kWords; ++i) kw[i] = reinterpret_cast<const uint32_t*>(own)[i];
    }
    __syncthreads();  // Q in shared memory (first pass); the last pass's P V reads are done
    float s[kMaxGroup];
#pragma unroll
    for (int h = 0; h < kMaxGroup; ++h) s[h] = 0.0f;
#pragma unroll
    for (int b = 0; b < D / 32; ++b) {
      float x[32];
      slice_block<KT>(kw, b, x);
#pragma unroll
      for (int h = 0; h < kMaxGroup; ++h) {
        if (h >= g) break;
        const float4* qh = reinterpret_cast<const float4*>(qs + h * D + 32 * b);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float4 qv = qh[e];
          s[h] += qv.x * x[4 * e] + qv.y * x[4 * e + 1] + qv.z * x[4 * e + 2] + qv.w * x[4 * e + 3];
        }
      }
    }
#pragma unroll
    for (int h = 0; h < kMaxGroup; ++h) s[h] = live ? s[h] : -INFINITY;
    float mx[kMaxGroup], sum[kMaxGroup], alpha[kMaxGroup];
    block_reduce<true>(s, g, red_max, mx);
#pragma unroll
    for (int h = 0; h < kMaxGroup; ++h) {
      if (h >= g) break;
      const float m_new = fmaxf(m_run[h], mx[h]);  // finite: every pass has a live key
      alpha[h] = exp2f(m_run[h] - m_new);          // 0 on the first pass
      m_run[h] = m_new;
      s[h] = exp2f(s[h] - m_new);  // 0 for the dead keys
      ps[h * kPassKeys + t] = s[h];
    }
    block_reduce<false>(s, g, red_sum, sum);  // (its barrier also publishes P)
    __pipeline_wait_prior(0);
    __syncthreads();  // every thread's V copies
#pragma unroll
    for (int h = 0; h < kMaxGroup; ++h) {
      if (h >= g) break;
      l_run[h] = l_run[h] * alpha[h] + sum[h];
      o[h][0] *= alpha[h];
      o[h][1] *= alpha[h];
    }
#pragma unroll 4
    for (int k = kg; k < nk; k += kKeyGroups) {
      const float2 v = v_pair<VT, D>(k0 + k == own_key ? own_v : vs + k * slice_bytes<VT, D>(), j);
#pragma unroll
      for (int h = 0; h < kMaxGroup; ++h) {
        if (h >= g) break;
        const float p = ps[h * kPassKeys + k];
        o[h][0] += p * v.x;
        o[h][1] += p * v.y;
      }
    }
    __syncthreads();  // the next pass's V copies overwrite these rows
  }
  // The key groups' outputs meet in shared memory.
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h) {
    if (h >= g) break;
    *reinterpret_cast<float2*>(os + (kg * kMaxGroup + h) * D + 2 * j) =
        make_float2(o[h][0], o[h][1]);
  }
  __syncthreads();
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h) {  // (h unrolled: m_run and l_run stay in registers)
    if (h >= g) break;
    const int head = kvh * g + h;
    if (t < D) {  // whole warps: D % 32 == 0
      float acc = 0.0f;
#pragma unroll
      for (int i = 0; i < kKeyGroups; ++i) acc += os[(i * kMaxGroup + h) * D + t];
      if (splits == 1) {
        const int64_t i = int64_t{head} * D + t;
        const float r = acc / l_run[h];  // every token sees key 0: l > 0
        a.out[i] = r;
        write_matmul_input1(a.also, i, r);  // a warp's 32 values: one block of the next matmul
      } else {
        const int64_t slot = int64_t{head} * gridDim.y + split;
        a.part[slot * D + t] = acc;
        // (max in natural-log units, as the merge takes it)
        if (t == 0) a.ml[slot] = make_float2(m_run[h] * 0.69314718055994531f, l_run[h]);
      }
    }
  }
  if (splits == 1) return;
  for (int h = 0; h < g; ++h) {  // block-uniform: every thread calls each merge
    const int head = kvh * g + h;
    const int64_t head0 = int64_t{head} * gridDim.y;  // the layout's split count
    merge_head_partials<kThreads, 1, kMaxSplits>(head, splits, 1, D, q_dim, a.part + head0 * D,
                                                 a.ml + head0, a.arrivals, a.out, a.also, qs, D);
  }
}

template <DType KT, DType VT, int D, bool kEarly>
Status launch_typed(const DecodeAttnArgs& a, int n_head_kv, int splits, cudaStream_t s) {
  constexpr size_t smem = decode_smem_bytes<VT, D>() + (kEarly ? 4 * D : 0);
  auto kernel = attention_decode_kernel<KT, VT, D, kEarly>;
  CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                static_cast<int>(smem)),
           "attention (decode): shared memory size");
  // (An error is left for LAUNCH_CHECK, as a <<<>>> launch leaves it.)
  (void)launch_dependent_smem(chained_launches(), kernel, dim3(n_head_kv, splits), dim3(kThreads),
                              smem, s, a);
  return Status::ok();
}

// Keys a split takes at least: KESTREL_CUDA_ATT_DECODE_KEYS=N (rounded up to whole passes).
int decode_min_keys() {
  static const int n = [] {
    const char* e = std::getenv("KESTREL_CUDA_ATT_DECODE_KEYS");
    const int v = e ? std::clamp(std::atoi(e), 1, 1 << 20) : 256;
    return (v + kPassKeys - 1) / kPassKeys * kPassKeys;
  }();
  return n;
}

// KESTREL_CUDA_ATT_DECODE_EARLY=1: attention_decode_kernel's kEarly form (with RoPE only).
bool decode_early() {
  static const bool on = [] {
    const char* e = std::getenv("KESTREL_CUDA_ATT_DECODE_EARLY");
    return e && e[0] == '1' && e[1] == '\0';
  }();
  return on;
}

}  // namespace

bool attention_decode_fits(const AttentionParams& p, int n_tokens, const Tensor& kc,
                           const Tensor& vc) {
  return cache_rows_copyable(kc, vc) && n_tokens == 1 && p.n_head_kv > 0 &&
         p.n_head % p.n_head_kv == 0 && p.n_head / p.n_head_kv <= kMaxGroup &&
         (p.head_dim == 64 || p.head_dim == 128);
}

int attention_decode_splits(int64_t cache_rows) {
  // Enough splits for the longest cache at min_keys a split.
  const int64_t by_keys = (cache_rows + decode_min_keys() - 1) / decode_min_keys();
  return static_cast<int>(std::clamp<int64_t>(by_keys, 1, kMaxSplits));
}

namespace {
// The (max, sum) pairs' bytes, rounded up to 16: the merge reads the partials after them as
// float4 (an odd n_head x splits, e.g. 9 heads x 3 splits, would leave them 8-byte aligned).
size_t decode_ml_bytes(const AttentionParams& p, int splits) {
  return (static_cast<size_t>(p.n_head) * splits * sizeof(float2) + 15) / 16 * 16;
}
}  // namespace

size_t attention_decode_scratch_bytes(const AttentionParams& p, int splits) {
  return decode_ml_bytes(p, splits) +
         static_cast<size_t>(p.n_head) * splits * sizeof(float) * p.head_dim;
}

Status launch_attention_decode(const float* q, const int32_t* pos, const Tensor& kc,
                               const Tensor& vc, const AttentionParams& p, const DecodeRope& rope,
                               int splits, unsigned* arrivals, void* scratch, float* out,
                               const MatmulInputOut& also, cudaStream_t s) {
  if (!attention_decode_fits(p, 1, kc, vc) || splits < 1 || splits > kMaxSplits)
    return error("attention (decode): %d / %d heads of %d, %d splits", p.n_head, p.n_head_kv,
                 p.head_dim, splits);
  // scratch: the (max, sum) pairs, then the partial outputs.
  float2* ml = static_cast<float2*>(scratch);
  float* part =
      reinterpret_cast<float*>(static_cast<uint8_t*>(scratch) + decode_ml_bytes(p, splits));
  DecodeAttnArgs a{};
  a.q = q;
  a.pos = pos;
  a.kc = static_cast<const uint8_t*>(kc.data);
  a.vc = static_cast<const uint8_t*>(vc.data);
  a.k_row_bytes = static_cast<int64_t>(kc.row_bytes());
  a.v_row_bytes = static_cast<int64_t>(vc.row_bytes());
  a.n_head = p.n_head;
  a.group = p.n_head / p.n_head_kv;
  a.scale = p.scale;
  a.min_keys = decode_min_keys();
  a.part = part;
  a.ml = ml;
  a.arrivals = arrivals;
  a.out = out;
  a.also = also;
  a.rope = rope.table != nullptr;
  if (a.rope) {
    if (p.head_dim > 2 * kRopeMaxPairs || !rope.k_new || !rope.v_new)
      return error("attention (decode): RoPE of head size %d without its K and V rows", p.head_dim);
    a.neox = rope.neox;
    a.k_new = rope.k_new;
    a.v_new = rope.v_new;
    a.kc_w = static_cast<uint8_t*>(kc.data);  // (the cache tensors' data: writable memory)
    a.vc_w = static_cast<uint8_t*>(vc.data);
    a.table = *rope.table;
  }
  Status st = Status::ok();
  with_cache_types(kc.type, vc.type, [&](auto types) {
    using T = decltype(types);
    if (a.rope && decode_early())
      st = p.head_dim == 64 ? launch_typed<T::kK, T::kV, 64, true>(a, p.n_head_kv, splits, s)
                            : launch_typed<T::kK, T::kV, 128, true>(a, p.n_head_kv, splits, s);
    else
      st = p.head_dim == 64 ? launch_typed<T::kK, T::kV, 64, false>(a, p.n_head_kv, splits, s)
                            : launch_typed<T::kK, T::kV, 128, false>(a, p.n_head_kv, splits, s);
  });
  KESTREL_TRY(st);
  LAUNCH_CHECK("attention (decode)");
  return Status::ok();
}

}  // namespace kestrel::backend::cuda
