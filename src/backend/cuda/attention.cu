// KV store (quantize on write) and causal attention over the cache. Attention runs as two
// batched tensor-core GEMMs per KV head group through cuBLAS -- scores = Q K^T, then P V --
// with a causal softmax kernel between them; K/V rows of a quantized cache are expanded to f16
// first. Token rows are processed in slices so that the score matrix stays within a fixed
// scratch size, and each slice only multiplies the keys its last token can see.
//
// Precision: every f32 operand (Q, P, and K/V values that f16 cannot hold exactly, such as
// q8_0's d * q) is split into f16 hi + lo parts and the products of the parts are accumulated in
// f32 (hi.hi + lo.hi + hi.lo), so attention is as exact as f32 arithmetic (about 2^-22) at two
// to three tensor-core GEMMs instead of one. A single f16 rounding of Q and P perturbs K and V
// of the next layer by ~1e-3, which flips q4_0 rounding steps of the cache and moves logits by
// 1-2% (tests/e2e/test_e2e.py judges quantized caches against the exactly rounded reference).
#include <algorithm>
#include <vector>

#include "backend/cuda/acts_device.cuh"
#include "backend/cuda/attention_rows.cuh"
#include "backend/cuda/cuda_backend_impl.cuh"
#include "backend/cuda/kv_store_device.cuh"
#include "backend/cuda/quant_device.cuh"

namespace kestrel::backend::cuda {

namespace {

constexpr size_t kScoreBytes = size_t{64} << 20;  // f32 scores per slice of token rows

// K and V of one kv_store, written by one launch when their caches share a type (blockIdx.y
// picks the side): decode stores one token per layer, and each launch costs ~2 us of ramp.
struct KvSides {
  const float* src[2];
  int64_t dim[2];
  uint8_t* cache[2];
  int64_t row_bytes[2];
};

// f16 caches: one thread per element (coalesced): src row t -> cache row pos[t].
__global__ void kv_store_f16_kernel(const KvSides sides, int n_tokens, const int32_t* pos) {
  const int side = blockIdx.y;
  const float* src = side ? sides.src[1] : sides.src[0];
  const int64_t dim = side ? sides.dim[1] : sides.dim[0];
  __half* cache = reinterpret_cast<__half*>(side ? sides.cache[1] : sides.cache[0]);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n_tokens * dim) return;
  const int64_t t = i / dim, e = i % dim;
  cache[static_cast<int64_t>(pos[t]) * dim + e] = __float2half_rn(src[i]);
}

// q8_0 / q4_0 caches: one warp per (token, 32-element block), lane j holding element j
// (store_kv_block).
template <DType T>
__global__ void kv_store_quant_kernel(const KvSides sides, int n_tokens, const int32_t* pos) {
  const int side = blockIdx.y;
  const float* src = side ? sides.src[1] : sides.src[0];
  const int64_t dim = side ? sides.dim[1] : sides.dim[0];
  uint8_t* cache = side ? sides.cache[1] : sides.cache[0];
  const int64_t row_bytes = side ? sides.row_bytes[1] : sides.row_bytes[0];
  const int64_t blocks = dim / 32;
  const int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (w >= n_tokens * blocks) return;  // whole warps leave together
  const int64_t t = w / blocks, b = w % blocks;
  const float x = src[t * dim + 32 * b + lane];
  store_kv_block<T>(x, lane, cache + static_cast<int64_t>(pos[t]) * row_bytes, b);
}

// Cache rows [0, n_rows) -> f16 hi + lo [n_rows][dim], one thread per pair of elements: a warp
// writes 128 contiguous bytes of each part. (A thread per 32-element slice wrote 64-byte strides:
// 19 us for 327 rows of a 4096-wide q4_0 cache, 1.2 ms of the seed's 16 ms pass; ncu, H200.)
// The values are decode_slice's, bit for bit: float(q) * d.
template <DType T>
__global__ void cache_to_f16_kernel(const uint8_t* cache, int64_t row_bytes, int64_t dim,
                                    int64_t n_rows, __half* out, __half* lo) {
  static_assert(T == DType::Q4_0 || T == DType::Q8_0);
  const int64_t pairs = dim / 2;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n_rows * pairs) return;
  const int64_t r = i / pairs;
  const int e = static_cast<int>(2 * (i % pairs)), j = e % 32;
  float w0, w1;
  if constexpr (T == DType::Q4_0) {
    const uint8_t* b = cache + r * row_bytes + 18 * (e / 32);
    const float d = load_half(b);
    const int shift = j < 16 ? 0 : 4, k = j % 16;
    w0 = static_cast<float>(((b[2 + k] >> shift) & 15) - 8) * d;
    w1 = static_cast<float>(((b[3 + k] >> shift) & 15) - 8) * d;
  } else {
    const uint8_t* b = cache + r * row_bytes + 34 * (e / 32);
    const float d = load_half(b);
    w0 = static_cast<float>(static_cast<int8_t>(b[2 + j])) * d;
    w1 = static_cast<float>(static_cast<int8_t>(b[3 + j])) * d;
  }
  const __half2 h = __floats2half2_rn(w0, w1);
  *reinterpret_cast<__half2*>(out + r * dim + e) = h;
  *reinterpret_cast<__half2*>(lo + r * dim + e) =
      __floats2half2_rn(w0 - __low2float(h), w1 - __high2float(h));
}

