#include "backend/backend.h"

#include <chrono>

namespace kestrel::backend {

Status Backend::add_rms_norm(Tensor& x, const Tensor& y, int n_tokens, const Tensor& weight,
                             float eps, Tensor& out) {
  KESTREL_TRY(add(x, y, n_tokens));
  return rms_norm(x, n_tokens, weight, eps, out);
}

Status Backend::rope_qk(Tensor& q, Tensor& k, int n_tokens, const int32_t* positions,
                        const RopeParams& pq, const RopeParams& pk) {
  KESTREL_TRY(rope(q, n_tokens, positions, pq));
  return rope(k, n_tokens, positions, pk);
}

Status Backend::rope_kv_store(Tensor& q, Tensor& k, const Tensor& v, int n_tokens,
                              const int32_t* positions, const RopeParams& pq, const RopeParams& pk,
                              Tensor& k_cache, Tensor& v_cache) {
  KESTREL_TRY(rope_qk(q, k, n_tokens, positions, pq, pk));
  return kv_store(k, v, n_tokens, positions, k_cache, v_cache);
}

Status Backend::matmul_group(const Tensor& x, int n_tokens, const MatmulOut* outs, int n_outs) {
  for (int i = 0; i < n_outs; ++i)
    KESTREL_TRY(matmul(*outs[i].w, x, n_tokens, *outs[i].out, outs[i].bias));
  return Status::ok();
}

Status Backend::profile_op(std::string_view kind, OpProfiler& profiler,
                           const std::function<Status()>& op) {
  KESTREL_TRY(synchronize());  // earlier work must not be charged to this op
  const auto t0 = std::chrono::steady_clock::now();
  Status st = op();
  if (st) st = synchronize();
  profiler.add(
      kind,
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  return st;
}

}  // namespace kestrel::backend
