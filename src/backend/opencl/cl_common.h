// What every file of the OpenCL backend shares: the 1.2 C API, error names, and the checked
// call helper that turns a failed OpenCL call into a Status naming the call and the op.
#pragma once

#ifndef CL_TARGET_OPENCL_VERSION
#define CL_TARGET_OPENCL_VERSION 120
#endif
#include <CL/cl.h>

#include <string>
#include <vector>

#include "core/status.h"

namespace kestrel::backend::opencl {

// "CL_OUT_OF_RESOURCES" for -5, "error -1234" for a code the header does not name.
std::string cl_error_name(cl_int err);

// error("<what>: <call> failed: CL_... (<code>)") unless err is CL_SUCCESS.
Status cl_status(cl_int err, const char* call, const char* what);

// Returns the Status of a failed OpenCL call from the enclosing function: `call` is the
// expression, `what` the op or purpose ("matmul 'blk.0.attn_q.weight'", "upload").
#define KESTREL_CL_TRY(call, what)                                                  \
  do {                                                                              \
    const cl_int kestrel_cl_err_ = (call);                                          \
    if (kestrel_cl_err_ != CL_SUCCESS)                                              \
      return ::kestrel::backend::opencl::cl_status(kestrel_cl_err_, #call, (what)); \
  } while (0)

// Platform and device strings and numbers (clGetPlatformInfo / clGetDeviceInfo).
std::string platform_string(cl_platform_id p, cl_platform_info what);
std::string device_string(cl_device_id d, cl_device_info what);
template <typename T>
T device_value(cl_device_id d, cl_device_info what) {
  T v{};
  if (clGetDeviceInfo(d, what, sizeof(T), &v, nullptr) != CL_SUCCESS) return T{};
  return v;
}

// The platforms and their devices, in the ICD loader's order.
struct PlatformDevices {
  cl_platform_id platform = nullptr;
  std::string name;
  std::vector<cl_device_id> devices;
};
// Error when there is no platform at all (no ICD installed) or the loader fails.
Expected<std::vector<PlatformDevices>> list_devices();

// The device a backend runs on. platform < 0: the first GPU or accelerator of any platform,
// else (no GPU anywhere) the first device of any type; device then indexes that platform's
// devices only when a platform is given. Errors name what exists.
struct DeviceChoice {
  cl_platform_id platform = nullptr;
  cl_device_id device = nullptr;
  int platform_index = 0, device_index = 0;
};
Expected<DeviceChoice> choose_device(int platform, int device);

// Whether the device is a GPU or accelerator, the kind `--backend auto` may pick (a CPU device
// such as PoCL's runs the model slower than the native CPU backend).
bool is_gpu_device(cl_device_id d);

// Kernel arguments in order; the first failing clSetKernelArg is reported with the op.
class Args {
 public:
  Args(cl_kernel k, const char* op) : k_(k), op_(op) {}
  template <typename T>
  Args& operator()(const T& v) {
    if (err_ == CL_SUCCESS) {
      err_ = clSetKernelArg(k_, i_, sizeof(T), &v);
      if (err_ != CL_SUCCESS) failed_ = i_;
    }
    ++i_;
    return *this;
  }
  Args& mem(const void* tensor_data) {
    return (*this)(static_cast<cl_mem>(const_cast<void*>(tensor_data)));
  }
  Args& null_mem() {
    if (err_ == CL_SUCCESS) {
      err_ = clSetKernelArg(k_, i_, sizeof(cl_mem), nullptr);
      if (err_ != CL_SUCCESS) failed_ = i_;
    }
    ++i_;
    return *this;
  }
  Status status() const {
    if (err_ == CL_SUCCESS) return Status::ok();
    return error("%s: clSetKernelArg(%u) failed: %s", op_, failed_, cl_error_name(err_).c_str());
  }

 private:
  cl_kernel k_;
  const char* op_;
  cl_uint i_ = 0, failed_ = 0;
  cl_int err_ = CL_SUCCESS;
};

}  // namespace kestrel::backend::opencl
