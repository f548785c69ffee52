#include "backend/opencl/cl_common.h"

namespace kestrel::backend::opencl {

std::string cl_error_name(cl_int err) {
  switch (err) {
#define KESTREL_CL_ERR(name) \
  case name:                 \
    return #name;
    KESTREL_CL_ERR(CL_SUCCESS)
    KESTREL_CL_ERR(CL_DEVICE_NOT_FOUND)
    KESTREL_CL_ERR(CL_DEVICE_NOT_AVAILABLE)
    KESTREL_CL_ERR(CL_COMPILER_NOT_AVAILABLE)
    KESTREL_CL_ERR(CL_MEM_OBJECT_ALLOCATION_FAILURE)
    KESTREL_CL_ERR(CL_OUT_OF_RESOURCES)
    KESTREL_CL_ERR(CL_OUT_OF_HOST_MEMORY)
    KESTREL_CL_ERR(CL_PROFILING_INFO_NOT_AVAILABLE)
    KESTREL_CL_ERR(CL_MEM_COPY_OVERLAP)
    KESTREL_CL_ERR(CL_BUILD_PROGRAM_FAILURE)
    KESTREL_CL_ERR(CL_MAP_FAILURE)
    KESTREL_CL_ERR(CL_MISALIGNED_SUB_BUFFER_OFFSET)
    KESTREL_CL_ERR(CL_EXEC_STATUS_ERROR_FOR_EVENTS_IN_WAIT_LIST)
    KESTREL_CL_ERR(CL_COMPILE_PROGRAM_FAILURE)
    KESTREL_CL_ERR(CL_LINKER_NOT_AVAILABLE)
    KESTREL_CL_ERR(CL_LINK_PROGRAM_FAILURE)
    KESTREL_CL_ERR(CL_INVALID_VALUE)
    KESTREL_CL_ERR(CL_INVALID_DEVICE_TYPE)
    KESTREL_CL_ERR(CL_INVALID_PLATFORM)
    KESTREL_CL_ERR(CL_INVALID_DEVICE)
    KESTREL_CL_ERR(CL_INVALID_CONTEXT)
    KESTREL_CL_ERR(CL_INVALID_QUEUE_PROPERTIES)
    KESTREL_CL_ERR(CL_INVALID_COMMAND_QUEUE)
    KESTREL_CL_ERR(CL_INVALID_HOST_PTR)
    KESTREL_CL_ERR(CL_INVALID_MEM_OBJECT)
    KESTREL_CL_ERR(CL_INVALID_BINARY)
    KESTREL_CL_ERR(CL_INVALID_BUILD_OPTIONS)
    KESTREL_CL_ERR(CL_INVALID_PROGRAM)
    KESTREL_CL_ERR(CL_INVALID_PROGRAM_EXECUTABLE)
    KESTREL_CL_ERR(CL_INVALID_KERNEL_NAME)
    KESTREL_CL_ERR(CL_INVALID_KERNEL)
    KESTREL_CL_ERR(CL_INVALID_ARG_INDEX)
    KESTREL_CL_ERR(CL_INVALID_ARG_VALUE)
    KESTREL_CL_ERR(CL_INVALID_ARG_SIZE)
    KESTREL_CL_ERR(CL_INVALID_KERNEL_ARGS)
    KESTREL_CL_ERR(CL_INVALID_WORK_DIMENSION)
    KESTREL_CL_ERR(CL_INVALID_WORK_GROUP_SIZE)
    KESTREL_CL_ERR(CL_INVALID_WORK_ITEM_SIZE)
    KESTREL_CL_ERR(CL_INVALID_GLOBAL_OFFSET)
    KESTREL_CL_ERR(CL_INVALID_EVENT_WAIT_LIST)
    KESTREL_CL_ERR(CL_INVALID_EVENT)
    KESTREL_CL_ERR(CL_INVALID_OPERATION)
    KESTREL_CL_ERR(CL_INVALID_BUFFER_SIZE)
    KESTREL_CL_ERR(CL_INVALID_GLOBAL_WORK_SIZE)
    KESTREL_CL_ERR(CL_INVALID_PROPERTY)
#undef KESTREL_CL_ERR
    case -1001:
      return "CL_PLATFORM_NOT_FOUND_KHR (no OpenCL driver is installed)";
    default:
      return "error " + std::to_string(err);
  }
}

Status cl_status(cl_int err, const char* call, const char* what) {
  if (err == CL_SUCCESS) return Status::ok();
  return error("%s: %s failed: %s (%d)", what, call, cl_error_name(err).c_str(), err);
}

std::string platform_string(cl_platform_id p, cl_platform_info what) {
  size_t n = 0;
  if (clGetPlatformInfo(p, what, 0, nullptr, &n) != CL_SUCCESS || n == 0) return "";
  std::string s(n, '\0');
  if (clGetPlatformInfo(p, what, n, s.data(), nullptr) != CL_SUCCESS) return "";
  while (!s.empty() && (s.back() == '\0' || s.back() == ' ')) s.pop_back();
  return s;
}

std::string device_string(cl_device_id d, cl_device_info what) {
  size_t n = 0;
  if (clGetDeviceInfo(d, what, 0, nullptr, &n) != CL_SUCCESS || n == 0) return "";
  std::string s(n, '\0');
  if (clGetDeviceInfo(d, what, n, s.data(), nullptr) != CL_SUCCESS) return "";
  while (!s.empty() && (s.back() == '\0' || s.back() == ' ')) s.pop_back();
  return s;
}

Expected<std::vector<PlatformDevices>> list_devices() {
  cl_uint n = 0;
  const cl_int err = clGetPlatformIDs(0, nullptr, &n);
  if (err == -1001 || (err == CL_SUCCESS && n == 0))
    return error(
        "no OpenCL platform found: install an OpenCL driver (an ICD: the GPU vendor's, or "
        "pocl-opencl-icd to run on the CPU) or point OCL_ICD_VENDORS at its .icd file");
  if (err != CL_SUCCESS) return cl_status(err, "clGetPlatformIDs", "OpenCL platforms");
  std::vector<cl_platform_id> ids(n);
  KESTREL_CL_TRY(clGetPlatformIDs(n, ids.data(), nullptr), "OpenCL platforms");
  std::vector<PlatformDevices> out;
  for (cl_platform_id p : ids) {
    PlatformDevices pd;
    pd.platform = p;
    pd.name = platform_string(p, CL_PLATFORM_NAME);
    cl_uint nd = 0;
    if (clGetDeviceIDs(p, CL_DEVICE_TYPE_ALL, 0, nullptr, &nd) == CL_SUCCESS && nd > 0) {
      pd.devices.resize(nd);
      if (clGetDeviceIDs(p, CL_DEVICE_TYPE_ALL, nd, pd.devices.data(), nullptr) != CL_SUCCESS)
        pd.devices.clear();
    }
    out.push_back(std::move(pd));
  }
  return out;
}

bool is_gpu_device(cl_device_id d) {
  const auto type = device_value<cl_device_type>(d, CL_DEVICE_TYPE);
  return (type & (CL_DEVICE_TYPE_GPU | CL_DEVICE_TYPE_ACCELERATOR)) != 0;
}

namespace {

std::string describe(const std::vector<PlatformDevices>& all) {
  std::string s;
  for (size_t p = 0; p < all.size(); ++p) {
    s += (s.empty() ? "" : "; ") + format("platform %zu '%s': ", p, all[p].name.c_str());
    if (all[p].devices.empty()) s += "no devices";
    for (size_t d = 0; d < all[p].devices.size(); ++d)
      s += format("%sdevice %zu '%s'", d ? ", " : "", d,
                  device_string(all[p].devices[d], CL_DEVICE_NAME).c_str());
  }
  return s;
}

}  // namespace

Expected<DeviceChoice> choose_device(int platform, int device) {
  KESTREL_ASSIGN_OR_RETURN(std::vector<PlatformDevices> all, list_devices());
  DeviceChoice c;
  if (platform >= 0) {
    if (platform >= static_cast<int>(all.size()))
      return error("--cl-platform %d: there are %zu OpenCL platforms (%s)", platform, all.size(),
                   describe(all).c_str());
    const PlatformDevices& pd = all[platform];
    if (device < 0 || device >= static_cast<int>(pd.devices.size()))
      return error("--cl-device %d: OpenCL platform %d '%s' has %zu devices (%s)", device, platform,
                   pd.name.c_str(), pd.devices.size(), describe(all).c_str());
    return DeviceChoice{pd.platform, pd.devices[device], platform, device};
  }
  // No platform given: the GPUs and accelerators of all platforms in order, then the others;
  // `device` counts within that order.
  std::vector<DeviceChoice> order;
  for (int pass = 0; pass < 2; ++pass)
    for (size_t p = 0; p < all.size(); ++p)
      for (size_t d = 0; d < all[p].devices.size(); ++d)
        if (is_gpu_device(all[p].devices[d]) == (pass == 0))
          order.push_back(
              {all[p].platform, all[p].devices[d], static_cast<int>(p), static_cast<int>(d)});
  if (order.empty()) return error("no OpenCL device found (%s)", describe(all).c_str());
  if (device < 0 || device >= static_cast<int>(order.size()))
    return error("--cl-device %d: there are %zu OpenCL devices (%s)", device, order.size(),
                 describe(all).c_str());
  return order[device];
}

}  // namespace kestrel::backend::opencl