// x = hi + lo in f16 (lo holds the rounding error of hi).
__global__ void split_f16_kernel(const float* x, int64_t n, __half* hi, __half* lo) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) {
    const __half h = __float2half_rn(x[i]);
    hi[i] = h;
    lo[i] = __float2half_rn(x[i] - __half2float(h));
  }
}

// One block per (head, token) row of scores: p = softmax over keys 0..pos[t], 0 beyond.
__global__ void softmax_causal_kernel(const float* scores, int n_tokens, int64_t n_kv,
                                      const int32_t* pos, __half* p, __half* p_lo) {
  const int64_t row = blockIdx.x;  // head * n_tokens + t
  const int t = static_cast<int>(row % n_tokens);
  const float* s = scores + row * n_kv;
  __half* out = p + row * n_kv;
  __half* out_lo = p_lo + row * n_kv;
  const int64_t visible = min(static_cast<int64_t>(pos[t]) + 1, n_kv);
  __shared__ float red[32];
  float m = -INFINITY;
  for (int64_t k = threadIdx.x; k < visible; k += blockDim.x) m = fmaxf(m, s[k]);
  m = warp_max(m);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = m;
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = threadIdx.x < blockDim.x / 32 ? red[threadIdx.x] : -INFINITY;
    v = warp_max(v);
    if (threadIdx.x == 0) red[0] = v;
  }
  __syncthreads();
  m = red[0];
  __syncthreads();
  float sum = 0.0f;
  for (int64_t k = threadIdx.x; k < visible; k += blockDim.x) sum += expf(s[k] - m);
  sum = warp_sum(sum);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = sum;
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = threadIdx.x < blockDim.x / 32 ? red[threadIdx.x] : 0.0f;
    v = warp_sum(v);
    if (threadIdx.x == 0) red[0] = v;
  }
  __syncthreads();
  const float inv = 1.0f / red[0];
  for (int64_t k = threadIdx.x; k < n_kv; k += blockDim.x) {
    const float v = k < visible ? expf(s[k] - m) * inv : 0.0f;
    const __half h = __float2half_rn(v);
    out[k] = h;
    out_lo[k] = __float2half_rn(v - __half2float(h));
  }
}

