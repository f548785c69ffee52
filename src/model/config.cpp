#include "model/config.h"

#include <climits>

namespace kestrel::model {

bool is_supported_arch(const std::string& arch) {
  return arch == "llama" || arch == "qwen2";
}

namespace {

// Reads `{arch}.{key}` as a positive int that fits comfortably in an int.
Expected<int> read_dim(const gguf::File& f, const std::string& arch, const char* key,
                       int64_t def = -1) {
  const std::string full = arch + "." + key;
  int64_t v = def;
  if (f.find(full)) {
    KESTREL_ASSIGN_OR_RETURN(v, f.get_int(full));
  } else if (def < 0) {
    return error("%s: metadata key '%s' is missing: the file is not a complete %s model",
                 f.path().c_str(), full.c_str(), arch.c_str());
  }
  if (v <= 0 || v > (1 << 24))
    return error("%s: metadata '%s' = %lld is out of range", f.path().c_str(), full.c_str(),
                 static_cast<long long>(v));
  return static_cast<int>(v);
}

}  // namespace

Expected<Config> read_config(const gguf::File& f) {
  Config c;
  KESTREL_ASSIGN_OR_RETURN(c.arch, f.get_string("general.architecture"));
  if (!is_supported_arch(c.arch))
    return error("%s: architecture '%s' is not supported (Kestrel runs 'llama' and 'qwen2' models)",
                 f.path().c_str(), c.arch.c_str());
  c.name = f.get_string("general.name", c.arch);
  const std::string& a = c.arch;
  KESTREL_ASSIGN_OR_RETURN(c.n_embd, read_dim(f, a, "embedding_length"));
  KESTREL_ASSIGN_OR_RETURN(c.n_layer, read_dim(f, a, "block_count"));
  KESTREL_ASSIGN_OR_RETURN(c.n_ff, read_dim(f, a, "feed_forward_length"));
  KESTREL_ASSIGN_OR_RETURN(c.n_head, read_dim(f, a, "attention.head_count"));
  KESTREL_ASSIGN_OR_RETURN(c.n_head_kv, read_dim(f, a, "attention.head_count_kv", c.n_head));
  KESTREL_ASSIGN_OR_RETURN(c.n_ctx_train, read_dim(f, a, "context_length", 4096));
  if (c.n_embd % c.n_head != 0 && !f.find(a + ".attention.key_length"))
    return error("%s: n_embd %d is not a multiple of the head count %d", f.path().c_str(), c.n_embd,
                 c.n_head);
  KESTREL_ASSIGN_OR_RETURN(c.head_dim, read_dim(f, a, "attention.key_length", c.n_embd / c.n_head));
  if (c.n_head % c.n_head_kv != 0)
    return error("%s: %d attention heads cannot be grouped over %d KV heads", f.path().c_str(),
                 c.n_head, c.n_head_kv);
  if (c.head_dim % 2 != 0)
    return error("%s: head dimension %d is odd; RoPE needs pairs", f.path().c_str(), c.head_dim);
  if (const auto* rot = f.find(a + ".rope.dimension_count");
      rot && rot->is_integer() && rot->as_int() != c.head_dim)
    return error("%s: partial RoPE (%lld of %d dimensions) is not supported", f.path().c_str(),
                 static_cast<long long>(rot->as_int()), c.head_dim);
  c.rms_eps = static_cast<float>(f.get_float(a + ".attention.layer_norm_rms_epsilon", 1e-5));
  if (!(c.rms_eps > 0 && c.rms_eps < 1))
    return error("%s: RMS norm epsilon %g is out of range", f.path().c_str(), c.rms_eps);
  c.rope_base = static_cast<float>(f.get_float(a + ".rope.freq_base", 10000.0));
  if (!(c.rope_base > 1))
    return error("%s: rope.freq_base %g is out of range", f.path().c_str(), c.rope_base);
  c.rope_layout = a == "qwen2" ? backend::RopeLayout::NeoX : backend::RopeLayout::Normal;

  const gguf::TensorInfo* embd = f.tensor("token_embd.weight");
  if (!embd)
    return error("%s: tensor 'token_embd.weight' is missing: the file is incomplete",
                 f.path().c_str());
  if (embd->dims.size() != 2 || embd->dims[0] != c.n_embd)
    return error("%s: token_embd.weight has the wrong shape for n_embd %d", f.path().c_str(),
                 c.n_embd);
  if (embd->dims[1] > INT_MAX / 2)
    return error("%s: vocabulary of %lld tokens is too large", f.path().c_str(),
                 static_cast<long long>(embd->dims[1]));
  c.n_vocab = static_cast<int>(embd->dims[1]);
  c.tied_output = f.tensor("output.weight") == nullptr;
  c.qkv_bias = f.tensor("blk.0.attn_q.bias") != nullptr;
  return c;
}

}  // namespace kestrel::model
