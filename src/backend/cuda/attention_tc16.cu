// Attention of a micro-batch (1-16 query tokens) on the tensor cores, straight from the cache
// (f16, q8_0 or q4_0): grid (head, split), 4 warps a block; warp w of split s takes the 16-key
// sub-tiles w + 4 s, w + 4 s + 4 S, ... of its head's keys, and the 16 tokens are the 16 rows of
// mma.sync m16n8k16, so one sub-tile is S = Q K^T (two 8-key fragments), an online-softmax step
// in the registers that hold S, and O += P V (one k-step). The warps of a block meet once at the
// end (their partials combined in shared memory); with more than one split busy, the last block
// of a head merges the splits (attention_merge.cuh).
//
// Why: attention_rows_kernel (attention_rows.cuh) gives a block one head's whole cache for 4
// tokens and walks the keys in dependent rounds of f32 arithmetic: 20.6 us a layer for the seed's
// micro-batches (16 tokens, ~300 keys of a q4_0 cache; ncu, eighth session) where the K/V bytes
// (1.5 MB a layer) need ~0.5 us; attention_split.cu's f32 tiles were slower still. Here the
// arithmetic is ~64 mma.sync a warp a sub-tile, the cache bytes of a sub-tile come in one cp.async
// group (the next sub-tile's while this one computes), and no block barrier falls inside the loop.
// Floor (llama2-7b, 327 keys, 16 tokens): 1.5 MB of K/V at 3 TB/s, 0.5 us; 21 sub-tiles a head
// over 32 x 4 x 6 warps: one sub-tile a warp (~1 us of latency), the block combine and the merge.
// Measured (H100, eighteenth session, two calls): the seed's b128 ub16 4,377 / 4,389 t/s against
// 4,207 / 4,232 on the rows kernel (+4%, ~4 us a layer of the predicted ~17: the next ncu says
// where the rest goes), so the default from 3 tokens; decode steps (1 token) too since the
// nineteenth session: tg128 462 t/s against 427 on the rows kernel (H200, same call), whose one
// block a head leaves most SMs idle (KESTREL_CUDA_ATT_TC16_MIN=N: from N tokens; 17: never).
//
// Precision (as attention_mma.cu's quantized path, ~2^-22 relative): Q as f16 hi + lo parts; a
// quantized K enters as its exact integer codes (f16 holds -128..127) with the block scale applied
// to each 32-element block's f32 partial score; P is multiplied by V's block scale in f32 and
// enters as hi + lo parts against V's exact codes. An f16 cache enters as it is.
#include <cuda_pipeline_primitives.h>

#include <algorithm>
#include <cstdlib>

#include "backend/cuda/acts_device.cuh"
#include "backend/cuda/attention_frag.cuh"
#include "backend/cuda/attention_merge.cuh"
#include "backend/cuda/cuda_backend_impl.cuh"
#include "backend/cuda/frag_common.cuh"
#include "backend/cuda/quant_device.cuh"