// Few query tokens (decode, small micro-batches): attention_rows_block (attention_rows.cuh) for
// head blockIdx.x and tokens from blockIdx.y * kTB.
template <DType KT, DType VT, int kTB>
__global__ void __launch_bounds__(kRowsThreads)
    attention_rows_kernel(const float* q, int n_tokens, const int32_t* pos, const uint8_t* kc,
                          int64_t k_row_bytes, const uint8_t* vc, int64_t v_row_bytes, int n_head,
                          int group, int D, int64_t kv_stride, float scale, float* out,
                          MatmulInputOut also) {
  grid_dependents_launch();  // the output projection may start streaming its weights
  grid_dependency_wait();    // (chained_launches: started before the kernel before ended)
  extern __shared__ float smem[];
  const int h = blockIdx.x, t0 = blockIdx.y * kTB;
  const int64_t q_dim = int64_t{n_head} * D;
  const auto q_at = [&](int tb, int d) { return q[(t0 + tb) * q_dim + int64_t{h} * D + d]; };
  attention_rows_block<KT, VT, kTB>(h, t0, q_at, n_tokens, pos, kc, k_row_bytes, vc, v_row_bytes,
                                    n_head, group, D, kv_stride, scale, out, also, smem);
}

}  // namespace

// Up to this many query tokens, and keys whose scores fit shared memory, attention runs as
// attention_rows_kernel.

// Up to this many keys, prompt attention over a quantized cache runs fused (below).
constexpr int64_t kFlashAutoMaxKeys = 512;

// Tokens per block: one for decode, four for small micro-batches (each K/V value then serves
// four query tokens; more would leave SMs idle at 32 heads).
template <DType KT, DType VT, int kTB>
void launch_rows_tb(const float* q, int n_tokens, int64_t n_kv, const int32_t* pos,
                    const Tensor& kc, const Tensor& vc, const AttentionParams& p, float* out,
                    const MatmulInputOut& also, cudaStream_t s) {
  const dim3 grid(p.n_head, ceil_div(n_tokens, kTB));
  const size_t smem =
      sizeof(float) * (p.head_dim * kTB * (1 + kRowsThreads / 32) + int64_t{kTB} * n_kv);
  auto kernel = attention_rows_kernel<KT, VT, kTB>;
  if (smem > 48 * 1024)
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(smem));
  // (An error is left for LAUNCH_CHECK, as a <<<>>> launch leaves it.)
  (void)launch_dependent_smem(
      chained_launches(), kernel, grid, dim3(kRowsThreads), smem, s, q, n_tokens, pos,
      static_cast<const uint8_t*>(kc.data), static_cast<int64_t>(kc.row_bytes()),
      static_cast<const uint8_t*>(vc.data), static_cast<int64_t>(vc.row_bytes()), p.n_head,
      p.n_head / p.n_head_kv, p.head_dim, n_kv, p.scale, out, also);
}

template <DType KT, DType VT>
void launch_rows(const float* q, int n_tokens, int64_t n_kv, const int32_t* pos, const Tensor& kc,
                 const Tensor& vc, const AttentionParams& p, float* out, const MatmulInputOut& also,
                 cudaStream_t s) {
  // (A block per token for every few-token batch measured slower: seed b128 ub16 2,722 against
  // 3,539 t/s, H200.)
  if (n_tokens <= 2)
    launch_rows_tb<KT, VT, 1>(q, n_tokens, n_kv, pos, kc, vc, p, out, also, s);
  else
    launch_rows_tb<KT, VT, 4>(q, n_tokens, n_kv, pos, kc, vc, p, out, also, s);
}

Status launch_attention_rows(const float* q, int n_tokens, int64_t n_kv, const int32_t* pos,
                             const Tensor& kc, const Tensor& vc, const AttentionParams& p,
                             float* out, const MatmulInputOut& also, cudaStream_t s) {
  const bool ok = with_cache_types(kc.type, vc.type, [&](auto types) {
    using T = decltype(types);
    launch_rows<T::kK, T::kV>(q, n_tokens, n_kv, pos, kc, vc, p, out, also, s);
  });
  if (!ok)
    return error("attention: cache types %s/%s are not supported", quant::type_name(kc.type),
                 quant::type_name(vc.type));
  LAUNCH_CHECK("attention (rows)");
  return Status::ok();
}

