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

Status Backend::matmul_rope_kv_store(const Tensor& x, int n_tokens, const MatmulOut* qkv,
                                     const int32_t* positions, const RopeParams& pq,
                                     const RopeParams& pk, Tensor& k_cache, Tensor& v_cache) {
  KESTREL_TRY(matmul_group(x, n_tokens, qkv, 3));
  return rope_kv_store(*qkv[0].out, *qkv[1].out, *qkv[2].out, n_tokens, positions, pq, pk, k_cache,
                       v_cache);
}

Status Backend::rope_kv_attention(Tensor& q, Tensor& k, const Tensor& v, int n_tokens,
                                  const int32_t* positions, const RopeParams& pq,
                                  const RopeParams& pk, Tensor& k_cache, Tensor& v_cache,
                                  const AttentionParams& p, Tensor& out) {
  KESTREL_TRY(rope_kv_store(q, k, v, n_tokens, positions, pq, pk, k_cache, v_cache));
  return attention(q, n_tokens, positions, k_cache, v_cache, p, out);
}

Status Backend::swiglu_matmul(Tensor& gate, const Tensor& up, int n_tokens, const Weight& w,
                              Tensor& out) {
  KESTREL_TRY(swiglu(gate, up, n_tokens, gate));
  return matmul(w, gate, n_tokens, out, nullptr);
}

Status Backend::matmul_swiglu(const Tensor& x, int n_tokens, const Weight& w_gate,
                              const Weight& w_up, Tensor& gate, Tensor& up) {
  const MatmulOut outs[] = {{&w_gate, &gate, nullptr}, {&w_up, &up, nullptr}};
  KESTREL_TRY(matmul_group(x, n_tokens, outs, 2));
  return swiglu(gate, up, n_tokens, gate);
}

Status Backend::matmul_add_rms_norm(const Weight& w, const Tensor& in, int n_tokens, Tensor& proj,
                                    Tensor& x, const Tensor& weight, float eps, Tensor& out) {
  KESTREL_TRY(matmul(w, in, n_tokens, proj, nullptr));
  return add_rms_norm(x, proj, n_tokens, weight, eps, out);
}

Status Backend::matmul_group(const Tensor& x, int n_tokens, const MatmulOut* outs, int n_outs) {
  for (int i = 0; i < n_outs; ++i)
    KESTREL_TRY(matmul(*outs[i].w, x, n_tokens, *outs[i].out, outs[i].bias));
  return Status::ok();
}

namespace {

// matmul_group when the weights share a type (as the forward pass groups them), else one matmul
// each.
Status group_or_each(Backend& be, const Tensor& x, const MatmulOut* outs, int n) {
  for (int i = 1; i < n; ++i)
    if (outs[i].w->type != outs[0].w->type) {
      for (int j = 0; j < n; ++j)
        KESTREL_TRY(be.matmul(*outs[j].w, x, 1, *outs[j].out, outs[j].bias));
      return Status::ok();
    }
  return be.matmul_group(x, 1, outs, n);
}

}  // namespace

Status Backend::decode_layer(const DecodeLayer& d) {
  const int32_t pos[1] = {d.pos};
  if (d.pending_add)
    KESTREL_TRY(add_rms_norm(*d.x, *d.proj, 1, *d.attn_norm, d.rms_eps, *d.h));
  else
    KESTREL_TRY(rms_norm(*d.x, 1, *d.attn_norm, d.rms_eps, *d.h));
  const MatmulOut qkv[] = {{d.wq, d.q, d.bq}, {d.wk, d.k, d.bk}, {d.wv, d.v, d.bv}};
  KESTREL_TRY(group_or_each(*this, *d.h, qkv, 3));
  KESTREL_TRY(rope_kv_store(*d.q, *d.k, *d.v, 1, pos, d.rope_q, d.rope_k, *d.k_cache, *d.v_cache));
  KESTREL_TRY(attention(*d.q, 1, pos, *d.k_cache, *d.v_cache, d.attn, *d.att));
  KESTREL_TRY(matmul(*d.wo, *d.att, 1, *d.proj, nullptr));
  KESTREL_TRY(add_rms_norm(*d.x, *d.proj, 1, *d.ffn_norm, d.rms_eps, *d.h));
  const MatmulOut gate_up[] = {{d.w_gate, d.gate, nullptr}, {d.w_up, d.up, nullptr}};
  KESTREL_TRY(group_or_each(*this, *d.h, gate_up, 2));
  KESTREL_TRY(swiglu(*d.gate, *d.up, 1, *d.gate));
  KESTREL_TRY(matmul(*d.w_down, *d.gate, 1, *d.proj, nullptr));
  return add(*d.x, *d.proj, 1);
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