namespace kestrel::backend::cuda {

namespace {

constexpr int kWarps = 4, kThreads = 32 * kWarps;
constexpr int kSub = 16;        // keys a warp takes at a time: one k-step of P V
constexpr int kMaxTokens = 16;  // the mma's rows
constexpr int kMaxSplits = 16;

// Bytes of one KV head's part of a cache row (D elements), and of its copy in shared memory (an
// f16 row padded by 16 bytes: the 8 rows one ldmatrix reads start in distinct bank groups).
template <DType T, int D>
constexpr int slice_bytes() {
  return cache_slice_bytes<T, D>();
}
template <DType T, int D>
constexpr int row_bytes_smem() {
  return slice_bytes<T, D>() + (T == DType::F16 ? 16 : 0);
}
template <DType KT, DType VT, int D>
constexpr int stage_bytes() {
  return kSub * (row_bytes_smem<KT, D>() + row_bytes_smem<VT, D>());
}
// Shared memory: Q's A fragments (hi, lo), then each warp's two stages of raw K and V rows; after
// the key loop the stages hold the warps' partials ([kWarps][kMaxTokens][D] outputs, then
// [kWarps][kMaxTokens] (m, l) pairs).
template <int D>
constexpr size_t qfrag_bytes() {
  return 2 * (D / 16) * 32 * sizeof(uint4);
}
template <DType KT, DType VT, int D>
constexpr size_t tc16_smem_bytes() {
  const size_t stages = size_t{kWarps} * 2 * stage_bytes<KT, VT, D>();
  const size_t partials = kWarps * kMaxTokens * (D * sizeof(float) + sizeof(float2));
  return qfrag_bytes<D>() + (stages > partials ? stages : partials);
}

struct Tc16Args {
  const float* q;
  int n_tokens;
  const int32_t* pos;
  const uint8_t *kc, *vc;
  int64_t k_row_bytes, v_row_bytes;
  int n_head, group;
  float scale;
  float* part;  // [n_head][splits][kMaxTokens][D]
  float2* ml;   // [n_head][splits][kMaxTokens]
  unsigned* arrivals;
  float* out;
  MatmulInputOut also;
  int warp_subs;  // sub-tiles a warp takes before another split gets keys (tc16_warp_subs)
};

// Rows r0 .. r0 + 15 of KV head kvh (its slice of each cache row) into dst (row stride
// row_bytes_smem) with cp.async, by the 32 lanes of a warp; rows at or past n_valid are zeros
// (never garbage times a masked zero). The caller commits.
template <DType T, int D>
__device__ __forceinline__ void copy_rows(const uint8_t* cache, int64_t row_bytes, int kvh, int r0,
                                          int n_valid, uint8_t* dst) {
  constexpr int kChunk = T == DType::F16 ? 16 : 4;  // quantized slices: 4-byte aligned only
  constexpr int kPer = slice_bytes<T, D>() / kChunk;
  const int lane = threadIdx.x % 32;
  for (int i = lane; i < kSub * kPer; i += 32) {
    const int r = i / kPer, ch = i % kPer;
    const bool in = r0 + r < n_valid;
    const uint8_t* src =
        in ? cache + (r0 + r) * row_bytes + int64_t{kvh} * slice_bytes<T, D>() + ch * kChunk
           : cache;
    __pipeline_memcpy_async(dst + r * row_bytes_smem<T, D>() + ch * kChunk, src, kChunk,
                            in ? 0 : kChunk);
  }
}

// A 2-byte value of a stage (every code pair and scale read is at an even offset: rows and blocks
// of an even number of bytes).
__device__ __forceinline__ uint32_t smem_u16(const uint8_t* p) {
  return *reinterpret_cast<const uint16_t*>(p);
}
__device__ __forceinline__ float smem_half(const uint8_t* p) {
  return __half2float(*reinterpret_cast<const __half*>(p));
}

// Two codes of a quantized cache (bytes 0 and 1 of w: Q4_0 their low nibbles, Q8_0 the signed
// bytes) as the half2 of their exact integer values.
template <DType T>
__device__ __forceinline__ uint32_t codes_pair(uint32_t w) {
  return codes_to_half2<T, 0x5150>(w, 0x64006400u, __float2half2_rn(1.0f));
}

// S = Q K^T for the 16 keys of a stage: s[j][e] is row g (e < 2) or g + 8, key 8 j + 2 c + e % 2.
template <DType KT, int D>
__device__ __forceinline__ void sub_tile_scores(const uint4* qfrag, const uint8_t* ks,
                                                float (&s)[2][4]) {
  constexpr int kRow = row_bytes_smem<KT, D>();
  const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[j][e] = 0.0f;
  if constexpr (KT == DType::F16) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint4 qh = qfrag[kk * 32 + lane], ql = qfrag[(D / 16 + kk) * 32 + lane];
      const uint32_t ah[4] = {qh.x, qh.y, qh.z, qh.w}, al[4] = {ql.x, ql.y, ql.z, ql.w};
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        // B fragment: dims 16 kk + 2 c, +1 (b0) and + 8, + 9 (b1) of key 8 j + g.
        const uint8_t* p = ks + (8 * j + g) * kRow + 2 * (16 * kk + 2 * c);
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(p);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(p + 16);
        mma_16816(s[j], ah, b0, b1);
        mma_16816(s[j], al, b0, b1);
      }
    }
  } else {
    constexpr int kBlock = KT == DType::Q8_0 ? 34 : 18;
#pragma unroll
    for (int kb = 0; kb < D / 32; ++kb) {
      // k-steps 2 kb and 2 kb + 1: the block's elements 0..15 and 16..31.
      uint32_t ah[2][4], al[2][4];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint4 qh = qfrag[(2 * kb + h) * 32 + lane];
        const uint4 ql = qfrag[(D / 16 + 2 * kb + h) * 32 + lane];
        ah[h][0] = qh.x, ah[h][1] = qh.y, ah[h][2] = qh.z, ah[h][3] = qh.w;
        al[h][0] = ql.x, al[h][1] = ql.y, al[h][2] = ql.z, al[h][3] = ql.w;
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const uint8_t* blk = ks + (8 * j + g) * kRow + kb * kBlock + 2;  // key 8 j + g's codes
        float cb[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          uint32_t b0, b1;
          if constexpr (KT == DType::Q4_0) {  // byte i: element i (low nibble), i + 16 (high)
            const uint32_t w0 = smem_u16(blk + 2 * c), w1 = smem_u16(blk + 2 * c + 8);
            b0 = codes_pair<KT>(h ? w0 >> 4 : w0);
            b1 = codes_pair<KT>(h ? w1 >> 4 : w1);
          } else {  // byte i: element i
            b0 = codes_pair<KT>(smem_u16(blk + 16 * h + 2 * c));
            b1 = codes_pair<KT>(smem_u16(blk + 16 * h + 2 * c + 8));
          }
          mma_16816(cb, ah[h], b0, b1);
          mma_16816(cb, al[h], b0, b1);
        }
        // cb columns: keys 8 j + 2 c and + 1, whose block scales weigh this block's sums.
        const float d0 = smem_half(ks + (8 * j + 2 * c) * kRow + kb * kBlock);
        const float d1 = smem_half(ks + (8 * j + 2 * c + 1) * kRow + kb * kBlock);
        s[j][0] += d0 * cb[0];
        s[j][1] += d1 * cb[1];
        s[j][2] += d0 * cb[2];
        s[j][3] += d1 * cb[3];
      }
    }
  }
}