Status launch_kv_store(const KvStoreSide* sides, int n_sides, int n_tokens, const int32_t* pos,
                       cudaStream_t s) {
  if (n_tokens <= 0) return Status::ok();
  if (n_sides < 1 || n_sides > 2 || (n_sides == 2 && sides[0].type != sides[1].type))
    return error("kv_store: %d caches in one launch (1, or 2 of one type)", n_sides);
  KvSides a{};
  int64_t max_dim = 0;
  for (int i = 0; i < n_sides; ++i) {
    a.src[i] = sides[i].src;
    a.dim[i] = sides[i].dim;
    a.cache[i] = sides[i].cache;
    a.row_bytes[i] = sides[i].row_bytes;
    max_dim = std::max(max_dim, sides[i].dim);
  }
  const int64_t warps = n_tokens * (max_dim / 32);
  switch (sides[0].type) {
    case DType::F16:
      kv_store_f16_kernel<<<dim3(ceil_div(n_tokens * max_dim, 256), n_sides), 256, 0, s>>>(
          a, n_tokens, pos);
      break;
    case DType::Q8_0:
      kv_store_quant_kernel<DType::Q8_0>
          <<<dim3(ceil_div(warps * 32, 256), n_sides), 256, 0, s>>>(a, n_tokens, pos);
      break;
    case DType::Q4_0:
      kv_store_quant_kernel<DType::Q4_0>
          <<<dim3(ceil_div(warps * 32, 256), n_sides), 256, 0, s>>>(a, n_tokens, pos);
      break;
    default:
      return error("kv_store: cache type %s is not supported", quant::type_name(sides[0].type));
  }
  LAUNCH_CHECK("kv_store");
  return Status::ok();
}

Status launch_cache_to_f16(DType type, const uint8_t* cache, int64_t row_bytes, int64_t dim,
                           int64_t n_rows, __half* out, __half* lo, cudaStream_t s) {
  const int64_t n = n_rows * (dim / 2);
  const int blocks = static_cast<int>(ceil_div(n, 256));
  switch (type) {
    case DType::Q8_0:
      cache_to_f16_kernel<DType::Q8_0>
          <<<blocks, 256, 0, s>>>(cache, row_bytes, dim, n_rows, out, lo);
      break;
    case DType::Q4_0:
      cache_to_f16_kernel<DType::Q4_0>
          <<<blocks, 256, 0, s>>>(cache, row_bytes, dim, n_rows, out, lo);
      break;
    default:
      return error("attention: cache type %s is not supported", quant::type_name(type));
  }
  LAUNCH_CHECK("attention (expand KV cache to f16)");
  return Status::ok();
}

Status launch_softmax_causal(const float* scores, int n_heads, int n_tokens, int64_t n_kv,
                             const int32_t* pos, __half* p, __half* p_lo, cudaStream_t s) {
  softmax_causal_kernel<<<n_heads * n_tokens, 256, 0, s>>>(scores, n_tokens, n_kv, pos, p, p_lo);
  LAUNCH_CHECK("attention (softmax)");
  return Status::ok();
}

Status launch_split_f16(const float* x, int64_t n, __half* hi, __half* lo, cudaStream_t s) {
  if (n <= 0) return Status::ok();
  split_f16_kernel<<<ceil_div(n, 256), 256, 0, s>>>(x, n, hi, lo);
  LAUNCH_CHECK("split into f16 parts");
  return Status::ok();
}

Status CudaBackend::check_attention_shapes(const Tensor& q, int n_tokens, const Tensor& k_cache,
                                           const Tensor& v_cache, const AttentionParams& p,
                                           const Tensor& out) {
  const int D = p.head_dim, H = p.n_head, Hkv = p.n_head_kv;
  if (H <= 0 || Hkv <= 0 || H % Hkv != 0 || D % 32 != 0 || k_cache.cols != int64_t{Hkv} * D ||
      v_cache.cols != k_cache.cols || q.cols != int64_t{H} * D || out.cols != q.cols ||
      n_tokens > q.rows || n_tokens > out.rows)
    return error(
        "attention: %d heads / %d KV heads of %d do not match q rows of %lld, the cache rows of "
        "%lld / %lld or the output",
        H, Hkv, D, static_cast<long long>(q.cols), static_cast<long long>(k_cache.cols),
        static_cast<long long>(v_cache.cols));
  return Status::ok();
}

