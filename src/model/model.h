// A llama-family model placed on backends: config, the GGUF mapping, and per-layer weights
// prepared by the backend that runs the layer.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "format/gguf.h"
#include "model/config.h"

namespace kestrel::model {

struct LayerWeights {
  backend::Backend* backend = nullptr;      // where this layer runs
  backend::Tensor attn_norm;                // [E]
  backend::Tensor ffn_norm;                 // [E]
  backend::Tensor bq, bk, bv;               // [q_dim], [kv_dim], [kv_dim] (qwen2 only)
  std::unique_ptr<backend::Weight> wq;      // [q_dim][E]
  std::unique_ptr<backend::Weight> wk;      // [kv_dim][E]
  std::unique_ptr<backend::Weight> wv;      // [kv_dim][E]
  std::unique_ptr<backend::Weight> wo;      // [E][q_dim]
  std::unique_ptr<backend::Weight> w_gate;  // [F][E]
  std::unique_ptr<backend::Weight> w_up;    // [F][E]
  std::unique_ptr<backend::Weight> w_down;  // [E][F]
};

struct LoadParams {
  int n_threads = 0;            // 0: all cores
  std::string backend = "cpu";  // where -ngl layers go (backend/registry.h lists them)
  int n_gpu_layers = 0;         // llama.cpp's -ngl: the last N layers, N > n_layer adds the head
};

class Model {
 public:
  static Expected<std::unique_ptr<Model>> load(const std::string& path, const LoadParams& params);
  ~Model();

  const Config& config() const { return config_; }
  const gguf::File& file() const { return *file_; }
  const backend::HostMatrix& token_embd() const { return token_embd_; }  // [V][E], on the host
  const LayerWeights& layer(int i) const { return layers_[i]; }
  backend::Backend* input_backend() const { return layers_.front().backend; }
  backend::Backend* head_backend() const { return head_backend_; }
  const backend::Tensor& output_norm() const { return output_norm_; }  // [E]
  const backend::Weight& output() const { return *output_; }           // [V][E]
  int n_threads() const { return n_threads_; }
  int n_gpu_layers() const {
    return n_gpu_layers_;
  }  // layers actually placed off the CPU  // CPU threads, after resolving 0 = all cores
  std::vector<backend::Backend*> backends() const;

 private:
  Model() = default;
  Status load_layers();

  Config config_;
  std::unique_ptr<gguf::File> file_;
  std::vector<std::unique_ptr<backend::Backend>> owned_backends_;
  std::vector<LayerWeights> layers_;
  backend::HostMatrix token_embd_;
  backend::Backend* head_backend_ = nullptr;
  int n_threads_ = 1;
  int n_gpu_layers_ = 0;
  backend::Tensor output_norm_;
  std::unique_ptr<backend::Weight> output_;
};

}  // namespace kestrel::model
