// Attention of a micro-batch (3-16 query tokens) over the cache with the keys split among
// blocks: grid (head, split); split s takes the 64-key tiles s, s + S, s + 2S, ... of its head,
// keeps a running softmax (max m, sum l, unnormalized output o) per token in f32, and writes them
// as a partial; the last block of a head to finish merges its S partials into the output.
//
// Why: attention_rows_kernel gives a block the whole cache of one head for 4 tokens, so a block
// walks every key in a chain of dependent rounds (scores, a softmax with a dozen barriers, P.V
// with a warp per 16th key): 20.6 us a layer for the seed's micro-batches of 16 tokens over ~300
// keys (ncu, eighth session), 16% of a micro-batch, where the K/V bytes (1.5 MB a layer) need
// ~0.5 us and the f32 arithmetic (43 M FMAs) ~1.5 us on all SMs. Here each block reads its K/V
// tile once for all of the micro-batch's tokens, decodes it into shared memory, and every warp
// owns two tokens for the whole tile (scores, softmax update and P.V without block barriers).
//
// Measured (H100, fifteenth session, the seed's b128 ub16): 3,894 +- 137 t/s against 4,036 +- 174
// on the rows kernel (a first version whose merge waited on one load at a time: 3,470), so it is
// opt-in (KESTREL_CUDA_ATT_SPLIT_MIN=N); tg128 from 1 token 410 against 404. Not yet known: which
// part costs what (a --profile of the two is the next step): the tile decode (a thread a 32-value
// slice, byte loads), the scores' shared-memory reads (each warp reads all 64 K rows: ~1.4 us a
// tile), the merge's round trip through L2.
//
// The split count S is fixed per launch (the grid cannot depend on the cache length when the
// pass is replayed from a CUDA graph); the tiles a block takes follow the length read from pos.
#include "backend/cuda/acts_device.cuh"
#include "backend/cuda/attention_merge.cuh"
#include "backend/cuda/cuda_backend_impl.cuh"
#include "backend/cuda/quant_device.cuh"