// The decode kernel with its scratch: after attention's checks, or rope_kv_attention's.
Status CudaBackend::decode_attention(const Tensor& q, const int32_t* positions,
                                     const Tensor& k_cache, const Tensor& v_cache,
                                     const AttentionParams& p, const DecodeRope& rope,
                                     Tensor& out) {
  const int64_t q_dim = int64_t{p.n_head} * p.head_dim;
  KESTREL_ASSIGN_OR_RETURN(const int32_t* pos_dev, upload_ints(positions, 1));
  KESTREL_ASSIGN_OR_RETURN(const MatmulInputOut also,
                           fused_matmul_input(static_cast<float*>(out.data), 1, q_dim));
  // The grid by the most keys this kernel takes (the cache's rows, at most att_decode_max_keys_),
  // not by this step's: a recorded step serves them all.
  const int splits = attention_decode_splits(
      std::min({k_cache.rows, v_cache.rows, int64_t{att_decode_max_keys_}}));
  KESTREL_ASSIGN_OR_RETURN(unsigned* arrivals, arrival_counters(p.n_head, kAttnArrivals));
  KESTREL_ASSIGN_OR_RETURN(void* partials,
                           scratch(kAttnSplit, attention_decode_scratch_bytes(p, splits)));
  if (mode_ == Mode::Stage || lab_skips("attention")) return Status::ok();
  return launch_attention_decode(static_cast<const float*>(q.data), pos_dev, k_cache, v_cache, p,
                                 rope, splits, arrivals, partials, static_cast<float*>(out.data),
                                 also, stream_);
}

bool CudaBackend::fuses_rope_kv_attention(int n_tokens, const Tensor& k_cache,
                                          const Tensor& v_cache) const {
  return att_decode_ && rope_attention_ && n_tokens == 1 &&
         with_cache_types(k_cache.type, v_cache.type, [](auto) {});
}

int CudaBackend::record_bucket(int n_keys) const {
  return att_decode_ && !decode_kernel_for(n_keys - 1) ? 1 : 0;
}

Status CudaBackend::rope_kv_attention(Tensor& q, Tensor& k, const Tensor& v, int n_tokens,
                                      const int32_t* positions, const RopeParams& pq,
                                      const RopeParams& pk, Tensor& k_cache, Tensor& v_cache,
                                      const AttentionParams& p, Tensor& out) {
  const int D = p.head_dim;
  const int64_t kv_dim = int64_t{p.n_head_kv} * D;
  const bool fits =
      fuses_rope_kv_attention(n_tokens, k_cache, v_cache) && n_tokens == 1 &&
      decode_kernel_for(positions[0]) && attention_decode_fits(p, n_tokens, k_cache, v_cache) &&
      pq.head_dim == D && pk.head_dim == D && pq.n_heads == p.n_head && pk.n_heads == p.n_head_kv &&
      pq.freq_base == pk.freq_base && pq.layout == pk.layout && D <= 2 * kRopeMaxPairs &&
      k.cols == kv_dim && v.cols == kv_dim && k.rows >= 1 && v.rows >= 1;
  // Anything else (and its errors) as the two ops.
  if (!fits)
    return Backend::rope_kv_attention(q, k, v, n_tokens, positions, pq, pk, k_cache, v_cache, p,
                                      out);
  forget_activations();
  KESTREL_TRY(check_attention_shapes(q, n_tokens, k_cache, v_cache, p, out));
  KESTREL_TRY(check_cache_positions(positions, n_tokens, std::min(k_cache.rows, v_cache.rows)));
  DecodeRope rope;
  rope.k_new = static_cast<const float*>(k.data);
  rope.v_new = static_cast<const float*>(v.data);
  rope.table = &rope_table(pq.freq_base, D);
  rope.neox = pq.layout == RopeLayout::NeoX;
  return decode_attention(q, positions, k_cache, v_cache, p, rope, out);
}