// O += P V for the 16 keys of a stage; p as softmax_step left it (the A fragment of P: s[0]
// keys 2 c, 2 c + 1, s[1] keys 8 + 2 c, 9 + 2 c; rows g and g + 8).
template <DType VT, int D>
__device__ __forceinline__ void sub_tile_pv(const float (&p)[2][4], const uint8_t* vs,
                                            float (&o)[D / 8][4]) {
  constexpr int kRow = row_bytes_smem<VT, D>();
  const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  if constexpr (VT == DType::F16) {
    const uint32_t ph[4] = {pack_half2(p[0][0], p[0][1]), pack_half2(p[0][2], p[0][3]),
                            pack_half2(p[1][0], p[1][1]), pack_half2(p[1][2], p[1][3])};
    const uint32_t pl[4] = {pack_half2_lo(p[0][0], p[0][1]), pack_half2_lo(p[0][2], p[0][3]),
                            pack_half2_lo(p[1][0], p[1][1]), pack_half2_lo(p[1][2], p[1][3])};
    const __half* v = reinterpret_cast<const __half*>(vs);
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      uint32_t b0, b1;
      ldmatrix_x2_trans(b0, b1, v + (lane % 16) * (kRow / 2) + 8 * n);
      mma_16816(o[n], ph, b0, b1);
      mma_16816(o[n], pl, b0, b1);
    }
  } else {
    constexpr int kBlock = VT == DType::Q8_0 ? 34 : 18;
    const int key[4] = {2 * c, 2 * c + 1, 2 * c + 8, 2 * c + 9};
#pragma unroll
    for (int kb = 0; kb < D / 32; ++kb) {
      const uint8_t* blk[4];
      float d[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        blk[i] = vs + key[i] * kRow + kb * kBlock;
        d[i] = smem_half(blk[i]);
      }
      // P times the block scale of each key, as hi + lo parts, against V's exact codes.
      const float a[8] = {p[0][0] * d[0], p[0][1] * d[1], p[0][2] * d[0], p[0][3] * d[1],
                          p[1][0] * d[2], p[1][1] * d[3], p[1][2] * d[2], p[1][3] * d[3]};
      const uint32_t ph[4] = {pack_half2(a[0], a[1]), pack_half2(a[2], a[3]),
                              pack_half2(a[4], a[5]), pack_half2(a[6], a[7])};
      const uint32_t pl[4] = {pack_half2_lo(a[0], a[1]), pack_half2_lo(a[2], a[3]),
                              pack_half2_lo(a[4], a[5]), pack_half2_lo(a[6], a[7])};
      // n-tile 4 kb + t: dims 8 t + g of the block (b0: keys 2c, 2c+1; b1: 2c+8, 2c+9).
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        uint32_t w[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const uint8_t* lo_key = blk[2 * i] + 2;
          const uint8_t* hi_key = blk[2 * i + 1] + 2;
          if constexpr (VT == DType::Q4_0) {  // element e: byte e % 16, high nibble from 16
            const int byte = (8 * t + g) % 16;
            const uint32_t pair = lo_key[byte] | (uint32_t{hi_key[byte]} << 8);
            w[i] = codes_pair<VT>(t >= 2 ? pair >> 4 : pair);
          } else {
            const int byte = 8 * t + g;
            w[i] = codes_pair<VT>(lo_key[byte] | (uint32_t{hi_key[byte]} << 8));
          }
        }
        mma_16816(o[4 * kb + t], ph, w[0], w[1]);
        mma_16816(o[4 * kb + t], pl, w[0], w[1]);
      }
    }
  }
}

