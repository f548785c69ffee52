// Hyper-parameters of a llama-family model, read from GGUF metadata and checked for sense.
#pragma once

#include <string>

#include "backend/backend.h"
#include "core/status.h"
#include "format/gguf.h"

namespace kestrel::model {

struct Config {
  std::string arch;  // "llama" or "qwen2"
  std::string name;
  int n_vocab = 0;
  int n_embd = 0;
  int n_layer = 0;
  int n_head = 0;
  int n_head_kv = 0;
  int head_dim = 0;
  int n_ff = 0;
  int n_ctx_train = 0;
  float rms_eps = 1e-5f;
  float rope_base = 10000.0f;
  backend::RopeLayout rope_layout = backend::RopeLayout::Normal;
  bool tied_output = false;  // no output.weight: the head reuses token_embd
  bool qkv_bias = false;

  int q_dim() const { return n_head * head_dim; }
  int kv_dim() const { return n_head_kv * head_dim; }
};

// The architectures Kestrel runs, and how each rotates: llama pairs adjacent dimensions
// (the GGUF converter permutes Q/K for that), qwen2 rotates halves (NeoX style).
bool is_supported_arch(const std::string& arch);

Expected<Config> read_config(const gguf::File& file);

}  // namespace kestrel::model
