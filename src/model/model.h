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
  int n_threads = 0;  // 0: all cores
  // Where -ngl layers go (backend/registry.h lists them). "auto": the first GPU backend with a
  // usable device, else the CPU (Model::placement_note says why).
  std::string backend = "auto";
  // llama.cpp's -ngl: the last N layers, N > n_layer adds the head. -1: all layers and the head
  // when a GPU backend is used, none on the CPU.
  int n_gpu_layers = -1;
  // Which device of the GPU backend (--cl-device), and for OpenCL which platform (--cl-platform;
  // -1: the GPUs of every platform first). See backend::BackendOptions.
  int device = 0;
  int platform = -1;
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
  // The backend that runs most of the model: the GPU's when any layer is there, else the CPU.
  backend::Backend* primary_backend() const {
    return (n_gpu_layers_ > 0 ? owned_backends_.back() : owned_backends_.front()).get();
  }
  // Why the model runs where it does when that was not asked for ("no CUDA device ...: running
  // on the CPU"); empty otherwise. The CLI prints it.
  const std::string& placement_note() const { return placement_note_; }
  backend::Backend* head_backend() const { return head_backend_; }
  const backend::Tensor& output_norm() const { return output_norm_; }  // [E]
  const backend::Weight& output() const { return *output_; }           // [V][E]
  int n_threads() const { return n_threads_; }        // CPU threads after resolving 0 = all cores
  int n_gpu_layers() const { return n_gpu_layers_; }  // layers placed off the CPU (+1: the head)
  std::vector<backend::Backend*> backends() const;

 private:
  Model() = default;
  Status place(const LoadParams& params);
  Status check_gpu_memory(backend::Backend& gpu) const;
  Status load_layers();

  Config config_;
  std::unique_ptr<gguf::File> file_;
  std::vector<std::unique_ptr<backend::Backend>> owned_backends_;
  std::vector<LayerWeights> layers_;
  backend::HostMatrix token_embd_;
  backend::Backend* head_backend_ = nullptr;
  int n_threads_ = 1;
  int n_gpu_layers_ = 0;
  std::string placement_note_;
  backend::Tensor output_norm_;
  std::unique_ptr<backend::Weight> output_;
};

}  // namespace kestrel::model
