// The OpenCL backend's entry points for the registry (registry.cpp): any OpenCL 1.2+ device,
// chosen with BackendOptions::platform / device (--cl-platform, --cl-device).
#pragma once

#include <memory>

#include "backend/backend.h"
#include "backend/registry.h"
#include "core/status.h"

namespace kestrel::backend::opencl {

// OK when an OpenCL device of any type exists (PoCL's CPU device counts: --backend opencl and
// the conformance tests run on it); the error says what is missing.
Status probe();
// OK only for a GPU or accelerator: what `--backend auto` may pick (a CPU device would run the
// model slower than the native CPU backend).
Status probe_gpu();
Expected<std::unique_ptr<Backend>> create(const BackendOptions& options);

}  // namespace kestrel::backend::opencl
