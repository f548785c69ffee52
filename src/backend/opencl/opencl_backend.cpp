// The OpenCL backend: device choice, program build, memory, weights, synchronization and
// profiling. The ops' host sides are in ops.cpp, their kernels in kernels/*.cl.
#include "backend/opencl/opencl_backend.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "backend/opencl/kernels/attention_cl.h"
#include "backend/opencl/kernels/common_cl.h"
#include "backend/opencl/kernels/elementwise_cl.h"
#include "backend/opencl/kernels/matmul_cl.h"
#include "backend/opencl/kernels/matmul_tiled_cl.h"
#include "backend/opencl/kernels/matmul_tiled_half_cl.h"
#include "backend/opencl/opencl_backend_impl.h"
#include "backend/opencl/program_cache.h"
#include "format/quant/quant.h"

namespace kestrel::backend::opencl {

namespace {

double gib(double bytes) {
  return bytes / 1073741824.0;
}

const char* const kKernelNames[] = {
    "embed_rows",      "rms_norm",        "add_rms_norm",      "rope",
    "swiglu",          "add_inplace",     "get_rows",          "kv_store",
    "attention_query", "attention_block", "attention_combine", "matmul_small",
    "matmul_reduce",   "matmul_tiled",    "matmul_mid",        "matmul_tiled16",
    "rope_kv_store",   "swiglu_rows",
};

// One instance of the matmul_tiled.cl template (which undefines its parameters at the end).
// With `half`, of matmul_tiled_half.cl (the same parameters but MM_VEC4, which it always has).
std::string tiled_instance(const char* name, const TileShape& t, bool half = false) {
  std::string s = format(
      "#define MM_TM %d\n#define MM_TN %d\n#define MM_WX %d\n#define MM_WY %d\n"
      "#define MM_PREFETCH %d\n#define MM_KERNEL %s\n",
      t.tm, t.tn, t.wx, t.wy, t.prefetch ? 1 : 0, name);
  if (half) return s.append(sources::matmul_tiled_half);
  s.append(format("#define MM_VEC4 %d\n", t.vec4 ? 1 : 0));
  return s.append(sources::matmul_tiled);
}

// matmul_tiled_half's work-items accumulate runs of four rows and four tokens.
bool half_fits(const TileShape& t) {
  return t.tm % (4 * t.wx) == 0 && t.tn % (4 * t.wy) == 0;
}

// Local memory of a tiled instance's weight and activation tiles (32 columns of f32 each).
cl_ulong tile_local_bytes(const TileShape& t) {
  return sizeof(float) * 32 * static_cast<cl_ulong>(t.tm + t.tn);
}

// A tile shape from the environment variable `var` ("TM,TN,WX,WY": rows and tokens per
// work-group, the work-group), for measuring other shapes than the defaults; unset: `t` as it
// is. The shape must suit the template (float4 reads of runs of four rows and tokens per
// work-item, at most 16 x 16 accumulators) and the device (work-group size, local memory).
Status tile_from_env(const char* var, const DeviceInfo& info, TileShape& t) {
  const char* v = std::getenv(var);
  if (!v || !*v) return Status::ok();
  TileShape s = t;
  if (std::sscanf(v, "%d,%d,%d,%d", &s.tm, &s.tn, &s.wx, &s.wy) != 4)
    return error("%s=%s: expected TM,TN,WX,WY (for example 128,64,16,16)", var, v);
  const int step = s.vec4 ? 4 : 1;
  const bool fits = s.tm > 0 && s.tn > 0 && s.wx > 0 && s.wy > 0 && s.tm % 4 == 0 &&
                    s.tn % 4 == 0 && s.tm % (step * s.wx) == 0 && s.tn % (step * s.wy) == 0 &&
                    s.tm / s.wx <= 16 && s.tn / s.wy <= 16 &&
                    static_cast<size_t>(s.wx) * s.wy <= info.max_work_group &&
                    tile_local_bytes(s) + 1024 <= info.local_mem;
  if (!fits)
    return error(
        "%s=%s: not a usable tile here (TM a multiple of 4 and of %d * WX, TN of 4 and %d * WY, "
        "at most 16 rows and tokens per work-item, WX * WY <= %zu work-items, 128 * (TM + TN) "
        "bytes of local memory <= %llu)",
        var, v, step, step, info.max_work_group,
        static_cast<unsigned long long>(info.local_mem) - 1024);
  t = s;
  return Status::ok();
}

}  // namespace

Status probe() {
  auto c = choose_device(-1, 0);
  return c ? Status::ok() : c.status();
}

Status probe_gpu() {
  KESTREL_ASSIGN_OR_RETURN(std::vector<PlatformDevices> all, list_devices());
  std::string cpu_only;
  for (const PlatformDevices& p : all)
    for (cl_device_id d : p.devices) {
      if (is_gpu_device(d)) return Status::ok();
      cpu_only += (cpu_only.empty() ? "" : ", ") + device_string(d, CL_DEVICE_NAME);
    }
  if (cpu_only.empty()) return error("no OpenCL device found");
  return error(
      "no OpenCL GPU found (only CPU devices: %s; --backend opencl runs on them, slower than "
      "the CPU backend)",
      cpu_only.c_str());
}

Expected<std::unique_ptr<Backend>> create(const BackendOptions& options) {
  KESTREL_ASSIGN_OR_RETURN(auto be, OpenclBackend::create(options.platform, options.device));
  return std::unique_ptr<Backend>(std::move(be));
}

ClWeight::~ClWeight() {
  if (owner) owner->release_weight(*this);
}

void OpenclBackend::release_weight(ClWeight& w) {
  device_free(w.qs, w.qs_bytes);
  device_free(w.d, w.d_bytes);
  w.qs = w.d = nullptr;
}

Expected<std::unique_ptr<OpenclBackend>> OpenclBackend::create(int platform, int device) {
  std::unique_ptr<OpenclBackend> be(new OpenclBackend());
  KESTREL_TRY(be->init(platform, device));
  return be;
}

Status OpenclBackend::init(int platform, int device) {
  const auto t0 = std::chrono::steady_clock::now();
  KESTREL_ASSIGN_OR_RETURN(DeviceChoice choice, choose_device(platform, device));
  platform_ = choice.platform;
  device_ = choice.device;
  DeviceInfo& i = info_;
  i.name = device_string(device_, CL_DEVICE_NAME);
  i.vendor = device_string(device_, CL_DEVICE_VENDOR);
  i.version = device_string(device_, CL_DEVICE_VERSION);
  i.driver = device_string(device_, CL_DRIVER_VERSION);
  i.platform_name = platform_string(platform_, CL_PLATFORM_NAME);
  i.gpu = is_gpu_device(device_);
  i.global_mem = device_value<cl_ulong>(device_, CL_DEVICE_GLOBAL_MEM_SIZE);
  i.max_alloc = device_value<cl_ulong>(device_, CL_DEVICE_MAX_MEM_ALLOC_SIZE);
  i.local_mem = device_value<cl_ulong>(device_, CL_DEVICE_LOCAL_MEM_SIZE);
  i.max_work_group = device_value<size_t>(device_, CL_DEVICE_MAX_WORK_GROUP_SIZE);
  i.compute_units = device_value<cl_uint>(device_, CL_DEVICE_MAX_COMPUTE_UNITS);
  std::string ext = " ";
  ext.append(device_string(device_, CL_DEVICE_EXTENSIONS));
  ext.append(" ");
  i.fp16 = ext.find(" cl_khr_fp16 ") != std::string::npos;
  i.khr_subgroups = ext.find(" cl_khr_subgroups ") != std::string::npos;
  i.subgroups = i.khr_subgroups || ext.find(" cl_intel_subgroups ") != std::string::npos;
  i.correct_divide = (device_value<cl_device_fp_config>(device_, CL_DEVICE_SINGLE_FP_CONFIG) &
                      CL_FP_CORRECTLY_ROUNDED_DIVIDE_SQRT) != 0;
  if (i.max_work_group < 64)
    return error(
        "OpenCL device %s allows work-groups of %zu work-items; the OpenCL backend needs 64",
        i.name.c_str(), i.max_work_group);
  if (i.local_mem < 16 * 1024)
    return error("OpenCL device %s has %llu bytes of local memory; the OpenCL backend needs 16 KiB",
                 i.name.c_str(), static_cast<unsigned long long>(i.local_mem));
  cl_int err = CL_SUCCESS;
  const cl_context_properties props[] = {CL_CONTEXT_PLATFORM,
                                         reinterpret_cast<cl_context_properties>(platform_), 0};
  context_ = clCreateContext(props, 1, &device_, nullptr, nullptr, &err);
  KESTREL_CL_TRY(err, "OpenCL setup");
  queue_ = clCreateCommandQueue(context_, device_, 0, &err);
  KESTREL_CL_TRY(err, "OpenCL setup");
  KESTREL_TRY(build_kernels());
  choose_recording();
  // The arithmetic is part of the name (reports carry it): "half matmuls" where the quantized
  // micro-batch matmuls run in half.
  device_name_ =
      format("%s (%s, driver %s, %.0f GiB, %s%s%s)", i.name.c_str(), i.platform_name.c_str(),
             i.driver.c_str(), gib(static_cast<double>(i.global_mem)), i.gpu ? "GPU" : "CPU device",
             nv_mma_ == "emulate" && nv_frag_ ? ", mma.sync emulated, 16-token fragments"
             : nv_frag_                     ? ", tensor-core matmuls (mma.sync), 16-token fragments"
             : nv_mma_ == "emulate"         ? ", mma.sync emulated"
             : !nv_mma_.empty()             ? ", tensor-core matmuls (mma.sync)"
             : half_tiled_ || half_tiled16_ ? ", fp16, half matmuls"
             : i.fp16                       ? ", fp16"
                                            : "",
             subgroups_ ? ", subgroup reductions" : "");
  ring_host_.assign(kRingInts, 0);
  KESTREL_ASSIGN_OR_RETURN(ring_dev_, device_alloc(kRingInts * sizeof(int32_t), "index ring"));
  setup_ms_ =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  return Status::ok();
}

// The work-group shapes follow the device's limit (256 work-items where it allows them, the
// common case; 64 otherwise); half arithmetic and the correctly rounded division (which the KV
// store's quantization needs to equal quantize_row) only where the device has them.
Status OpenclBackend::build_kernels() {
  wide_ = info_.max_work_group >= 256 && info_.local_mem >= 32 * 1024;
  // Tiles of 128 rows x 64 tokens, 8 x 4 accumulators per work-item (24 KiB of local memory)
  // where the device allows, else 32 x 32.
  tile_ = wide_ ? TileShape{128, 64, 16, 16, true, false} : TileShape{32, 32, 8, 8, true, false};
  if (const char* v = std::getenv("KESTREL_CL_TILED_SCALAR"); v && std::string(v) == "1")
    tile_.vec4 = false;
  // Loading the next step during the products: pp512 1,749 against 1,494 t/s on the H200
  // through NVIDIA's driver (bench/NOTES.md); KESTREL_CL_TILED_PREFETCH=0 turns it off.
  tile_.prefetch = true;
  if (const char* v = std::getenv("KESTREL_CL_TILED_PREFETCH"); v && std::string(v) == "0")
    tile_.prefetch = false;
  if (const char* v = std::getenv("KESTREL_CL_MID_MAX_TOKENS")) mid_max_tokens_ = std::atoi(v);
  // matmul_mid's work-group: mid_rows_ rows x (256 / mid_rows_) K-splits (64 x 1 on small
  // devices); KESTREL_CL_MID_ROWS=32|64|128 overrides it, to compare.
  mid_rows_ = wide_ ? 128 : 64;
  if (const char* v = std::getenv("KESTREL_CL_MID_ROWS"); v && wide_) {
    const int rows = std::atoi(v);
    if (rows == 32 || rows == 64 || rows == 128) mid_rows_ = rows;
  }
  mid_split_ = wide_ ? 256 / mid_rows_ : 1;
  // The tiled template at 16 tokens: 4 rows x 4 tokens per work-item (float4 local reads), a
  // work-group of rows / 4 x 4; KESTREL_CL_MID_TILE_ROWS=64|128|256 picks its rows (256 needs
  // 34 KiB of local memory).
  mid_tile_ = wide_ ? TileShape{128, 16, 32, 4, true, tile_.prefetch}
                    : TileShape{32, 16, 8, 4, true, tile_.prefetch};
  if (const char* v = std::getenv("KESTREL_CL_MID_TILE_ROWS"); v && wide_) {
    const int rows = std::atoi(v);
    if (rows == 64 || rows == 128 || (rows == 256 && info_.local_mem >= 40 * 1024))
      mid_tile_.tm = rows, mid_tile_.wx = rows / 4;
  }
  // On the H200 (NVIDIA's driver), the seed's b128 ub16: 631 t/s on matmul_tiled16 at 128 rows
  // against 601 on matmul_mid, 548 at 256 rows, 593 at 64. KESTREL_CL_MID_KERNEL=mid: matmul_mid.
  if (const char* v = std::getenv("KESTREL_CL_MID_KERNEL"); v && std::string(v) == "mid")
    mid_tiled_ = false;
  // Split-K of mid-sized batches: at most this many slices of the input columns
  // (KESTREL_CL_MID_MAX_SPLITS, 2 to 64).
  if (const char* v = std::getenv("KESTREL_CL_MID_MAX_SPLITS"))
    mid_max_splits_ = std::clamp(std::atoi(v), 2, 64);
  if (const char* v = std::getenv("KESTREL_CL_MID_GROUPS_PER_CU"))
    mid_groups_per_cu_ = std::clamp(std::atoi(v), 1, 16);
  if (const char* v = std::getenv("KESTREL_CL_ATT_SPLITS"))
    att_splits_forced_ = std::max(std::atoi(v), 0);
  if (const char* v = std::getenv("KESTREL_CL_FUSED_ROPE_KV"); v && std::string(v) == "0")
    fused_rope_kv_ = false;
  if (const char* v = std::getenv("KESTREL_CL_FUSED_F16"); v && std::string(v) == "0")
    fused_f16_ = false;
  // Other tile shapes, to measure: KESTREL_CL_TILE (more than 16 tokens) and KESTREL_CL_MID_TILE
  // (9-16 tokens, whose TN must stay 16), "TM,TN,WX,WY". On the H200 (NVIDIA's driver) every
  // shape tried measured within 3% of the defaults at pp512 (128,128,16,16: 1,722 t/s against
  // 1,745; 64,128,16,16: 1,700; 256,64,32,8: 1,735) and the seed's case (64,16,16,4: 833 against
  // 840; 128,16,16,2: 659), so the local-memory reads per product are not what bounds it.
  KESTREL_TRY(tile_from_env("KESTREL_CL_TILE", info_, tile_));
  KESTREL_TRY(tile_from_env("KESTREL_CL_MID_TILE", info_, mid_tile_));
  if (mid_tile_.tn != 16)
    return error("KESTREL_CL_MID_TILE: the mid-sized tile must have TN = 16 tokens, not %d",
                 mid_tile_.tn);
  std::string options = "-cl-std=CL1.2";
  options +=
      wide_ ? " -DMV_ROWS=16 -DMV_SPLIT=16 -DRMS_WG=256" : " -DMV_ROWS=16 -DMV_SPLIT=4 -DRMS_WG=64";
  options += format(" -DMID_ROWS=%d -DMID_SPLIT=%d", mid_rows_, mid_split_);
  if (info_.fp16) options += " -DKESTREL_HAS_FP16";
  if (info_.correct_divide) options += " -cl-fp32-correctly-rounded-divide-sqrt";
  choose_subgroups(options);
  std::vector<std::string> srcs = {sources::common,
                                   sources::elementwise,
                                   sources::attention,
                                   sources::matmul,
                                   tiled_instance("matmul_tiled", tile_),
                                   tiled_instance("matmul_tiled16", mid_tile_)};
  // Half arithmetic for the quantized micro-batches where the device has it (matmul_tiled_half.cl
  // says why it stays accurate); KESTREL_CL_HALF=0 keeps them in f32.
  const char* half_env = std::getenv("KESTREL_CL_HALF");
  const bool half = info_.fp16 && !(half_env && std::string(half_env) == "0");
  half_tiled_ = half && half_fits(tile_);
  half_tiled16_ = half && half_fits(mid_tile_);
  if (half_tiled_) srcs.push_back(tiled_instance("matmul_tiled_half", tile_, true));
  if (half_tiled16_) srcs.push_back(tiled_instance("matmul_tiled16_half", mid_tile_, true));
  std::vector<const char*> names(std::begin(kKernelNames), std::end(kKernelNames));
  // The tensor cores through inline PTX where NVIDIA's compiler passes the probe (nv_mma.cpp).
  choose_nv_mma();
  add_nv_mma_sources(srcs, names, options);
  if (half_tiled_ || half_tiled16_) names.push_back("x_half_blocks");
  if (half_tiled_) names.push_back("matmul_tiled_half");
  if (half_tiled16_) names.push_back("matmul_tiled16_half");
  KESTREL_ASSIGN_OR_RETURN(ProgramBuild built,
                           build_program(context_, device_, srcs, options, default_cache_dir()));
  program_ = built.program;
  setup_note_ = built.note;
  if (built.note.find("corrupt") != std::string::npos ||
      built.note.find("unusable") != std::string::npos)
    std::fprintf(stderr, "kestrel: opencl: %s\n", built.note.c_str());
  for (const char* name : names) {
    cl_int err = CL_SUCCESS;
    cl_kernel k = clCreateKernel(program_, name, &err);
    if (err != CL_SUCCESS)
      return error("OpenCL setup: clCreateKernel(%s) failed: %s", name, cl_error_name(err).c_str());
    kernels_[name] = k;
    // A kernel with a required work-group size must be able to run it on this device.
    size_t wg = 0, reqd[3] = {0, 0, 0};
    clGetKernelWorkGroupInfo(k, device_, CL_KERNEL_WORK_GROUP_SIZE, sizeof wg, &wg, nullptr);
    clGetKernelWorkGroupInfo(k, device_, CL_KERNEL_COMPILE_WORK_GROUP_SIZE, sizeof reqd, reqd,
                             nullptr);
    const size_t need = reqd[0] * std::max<size_t>(reqd[1], 1) * std::max<size_t>(reqd[2], 1);
    if (wg != 0 && wg < need)
      return error(
          "OpenCL kernel %s runs at most %zu work-items per group on %s; it needs %zu (the "
          "device's registers or local memory are too small for it)",
          name, wg, info_.name.c_str(), need);
    // Local memory is checked here, not by a failing launch: attention_block (27 KiB) gives way
    // to the one-query kernel on devices with less; every other kernel fits in 16 KiB on them.
    cl_ulong local = 0;
    clGetKernelWorkGroupInfo(k, device_, CL_KERNEL_LOCAL_MEM_SIZE, sizeof local, &local, nullptr);
    if (local > info_.local_mem) {
      if (std::strcmp(name, "attention_block") == 0) {
        attention_block_fits_ = false;
        continue;
      }
      return error("OpenCL kernel %s needs %llu bytes of local memory; %s has %llu", name,
                   static_cast<unsigned long long>(local), info_.name.c_str(),
                   static_cast<unsigned long long>(info_.local_mem));
    }
  }
  return Status::ok();
}

cl_kernel OpenclBackend::kernel(const char* name) const {
  return kernels_.at(name);
}

OpenclBackend::~OpenclBackend() {
  if (queue_) clFinish(queue_);
  drop_recordings();
  for (Pending& p : pending_)
    for (cl_event e : p.events) clReleaseEvent(e);
  for (auto& [m, bytes] : scratch_)
    if (m) clReleaseMemObject(m);
  for (auto& [host, t] : tables_) clReleaseMemObject(t.first);
  for (auto& [key, m] : rope_freqs_) clReleaseMemObject(m);
  if (ring_dev_) clReleaseMemObject(ring_dev_);
  if (nv_arrivals_) clReleaseMemObject(nv_arrivals_);
  for (auto& [name, k] : kernels_) clReleaseKernel(k);
  if (program_) clReleaseProgram(program_);
  if (queue_) clReleaseCommandQueue(queue_);
  if (context_) clReleaseContext(context_);
}

int64_t OpenclBackend::available_memory() const {
  // OpenCL has no query for free memory: the device's total less what this backend holds.
  return std::max<int64_t>(
      0, static_cast<int64_t>(info_.global_mem) - static_cast<int64_t>(allocated_));
}

Expected<cl_mem> OpenclBackend::device_alloc(size_t bytes, const char* what) {
  bytes = std::max<size_t>(bytes, 4);
  if (bytes > info_.max_alloc)
    return error(
        "%s needs %.3f GiB in one buffer, but OpenCL device %s allows at most %.3f GiB per "
        "buffer (CL_DEVICE_MAX_MEM_ALLOC_SIZE): lower the context (-c) or the micro-batch (-ub), "
        "quantize the KV cache (-ctk/-ctv q8_0, q4_0) or lower -ngl",
        what, gib(static_cast<double>(bytes)), info_.name.c_str(),
        gib(static_cast<double>(info_.max_alloc)));
  if (bytes > static_cast<size_t>(available_memory()))
    return error(
        "out of device memory allocating %.3f GiB for %s on OpenCL device %s (%.3f GiB of %.3f "
        "GiB free): lower -ngl, the context (-c) or the micro-batch (-ub), or quantize the KV "
        "cache (-ctk/-ctv q8_0, q4_0)",
        gib(static_cast<double>(bytes)), what, info_.name.c_str(),
        gib(static_cast<double>(available_memory())), gib(static_cast<double>(info_.global_mem)));
  cl_int err = CL_SUCCESS;
  cl_mem m = clCreateBuffer(context_, CL_MEM_READ_WRITE, bytes, nullptr, &err);
  if (err != CL_SUCCESS)
    return error("allocating %.3f GiB for %s on OpenCL device %s: clCreateBuffer failed: %s",
                 gib(static_cast<double>(bytes)), what, info_.name.c_str(),
                 cl_error_name(err).c_str());
  // Drivers may allocate on first use: touch the buffer now, so that a failure is this
  // allocation's (with its numbers) and nothing half-allocated stays behind.
  const cl_uchar zero = 0;
  err = clEnqueueWriteBuffer(queue_, m, CL_TRUE, 0, 1, &zero, 0, nullptr, nullptr);
  if (err != CL_SUCCESS) {
    clReleaseMemObject(m);
    return error(
        "allocating %.3f GiB for %s on OpenCL device %s failed (%s): lower -ngl, the "
        "context (-c) or the micro-batch (-ub)",
        gib(static_cast<double>(bytes)), what, info_.name.c_str(), cl_error_name(err).c_str());
  }
  allocated_ += bytes;
  return m;
}

void OpenclBackend::device_free(cl_mem m, size_t bytes) {
  if (!m) return;
  recordings_stale_ = recordings_stale_ || !recordings_.empty();  // a recording may use it
  // The driver keeps the memory until the queued kernels that use it have finished.
  clReleaseMemObject(m);
  allocated_ -= std::min(allocated_, std::max<size_t>(bytes, 4));
}

Expected<cl_mem> OpenclBackend::scratch(int slot, size_t bytes) {
  if (static_cast<size_t>(slot) >= scratch_.size()) scratch_.resize(slot + 1, {nullptr, 0});
  auto& [m, size] = scratch_[slot];
  if (size >= bytes) return m;
  device_free(m, size);
  m = nullptr;
  size = 0;
  KESTREL_ASSIGN_OR_RETURN(m, device_alloc(bytes, "scratch"));
  size = bytes;
  return m;
}

Expected<Tensor> OpenclBackend::alloc(quant::DType type, int64_t rows, int64_t cols,
                                      const char* what) {
  const int64_t rb = quant::row_bytes(type, cols);
  if (rows < 0 || rb < 0)
    return error("cannot allocate %s: %lld x %lld of %s is not a valid shape", what,
                 static_cast<long long>(rows), static_cast<long long>(cols),
                 quant::type_name(type));
  if (rb > 0 && rows > INT64_MAX / rb)
    return error("cannot allocate %s: %lld rows of %lld bytes overflow a 64-bit byte count", what,
                 static_cast<long long>(rows), static_cast<long long>(rb));
  Tensor t;
  t.type = type;
  t.rows = rows;
  t.cols = cols;
  t.bytes = static_cast<size_t>(rb) * static_cast<size_t>(rows);
  KESTREL_ASSIGN_OR_RETURN(cl_mem m, device_alloc(t.bytes, what));
  t.data = m;
  t.owner = this;
  return t;
}

void OpenclBackend::free(Tensor& t) {
  if (t.data) device_free(static_cast<cl_mem>(t.data), t.bytes);
  t = Tensor();
}

Status OpenclBackend::upload(Tensor& dst, int64_t row0, int64_t n_rows, const void* src) {
  if (row0 < 0 || n_rows < 0 || row0 + n_rows > dst.rows)
    return error("upload of rows %lld..%lld outside a tensor of %lld rows",
                 static_cast<long long>(row0), static_cast<long long>(row0 + n_rows),
                 static_cast<long long>(dst.rows));
  if (n_rows == 0) return Status::ok();
  const size_t rb = dst.row_bytes();
  if (dst.data == companion_.data) companion_ = {};           // its f16 companion is stale now
  if (rec_mode_ != RecMode::Eager) recordings_stale_ = true;  // not part of a recording
  // Blocking: the caller may reuse its buffer as soon as this returns.
  KESTREL_CL_TRY(clEnqueueWriteBuffer(queue_, static_cast<cl_mem>(dst.data), CL_TRUE, rb * row0,
                                      rb * n_rows, src, 0, nullptr, nullptr),
                 "upload to the OpenCL device");
  return Status::ok();
}

Status OpenclBackend::download(const Tensor& src, int64_t row0, int64_t n_rows, void* dst) {
  if (row0 < 0 || n_rows < 0 || row0 + n_rows > src.rows)
    return error("download of rows %lld..%lld outside a tensor of %lld rows",
                 static_cast<long long>(row0), static_cast<long long>(row0 + n_rows),
                 static_cast<long long>(src.rows));
  if (n_rows == 0) return synchronize();
  const size_t rb = src.row_bytes();
  // In queue order: the read sees every op enqueued before it. Under profile_op the read is
  // timed like a launch; the queue is then idle and profile_op reads the times (synchronize()
  // here would read them before this op's entry exists, leaving it to a later pass).
  cl_event ev = nullptr;
  KESTREL_CL_TRY(clEnqueueReadBuffer(queue_, static_cast<cl_mem>(src.data), CL_TRUE, rb * row0,
                                     rb * n_rows, dst, 0, nullptr, capture_ ? &ev : nullptr),
                 "download from the OpenCL device");
  if (!ev) return synchronize();
  capture_->push_back(ev);
  op_finished_queue_ = true;
  KESTREL_CL_TRY(clFinish(queue_), "download from the OpenCL device");
  return Status::ok();
}

Expected<std::unique_ptr<Weight>> OpenclBackend::load_weight(const HostMatrix& m) {
  if (!quant::is_supported(m.type))
    return error("%s: type %s is not supported by the OpenCL backend", m.name.c_str(),
                 quant::type_name(m.type));
  const int64_t rb = quant::row_bytes(m.type, m.n_in);
  if (m.n_in % 32 != 0)
    return error("%s: rows of %lld elements: the OpenCL backend needs a multiple of 32",
                 m.name.c_str(), static_cast<long long>(m.n_in));
  if (rb < 0 || m.n_out <= 0 || m.n_out > INT32_MAX || m.n_in > INT32_MAX)
    return error("%s: %lld x %lld is not a valid %s matrix", m.name.c_str(),
                 static_cast<long long>(m.n_out), static_cast<long long>(m.n_in),
                 quant::type_name(m.type));
  auto w = std::make_unique<ClWeight>();
  w->owner = this;
  w->type = m.type;
  w->n_in = m.n_in;
  w->n_out = m.n_out;
  w->name = m.name;
  w->row_bytes = rb;
  const size_t total = static_cast<size_t>(rb) * m.n_out;
  w->bytes = total;
  const bool q4 = m.type == quant::DType::Q4_0, q8 = m.type == quant::DType::Q8_0;
  if (!q4 && !q8) {
    KESTREL_ASSIGN_OR_RETURN(w->qs, device_alloc(total, m.name.c_str()));
    w->qs_bytes = total;
    KESTREL_CL_TRY(
        clEnqueueWriteBuffer(queue_, w->qs, CL_TRUE, 0, total, m.data, 0, nullptr, nullptr),
        m.name.c_str());
    return std::unique_ptr<Weight>(std::move(w));
  }
  // Block-major repack: quants [nb][n_out][qb], scales [nb][n_out].
  const int64_t nb = m.n_in / 32, qb = q4 ? 16 : 32, block = q4 ? 18 : 34;
  std::vector<uint8_t> qs(static_cast<size_t>(nb * m.n_out * qb));
  std::vector<uint16_t> ds(static_cast<size_t>(nb * m.n_out));
  const auto* src = static_cast<const uint8_t*>(m.data);
  for (int64_t r = 0; r < m.n_out; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = src + (r * nb + b) * block;
      std::memcpy(&ds[b * m.n_out + r], blk, 2);
      std::memcpy(&qs[(b * m.n_out + r) * qb], blk + 2, qb);
    }
  KESTREL_ASSIGN_OR_RETURN(w->qs, device_alloc(qs.size(), m.name.c_str()));
  w->qs_bytes = qs.size();
  KESTREL_ASSIGN_OR_RETURN(w->d, device_alloc(ds.size() * 2, m.name.c_str()));
  w->d_bytes = ds.size() * 2;
  KESTREL_CL_TRY(
      clEnqueueWriteBuffer(queue_, w->qs, CL_TRUE, 0, qs.size(), qs.data(), 0, nullptr, nullptr),
      m.name.c_str());
  KESTREL_CL_TRY(
      clEnqueueWriteBuffer(queue_, w->d, CL_TRUE, 0, ds.size() * 2, ds.data(), 0, nullptr, nullptr),
      m.name.c_str());
  return std::unique_ptr<Weight>(std::move(w));
}

Expected<Tensor> OpenclBackend::load_vector(const float* data, int64_t n, const char* what) {
  KESTREL_ASSIGN_OR_RETURN(Tensor t, alloc(quant::DType::F32, 1, n, what));
  Status st = upload(t, 0, 1, data);
  if (!st) {
    free(t);
    return st;
  }
  return t;
}

Expected<cl_mem> OpenclBackend::device_table(const HostMatrix& table) {
  if (auto it = tables_.find(table.data); it != tables_.end()) return it->second.first;
  const size_t bytes = static_cast<size_t>(quant::row_bytes(table.type, table.n_in)) * table.n_out;
  KESTREL_ASSIGN_OR_RETURN(cl_mem m, device_alloc(bytes, "token embeddings"));
  const cl_int err =
      clEnqueueWriteBuffer(queue_, m, CL_TRUE, 0, bytes, table.data, 0, nullptr, nullptr);
  if (err != CL_SUCCESS) {
    device_free(m, bytes);
    return cl_status(err, "clEnqueueWriteBuffer", "token embeddings upload");
  }
  tables_[table.data] = {m, bytes};
  return m;
}

Expected<int> OpenclBackend::upload_ints(const int32_t* host, int n, const char* what) {
  if (n <= 0) return 0;
  if (rec_mode_ != RecMode::Eager) return upload_slot(host, n, what);
  constexpr size_t kRing = kRingInts - kRecordSlotInts;  // the eager part of the ring
  if (static_cast<size_t>(n) > kRing)
    return error("%s: %d indices exceed the upload ring of %zu", what, n, kRing);
  if (last_ints_off_ >= 0 && last_ints_.size() == static_cast<size_t>(n) &&
      std::memcmp(last_ints_.data(), host, n * sizeof(int32_t)) == 0)
    return last_ints_off_;
  if (ring_pos_ + n > kRing) {
    // The ring wraps: the copies out of its start must be done before it is overwritten.
    KESTREL_CL_TRY(clFinish(queue_), what);
    ring_pos_ = 0;
  }
  std::memcpy(ring_host_.data() + ring_pos_, host, n * sizeof(int32_t));
  const int off = static_cast<int>(ring_pos_);
  cl_event ev = nullptr;
  KESTREL_CL_TRY(clEnqueueWriteBuffer(queue_, ring_dev_, CL_FALSE, ring_pos_ * sizeof(int32_t),
                                      n * sizeof(int32_t), ring_host_.data() + ring_pos_, 0,
                                      nullptr, capture_ ? &ev : nullptr),
                 what);
  if (ev) capture_->push_back(ev);
  ring_pos_ += (static_cast<size_t>(n) + 31) & ~size_t{31};
  last_ints_.assign(host, host + n);
  last_ints_off_ = off;
  return off;
}

Status OpenclBackend::launch(cl_kernel k, const char* op, cl_uint dims, const size_t* global,
                             const size_t* local) {
  ++launches_;
  size_t g[3] = {1, 1, 1};
  for (cl_uint i = 0; i < dims; ++i) {
    g[i] = global[i];
    if (local && local[i] > 0) g[i] = (g[i] + local[i] - 1) / local[i] * local[i];
    if (g[i] == 0) return Status::ok();  // nothing to do
  }
  KESTREL_ASSIGN_OR_RETURN(const bool recorded, record_launch(k, op, dims, g, local));
  if (recorded) return Status::ok();
  cl_event ev = nullptr;
  const cl_int err = clEnqueueNDRangeKernel(queue_, k, dims, nullptr, g, local, 0, nullptr,
                                            capture_ ? &ev : nullptr);
  if (err != CL_SUCCESS) return cl_status(err, "clEnqueueNDRangeKernel", op);
  if (ev) capture_->push_back(ev);
  return Status::ok();
}

Status OpenclBackend::synchronize() {
  const cl_int err = clFinish(queue_);
  if (err != CL_SUCCESS)
    return error("an OpenCL command failed: clFinish returned %s", cl_error_name(err).c_str());
  return flush_profile();
}

// Device timers of profiled ops: the first time profile_op runs, the queue is recreated with
// profiling on (the unprofiled path never pays for it); each launch inside the op records an
// event, and the op's time is from the first start to the last end, read after synchronize().
Status OpenclBackend::profile_op(std::string_view kind, OpProfiler& profiler,
                                 const std::function<Status()>& op) {
  if (!queue_profiling_) {
    KESTREL_CL_TRY(clFinish(queue_), "profiling");
    cl_int err = CL_SUCCESS;
    cl_command_queue q = clCreateCommandQueue(context_, device_, CL_QUEUE_PROFILING_ENABLE, &err);
    KESTREL_CL_TRY(err, "profiling");
    drop_recordings();  // recorded for the old queue
    clReleaseCommandQueue(queue_);
    queue_ = q;
    queue_profiling_ = true;
  }
  Pending p{std::string(kind), &profiler, {}};
  capture_ = &p.events;
  Status st = op();
  capture_ = nullptr;
  pending_.push_back(std::move(p));
  if (op_finished_queue_) {
    op_finished_queue_ = false;
    const Status flushed = flush_profile();
    if (st) st = flushed;
  }
  return st;
}

Status OpenclBackend::flush_profile() {
  Status st = Status::ok();
  for (Pending& p : pending_) {
    cl_ulong first = ~cl_ulong{0}, last = 0;
    for (cl_event e : p.events) {
      cl_ulong start = 0, end = 0;
      const cl_int a =
          clGetEventProfilingInfo(e, CL_PROFILING_COMMAND_START, sizeof start, &start, nullptr);
      const cl_int b =
          clGetEventProfilingInfo(e, CL_PROFILING_COMMAND_END, sizeof end, &end, nullptr);
      if ((a != CL_SUCCESS || b != CL_SUCCESS) && st)
        st = cl_status(a != CL_SUCCESS ? a : b, "clGetEventProfilingInfo", "profiling");
      first = std::min(first, start);
      last = std::max(last, end);
      clReleaseEvent(e);
    }
    p.profiler->add(p.kind, last > first ? static_cast<double>(last - first) * 1e-6 : 0.0);
  }
  pending_.clear();
  return st;
}

}  // namespace kestrel::backend::opencl