Status CudaBackend::attention(const Tensor& q, int n_tokens, const int32_t* positions,
                              const Tensor& k_cache, const Tensor& v_cache,
                              const AttentionParams& p, Tensor& out) {
  forget_activations();
  const int D = p.head_dim, H = p.n_head, Hkv = p.n_head_kv;
  KESTREL_TRY(check_attention_shapes(q, n_tokens, k_cache, v_cache, p, out));
  if (n_tokens <= 0) return Status::ok();
  int max_pos = 0;
  for (int t = 0; t < n_tokens; ++t) {
    if (positions[t] < 0 || positions[t] >= std::min(k_cache.rows, v_cache.rows))
      return error("attention: position %d outside a cache of %lld rows", positions[t],
                   static_cast<long long>(std::min(k_cache.rows, v_cache.rows)));
    max_pos = std::max(max_pos, positions[t]);
  }
  const int group = H / Hkv;
  const int64_t kv_dim = k_cache.cols, q_dim = int64_t{H} * D;
  const int64_t n_kv_all = max_pos + 1;
  if (decode_kernel_for(max_pos) && attention_decode_fits(p, n_tokens, k_cache, v_cache))
    return decode_attention(q, positions, k_cache, v_cache, p, DecodeRope{}, out);
  // (The split-key kernel is opt-in: where it was asked for, it goes before tc16.)
  const bool split = n_tokens >= att_split_min_tokens_ && attention_split_fits(p, n_tokens);
  const bool tc16 = !split && n_tokens >= att_tc16_min_tokens_ &&
                    attention_tc16_fits(p, n_tokens, k_cache, v_cache);
  const bool rows = n_tokens <= rows_max_tokens_ && n_kv_all <= kRowsMaxKeys && D <= kRowsMaxDim;
  // The GEMM path depends on host-side sizes: a recording can only hold the few-token kernels.
  if (mode_ != Mode::Eager && !tc16 && !split && !rows)
    return error("attention of %d tokens over %lld keys cannot be recorded", n_tokens,
                 static_cast<long long>(n_kv_all));
  if (tc16 || split) {  // keys split among blocks; the grid does not depend on the cache length
    KESTREL_ASSIGN_OR_RETURN(const int32_t* pos_dev, upload_ints(positions, n_tokens));
    KESTREL_ASSIGN_OR_RETURN(const MatmulInputOut also,
                             fused_matmul_input(static_cast<float*>(out.data), n_tokens, q_dim));
    const int splits =
        tc16 ? attention_tc16_count(p, sm_count_) : attention_split_count(p, sm_count_);
    KESTREL_ASSIGN_OR_RETURN(unsigned* arrivals, arrival_counters(H, kAttnArrivals));
    KESTREL_ASSIGN_OR_RETURN(void* partials,
                             scratch(kAttnSplit, attention_split_scratch_bytes(p, splits)));
    if (mode_ == Mode::Stage || lab_skips("attention")) return Status::ok();
    if (tc16)
      return launch_attention_tc16(static_cast<const float*>(q.data), n_tokens, pos_dev, k_cache,
                                   v_cache, p, splits, arrivals, partials,
                                   static_cast<float*>(out.data), also, stream_);
    return launch_attention_split(static_cast<const float*>(q.data), n_tokens, pos_dev, k_cache,
                                  v_cache, p, splits, arrivals, partials,
                                  static_cast<float*>(out.data), also, stream_);
  }
  if (rows) {
    KESTREL_ASSIGN_OR_RETURN(const int32_t* pos_dev, upload_ints(positions, n_tokens));
    // The output projection's input is written with the output (the GEMM path below leaves it
    // to the matmul).
    KESTREL_ASSIGN_OR_RETURN(const MatmulInputOut also,
                             fused_matmul_input(static_cast<float*>(out.data), n_tokens, q_dim));
    if (mode_ == Mode::Stage) return Status::ok();
    // A recorded launch must serve every later context length: room for all keys it may see,
    // which the cache's rows bound (the seed's -c 512: 43 KB of shared memory a block, not 163,
    // so that the output projection's blocks can start beside it; see matmul_stream16.cu).
    const int64_t keys = mode_ == Mode::Capture
                             ? std::min(kRowsMaxKeys, std::min(k_cache.rows, v_cache.rows))
                             : n_kv_all;
    return launch_attention_rows(static_cast<const float*>(q.data), n_tokens, keys, pos_dev,
                                 k_cache, v_cache, p, static_cast<float*>(out.data), also, stream_);
  }

  // The fused f32 kernel against the tensor-core GEMMs (H200, llama2-7b): with a q4_0 cache
  // 19,014 against 15,389 t/s at 327 tokens and 23,179 against 22,451 at 512; with an f16 cache
  // (one GEMM term, not three) 25,433 against 27,099 at 512 and 19,213 against 22,926 at 2048.
  // The fused tensor-core kernel (attention_mma.cu) against them (same call): with an f16 cache
  // pp2048 27,191 against 22,894 (cuBLAS), llama3-8b pp512 28,609 against 25,145.
  const bool quantized_cache = k_cache.type != DType::F16 || v_cache.type != DType::F16;
  const bool mma = mma_attention_ && flash_attention_ != 1 && mma_attention_fits(p, kv_dim) &&
                   (k_cache.type == DType::F16) == (v_cache.type == DType::F16);
  const bool flash = flash_attention_ == 1 ||
                     (flash_attention_ == -1 && quantized_cache && n_kv_all <= kFlashAutoMaxKeys);
  if (!mma && flash && flash_attention_fits(p)) {
    KESTREL_ASSIGN_OR_RETURN(const int32_t* pos_dev, upload_ints(positions, n_tokens));
    return launch_attention_flash(static_cast<const float*>(q.data), n_tokens, pos_dev, k_cache,
                                  v_cache, p, static_cast<float*>(out.data), stream_);
  }

  // K and V as f16 hi + lo parts (an f16 cache is exact in place: no lo part).
  const __half* kv_hi[2];
  const __half* kv_lo[2] = {nullptr, nullptr};
  const Tensor* caches[2] = {&k_cache, &v_cache};
  for (int i = 0; i < 2; ++i) {
    if (caches[i]->type == DType::F16) {
      kv_hi[i] = static_cast<const __half*>(caches[i]->data);
      continue;
    }
    const int64_t n = n_kv_all * kv_dim;
    KESTREL_ASSIGN_OR_RETURN(void* buf, scratch(i == 0 ? kK16 : kV16, 2 * sizeof(__half) * n));
    auto* hi = static_cast<__half*>(buf);
    KESTREL_TRY(launch_cache_to_f16(caches[i]->type, static_cast<const uint8_t*>(caches[i]->data),
                                    static_cast<int64_t>(caches[i]->row_bytes()), kv_dim, n_kv_all,
                                    hi, hi + n, stream_));
    kv_hi[i] = hi;
    kv_lo[i] = hi + n;
  }
  if (mma) {
    KESTREL_ASSIGN_OR_RETURN(const int32_t* pos_dev, upload_ints(positions, n_tokens));
    return launch_attention_mma(static_cast<const float*>(q.data), n_tokens, pos_dev, kv_hi[0],
                                kv_lo[0], kv_hi[1], kv_lo[1], kv_dim, p,
                                static_cast<float*>(out.data), stream_);
  }
  // Q as f16 hi + lo parts.
  const int64_t nq = int64_t{n_tokens} * q_dim;
  KESTREL_ASSIGN_OR_RETURN(void* q16v, scratch(kQ16, 2 * sizeof(__half) * nq));
  auto* q_hi = static_cast<__half*>(q16v);
  __half* q_lo = q_hi + nq;
  KESTREL_TRY(launch_split_f16(static_cast<const float*>(q.data), nq, q_hi, q_lo, stream_));
  KESTREL_ASSIGN_OR_RETURN(const int32_t* pos_dev, upload_ints(positions, n_tokens));

  // The lo parts matter where a perturbation is amplified: a quantized cache re-rounds the next
  // layer's K/V (a flipped q4_0 step moves a value by 1/8 of its block's range). With an f16
  // cache, Q and P rounded once to f16 stay within the bounds (one GEMM per product).
  const int terms = k_cache.type == DType::F16 && v_cache.type == DType::F16 ? 1 : 3;
  // Token rows in slices whose scores fit kScoreBytes.
  const int64_t per_row = int64_t{H} * n_kv_all * sizeof(float);
  const int slice = static_cast<int>(
      std::clamp<int64_t>(static_cast<int64_t>(kScoreBytes) / per_row, 1, n_tokens));
  KESTREL_ASSIGN_OR_RETURN(void* sv, scratch(kScores, per_row * slice));
  KESTREL_ASSIGN_OR_RETURN(void* pv, scratch(kProbs, per_row * slice));  // hi + lo halves
  auto* scores = static_cast<float*>(sv);
  auto* p_hi = static_cast<__half*>(pv);
  __half* p_lo = p_hi + per_row / 4 * slice;
  const float one = 1.0f;
  for (int t0 = 0; t0 < n_tokens; t0 += slice) {
    const int nt = std::min(slice, n_tokens - t0);
    int64_t n_kv = 0;
    for (int t = t0; t < t0 + nt; ++t) n_kv = std::max<int64_t>(n_kv, positions[t] + 1);
    // scores[h][t][k] = scale * q[t][h] . k[k][h / group], batched over KV heads, one call per
    // query head within the group and per product of parts (hi.hi, lo.hi, hi.lo).
    const __half* q_parts[3] = {q_hi, q_lo, q_hi};
    const __half* k_parts[3] = {kv_hi[0], kv_hi[0], kv_lo[0]};
    for (int term = 0; term < terms && k_parts[term]; ++term) {
      const float beta = term == 0 ? 0.0f : 1.0f;
      for (int j = 0; j < group; ++j) {
        cublasStatus_t st = cublasGemmStridedBatchedEx(
            cublas_, CUBLAS_OP_T, CUBLAS_OP_N, n_kv, nt, D, &p.scale, k_parts[term], CUDA_R_16F,
            kv_dim, D, q_parts[term] + t0 * q_dim + j * D, CUDA_R_16F, q_dim, int64_t{group} * D,
            &beta, scores + int64_t{j} * nt * n_kv, CUDA_R_32F, n_kv, int64_t{group} * nt * n_kv,
            Hkv, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        if (st != CUBLAS_STATUS_SUCCESS)
          return error("attention: cuBLAS Q.K GEMM failed (status %d)", st);
      }
    }
    KESTREL_TRY(launch_softmax_causal(scores, H, nt, n_kv, pos_dev + t0, p_hi, p_lo, stream_));
    // out[t][h] = sum_k p[h][t][k] v[k][h / group], by parts as above.
    const __half* p_parts[3] = {p_hi, p_lo, p_hi};
    const __half* v_parts[3] = {kv_hi[1], kv_hi[1], kv_lo[1]};
    for (int term = 0; term < terms && v_parts[term]; ++term) {
      const float beta = term == 0 ? 0.0f : 1.0f;
      for (int j = 0; j < group; ++j) {
        cublasStatus_t st = cublasGemmStridedBatchedEx(
            cublas_, CUBLAS_OP_N, CUBLAS_OP_N, D, nt, n_kv, &one, v_parts[term], CUDA_R_16F, kv_dim,
            D, p_parts[term] + int64_t{j} * nt * n_kv, CUDA_R_16F, n_kv, int64_t{group} * nt * n_kv,
            &beta, static_cast<float*>(out.data) + t0 * q_dim + j * D, CUDA_R_32F, q_dim,
            int64_t{group} * D, Hkv, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        if (st != CUBLAS_STATUS_SUCCESS)
          return error("attention: cuBLAS P.V GEMM failed (status %d)", st);
      }
    }
  }
  return Status::ok();
}

}  // namespace kestrel::backend::cuda
