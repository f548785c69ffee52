// A layer's Q, K and V projections with RoPE and the KV store in the launch's epilogue
// (Backend::matmul_rope_kv_store), for the 5-16-token micro-batches on stream16
// (matmul_stream16.cu): the blocks that sum a slice of the cluster's results rotate the Q and K
// rows of it and quantize the K and V rows into the caches (stream16_device.cuh,
// store_sum4_rope), so the rope+kv_store launch that followed is gone.
//
// Why: with the launch's programmatic start and tail, the separate op cost ~9.5 us a layer of a
// seed micro-batch (H100, twenty-fourth session: the seed's b128 ub16 with it skipped, 4,400 ->
// 4,567 t/s) for ~0.4 MB of work. The epilogue's share: per float4 of results two angles (double
// reduction and sincosf) and, for K and V, a warp's quantization of four cache blocks.
//
// Where it does not fit (other weight types or token counts, the NeoX layout, head sizes that are
// not a multiple of 32, a plan whose cluster does not sum by push in whole slices), the two ops.
//
// Measured (thirtieth session): bit for bit the two ops (GpuOpsFusedRope), e2e 175/175, but
// slower: the seed's b128 ub16 4,374 / 4,228 t/s against 4,640 / 4,551 (H100), 4,421 / 4,406
// against 4,747 / 4,693 (H200, the epilogue's quantization by 8-lane groups). Likely cause: in a
// recorded micro-batch the positions' upload is a memcpy node, which this op puts before the
// Q/K/V launch, so that launch loses its early start. Wrong: with the positions copied once a
// pass (thirty-first session, now the default) it is slower still, 4,036-4,195 t/s against
// 4,894-5,015 (H100): the epilogue itself costs. Opt-in: KESTREL_CUDA_MATMUL_ROPE_KV=1.
#include <algorithm>

#include "backend/cuda/cuda_backend_impl.cuh"

namespace kestrel::backend::cuda {

using quant::DType;

bool CudaBackend::fuses_matmul_rope_kv_store(const Weight& wq, int n_tokens, const Tensor& k_cache,
                                             const Tensor& v_cache) const {
  const auto& w = static_cast<const CudaWeight&>(wq);
  const DType t = k_cache.type;
  return matmul_rope_kv_ && stream16_ && fused_rope_kv_ && w.type == DType::Q4_0 &&
         matmul_path(w.type, w.n_in, n_tokens) == MatmulPath::kFrag && v_cache.type == t &&
         (t == DType::F16 || t == DType::Q8_0 || t == DType::Q4_0);
}

bool CudaBackend::rope_epilogue_fits(const Tensor& x, int n_tokens, const MatmulOut* qkv,
                                     const RopeParams& pq, const RopeParams& pk,
                                     const Tensor& k_cache, const Tensor& v_cache) const {
  const int D = pq.head_dim;
  const Tensor &q = *qkv[0].out, &k = *qkv[1].out, &v = *qkv[2].out;
  if (!group_matmuls_ || pk.head_dim != D || pk.freq_base != pq.freq_base ||
      pq.layout != RopeLayout::Normal || pk.layout != RopeLayout::Normal || D % 32 != 0 ||
      D > 2 * kRopeMaxPairs || q.cols != int64_t{pq.n_heads} * D ||
      k.cols != int64_t{pk.n_heads} * D || v.cols != k.cols || k_cache.cols != k.cols ||
      v_cache.cols != v.cols || k_cache.row_bytes() != v_cache.row_bytes() || n_tokens <= 0 ||
      n_tokens > q.rows || n_tokens > k.rows || n_tokens > v.rows)
    return false;
  MatvecPart parts[3];
  for (int i = 0; i < 3; ++i) {
    const auto& w = static_cast<const CudaWeight&>(*qkv[i].w);
    // Whole 64-row groups a part (its rows and cache blocks never shared with the next part).
    if (w.type != DType::Q4_0 || w.n_in != x.cols || w.n_out % 64 != 0 ||
        qkv[i].out->data == x.data)
      return false;
    parts[i] = {&w, static_cast<float*>(qkv[i].out->data),
                qkv[i].bias ? static_cast<const float*>(qkv[i].bias->data) : nullptr};
  }
  return stream16_takes_rope(stream16_plan(parts, 3, n_tokens, sm_count_, smem_optin_));
}

Status CudaBackend::matmul_rope_kv_store(const Tensor& x, int n_tokens, const MatmulOut* qkv,
                                         const int32_t* positions, const RopeParams& pq,
                                         const RopeParams& pk, Tensor& k_cache, Tensor& v_cache) {
  if (!fuses_matmul_rope_kv_store(*qkv[0].w, n_tokens, k_cache, v_cache) ||
      !rope_epilogue_fits(x, n_tokens, qkv, pq, pk, k_cache, v_cache))
    return Backend::matmul_rope_kv_store(x, n_tokens, qkv, positions, pq, pk, k_cache, v_cache);
  KESTREL_TRY(check_cache_positions(positions, n_tokens, std::min(k_cache.rows, v_cache.rows)));
  Stream16Rope rope;
  KESTREL_ASSIGN_OR_RETURN(rope.pos, upload_ints(positions, n_tokens));
  rope.k_cache = static_cast<uint8_t*>(k_cache.data);
  rope.v_cache = static_cast<uint8_t*>(v_cache.data);
  rope.row_bytes = static_cast<int64_t>(k_cache.row_bytes());
  rope.head_dim = pq.head_dim;
  rope.cache_type = static_cast<int>(k_cache.type);
  rope.table = rope_table(pq.freq_base, pq.head_dim);
  KESTREL_TRY(matmul_group_launch(x, n_tokens, qkv, 3, &rope));
  forget_activations();  // (as rope_kv_store: q and k changed after the launch wrote them)
  return Status::ok();
}

}  // namespace kestrel::backend::cuda
