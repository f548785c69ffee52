// Builds the backend's one OpenCL program, through an on-disk cache of program binaries so
// that only the first run on a device compiles the kernels (seconds on some drivers) and later
// runs load the binary (milliseconds). A cache entry is keyed by everything that changes the
// binary: device name, device and driver version, platform version, the kernel sources and the
// build options. An entry that cannot be read, fails its checksum or that the driver refuses is
// rebuilt from source and rewritten, with a note, never an error.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "backend/opencl/cl_common.h"

namespace kestrel::backend::opencl {

struct ProgramBuild {
  cl_program program = nullptr;  // built for the device; the caller releases it
  bool from_cache = false;       // loaded from a cached binary (a warm start)
  double ms = 0;                 // wall time of the whole build or load
  std::string note;  // what happened to the cache, for the log ("corrupt: rebuilt", ...)
};

// The cache directory: $KESTREL_CL_CACHE_DIR, else $XDG_CACHE_HOME/kestrel/opencl, else
// $HOME/.cache/kestrel/opencl; "" (no cache) when KESTREL_CL_CACHE=0 or none of them is set.
std::string default_cache_dir();

// The cache file that serves these sources and options on `device` under `dir`.
std::string cache_path(const std::string& dir, cl_device_id device,
                       const std::vector<std::string>& sources, const std::string& options);

// Builds `sources` (concatenated in order) for `device` with `options`, using the cache under
// `cache_dir` ("" disables it). A compile error returns the build log.
Expected<ProgramBuild> build_program(cl_context context, cl_device_id device,
                                     const std::vector<std::string>& sources,
                                     const std::string& options, const std::string& cache_dir);

}  // namespace kestrel::backend::opencl