namespace kestrel::backend::cuda {

namespace {

constexpr int kTile = 64;  // keys a tile
constexpr int kWarps = 8, kThreads = 32 * kWarps;
constexpr int kMaxDim = 128;             // head sizes 32..128 (a lane holds 4 output elements)
constexpr int kRowStride = kMaxDim + 4;  // floats a decoded K/V row: +4 spreads rows over banks
constexpr int kMaxTokens = 2 * kWarps;   // two tokens a warp
constexpr int kMaxSplits = 16;           // blocks a head

constexpr size_t smem_bytes() {
  return sizeof(float) * (kMaxTokens * kMaxDim + 2 * kTile * kRowStride + kMaxTokens * kTile);
}

// Block (head blockIdx.x, split blockIdx.y of gridDim.y). kTPW tokens a warp: 1 (up to 8 tokens)
// or 2 (up to 16). part: [n_head][S][kMaxTokens][D] unnormalized outputs, ml: [n_head][S]
// [kMaxTokens] (max, sum) pairs, arrivals: n_head counters, zero between launches.
template <DType KT, DType VT, int kTPW>
__global__ void __launch_bounds__(kThreads)
    attention_split_kernel(const float* q, int n_tokens, const int32_t* pos, const uint8_t* kc,
                           int64_t k_row_bytes, const uint8_t* vc, int64_t v_row_bytes, int n_head,
                           int group, int D, float scale, float* part, float2* ml,
                           unsigned* arrivals, float* out, MatmulInputOut also) {
  grid_dependents_launch();  // the output projection may start streaming its weights
  extern __shared__ float4 smem4[];
  float* qs = reinterpret_cast<float*>(smem4);  // [kMaxTokens][kMaxDim], scaled
  float* ks = qs + kMaxTokens * kMaxDim;        // [kTile][kRowStride]
  float* vs = ks + kTile * kRowStride;          // [kTile][kRowStride]
  float* ps = vs + kTile * kRowStride;          // [kMaxTokens][kTile] probabilities of the tile
  const int h = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const int g = h / group, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int nt = min(n_tokens, kWarps * kTPW);
  const int64_t q_dim = int64_t{n_head} * D;
  int n_kv = 0;
  (void)warp_positions(pos, nt, n_kv);
  for (int e = threadIdx.x; e < kMaxTokens * D; e += kThreads) {
    const int t = e / D, d = e % D;
    qs[t * kMaxDim + d] = t < nt ? q[t * q_dim + int64_t{h} * D + d] * scale : 0.0f;
  }
  // This warp's tokens, their running max, sum and output elements 4 lane .. 4 lane + 3.
  int tok[kTPW], tpos[kTPW];
  float m[kTPW], l[kTPW];
  float4 o[kTPW];
#pragma unroll
  for (int i = 0; i < kTPW; ++i) {
    tok[i] = warp * kTPW + i;
    tpos[i] = tok[i] < nt ? pos[tok[i]] : -1;  // -1: no key visible (padding token)
    m[i] = -INFINITY;
    l[i] = 0.0f;
    o[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
  const int n_sl = D / 32, tiles = (n_kv + kTile - 1) / kTile;
  const bool has_dims = 4 * lane < D;
  for (int tile = split; tile < tiles; tile += splits) {
    const int k0 = tile * kTile;
    __syncthreads();  // the previous tile's readers are done (and qs is written, first time)
    // Decode K and V rows k0 .. k0 + 63 of KV head g: a thread per (side, slice, key), keys
    // fastest so that a warp's float4 stores land on distinct banks.
    for (int e = threadIdx.x; e < 2 * n_sl * kTile; e += kThreads) {
      const int key = e % kTile, sl = e / kTile % n_sl, side = e / (kTile * n_sl);
      const int64_t k = min(k0 + key, n_kv - 1);  // rows past n_kv: any valid row, masked below
      float w[32];
      if (side == 0)
        decode_slice<KT>(kc + k * k_row_bytes, int64_t{g} * n_sl + sl, w);
      else
        decode_slice<VT>(vc + k * v_row_bytes, int64_t{g} * n_sl + sl, w);
      float4* dst = reinterpret_cast<float4*>((side ? vs : ks) + key * kRowStride + 32 * sl);
#pragma unroll
      for (int j = 0; j < 8; ++j)
        dst[j] = make_float4(w[4 * j], w[4 * j + 1], w[4 * j + 2], w[4 * j + 3]);
    }
    __syncthreads();
    // Scores of the warp's tokens against keys k0 + lane and k0 + lane + 32.
    float s[kTPW][2];
#pragma unroll
    for (int i = 0; i < kTPW; ++i) s[i][0] = s[i][1] = 0.0f;
    const float4* k_a = reinterpret_cast<const float4*>(ks + lane * kRowStride);
    const float4* k_b = reinterpret_cast<const float4*>(ks + (lane + 32) * kRowStride);
    for (int j = 0; j < D / 4; ++j) {
      const float4 a = k_a[j], b = k_b[j];
#pragma unroll
      for (int i = 0; i < kTPW; ++i) {
        const float4 x = reinterpret_cast<const float4*>(qs + tok[i] * kMaxDim)[j];
        s[i][0] += x.x * a.x + x.y * a.y + x.z * a.z + x.w * a.w;
        s[i][1] += x.x * b.x + x.y * b.y + x.z * b.z + x.w * b.w;
      }
    }
    // Online softmax update, the causal mask on key positions.
#pragma unroll
    for (int i = 0; i < kTPW; ++i) {
      const float s0 = k0 + lane <= tpos[i] ? s[i][0] : -INFINITY;
      const float s1 = k0 + lane + 32 <= tpos[i] ? s[i][1] : -INFINITY;
      const float m_new = fmaxf(m[i], warp_max(fmaxf(s0, s1)));
      float p0 = 0.0f, p1 = 0.0f, corr = 1.0f;
      if (m_new != -INFINITY) {  // else nothing visible yet: all stays 0
        corr = expf(m[i] - m_new);
        p0 = expf(s0 - m_new);
        p1 = expf(s1 - m_new);
      }
      m[i] = m_new;
      l[i] = l[i] * corr + warp_sum(p0 + p1);
      o[i].x *= corr;
      o[i].y *= corr;
      o[i].z *= corr;
      o[i].w *= corr;
      ps[tok[i] * kTile + lane] = p0;
      ps[tok[i] * kTile + lane + 32] = p1;
    }
    __syncwarp();
    if (has_dims) {
#pragma unroll 4
      for (int k = 0; k < kTile; ++k) {
        const float4 v = reinterpret_cast<const float4*>(vs + k * kRowStride)[lane];
#pragma unroll
        for (int i = 0; i < kTPW; ++i) {
          const float p = ps[tok[i] * kTile + k];
          o[i].x += p * v.x;
          o[i].y += p * v.y;
          o[i].z += p * v.z;
          o[i].w += p * v.w;
        }
      }
    }
  }
  // This split's partial; a split without tiles leaves m = -inf, l = 0, o = 0.
  const int64_t slot = (int64_t{h} * splits + split) * kMaxTokens;
#pragma unroll
  for (int i = 0; i < kTPW; ++i) {
    if (tok[i] >= nt) continue;
    if (has_dims) reinterpret_cast<float4*>(part + (slot + tok[i]) * D)[lane] = o[i];
    if (lane == 0) ml[slot + tok[i]] = make_float2(m[i], l[i]);
  }
  const int64_t head0 = int64_t{h} * splits * kMaxTokens;
  merge_head_partials<kThreads, kMaxTokens, kMaxSplits>(
      h, splits, nt, D, q_dim, part + head0 * D, ml + head0, arrivals, out, also, qs, kMaxDim);
}

template <DType KT, DType VT>
void launch_typed(const float* q, int n_tokens, const int32_t* pos, const Tensor& kc,
                  const Tensor& vc, const AttentionParams& p, int splits, float* part, float2* ml,
                  unsigned* arrivals, float* out, const MatmulInputOut& also, cudaStream_t s) {
  const bool two = n_tokens > kWarps;
  auto kernel = two ? attention_split_kernel<KT, VT, 2> : attention_split_kernel<KT, VT, 1>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                       static_cast<int>(smem_bytes()));
  kernel<<<dim3(p.n_head, splits), kThreads, smem_bytes(), s>>>(
      q, n_tokens, pos, static_cast<const uint8_t*>(kc.data), static_cast<int64_t>(kc.row_bytes()),
      static_cast<const uint8_t*>(vc.data), static_cast<int64_t>(vc.row_bytes()), p.n_head,
      p.n_head / p.n_head_kv, p.head_dim, p.scale, part, ml, arrivals, out, also);
}

}  // namespace

bool attention_split_fits(const AttentionParams& p, int n_tokens) {
  return n_tokens >= 1 && n_tokens <= kMaxTokens && p.head_dim % 32 == 0 && p.head_dim <= kMaxDim;
}

int attention_split_count(const AttentionParams& p, int sm_count) {
  // About two blocks an SM (two fit: ~80 KB of shared memory each), at most 16 splits a head.
  return std::max(1, std::min(kMaxSplits, (2 * sm_count + p.n_head - 1) / p.n_head));
}

size_t attention_split_scratch_bytes(const AttentionParams& p, int splits) {
  const size_t slots = static_cast<size_t>(p.n_head) * splits * kMaxTokens;
  return slots * (sizeof(float2) + sizeof(float) * p.head_dim);
}

Status launch_attention_split(const float* q, int n_tokens, const int32_t* pos, const Tensor& kc,
                              const Tensor& vc, const AttentionParams& p, int splits,
                              unsigned* arrivals, void* scratch, float* out,
                              const MatmulInputOut& also, cudaStream_t s) {
  // scratch: the (max, sum) pairs, then the partial outputs.
  float2* ml = static_cast<float2*>(scratch);
  float* part = reinterpret_cast<float*>(ml + static_cast<size_t>(p.n_head) * splits * kMaxTokens);
  const bool ok = with_cache_types(kc.type, vc.type, [&](auto types) {
    using T = decltype(types);
    launch_typed<T::kK, T::kV>(q, n_tokens, pos, kc, vc, p, splits, part, ml, arrivals, out, also,
                               s);
  });
  if (!ok)
    return error("attention: cache types %s/%s are not supported", quant::type_name(kc.type),
                 quant::type_name(vc.type));
  LAUNCH_CHECK("attention (split keys)");
  return Status::ok();
}

}  // namespace kestrel::backend::cuda
