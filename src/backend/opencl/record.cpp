// run_recorded on OpenCL: a forward pass of a few tokens (decode steps, the seed's micro-batches
// of 16) recorded once into a command buffer (cl_khr_command_buffer, OpenCL's form of a CUDA
// graph) and replayed with one enqueue instead of hundreds of launches. NVIDIA's driver seems to
// cost ~20 us a launch (src/backend/opencl/NOTES.md); a phone's driver has its own cost.
// Opt-in (KESTREL_CL_RECORD=1) until measured on a GPU; tested on PoCL and Intel's runtime.
//
// As on CUDA (cuda/graphs.cu): the first pass of a key runs eagerly (it allocates what the pass
// needs), the second is captured (its launches go into the command buffer, its inputs to fixed
// slots at the end of the index ring), later ones stage (the body runs without launching
// anything, only to write its inputs into the same slots, which then go to the device in one
// write; or, when the capture took every input from run_recorded's named inputs, the slots are
// filled from those without walking the body) and enqueue the buffer. Anything the
// recording cannot hold -- an upload into a tensor, a buffer freed (scratch growth) -- drops it
// and the pass runs eagerly.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "backend/opencl/opencl_backend_impl.h"

namespace kestrel::backend::opencl {

namespace {

// cl_khr_command_buffer's constants and entry points, declared here (the CUDA toolkit's OpenCL
// headers lack them): the calls used have kept their form from version 0.9.0 to 1.0.0.
constexpr cl_device_info kDeviceCommandBufferRequiredQueueProperties = 0x12AA;
constexpr cl_device_info kDeviceExtensionsWithVersion = 0x1060;
struct NameVersion {
  cl_uint version;
  char name[64];
};

}  // namespace

// The entry points, or why the device cannot record ("" when it can).
std::string OpenclBackend::load_command_buffer_fns() {
  std::string ext = " ";
  ext.append(device_string(device_, CL_DEVICE_EXTENSIONS));
  ext.append(" ");
  if (ext.find(" cl_khr_command_buffer ") == std::string::npos)
    return "the device has no cl_khr_command_buffer";
  // PoCL 3.1 (Debian 12's) records and finalizes them, then aborts in its scheduler (a pthread
  // error) when one is enqueued.
  const std::string platform = platform_string(platform_, CL_PLATFORM_VERSION);
  if (const size_t at = platform.find("PoCL ");
      at != std::string::npos && std::atoi(platform.c_str() + at + 5) < 4)
    return "PoCL before 4.0 aborts when a command buffer is enqueued (" + platform + ")";
  // The version, where the device reports versions (OpenCL 3.0): 0.9 or later.
  size_t bytes = 0;
  if (clGetDeviceInfo(device_, kDeviceExtensionsWithVersion, 0, nullptr, &bytes) == CL_SUCCESS &&
      bytes >= sizeof(NameVersion)) {
    std::vector<NameVersion> list(bytes / sizeof(NameVersion));
    if (clGetDeviceInfo(device_, kDeviceExtensionsWithVersion, bytes, list.data(), nullptr) ==
        CL_SUCCESS)
      for (const NameVersion& nv : list)
        if (std::strncmp(nv.name, "cl_khr_command_buffer", sizeof nv.name) == 0) {
          const cl_uint major = nv.version >> 22, minor = (nv.version >> 12) & 0x3ff;
          if (major == 0 && minor < 9)
            return format("cl_khr_command_buffer %u.%u is older than 0.9", major, minor);
        }
  }
  cl_ulong required = 0;
  if (clGetDeviceInfo(device_, kDeviceCommandBufferRequiredQueueProperties, sizeof required,
                      &required, nullptr) == CL_SUCCESS &&
      required != 0)
    return "its command buffers need queue properties the backend's queue lacks";
  auto fn = [&](const char* name) {
    return clGetExtensionFunctionAddressForPlatform(platform_, name);
  };
  cb_.create = reinterpret_cast<CommandBufferFns::Create>(fn("clCreateCommandBufferKHR"));
  cb_.finalize = reinterpret_cast<CommandBufferFns::Finalize>(fn("clFinalizeCommandBufferKHR"));
  cb_.release = reinterpret_cast<CommandBufferFns::Release>(fn("clReleaseCommandBufferKHR"));
  cb_.ndrange = reinterpret_cast<CommandBufferFns::NDRange>(fn("clCommandNDRangeKernelKHR"));
  cb_.enqueue = reinterpret_cast<CommandBufferFns::Enqueue>(fn("clEnqueueCommandBufferKHR"));
  if (!cb_.create || !cb_.finalize || !cb_.release || !cb_.ndrange || !cb_.enqueue)
    return "the driver does not give cl_khr_command_buffer's entry points";
  return "";
}

// KESTREL_CL_RECORD=1: record passes where the device can (else a line on stderr saying why).
void OpenclBackend::choose_recording() {
  const char* env = std::getenv("KESTREL_CL_RECORD");
  if (!env || std::string(env) != "1") return;
  const std::string why = load_command_buffer_fns();
  if (!why.empty()) {
    std::fprintf(stderr, "kestrel: opencl: KESTREL_CL_RECORD=1: not recording, %s\n", why.c_str());
    return;
  }
  record_ = true;
  const char* direct = std::getenv("KESTREL_CL_RECORD_DIRECT");
  record_direct_ = !(direct && std::string(direct) == "0");
}

void OpenclBackend::drop_recordings() {
  for (auto& [key, r] : recordings_)
    if (r.cb) cb_.release(r.cb);
  recordings_.clear();
  recordings_stale_ = false;
}

// A replay's inputs straight into the slots its capture filled from them (Recording::fills),
// when every upload of the capture came from them and they have the capture's lengths.
bool OpenclBackend::stage_direct(Recording& r, const RecordInput* inputs, int n_inputs) {
  if (!r.direct || static_cast<size_t>(n_inputs) != r.input_sizes.size()) return false;
  for (int i = 0; i < n_inputs; ++i)
    if (inputs[i].n != r.input_sizes[i]) return false;
  for (const RecordFill& f : r.fills)
    std::memcpy(ring_host_.data() + f.at, inputs[f.input].data + f.offset, f.n * sizeof(int32_t));
  return true;
}

Status OpenclBackend::run_recorded(uint64_t key, const RecordInput* inputs, int n_inputs,
                                   const std::function<Status()>& body) {
  // A recorded pass must make the same host-side choices every time (which f16 forms exist).
  companion_ = {};
  half_x_ready_ = nullptr;
  if (!record_ || rec_mode_ != RecMode::Eager || queue_profiling_) return body();
  if (recordings_stale_) drop_recordings();
  Recording& r = recordings_[key];
  if (r.failed || r.runs++ == 0) return body();  // the first run allocates what the body needs
  if (!r.cb) {
    cl_int err = CL_SUCCESS;
    r.cb = cb_.create(1, &queue_, nullptr, &err);
    if (err != CL_SUCCESS || !r.cb) {
      r.cb = nullptr;
      r.failed = true;
      return body();
    }
    rec_mode_ = RecMode::Capture;
    rec_cb_ = r.cb;
    slot_pos_ = 0;
    r.fills.clear();
    r.input_sizes.assign(n_inputs, 0);
    for (int i = 0; i < n_inputs; ++i) r.input_sizes[i] = inputs[i].n;
    r.direct = record_direct_;
    capturing_ = &r;
    capture_inputs_ = inputs;
    n_capture_inputs_ = n_inputs;
    Status st = body();
    capturing_ = nullptr;
    capture_inputs_ = nullptr;
    n_capture_inputs_ = 0;
    r.slot_end = slot_pos_;
    rec_mode_ = RecMode::Eager;
    rec_cb_ = nullptr;
    if (st && !recordings_stale_) st = cl_status(cb_.finalize(r.cb), "command buffer", "record");
    if (!st || recordings_stale_) {
      // Not recordable: from now on this key runs eagerly. Nothing of this pass ran yet.
      cb_.release(r.cb);
      r.cb = nullptr;
      r.failed = true;
      return body();
    }
  } else {
    if (!stage_direct(r, inputs, n_inputs)) {
      rec_mode_ = RecMode::Stage;
      slot_pos_ = 0;
      const Status st = body();
      rec_mode_ = RecMode::Eager;
      KESTREL_TRY(st);
      if (recordings_stale_) {  // the body freed a buffer the recording uses: run it eagerly
        drop_recordings();
        return body();
      }
    }
    // The staged slots in one write (the capture wrote each as it came).
    KESTREL_TRY(write_slots(r.slot_end));
  }
  ++launches_;
  return cl_status(cb_.enqueue(1, &queue_, r.cb, 0, nullptr, nullptr), "command buffer", "replay");
}

// A launch while recording: into the command buffer (capture) or nowhere (stage). False when
// the launch is to go to the queue.
Expected<bool> OpenclBackend::record_launch(cl_kernel k, const char* op, cl_uint dims,
                                            const size_t* global, const size_t* local) {
  if (rec_mode_ == RecMode::Eager) return false;
  if (rec_mode_ == RecMode::Stage) return true;
  const cl_int err = cb_.ndrange(rec_cb_, nullptr, nullptr, k, dims, nullptr, global, local, 0,
                                 nullptr, nullptr, nullptr);
  if (err != CL_SUCCESS) return cl_status(err, "clCommandNDRangeKernelKHR", op);
  return true;
}

// The first n_ints of the slots, written to the device (blocking: the replay enqueued before
// may still read the slots, and an in-order queue runs this write after it).
Status OpenclBackend::write_slots(size_t n_ints) {
  if (n_ints == 0) return Status::ok();
  const size_t at = kRingInts - kRecordSlotInts;
  KESTREL_CL_TRY(
      clEnqueueWriteBuffer(queue_, ring_dev_, CL_TRUE, at * sizeof(int32_t),
                           n_ints * sizeof(int32_t), ring_host_.data() + at, 0, nullptr, nullptr),
      "recorded pass inputs");
  return Status::ok();
}

// A recorded pass's index array: at slot_pos_ of the slots at the ring's end. A capture writes
// it now (blocking, as write_slots); a staging only fills the host copy, which run_recorded
// writes in one go. A capture also notes which of run_recorded's inputs holds the array
// (Recording::fills); one that none (or more than one) holds leaves the recording to stage
// through its body.
Expected<int> OpenclBackend::upload_slot(const int32_t* host, int n, const char* what) {
  if (slot_pos_ + static_cast<size_t>(n) > kRecordSlotInts)
    return error("%s: %d indices exceed the recorded pass's slots", what, n);
  const size_t at = kRingInts - kRecordSlotInts + slot_pos_;
  std::memcpy(ring_host_.data() + at, host, n * sizeof(int32_t));
  slot_pos_ += (static_cast<size_t>(n) + 31) & ~size_t{31};
  if (rec_mode_ != RecMode::Capture) return static_cast<int>(at);
  const RecordFill f = find_record_fill(capture_inputs_, n_capture_inputs_, host, n, at);
  if (f.input < 0)
    capturing_->direct = false;
  else
    capturing_->fills.push_back(f);
  KESTREL_CL_TRY(
      clEnqueueWriteBuffer(queue_, ring_dev_, CL_TRUE, at * sizeof(int32_t), n * sizeof(int32_t),
                           ring_host_.data() + at, 0, nullptr, nullptr),
      what);
  return static_cast<int>(at);
}

}  // namespace kestrel::backend::opencl
