// Which backends this build has. Each backend adds itself to the table in registry.cpp under
// its build option (KESTREL_CUDA, KESTREL_OPENCL), so tools that list or check backends
// (`kestrel bench --backend`, -ngl) need no change when one is added.
#pragma once

#include <string>
#include <vector>

#include "core/status.h"

namespace kestrel::backend {

// Names of the backends compiled in, "cpu" first (it is always there).
std::vector<std::string> available_backends();
// "cpu, cuda": the same list for messages.
std::string available_backends_text();
// Whether `name` is an accelerator that -ngl places layers on (false for "cpu" and unknowns).
bool is_gpu_backend(const std::string& name);
// Error naming what is available unless `name` is compiled in.
Status check_backend(const std::string& name);
// Error unless `n_gpu_layers` can be honoured with `backend`: 0 always can; more needs a GPU
// backend.
Status check_gpu_layers(const std::string& backend, int n_gpu_layers);

}  // namespace kestrel::backend
