#include "model/model.h"

#include <thread>

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
  KESTREL_TRY(m->place(params));
  KESTREL_TRY(m->load_layers());
  return m;
}

// Placement with llama.cpp's meaning of -ngl: the last N layers on the GPU backend, N > n_layer
// adds the head; the rest on the CPU. The CPU backend is always created first (it holds the
// layers below the boundary and embeds when layer 0 is there).
Status Model::place(const LoadParams& params) {
  const int n_layer = config_.n_layer;
  int threads = params.n_threads;
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  n_threads_ = threads;
  std::string name = params.backend;
  int ngl = params.n_gpu_layers;
  if (name == "auto") {
    std::string why;
    name = backend::first_usable_gpu_backend(&why);
    if (name.empty()) {
      name = "cpu";
      bool any_gpu = false;
      for (const std::string& b : backend::available_backends())
        any_gpu = any_gpu || backend::is_gpu_backend(b);
      // A build without GPU backends refuses -ngl N as before; one with a GPU backend but no
      // device says so and runs on the CPU, as the user did not force a backend.
      if (!any_gpu) {
        KESTREL_TRY(backend::check_gpu_layers("cpu", std::max(ngl, 0)));
      } else {
        placement_note_ = why + ": running on the CPU";
      }
      ngl = 0;
    }
  }
  KESTREL_TRY(backend::check_backend(name));
  const bool gpu = backend::is_gpu_backend(name);
  if (ngl < 0) ngl = gpu ? n_layer + 1 : 0;
  KESTREL_TRY(backend::check_gpu_layers(name, ngl));

  backend::BackendOptions opts;
  opts.n_threads = threads;
  opts.device = params.device;
  opts.platform = params.platform;
  KESTREL_ASSIGN_OR_RETURN(auto cpu, backend::create_backend("cpu", opts));
  owned_backends_.push_back(std::move(cpu));
  Backend* where = owned_backends_.front().get();
  Backend* gpu_be = where;
  if (gpu) {
    auto made = backend::create_backend(name, opts);
    if (!made) return error("--backend %s: %s", name.c_str(), made.message().c_str());
    owned_backends_.push_back(std::move(*made));
    gpu_be = owned_backends_.back().get();
  }
  layers_.resize(n_layer);
  const int first_gpu_layer = n_layer - std::min(ngl, n_layer);
  for (int i = 0; i < n_layer; ++i) layers_[i].backend = i >= first_gpu_layer ? gpu_be : where;
  head_backend_ = ngl > n_layer ? gpu_be : where;
  n_gpu_layers_ = std::min(ngl, n_layer + 1);
  if (gpu && ngl > 0) KESTREL_TRY(check_gpu_memory(*gpu_be));
  return Status::ok();
}

// Before any weight is uploaded: the placed weights must fit the GPU's free memory, or the
// load stops with the numbers and the ways out (nothing half-allocated is left behind).
Status Model::check_gpu_memory(Backend& gpu) const {
  const Config& c = config_;
  const gguf::File& f = *file_;
  auto bytes_of = [&](const std::string& name) -> double {
    const gguf::TensorInfo* t = f.tensor(name);
    return t ? static_cast<double>(t->n_bytes) : 0.0;
  };
  double per_layer_max = 0, needed = 0;
  for (int i = 0; i < c.n_layer; ++i) {
    double layer = 0;
    for (const char* w : {"attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                          "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"})
      layer += bytes_of(layer_name(i, w));
    per_layer_max = std::max(per_layer_max, layer);
    if (layers_[i].backend == &gpu) needed += layer;
  }
  if (head_backend_ == &gpu)
    needed += bytes_of(c.tied_output ? "token_embd.weight" : "output.weight");
  const int64_t free = gpu.available_memory();
  if (free < 0 || needed <= static_cast<double>(free)) return Status::ok();
  const int fit =
      per_layer_max > 0 ? static_cast<int>(static_cast<double>(free) / per_layer_max) : 0;
  return error(
      "the %d layers placed on %s need %.2f GiB of weights but only %.2f GiB of GPU memory is "
      "free: lower -ngl (about %d layers fit, leaving room for the KV cache and scratch), or use "
      "a smaller quantization of the model",
      n_gpu_layers_, gpu.device_name().c_str(), needed / 1073741824.0, free / 1073741824.0,
      std::max(0, fit - 1));
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
