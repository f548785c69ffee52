#include "model/model.h"

#include <thread>

#include "backend/cpu/cpu_backend.h"
#include "backend/registry.h"
#include "format/quant/quant.h"

namespace kestrel::model {

using backend::Backend;
using backend::HostMatrix;
using backend::Tensor;

namespace {

std::string layer_name(int layer, const char* what) {
  return "blk." + std::to_string(layer) + "." + what;
}

// Looks up a tensor and checks its shape (GGUF order: dims[0] is the row length).
Expected<const gguf::TensorInfo*> find_tensor(const gguf::File& f, const Config& c,
                                              const std::string& name, int64_t d0, int64_t d1) {
  const gguf::TensorInfo* t = f.tensor(name);
  if (!t)
    return error("%s: tensor '%s' is missing: the file is incomplete or not a %s model",
                 f.path().c_str(), name.c_str(), c.arch.c_str());
  const bool shape_ok = d1 == 0 ? (t->dims.size() == 1 && t->dims[0] == d0)
                                : (t->dims.size() == 2 && t->dims[0] == d0 && t->dims[1] == d1);
  if (!shape_ok) {
    std::string got;
    for (size_t i = 0; i < t->dims.size(); ++i)
      got += (i ? " x " : "") + std::to_string(t->dims[i]);
    return error("%s: tensor '%s' has shape [%s], expected [%lld%s]", f.path().c_str(),
                 name.c_str(), got.c_str(), static_cast<long long>(d0),
                 d1 ? (" x " + std::to_string(d1)).c_str() : "");
  }
  if (!quant::is_supported(t->type))
    return error("%s: tensor '%s' has type %s, which Kestrel does not support yet",
                 f.path().c_str(), name.c_str(), quant::type_name(t->type));
  return t;
}

HostMatrix host_matrix(const gguf::TensorInfo& t) {
  HostMatrix m;
  m.type = t.type;
  m.n_in = t.dims[0];
  m.n_out = t.dims.size() > 1 ? t.dims[1] : 1;
  m.data = t.data;
  m.name = t.name;
  return m;
}

Expected<std::unique_ptr<backend::Weight>> load_matrix(Backend& be, const gguf::File& f,
                                                       const Config& c, const std::string& name,
                                                       int64_t n_in, int64_t n_out) {
  KESTREL_ASSIGN_OR_RETURN(const gguf::TensorInfo* t, find_tensor(f, c, name, n_in, n_out));
  return be.load_weight(host_matrix(*t));
}

Expected<Tensor> load_f32_vector(Backend& be, const gguf::File& f, const Config& c,
                                 const std::string& name, int64_t n) {
  KESTREL_ASSIGN_OR_RETURN(const gguf::TensorInfo* t, find_tensor(f, c, name, n, 0));
  std::vector<float> v(n);
  quant::dequantize_row(t->type, t->data, v.data(), n);
  return be.load_vector(v.data(), n, name.c_str());
}

}  // namespace

Model::~Model() {
  for (auto& l : layers_) {
    for (Tensor* t : {&l.attn_norm, &l.ffn_norm, &l.bq, &l.bk, &l.bv})
      if (*t) l.backend->free(*t);
  }
  if (output_norm_) head_backend_->free(output_norm_);
}

Expected<std::unique_ptr<Model>> Model::load(const std::string& path, const LoadParams& params) {
  std::unique_ptr<Model> m(new Model());
  KESTREL_ASSIGN_OR_RETURN(m->file_, gguf::File::open(path));
  KESTREL_ASSIGN_OR_RETURN(m->config_, read_config(*m->file_));
  // Placement: every backend compiled in is in the registry; until a GPU backend is, the
  // checks below leave only the CPU, and the GPU backends place layers here when they land.
  KESTREL_TRY(backend::check_backend(params.backend));
  KESTREL_TRY(backend::check_gpu_layers(params.backend, params.n_gpu_layers));
  int threads = params.n_threads;
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  m->n_threads_ = threads;
  m->owned_backends_.push_back(std::make_unique<backend::cpu::CpuBackend>(threads));
  Backend* cpu = m->owned_backends_.front().get();
  m->layers_.resize(m->config_.n_layer);
  for (auto& l : m->layers_) l.backend = cpu;
  m->head_backend_ = cpu;
  KESTREL_TRY(m->load_layers());
  return m;
}

Status Model::load_layers() {
  const Config& c = config_;
  const gguf::File& f = *file_;
  KESTREL_ASSIGN_OR_RETURN(const gguf::TensorInfo* embd,
                           find_tensor(f, c, "token_embd.weight", c.n_embd, c.n_vocab));
  token_embd_ = host_matrix(*embd);
  for (int i = 0; i < c.n_layer; ++i) {
    LayerWeights& l = layers_[i];
    Backend& be = *l.backend;
    auto name = [&](const char* what) { return layer_name(i, what); };
    KESTREL_ASSIGN_OR_RETURN(l.attn_norm,
                             load_f32_vector(be, f, c, name("attn_norm.weight"), c.n_embd));
    KESTREL_ASSIGN_OR_RETURN(l.ffn_norm,
                             load_f32_vector(be, f, c, name("ffn_norm.weight"), c.n_embd));
    KESTREL_ASSIGN_OR_RETURN(l.wq,
                             load_matrix(be, f, c, name("attn_q.weight"), c.n_embd, c.q_dim()));
    KESTREL_ASSIGN_OR_RETURN(l.wk,
                             load_matrix(be, f, c, name("attn_k.weight"), c.n_embd, c.kv_dim()));
    KESTREL_ASSIGN_OR_RETURN(l.wv,
                             load_matrix(be, f, c, name("attn_v.weight"), c.n_embd, c.kv_dim()));
    KESTREL_ASSIGN_OR_RETURN(
        l.wo, load_matrix(be, f, c, name("attn_output.weight"), c.q_dim(), c.n_embd));
    KESTREL_ASSIGN_OR_RETURN(l.w_gate,
                             load_matrix(be, f, c, name("ffn_gate.weight"), c.n_embd, c.n_ff));
    KESTREL_ASSIGN_OR_RETURN(l.w_up,
                             load_matrix(be, f, c, name("ffn_up.weight"), c.n_embd, c.n_ff));
    KESTREL_ASSIGN_OR_RETURN(l.w_down,
                             load_matrix(be, f, c, name("ffn_down.weight"), c.n_ff, c.n_embd));
    if (c.qkv_bias) {
      KESTREL_ASSIGN_OR_RETURN(l.bq, load_f32_vector(be, f, c, name("attn_q.bias"), c.q_dim()));
      KESTREL_ASSIGN_OR_RETURN(l.bk, load_f32_vector(be, f, c, name("attn_k.bias"), c.kv_dim()));
      KESTREL_ASSIGN_OR_RETURN(l.bv, load_f32_vector(be, f, c, name("attn_v.bias"), c.kv_dim()));
    }
  }
  Backend& hb = *head_backend_;
  KESTREL_ASSIGN_OR_RETURN(output_norm_, load_f32_vector(hb, f, c, "output_norm.weight", c.n_embd));
  if (c.tied_output) {
    KESTREL_ASSIGN_OR_RETURN(output_, hb.load_weight(token_embd_));
  } else {
    KESTREL_ASSIGN_OR_RETURN(output_, load_matrix(hb, f, c, "output.weight", c.n_embd, c.n_vocab));
  }
  return Status::ok();
}

std::vector<Backend*> Model::backends() const {
  std::vector<Backend*> out;
  for (const auto& b : owned_backends_) out.push_back(b.get());
  return out;
}

}  // namespace kestrel::model