template <DType KT, DType VT, int D>
__global__ void __launch_bounds__(kThreads) attention_tc16_kernel(const Tc16Args a) {
  grid_dependents_launch();  // the output projection may start streaming its weights
  grid_dependency_wait();    // (chained_launches: started before the kernel before ended)
  constexpr int kStage = stage_bytes<KT, VT, D>();
  constexpr int kKRows = kSub * row_bytes_smem<KT, D>();
  extern __shared__ uint4 smem16[];
  uint4* qfrag = smem16;  // [2][D / 16][32]: hi parts, then lo parts
  uint8_t* stages = reinterpret_cast<uint8_t*>(smem16) + qfrag_bytes<D>();
  const int h = blockIdx.x, split = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int kvh = h / a.group;
  const int nt = min(a.n_tokens, kMaxTokens);
  const int64_t q_dim = int64_t{a.n_head} * D;
  int n_kv = 0;
  const int lane_pos = warp_positions(a.pos, nt, n_kv);  // token `lane`'s position, -1 past nt
  const int n_sub = (n_kv + kSub - 1) / kSub;
  // Splits with work (the grid is sized for the longest cache; a replayed graph meets shorter).
  const int per_split = kWarps * a.warp_subs;
  const int splits = min(static_cast<int>(gridDim.y), (n_sub + per_split - 1) / per_split);
  if (split >= splits) return;

  // Q's A fragments: a[0] = (row g, dims 2c, 2c+1), a[1] = row g + 8, a[2] / a[3] dims + 8.
  for (int i = threadIdx.x; i < (D / 16) * 32; i += kThreads) {
    const int kk = i / 32, ig = i % 32 / 4, ic = i % 4;
    float2 v[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int row = ig + 8 * (r % 2), col = 16 * kk + 2 * ic + 8 * (r / 2);
      v[r] = row < nt ? *reinterpret_cast<const float2*>(a.q + row * q_dim + int64_t{h} * D + col)
                      : make_float2(0.0f, 0.0f);
    }
    qfrag[i] = make_uint4(pack_half2(v[0].x, v[0].y), pack_half2(v[1].x, v[1].y),
                          pack_half2(v[2].x, v[2].y), pack_half2(v[3].x, v[3].y));
    qfrag[(D / 16) * 32 + i] =
        make_uint4(pack_half2_lo(v[0].x, v[0].y), pack_half2_lo(v[1].x, v[1].y),
                   pack_half2_lo(v[2].x, v[2].y), pack_half2_lo(v[3].x, v[3].y));
  }
  __syncthreads();

  const int last[2] = {__shfl_sync(0xffffffffu, lane_pos, g),
                       __shfl_sync(0xffffffffu, lane_pos, g + 8)};
  const int first = split * kWarps + warp, stride = splits * kWarps;
  uint8_t* mine = stages + warp * 2 * kStage;
  auto load = [&](int sub, int stage) {
    if (sub < n_sub) {
      uint8_t* dst = mine + stage * kStage;
      copy_rows<KT, D>(a.kc, a.k_row_bytes, kvh, sub * kSub, n_kv, dst);
      copy_rows<VT, D>(a.vc, a.v_row_bytes, kvh, sub * kSub, n_kv, dst + kKRows);
    }
    __pipeline_commit();
  };
  float o[D / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  const float scale_log2 = a.scale * 1.44269504088896341f;  // exp(x) = 2^(x log2 e)
  load(first, 0);
  int stage = 0;
  for (int sub = first; sub < n_sub; sub += stride, stage ^= 1) {
    load(sub + stride, stage ^ 1);  // the stage the previous sub-tile used (read: __syncwarp)
    __pipeline_wait_prior(1);
    __syncwarp();
    const uint8_t* ks = mine + stage * kStage;
    float s[2][4];
    sub_tile_scores<KT, D>(qfrag, ks, s);
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int k = sub * kSub + 8 * j + 2 * c + e % 2;
        s[j][e] = k <= last[e / 2] ? s[j][e] * scale_log2 : -INFINITY;  // causal mask
      }
    softmax_step(s, m, l, o);
    sub_tile_pv<VT, D>(s, ks + kKRows, o);
    __syncwarp();
  }
  __pipeline_wait_prior(0);
  __syncthreads();  // every warp is done with its stages: they hold the partials now

  float* wo = reinterpret_cast<float*>(stages);                           // [kWarps][kMaxTokens][D]
  float2* wml = reinterpret_cast<float2*>(wo + kWarps * kMaxTokens * D);  // [kWarps][kMaxTokens]
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int t = g + 8 * r;
    const float sum = quad_sum(l[r]);
    if (c == 0) wml[warp * kMaxTokens + t] = make_float2(m[r], sum);
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<float2*>(wo + (warp * kMaxTokens + t) * D + 8 * n + 2 * c) =
          make_float2(o[n][2 * r], o[n][2 * r + 1]);
  }
  __syncthreads();
  // The block's rows: the warps' partials weighed by 2^(m_w - max).
  const int64_t slot = (int64_t{h} * gridDim.y + split) * kMaxTokens;  // this block's partial
  for (int e = threadIdx.x; e < nt * D; e += kThreads) {               // whole warps: D % 32 == 0
    const int t = e / D, d = e % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, wml[w * kMaxTokens + t].x);
    float sum = 0.0f, acc = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float2 wl = wml[w * kMaxTokens + t];
      const float f = wl.x == -INFINITY ? 0.0f : exp2f(wl.x - mx);
      sum += f * wl.y;
      acc += f * wo[(w * kMaxTokens + t) * D + d];
    }
    if (splits == 1) {
      const int64_t i = t * q_dim + int64_t{h} * D + d;
      const float r = acc / sum;  // every token sees key 0: sum > 0
      a.out[i] = r;
      // A warp's 32 values are one block of the output projection's input.
      write_matmul_input1(a.also, i, r);
    } else {
      a.part[(slot + t) * D + d] = acc;
      // (max in natural-log units, as the merge takes it)
      if (d == 0) a.ml[slot + t] = make_float2(mx * 0.69314718055994531f, sum);
    }
  }
  if (splits == 1) return;
  // The merge's rows go where Q's fragments were (the same 64 D bytes).
  const int64_t head0 = int64_t{h} * gridDim.y * kMaxTokens;  // the layout's split count
  merge_head_partials<kThreads, kMaxTokens, kMaxSplits>(h, splits, nt, D, q_dim, a.part + head0 * D,
                                                        a.ml + head0, a.arrivals, a.out, a.also,
                                                        reinterpret_cast<float*>(qfrag), D);
}

