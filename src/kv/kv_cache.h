// The KV cache: for every layer a K and a V matrix [n_ctx][kv_dim] on the layer's backend,
// in f16, q8_0 or q4_0 (quantized when written, by the backend's kv_store).
#pragma once

#include <vector>

#include "backend/backend.h"
#include "model/model.h"

namespace kestrel::kv {

class KvCache {
 public:
  static Expected<std::unique_ptr<KvCache>> create(const model::Model& model, int n_ctx,
                                                   quant::DType type_k, quant::DType type_v);
  ~KvCache();
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;

  int n_ctx() const { return n_ctx_; }
  quant::DType type_k() const { return type_k_; }
  quant::DType type_v() const { return type_v_; }
  backend::Tensor& k(int layer) { return k_[layer]; }
  backend::Tensor& v(int layer) { return v_[layer]; }
  size_t bytes() const;

 private:
  static Status check_fits(const model::Model& model, int n_ctx, quant::DType type_k,
                           quant::DType type_v);
  KvCache() = default;
  int n_ctx_ = 0;
  quant::DType type_k_ = quant::DType::F16;
  quant::DType type_v_ = quant::DType::F16;
  std::vector<backend::Tensor> k_, v_;
};

}  // namespace kestrel::kv
