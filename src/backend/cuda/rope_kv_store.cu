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
  if (mode_ == Mode::Stage) return Status::ok();
  const dim3 grid(n_tokens, pq.n_heads + 2 * pk.n_heads);
  const RopeTable& table = rope_table(pq.freq_base, D);
  const bool neox = pq.layout == RopeLayout::NeoX;
  auto* qd = static_cast<float*>(q.data);
  auto* kd = static_cast<float*>(k.data);
  const auto* vd = static_cast<const float*>(v.data);
  auto* kc = static_cast<uint8_t*>(k_cache.data);
  auto* vc = static_cast<uint8_t*>(v_cache.data);
  const auto rb = static_cast<int64_t>(k_cache.row_bytes());
  switch (k_cache.type) {
    case DType::F16:
      rope_kv_store_kernel<DType::F16><<<grid, D, 0, stream_>>>(qd, pq.n_heads, kd, vd, pk.n_heads,
                                                                pos, D, table, neox, kc, vc, rb);
      break;
    case DType::Q8_0:
      rope_kv_store_kernel<DType::Q8_0><<<grid, D, 0, stream_>>>(qd, pq.n_heads, kd, vd, pk.n_heads,
                                                                 pos, D, table, neox, kc, vc, rb);
      break;
    default:
      rope_kv_store_kernel<DType::Q4_0><<<grid, D, 0, stream_>>>(qd, pq.n_heads, kd, vd, pk.n_heads,
                                                                 pos, D, table, neox, kc, vc, rb);
      break;
  }
  LAUNCH_CHECK("rope+kv_store");
  return Status::ok();
}

}  // namespace kestrel::backend::cuda
