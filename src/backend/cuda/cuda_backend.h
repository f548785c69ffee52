// The CUDA backend's entry points for the registry (backend/registry.cpp). Nothing CUDA-specific
// is visible here, so that C++ code compiled without nvcc can create the backend; the class
// itself lives in cuda_backend_impl.cuh.
#pragma once

#include <memory>

#include "backend/backend.h"
#include "backend/registry.h"

namespace kestrel::backend::cuda {

// Ok when a CUDA device and a driver new enough for this build are present; otherwise the
// error says which is missing ("no CUDA device: ...").
Status probe();
// The backend on device `options.device`.
Expected<std::unique_ptr<Backend>> create(const BackendOptions& options);

}  // namespace kestrel::backend::cuda
