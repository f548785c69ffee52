#include "backend/registry.h"

namespace kestrel::backend {

namespace {

struct Entry {
  const char* name;
  bool gpu;  // takes the layers -ngl offloads
};

const std::vector<Entry>& entries() {
  static const std::vector<Entry> table = {
      {"cpu", false},
#ifdef KESTREL_CUDA
      {"cuda", true},
#endif
#ifdef KESTREL_OPENCL
      {"opencl", true},
#endif
  };
  return table;
}

const Entry* find(const std::string& name) {
  for (const Entry& e : entries())
    if (name == e.name) return &e;
  return nullptr;
}

}  // namespace

std::vector<std::string> available_backends() {
  std::vector<std::string> names;
  for (const Entry& e : entries()) names.emplace_back(e.name);
  return names;
}

std::string available_backends_text() {
  std::string text;
  for (const Entry& e : entries()) text += (text.empty() ? "" : ", ") + std::string(e.name);
  return text;
}

bool is_gpu_backend(const std::string& name) {
  const Entry* e = find(name);
  return e && e->gpu;
}

Status check_backend(const std::string& name) {
  if (find(name)) return Status::ok();
  return error("backend '%s' is not available in this build (available: %s)", name.c_str(),
               available_backends_text().c_str());
}

Status check_gpu_layers(const std::string& backend, int n_gpu_layers) {
  if (n_gpu_layers < 0)
    return error("-ngl %d: the number of GPU layers must be 0 or more", n_gpu_layers);
  if (n_gpu_layers == 0 || is_gpu_backend(backend)) return Status::ok();
  bool any_gpu = false;
  for (const Entry& e : entries()) any_gpu = any_gpu || e.gpu;
  if (!any_gpu)
    return error("-ngl %d: this build has no GPU backend (available: %s); use -ngl 0", n_gpu_layers,
                 available_backends_text().c_str());
  return error(
      "-ngl %d: backend '%s' runs on the CPU; choose a GPU backend with --backend "
      "(available: %s) or use -ngl 0",
      n_gpu_layers, backend.c_str(), available_backends_text().c_str());
}

}  // namespace kestrel::backend