// Sub-tiles of 16 keys a warp takes before the keys are split over another block (whose partial
// then costs a merge: a write, an arrival and the last block's read of every split's partial).
// KESTREL_CUDA_TC16_WARP_SUBS=N (1-64); 1, a sub-tile a warp, was the only choice before the
// twenty-fifth session; 8, the default since, gave the seed's b128 ub16 +1-3% in four A/B pairs
// on the H100 (each inside the run's sd; bench/NOTES.md).
int tc16_warp_subs() {
  static const int n = [] {
    const char* e = std::getenv("KESTREL_CUDA_TC16_WARP_SUBS");
    return e ? std::clamp(std::atoi(e), 1, 64) : 8;
  }();
  return n;
}

template <DType KT, DType VT, int D>
Status launch_typed(const Tc16Args& a, int splits, cudaStream_t s) {
  constexpr size_t smem = tc16_smem_bytes<KT, VT, D>();
  auto kernel = attention_tc16_kernel<KT, VT, D>;
  CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                static_cast<int>(smem)),
           "attention (micro-batch tensor cores): shared memory size");
  // (An error is left for LAUNCH_CHECK, as a <<<>>> launch leaves it.)
  (void)launch_dependent_smem(chained_launches(), kernel, dim3(a.n_head, splits), dim3(kThreads),
                              smem, s, a);
  return Status::ok();
}

}  // namespace

