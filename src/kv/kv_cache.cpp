#include "kv/kv_cache.h"

#include "format/quant/quant.h"

namespace kestrel::kv {

// Checks, before anything is allocated, that each backend has the memory for its layers'
// share of the cache; the message gives the numbers and the ways out.
Status KvCache::check_fits(const model::Model& model, int n_ctx, quant::DType type_k,
                           quant::DType type_v) {
  const auto& c = model.config();
  const double row = static_cast<double>(quant::row_bytes(type_k, c.kv_dim()) +
                                         quant::row_bytes(type_v, c.kv_dim()));
  for (backend::Backend* be : model.backends()) {
    int n_layers = 0;
    for (int i = 0; i < c.n_layer; ++i) n_layers += model.layer(i).backend == be;
    const double needed = row * n_ctx * n_layers;
    const int64_t free = be->available_memory();
    if (free >= 0 && needed > static_cast<double>(free))
      return error(
          "the KV cache for a context of %d tokens needs %.2f GiB on %s, but only "
          "%.2f GiB is free: lower -c, or store the cache quantized (-ctk q8_0 -ctv "
          "q8_0 halves it, q4_0 quarters it)",
          n_ctx, needed / 1073741824.0, be->name(), free / 1073741824.0);
  }
  return Status::ok();
}

Expected<std::unique_ptr<KvCache>> KvCache::create(const model::Model& model, int n_ctx,
                                                   quant::DType type_k, quant::DType type_v) {
  const auto& c = model.config();
  for (quant::DType t : {type_k, type_v}) {
    if (!quant::is_kv_type(t))
      return error("KV cache type %s is not supported: use f16, q8_0 or q4_0", quant::type_name(t));
    if (quant::row_bytes(t, c.kv_dim()) < 0)
      return error(
          "KV cache type %s needs rows of a multiple of 32 values, but this model's "
          "K/V rows have %d: use -ctk f16 -ctv f16",
          quant::type_name(t), c.kv_dim());
  }
  if (n_ctx <= 0) return error("context size %d must be positive", n_ctx);
  KESTREL_TRY(check_fits(model, n_ctx, type_k, type_v));
  std::unique_ptr<KvCache> kv(new KvCache());
  kv->n_ctx_ = n_ctx;
  kv->type_k_ = type_k;
  kv->type_v_ = type_v;
  for (int i = 0; i < c.n_layer; ++i) {
    backend::Backend* be = model.layer(i).backend;
    const std::string name = "KV cache of layer " + std::to_string(i);
    KESTREL_ASSIGN_OR_RETURN(auto k, be->alloc(type_k, n_ctx, c.kv_dim(), name.c_str()));
    kv->k_.push_back(k);
    KESTREL_ASSIGN_OR_RETURN(auto v, be->alloc(type_v, n_ctx, c.kv_dim(), name.c_str()));
    kv->v_.push_back(v);
  }
  return kv;
}

KvCache::~KvCache() {
  for (auto& t : k_) t.owner->free(t);
  for (auto& t : v_) t.owner->free(t);
}

size_t KvCache::bytes() const {
  size_t total = 0;
  for (const auto& t : k_) total += t.bytes;
  for (const auto& t : v_) total += t.bytes;
  return total;
}

}  // namespace kestrel::kv
