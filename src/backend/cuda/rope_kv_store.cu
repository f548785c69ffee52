// RoPE of Q and K and the KV store of the rotated K and V, in one launch: a few-token pass ran
// them as two (~2-3 us each at 1-16 tokens, ncu on an H200, most of it ramp and tail), and a
// prompt chunk wrote the rotated K to memory only to read it back for the store.
// KESTREL_CUDA_NO_FUSED_ROPE_KV=1: the two ops apart (rope_qk, then kv_store).
#include <algorithm>

#include "backend/cuda/cuda_backend_impl.cuh"
#include "backend/cuda/kv_store_device.cuh"
#include "backend/cuda/rope_device.cuh"

namespace kestrel::backend::cuda {

using quant::DType;

namespace {

// A block per (token, head) and a thread per element (head_dim threads: whole warps, each one
// quant block of the cache row). blockIdx.y: Q heads [0, n_head) are rotated in place; K heads
// [n_head, n_head + n_head_kv) are rotated in place and stored; V heads after them are stored.
// The angles and products are the rope kernel's (rope_device.cuh), the quantization the KV
// store's (kv_store_device.cuh).
template <DType CT>
__global__ void rope_kv_store_kernel(float* q, int n_head, float* k, const float* v, int n_head_kv,
                                     const int32_t* pos, int head_dim, RopeTable table, bool neox,
                                     uint8_t* k_cache, uint8_t* v_cache, int64_t row_bytes) {
  grid_dependency_wait();  // (chained_launches: started before the kernel before ended)
  const int t = blockIdx.x, y = blockIdx.y, e = threadIdx.x;
  const int p = pos[t];
  const int64_t kv_dim = int64_t{n_head_kv} * head_dim;
  const bool is_q = y < n_head, is_k = !is_q && y < n_head + n_head_kv;
  int h = 0;
  float x = 0.0f;
  if (is_q || is_k) {  // uniform across the block
    h = is_q ? y : y - n_head;
    float* head =
        (is_q ? q + int64_t{t} * n_head * head_dim : k + t * kv_dim) + int64_t{h} * head_dim;
    const int half = head_dim / 2;
    const int i = neox ? e % half : e / 2;  // the pair of element e
    const int i0 = neox ? i : 2 * i, i1 = neox ? i + half : 2 * i + 1;
    float sn, cn;
    rope_sincos(p, table.inv_freq[i], sn, cn);
    const float a = head[i0], b = head[i1];
    x = rope_rotate(a, b, sn, cn, e == i0);
    __syncthreads();  // every pair is read before any element is written back
    head[e] = x;
    if (is_q) return;
  } else {
    h = y - n_head - n_head_kv;
    x = v[t * kv_dim + int64_t{h} * head_dim + e];
  }
  uint8_t* row = (is_k ? k_cache : v_cache) + int64_t{p} * row_bytes;
  const int64_t col = int64_t{h} * head_dim + e;
  if constexpr (CT == DType::F16)
    reinterpret_cast<__half*>(row)[col] = __float2half_rn(x);
  else
    store_kv_block<CT>(x, e % 32, row, col / 32);
}

// Prompt chunks: a block per (token, run of heads) and a thread per rotated pair, the pair's
// sine and cosine computed once per block into shared memory. The kernel above, at 512 tokens
// and 96 heads (llama2-7b), ran 49,152 blocks of 128 threads that each formed their angle in
// double: 46 us a layer (--profile, H200) for ~40 MB of traffic (~10 us at full bandwidth).
// Head sizes 64 and 128: a multiple of 64, so that a warp's 32 pairs lie in one head and cover
// whole quant blocks of the K row. NeoX: elements i and i + D/2 of 32 pairs are two blocks; the
// normal layout's pairs (2i, 2i + 1) of 32 pairs are two blocks, regrouped by shuffles so that
// lane j holds element j as store_kv_block wants.
constexpr int kRowsThreads = 256;
template <DType CT, int D, bool kNeox>
__global__ void __launch_bounds__(kRowsThreads)
    rope_kv_store_rows_kernel(float* q, int n_head, float* k, const float* v, int n_head_kv,
                              const int32_t* pos, RopeTable table, uint8_t* k_cache,
                              uint8_t* v_cache, int64_t row_bytes, int heads_per_block) {
  grid_dependency_wait();  // (chained_launches: started before the kernel before ended)
  constexpr int kHalf = D / 2;
  __shared__ float sin_s[kHalf], cos_s[kHalf];
  const int t = blockIdx.x, p = pos[t], lane = threadIdx.x % 32;
  for (int i = threadIdx.x; i < kHalf; i += blockDim.x)
    rope_sincos(p, table.inv_freq[i], sin_s[i], cos_s[i]);
  __syncthreads();
  const int64_t kv_dim = int64_t{n_head_kv} * D;
  const int n_rot = n_head + n_head_kv, n_slots = n_rot + n_head_kv;
  const int s0 = blockIdx.y * heads_per_block, s1 = min(s0 + heads_per_block, n_slots);
  uint8_t* k_row = k_cache + int64_t{p} * row_bytes;
  // Q and K heads of the block: pair j of the run (warp-uniform head: kHalf % 32 == 0).
  const int rot_end = min(s1, n_rot);
#pragma unroll 4
  for (int j = threadIdx.x; j < (rot_end - s0) * kHalf; j += blockDim.x) {
    const int slot = s0 + j / kHalf, i = j % kHalf;
    const bool is_q = slot < n_head;
    const int h = is_q ? slot : slot - n_head;
    float* head = (is_q ? q + int64_t{t} * n_head * D : k + t * kv_dim) + int64_t{h} * D;
    const int i0 = kNeox ? i : 2 * i, i1 = kNeox ? i + kHalf : 2 * i + 1;
    float a, b;
    if constexpr (kNeox) {
      a = head[i0], b = head[i1];
    } else {  // the pair is adjacent: one 8-byte load
      const float2 ab = *reinterpret_cast<const float2*>(head + i0);
      a = ab.x, b = ab.y;
    }
    const float x0 = rope_rotate(a, b, sin_s[i], cos_s[i], true);
    const float x1 = rope_rotate(a, b, sin_s[i], cos_s[i], false);
    if constexpr (kNeox) {
      head[i0] = x0;
      head[i1] = x1;
    } else {
      *reinterpret_cast<float2*>(head + i0) = make_float2(x0, x1);
    }
    if (is_q) continue;
    const int64_t col0 = int64_t{h} * D;
    if constexpr (CT == DType::F16) {
      if constexpr (kNeox) {
        reinterpret_cast<__half*>(k_row)[col0 + i0] = __float2half_rn(x0);
        reinterpret_cast<__half*>(k_row)[col0 + i1] = __float2half_rn(x1);
      } else {
        *reinterpret_cast<__half2*>(reinterpret_cast<__half*>(k_row) + col0 + i0) =
            __floats2half2_rn(x0, x1);
      }
    } else if constexpr (kNeox) {  // lanes hold elements i (one block) and i + kHalf (another)
      store_kv_block<CT>(x0, lane, k_row, (col0 + i - lane) / 32);
      store_kv_block<CT>(x1, lane, k_row, (col0 + i - lane + kHalf) / 32);
    } else {  // lanes hold elements 2i, 2i + 1 of 64: block one is lanes 0-15's, two 16-31's
      const int from = lane / 2;
      const float lo0 = __shfl_sync(0xffffffffu, x0, from),
                  lo1 = __shfl_sync(0xffffffffu, x1, from);
      const float hi0 = __shfl_sync(0xffffffffu, x0, 16 + from);
      const float hi1 = __shfl_sync(0xffffffffu, x1, 16 + from);
      const int64_t b0 = (col0 + 2 * (i - lane)) / 32;
      store_kv_block<CT>(lane % 2 ? lo1 : lo0, lane, k_row, b0);
      store_kv_block<CT>(lane % 2 ? hi1 : hi0, lane, k_row, b0 + 1);
    }
  }
  // V heads: a thread per element.
  const int v0 = max(s0, n_rot);
  uint8_t* v_row = v_cache + int64_t{p} * row_bytes;
#pragma unroll 4
  for (int j = threadIdx.x; j < (s1 - v0) * D; j += blockDim.x) {
    const int64_t col = int64_t{v0 - n_rot} * D + j;
    const float x = v[t * kv_dim + col];
    if constexpr (CT == DType::F16)
      reinterpret_cast<__half*>(v_row)[col] = __float2half_rn(x);
    else
      store_kv_block<CT>(x, lane, v_row, col / 32);
  }
}

template <DType CT, int D, bool kNeox>
void launch_rows(dim3 grid, float* q, int n_head, float* k, const float* v, int n_head_kv,
                 const int32_t* pos, const RopeTable& table, uint8_t* kc, uint8_t* vc, int64_t rb,
                 int heads, cudaStream_t s) {
  // (An error is left for LAUNCH_CHECK, as a <<<>>> launch leaves it.)
  (void)launch_dependent(chained_launches(), rope_kv_store_rows_kernel<CT, D, kNeox>, grid,
                         dim3(kRowsThreads), s, q, n_head, k, v, n_head_kv, pos, table, kc, vc, rb,
                         heads);
}

// Whether the rows kernel has an instance for this head size.
bool rows_fit(int head_dim) {
  return head_dim == 64 || head_dim == 128;
}

template <DType CT>
void launch_rope_kv_store(bool rows, int n_tokens, int n_head, int n_head_kv, int D, float* q,
                          float* k, const float* v, const int32_t* pos, const RopeTable& table,
                          bool neox, uint8_t* kc, uint8_t* vc, int64_t rb, cudaStream_t s) {
  const int n_slots = n_head + 2 * n_head_kv;
  if (!rows) {
    (void)launch_dependent(chained_launches(), rope_kv_store_kernel<CT>, dim3(n_tokens, n_slots),
                           dim3(D), s, q, n_head, k, v, n_head_kv, pos, D, table, neox, kc, vc, rb);
    return;
  }
  // Enough blocks for ~4 per SM of an H100 when the tokens alone are fewer.
  const int runs = std::clamp(ceil_div(528, n_tokens), 1, n_slots);
  const int heads = ceil_div(n_slots, runs);
  const dim3 grid(n_tokens, ceil_div(n_slots, heads));
  if (D == 64)
    (neox ? launch_rows<CT, 64, true> : launch_rows<CT, 64, false>)(grid, q, n_head, k, v,
                                                                    n_head_kv, pos, table, kc, vc,
                                                                    rb, heads, s);
  else
    (neox ? launch_rows<CT, 128, true> : launch_rows<CT, 128, false>)(grid, q, n_head, k, v,
                                                                      n_head_kv, pos, table, kc, vc,
                                                                      rb, heads, s);
}

}  // namespace

bool CudaBackend::fuses_rope_kv_store(const Tensor& k_cache, const Tensor& v_cache) const {
  const DType t = k_cache.type;
  return fused_rope_kv_ && v_cache.type == t &&
         (t == DType::F16 || t == DType::Q8_0 || t == DType::Q4_0);
}

Status CudaBackend::rope_kv_store(Tensor& q, Tensor& k, const Tensor& v, int n_tokens,
                                  const int32_t* positions, const RopeParams& pq,
                                  const RopeParams& pk, Tensor& k_cache, Tensor& v_cache) {
  const int D = pq.head_dim;
  const bool fits = fuses_rope_kv_store(k_cache, v_cache) && pk.head_dim == D &&
                    pk.freq_base == pq.freq_base && pk.layout == pq.layout && D % 32 == 0 &&
                    D <= 2 * kRopeMaxPairs && q.cols == int64_t{pq.n_heads} * D &&
                    k.cols == int64_t{pk.n_heads} * D && v.cols == k.cols &&
                    k_cache.cols == k.cols && v_cache.cols == v.cols &&
                    k_cache.row_bytes() == v_cache.row_bytes() && n_tokens <= q.rows &&
                    n_tokens <= k.rows && n_tokens <= v.rows;
  // Anything else (and its errors) as the two ops.
  if (!fits) return Backend::rope_kv_store(q, k, v, n_tokens, positions, pq, pk, k_cache, v_cache);
  forget_activations();
  if (n_tokens <= 0) return Status::ok();
  KESTREL_TRY(check_cache_positions(positions, n_tokens, std::min(k_cache.rows, v_cache.rows)));
  KESTREL_ASSIGN_OR_RETURN(const int32_t* pos, upload_ints(positions, n_tokens));
  if (mode_ == Mode::Stage || lab_skips("rope")) return Status::ok();
  // More than 16 tokens (prompt chunks) on the rows kernel; decode and the seed's micro-batches
  // keep the block per (token, head), measured faster there.
  const bool rows = n_tokens > 16 && rows_fit(D) && rows_rope_kv_;
  const RopeTable& table = rope_table(pq.freq_base, D);
  const bool neox = pq.layout == RopeLayout::NeoX;
  auto* qd = static_cast<float*>(q.data);
  auto* kd = static_cast<float*>(k.data);
  const auto* vd = static_cast<const float*>(v.data);
  auto* kc = static_cast<uint8_t*>(k_cache.data);
  auto* vc = static_cast<uint8_t*>(v_cache.data);
  const auto rb = static_cast<int64_t>(k_cache.row_bytes());
  const int nh = pq.n_heads, nkv = pk.n_heads;
  switch (k_cache.type) {
    case DType::F16:
      launch_rope_kv_store<DType::F16>(rows, n_tokens, nh, nkv, D, qd, kd, vd, pos, table, neox, kc,
                                       vc, rb, stream_);
      break;
    case DType::Q8_0:
      launch_rope_kv_store<DType::Q8_0>(rows, n_tokens, nh, nkv, D, qd, kd, vd, pos, table, neox,
                                        kc, vc, rb, stream_);
      break;
    default:
      launch_rope_kv_store<DType::Q4_0>(rows, n_tokens, nh, nkv, D, qd, kd, vd, pos, table, neox,
                                        kc, vc, rb, stream_);
      break;
  }
  LAUNCH_CHECK("rope+kv_store");
  return Status::ok();
}

}  // namespace kestrel::backend::cuda
