#include "backend/registry.h"

#include "backend/cpu/cpu_backend.h"
#ifdef KESTREL_CUDA
#include "backend/cuda/cuda_backend.h"
#endif
#ifdef KESTREL_OPENCL
#include "backend/opencl/opencl_backend.h"
#endif

namespace kestrel::backend {

namespace {

struct Entry {
  const char* name;
  bool gpu;  // takes the layers -ngl offloads
  Status (*probe)();
  // Whether `--backend auto` may pick it here (a GPU device); nullptr: whenever probe is ok.
  Status (*probe_auto)();
  Expected<std::unique_ptr<Backend>> (*create)(const BackendOptions&);
};

Expected<std::unique_ptr<Backend>> create_cpu(const BackendOptions& o) {
  return std::unique_ptr<Backend>(std::make_unique<cpu::CpuBackend>(o.n_threads));
}

const std::vector<Entry>& entries() {
  static const std::vector<Entry> table = {
      {"cpu", false, [] { return Status::ok(); }, nullptr, create_cpu},
#ifdef KESTREL_CUDA
      {"cuda", true, cuda::probe, nullptr, cuda::create},
#endif
#ifdef KESTREL_OPENCL
      {"opencl", true, opencl::probe, opencl::probe_gpu, opencl::create},
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
  if (name == "auto" || find(name)) return Status::ok();
  return error("backend '%s' is not available in this build (available: %s)", name.c_str(),
               available_backends_text().c_str());
}

Status check_gpu_layers(const std::string& backend, int n_gpu_layers) {
  if (n_gpu_layers < -1)
    return error("-ngl %d: the number of GPU layers must be 0 or more (-1: all on a GPU)",
                 n_gpu_layers);
  if (n_gpu_layers <= 0 || is_gpu_backend(backend)) return Status::ok();
  bool any_gpu = false;
  for (const Entry& e : entries()) any_gpu = any_gpu || e.gpu;
  if (any_gpu && backend == "auto") return Status::ok();
  if (!any_gpu)
    return error("-ngl %d: this build has no GPU backend (available: %s); use -ngl 0", n_gpu_layers,
                 available_backends_text().c_str());
  return error(
      "-ngl %d: backend '%s' runs on the CPU; choose a GPU backend with --backend "
      "(available: %s) or use -ngl 0",
      n_gpu_layers, backend.c_str(), available_backends_text().c_str());
}

Status probe_backend(const std::string& name) {
  KESTREL_TRY(check_backend(name));
  const Entry* e = find(name);
  if (!e->probe) return error("backend '%s' is not implemented yet", name.c_str());
  return e->probe();
}

std::string first_usable_gpu_backend(std::string* why) {
  for (const Entry& e : entries()) {
    if (!e.gpu) continue;
    Status s = probe_backend(e.name);
    if (s.is_ok() && e.probe_auto) s = e.probe_auto();
    if (s.is_ok()) return e.name;
    if (why) *why += (why->empty() ? "" : "; ") + s.message();
  }
  return "";
}

Expected<std::unique_ptr<Backend>> create_backend(const std::string& name,
                                                  const BackendOptions& options) {
  KESTREL_TRY(probe_backend(name));
  return find(name)->create(options);
}

}  // namespace kestrel::backend
