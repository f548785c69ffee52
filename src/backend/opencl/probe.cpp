// Set-up probes: a vendor feature (subgroup reductions, NVIDIA's inline PTX) is used only after
// a small kernel built with it has computed a known answer on this device. A compiler that
// refuses it, or a result that is wrong, keeps the portable code with one line on stderr.
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "backend/opencl/kernels/common_cl.h"
#include "backend/opencl/opencl_backend_impl.h"
#include "backend/opencl/program_cache.h"

namespace kestrel::backend::opencl {

namespace {

// Releases what a probe created, whatever path it leaves by.
struct ProbeObjects {
  cl_program program = nullptr;
  cl_kernel kernel = nullptr;
  std::vector<cl_mem> bufs;
  ~ProbeObjects() {
    for (cl_mem m : bufs)
      if (m) clReleaseMemObject(m);
    if (kernel) clReleaseKernel(kernel);
    if (program) clReleaseProgram(program);
  }
};

}  // namespace

// Builds `srcs` with `options` (through the program cache: a warm start pays a binary load), runs
// kernel `name` once as one work-group of `n_items` with the inputs copied to device buffers and
// a last buffer of out.size() floats read back into `out`. "" when it ran, else why not.
std::string OpenclBackend::run_probe(const std::vector<std::string>& srcs,
                                     const std::string& options, const char* name,
                                     const std::vector<ProbeInput>& inputs, std::vector<float>& out,
                                     size_t n_items) {
  auto built = build_program(context_, device_, srcs, options, default_cache_dir());
  if (!built) {
    const std::string& m = built.message();
    return format("%s does not build: %s", name, m.substr(0, m.find('\n', 200)).c_str());
  }
  ProbeObjects o;
  o.program = built->program;
  cl_int err = CL_SUCCESS;
  o.kernel = clCreateKernel(o.program, name, &err);
  if (err != CL_SUCCESS) return format("clCreateKernel(%s): %s", name, cl_error_name(err).c_str());
  Args args(o.kernel, name);
  for (size_t i = 0; i <= inputs.size(); ++i) {
    const bool is_out = i == inputs.size();
    const size_t bytes = is_out ? out.size() * sizeof(float) : inputs[i].bytes;
    void* host = is_out ? nullptr : const_cast<void*>(inputs[i].data);
    o.bufs.push_back(clCreateBuffer(context_, CL_MEM_READ_WRITE | (host ? CL_MEM_COPY_HOST_PTR : 0),
                                    bytes, host, &err));
    if (err != CL_SUCCESS) return "clCreateBuffer: " + cl_error_name(err);
    args(o.bufs.back());
  }
  if (Status s = args.status(); !s.is_ok()) return s.message();
  err =
      clEnqueueNDRangeKernel(queue_, o.kernel, 1, nullptr, &n_items, &n_items, 0, nullptr, nullptr);
  if (err == CL_SUCCESS)
    err = clEnqueueReadBuffer(queue_, o.bufs.back(), CL_TRUE, 0, out.size() * sizeof(float),
                              out.data(), 0, nullptr, nullptr);
  if (err != CL_SUCCESS) return format("%s's launch failed: %s", name, cl_error_name(err).c_str());
  return "";
}

// The subgroup reductions of common.cl (group_sum, group_max) checked on the device: sums and
// the maximum of random integers (exact in any order) over one work-group of the size the
// kernels use. "" when they are exact.
std::string OpenclBackend::run_subgroup_probe(const std::string& options, int n) {
  std::mt19937 rng(std::random_device{}());
  std::uniform_int_distribution<int> value(-1000, 1000);
  std::vector<float> x(static_cast<size_t>(n));
  float sum = 0.0f, max = -1e9f;
  for (float& v : x) {
    v = static_cast<float>(value(rng));
    sum += v;
    max = std::max(max, v);
  }
  std::vector<float> out(3, 0.0f);
  const std::string why = run_probe({sources::common}, options, "reduce_probe",
                                    {{x.data(), x.size() * sizeof(float)}}, out, x.size());
  if (!why.empty()) return why;
  if (out[0] != sum || out[1] != max || out[2] != -sum)
    return format("reduce_probe gave sum %g, max %g, %g (want %g, %g, %g)",
                  static_cast<double>(out[0]), static_cast<double>(out[1]),
                  static_cast<double>(out[2]), static_cast<double>(sum), static_cast<double>(max),
                  static_cast<double>(-sum));
  return "";
}

// Subgroup reductions where the device names cl_khr_subgroups or cl_intel_subgroups and its
// compiler passes the probe at the work-group sizes the kernels use (64 and, on wide devices,
// 256); KESTREL_CL_SUBGROUPS=0 keeps the local-memory trees. Adds the build options.
void OpenclBackend::choose_subgroups(std::string& options) {
  subgroups_ = false;
  const char* env = std::getenv("KESTREL_CL_SUBGROUPS");
  if ((env && std::string(env) == "0") || !info_.subgroups) return;
  const std::string flags =
      std::string(" -DKESTREL_SUBGROUPS") + (info_.khr_subgroups ? " -DKESTREL_KHR_SUBGROUPS" : "");
  std::string why;
  for (int n : {64, 256}) {
    if (n == 256 && !wide_) break;
    why = run_subgroup_probe("-cl-std=CL1.2" + flags, n);
    if (!why.empty()) break;
  }
  if (!why.empty()) {
    std::fprintf(stderr, "kestrel: opencl: subgroup reductions unavailable, %s\n", why.c_str());
    return;
  }
  subgroups_ = true;
  options += flags;
}

}  // namespace kestrel::backend::opencl