bool attention_tc16_fits(const AttentionParams& p, int n_tokens, const Tensor& kc,
                         const Tensor& vc) {
  return cache_rows_copyable(kc, vc) && n_tokens >= 1 && n_tokens <= kMaxTokens &&
         (p.head_dim == 64 || p.head_dim == 128);
}

int attention_tc16_count(const AttentionParams& p, int sm_count) {
  // About four blocks an SM at the longest caches (a block uses ~41-78 KB of shared memory).
  return std::max(1, std::min(kMaxSplits, (4 * sm_count + p.n_head - 1) / p.n_head));
}

Status launch_attention_tc16(const float* q, int n_tokens, const int32_t* pos, const Tensor& kc,
                             const Tensor& vc, const AttentionParams& p, int splits,
                             unsigned* arrivals, void* scratch, float* out,
                             const MatmulInputOut& also, cudaStream_t s) {
  if (!attention_tc16_fits(p, n_tokens, kc, vc) || splits < 1 || splits > kMaxSplits)
    return error("attention (micro-batch tensor cores): %d tokens, head size %d, %d splits",
                 n_tokens, p.head_dim, splits);
  // scratch: the (max, sum) pairs, then the partial outputs (attention_split.cu's layout).
  float2* ml = static_cast<float2*>(scratch);
  float* part = reinterpret_cast<float*>(ml + static_cast<size_t>(p.n_head) * splits * kMaxTokens);
  const Tc16Args a{q,
                   n_tokens,
                   pos,
                   static_cast<const uint8_t*>(kc.data),
                   static_cast<const uint8_t*>(vc.data),
                   static_cast<int64_t>(kc.row_bytes()),
                   static_cast<int64_t>(vc.row_bytes()),
                   p.n_head,
                   p.n_head / p.n_head_kv,
                   p.scale,
                   part,
                   ml,
                   arrivals,
                   out,
                   also,
                   tc16_warp_subs()};
  Status st = Status::ok();
  with_cache_types(kc.type, vc.type, [&](auto types) {
    using T = decltype(types);
    st = p.head_dim == 64 ? launch_typed<T::kK, T::kV, 64>(a, splits, s)
                          : launch_typed<T::kK, T::kV, 128>(a, splits, s);
  });
  KESTREL_TRY(st);
  LAUNCH_CHECK("attention (micro-batch tensor cores)");
  return Status::ok();
}

}  // namespace kestrel::backend::cuda
