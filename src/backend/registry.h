// Which backends this build has, and how to make one. Each backend adds itself to the table in
// registry.cpp under its build option (KESTREL_CUDA, KESTREL_OPENCL), so tools that list, check
// or create backends (`kestrel bench --backend`, -ngl, the model's placement, the conformance
// tests) need no change when one is added.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/status.h"

namespace kestrel::backend {

struct BackendOptions {
  int n_threads = 1;  // CPU threads (the CPU backend; GPU backends ignore it)
  int device = 0;     // device index within the backend (OpenCL: within --cl-platform if given)
  int platform = -1;  // OpenCL platform index; -1: GPUs of every platform first, then the rest
};

// Names of the backends compiled in, "cpu" first (it is always there).
std::vector<std::string> available_backends();
// "cpu, cuda": the same list for messages.
std::string available_backends_text();
// Whether `name` is an accelerator that -ngl places layers on (false for "cpu" and unknowns).
bool is_gpu_backend(const std::string& name);
// Error naming what is available unless `name` is compiled in or "auto" (the first usable GPU
// backend, else the CPU).
Status check_backend(const std::string& name);
// Error unless `n_gpu_layers` can be honoured with `backend`: 0 and -1 (all layers when on a
// GPU) always can; more needs a GPU backend, or "auto" in a build that has one.
Status check_gpu_layers(const std::string& backend, int n_gpu_layers);

// Whether the backend can run here: compiled in and, for a GPU backend, a usable device and
// driver. The error says which is missing ("no CUDA device: ...").
Status probe_backend(const std::string& name);
// The first GPU backend of the build that can run here on a GPU (an OpenCL CPU device such as
// PoCL's can run `--backend opencl` but is not picked here: the CPU backend is faster), or ""
// when none can; `why` (if given) collects each GPU backend's reason for not running, for the
// message that says Kestrel runs on the CPU instead.
std::string first_usable_gpu_backend(std::string* why = nullptr);
// Creates a backend by name; errors say what is missing.
Expected<std::unique_ptr<Backend>> create_backend(const std::string& name,
                                                  const BackendOptions& options);

}  // namespace kestrel::backend
