// The CUDA backend: device, memory, weights, synchronization and profiling; the ops' kernels
// are in matmul.cu, attention.cu and elementwise.cu.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string_view>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_backend_impl.cuh"
#include "format/quant/quant.h"

namespace kestrel::backend::cuda {

namespace {

constexpr size_t kRingInts = 1 << 18;  // pinned ring for positions and row lists (1 MiB)

double gib(double bytes) {
  return bytes / 1073741824.0;
}

// Whether environment variable `name` is set to exactly `value` (the kernel switches).
bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v && std::strcmp(v, value) == 0;
}

}  // namespace

Status probe() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e == cudaErrorNoDevice || (e == cudaSuccess && n == 0)) return error("no CUDA device found");
  if (e == cudaErrorInsufficientDriver)
    return error("the CUDA driver is missing or older than this build needs (%s)",
                 cudaGetErrorString(e));
  if (e != cudaSuccess) return error("CUDA is not usable: %s", cudaGetErrorString(e));
  return Status::ok();
}

Expected<std::unique_ptr<Backend>> create(const BackendOptions& options) {
  KESTREL_ASSIGN_OR_RETURN(auto be, CudaBackend::create(options.device));
  return std::unique_ptr<Backend>(std::move(be));
}

CudaWeight::~CudaWeight() {
  if (owner) owner->forget(*this);
  if (data) cudaFree(data);
}

void CudaBackend::forget(const CudaWeight& w) {
  cudaStreamSynchronize(aux_);  // a prefetch may be reading it
  drop_graphs();
  weights_.erase(w.id);
  decode_next_.clear();  // may name w
  decode_last_wq_ = nullptr;
  uncount(w.data);
  for (TileBuffer& t : tiles_)
    if (t.holds == w.id) t.holds = 0;
}

Expected<bool> probe_says_compiled(void (*probe)(int*), const char* what) {
  int* flag = nullptr;
  CUDA_TRY(cudaMalloc(&flag, sizeof(int)), (std::string(what) + " (allocation)").c_str());
  int host = 0;
  probe<<<1, 1>>>(flag);
  cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) e = cudaMemcpy(&host, flag, sizeof(int), cudaMemcpyDeviceToHost);
  cudaFree(flag);
  CUDA_TRY(e, what);
  return host == 1;
}

Expected<std::unique_ptr<CudaBackend>> CudaBackend::create(int device) {
  KESTREL_TRY(probe());
  int n = 0;
  CUDA_TRY(cudaGetDeviceCount(&n), "cudaGetDeviceCount");
  if (device < 0 || device >= n)
    return error("CUDA device %d does not exist (%d present)", device, n);
  std::unique_ptr<CudaBackend> be(new CudaBackend());
  be->device_ = device;
  CUDA_TRY(cudaSetDevice(device), "cudaSetDevice");
  cudaDeviceProp prop;
  CUDA_TRY(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  if (prop.major < 7)
    return error("CUDA device %s has compute capability %d.%d; Kestrel needs 7.0 or newer",
                 prop.name, prop.major, prop.minor);
  be->device_name_ = format("cuda: %s (sm_%d%d, %.0f GiB)", prop.name, prop.major, prop.minor,
                            gib(static_cast<double>(prop.totalGlobalMem)));
  // The ops run at the highest priority; the prefetching dequantization of the aux stream only
  // fills the SMs they leave idle (it is off the critical path).
  int least = 0, greatest = 0;
  CUDA_TRY(cudaDeviceGetStreamPriorityRange(&least, &greatest), "cudaDeviceGetStreamPriorityRange");
  CUDA_TRY(cudaStreamCreateWithPriority(&be->stream_, cudaStreamNonBlocking, greatest),
           "cudaStreamCreate");
  CUDA_TRY(cudaStreamCreateWithPriority(&be->aux_, cudaStreamNonBlocking, least),
           "cudaStreamCreate");
  for (TileBuffer& t : be->tiles_) {
    CUDA_TRY(cudaEventCreateWithFlags(&t.ready, cudaEventDisableTiming), "cudaEventCreate");
    CUDA_TRY(cudaEventCreateWithFlags(&t.free, cudaEventDisableTiming), "cudaEventCreate");
  }
  if (cublasCreate(&be->cublas_) != CUBLAS_STATUS_SUCCESS)
    return error("cuBLAS could not be initialized on %s", prop.name);
  cublasSetStream(be->cublas_, be->stream_);
  be->scratch_.assign(kSlots, {nullptr, 0});
  be->mma_disabled_ = env_is("KESTREL_CUDA_NO_MMA", "1");
  be->int8_disabled_ = env_is("KESTREL_CUDA_NO_INT8", "1");
  be->frag_disabled_ = env_is("KESTREL_CUDA_NO_FRAG", "1");
  be->fuse_inputs_ = !env_is("KESTREL_CUDA_NO_FUSED_INPUTS", "1");
  be->fuse_add_ = !env_is("KESTREL_CUDA_NO_FUSED_ADD", "1");
  be->rope_qk_one_launch_ = !env_is("KESTREL_CUDA_NO_ROPE_QK", "1");
  be->fused_rope_kv_ = !env_is("KESTREL_CUDA_NO_FUSED_ROPE_KV", "1");
  be->swiglu4_ = !env_is("KESTREL_CUDA_NO_SWIGLU4", "1");
  be->rows_rope_kv_ = !env_is("KESTREL_CUDA_NO_ROWS_ROPE_KV", "1");
  be->group_matmuls_ = !env_is("KESTREL_CUDA_NO_GROUP", "1");
  be->group_wgmma_ = !env_is("KESTREL_CUDA_WGMMA_NO_GROUP", "1");
  be->sm_count_ = prop.multiProcessorCount;
  if (env_is("KESTREL_CUDA_FLASH", "0") || env_is("KESTREL_CUDA_FLASH", "1"))
    be->flash_attention_ = env_is("KESTREL_CUDA_FLASH", "1") ? 1 : 0;
  be->mma_attention_ = !env_is("KESTREL_CUDA_FLASH_MMA", "0");
  be->graphs_disabled_ = env_is("KESTREL_CUDA_NO_GRAPHS", "1");
  be->graph_upload_once_ = !env_is("KESTREL_CUDA_GRAPH_UPLOAD_ONCE", "0");
  be->graph_direct_stage_ = env_is("KESTREL_CUDA_GRAPH_DIRECT_STAGE", "1");
  be->graph_one_copy_ = env_is("KESTREL_CUDA_GRAPH_ONE_COPY", "1");
  if (!env_is("KESTREL_CUDA_WGMMA", "0")) {
    KESTREL_ASSIGN_OR_RETURN(be->wgmma_, wgmma_available(device));
    if (be->wgmma_) be->wgmma_maps_.reset(new_wgmma_map_cache());
  }
  be->smem_optin_ = prop.sharedMemPerBlockOptin;
  if (be->wgmma_ && !env_is("KESTREL_CUDA_STREAM16", "0")) {
    KESTREL_ASSIGN_OR_RETURN(be->stream16_, stream16_available(device));
  }
  if (env_is("KESTREL_CUDA_MATVEC_STREAM", "1")) {
    KESTREL_ASSIGN_OR_RETURN(be->matvec_stream_, matvec_stream_available(device));
  }
  be->fused_swiglu_ = env_is("KESTREL_CUDA_FUSED_SWIGLU", "1");
  be->matmul_swiglu_ = env_is("KESTREL_CUDA_MATMUL_SWIGLU", "1");
  be->matmul_add_norm_ = env_is("KESTREL_CUDA_MATMUL_ADD_NORM", "1");
  be->matmul_rope_kv_ = env_is("KESTREL_CUDA_MATMUL_ROPE_KV", "1");
  if (env_is("KESTREL_CUDA_FUSED_DECODE", "1")) {
    KESTREL_ASSIGN_OR_RETURN(be->fused_decode_, decode_layer_available(device));
  }
  if (const char* rows = std::getenv("KESTREL_CUDA_ROWS_MAX_TOKENS"))
    be->rows_max_tokens_ = std::clamp(std::atoi(rows), 0, 16);
  if (const char* split = std::getenv("KESTREL_CUDA_ATT_SPLIT_MIN"))
    be->att_split_min_tokens_ = std::clamp(std::atoi(split), 1, 17);
  be->att_decode_ = !env_is("KESTREL_CUDA_ATT_DECODE", "0");
  if (const char* keys = std::getenv("KESTREL_CUDA_ATT_DECODE_MAX_KEYS"))
    be->att_decode_max_keys_ = std::max(0, std::atoi(keys));
  be->rope_attention_ = !env_is("KESTREL_CUDA_ROPE_ATTENTION", "0");
  if (const char* tc16 = std::getenv("KESTREL_CUDA_ATT_TC16_MIN"))
    be->att_tc16_min_tokens_ = std::clamp(std::atoi(tc16), 1, 17);
  CUDA_TRY(cudaMallocHost(&be->ring_host_, kRingInts * sizeof(int32_t)), "pinned host buffer");
  KESTREL_ASSIGN_OR_RETURN(void* ring, be->device_alloc(kRingInts * sizeof(int32_t), "positions"));
  be->ring_dev_ = static_cast<int32_t*>(ring);
  CUDA_TRY(cudaMallocHost(&be->slots_host_, sizeof(int32_t) * kGraphSlots * kSlotInts),
           "pinned host buffer");
  KESTREL_ASSIGN_OR_RETURN(void* slots,
                           be->device_alloc(sizeof(int32_t) * kGraphSlots * kSlotInts, "graphs"));
  be->slots_dev_ = static_cast<int32_t*>(slots);
  if (be->fused_decode_) {
    KESTREL_ASSIGN_OR_RETURN(void* counter,
                             be->device_alloc(sizeof(unsigned long long), "grid barrier"));
    CUDA_TRY(cudaMemset(counter, 0, sizeof(unsigned long long)), "cudaMemset");
    be->decode_barrier_ = static_cast<unsigned long long*>(counter);
    if (env_is("KESTREL_CUDA_DECODE_TIMING", "1")) KESTREL_TRY(be->init_decode_timing());
  }
  if (env_is("KESTREL_CUDA_GRAPH_TIMING", "1")) KESTREL_TRY(be->init_graph_timing());
  if (be->stream16_ && env_is("KESTREL_CUDA_STREAM16_TIMING", "1")) {
    KESTREL_ASSIGN_OR_RETURN(void* acc, be->device_alloc(stream16_timing_bytes(), "timing"));
    CUDA_TRY(cudaMemset(acc, 0, stream16_timing_bytes()), "cudaMemset");
    be->stream16_timing_ = static_cast<unsigned long long*>(acc);
  }
  return Expected<std::unique_ptr<CudaBackend>>(std::move(be));
}

CudaBackend::~CudaBackend() {
  if (stream_) cudaStreamSynchronize(stream_);
  if (aux_) cudaStreamSynchronize(aux_);
  for (TileBuffer& t : tiles_) {
    if (t.ptr) device_free(t.ptr);
    if (t.ready) cudaEventDestroy(t.ready);
    if (t.free) cudaEventDestroy(t.free);
  }
  if (aux_) cudaStreamDestroy(aux_);
  for (auto& p : pending_) {
    cudaEventDestroy(p.start);
    cudaEventDestroy(p.stop);
  }
  for (cudaEvent_t e : free_events_) cudaEventDestroy(e);
  for (auto& [ptr, bytes] : scratch_)
    if (ptr) device_free(ptr);
  for (auto& [host, dev] : tables_) device_free(dev);
  drop_graphs();
  graph_timing_.reset();  // (prints its table)
  if (slots_dev_) device_free(slots_dev_);
  if (decode_barrier_) device_free(decode_barrier_);
  if (decode_timing_) {
    print_decode_timing();
    device_free(decode_timing_);
  }
  if (stream16_timing_) {
    print_stream16_timing(stream16_timing_);
    device_free(stream16_timing_);
  }
  if (slots_host_) cudaFreeHost(slots_host_);
  if (ring_dev_) device_free(ring_dev_);
  if (ring_host_) cudaFreeHost(ring_host_);
  if (cublas_) cublasDestroy(cublas_);
  if (stream_) cudaStreamDestroy(stream_);
}

int64_t CudaBackend::available_memory() const {
  size_t free = 0, total = 0;
  if (cudaSetDevice(device_) != cudaSuccess || cudaMemGetInfo(&free, &total) != cudaSuccess)
    return -1;
  return static_cast<int64_t>(free);
}

// 2048-token micro-batches where the memory allows their activations (~0.75 GiB of scratch for
// llama2-7b, against ~0.4 GiB at 512), else llama.cpp's 512.
int CudaBackend::preferred_ubatch() const {
  constexpr int64_t kRoomFor2048 = int64_t{4} << 30;
  return available_memory() >= kRoomFor2048 ? 2048 : 512;
}

Backend::MemoryUse CudaBackend::memory_use() const {
  MemoryUse m;
  m.known = true;
  m.weights = held_[static_cast<int>(MemKind::kWeights)];
  m.kv_cache = held_[static_cast<int>(MemKind::kKvCache)];
  m.scratch = held_[static_cast<int>(MemKind::kScratch)];
  m.scratch_peak = peak_[static_cast<int>(MemKind::kScratch)];
  return m;
}

void CudaBackend::uncount(void* p) {
  const auto it = live_.find(p);
  if (it == live_.end()) return;
  held_[static_cast<int>(it->second.second)] -= static_cast<int64_t>(it->second.first);
  live_.erase(it);
}

void CudaBackend::device_free(void* p) {
  uncount(p);
  cudaFree(p);
}

Expected<void*> CudaBackend::device_alloc(size_t bytes, const char* what, MemKind kind) {
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, std::max<size_t>(bytes, 1));
  if (e == cudaSuccess) {
    const int k = static_cast<int>(kind);
    live_[p] = {bytes, kind};
    held_[k] += static_cast<int64_t>(bytes);
    peak_[k] = std::max(peak_[k], held_[k]);
    return p;
  }
  cudaGetLastError();  // clear the sticky-free error state of a failed allocation
  if (e == cudaErrorMemoryAllocation) {
    const int64_t free = available_memory();
    return error(
        "out of GPU memory allocating %.3f GiB for %s on %s (%.3f GiB free): lower -ngl, the "
        "context (-c) or the micro-batch (-ub), or quantize the KV cache (-ctk/-ctv q8_0, q4_0)",
        gib(static_cast<double>(bytes)), what, device_name_.c_str(),
        gib(static_cast<double>(free)));
  }
  return cuda_status(e, what);
}

Expected<void*> CudaBackend::scratch(int slot, size_t bytes) {
  auto& [ptr, size] = scratch_[slot];
  if (size >= bytes) return ptr;
  if (mode_ != Mode::Eager) return error("scratch must not grow while a graph is recorded");
  drop_graphs();
  if (ptr) {
    CUDA_TRY(cudaStreamSynchronize(stream_), "scratch resize");
    device_free(ptr);
    ptr = nullptr;
    size = 0;
  }
  KESTREL_ASSIGN_OR_RETURN(ptr, device_alloc(bytes, "scratch"));
  size = bytes;
  return ptr;
}

Expected<Tensor> CudaBackend::alloc(quant::DType type, int64_t rows, int64_t cols,
                                    const char* what) {
  const bool kv = std::string_view(what).rfind("KV cache", 0) == 0;
  return alloc_as(type, rows, cols, what, kv ? MemKind::kKvCache : MemKind::kScratch);
}

Expected<Tensor> CudaBackend::alloc_as(quant::DType type, int64_t rows, int64_t cols,
                                       const char* what, MemKind kind) {
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
  KESTREL_ASSIGN_OR_RETURN(t.data, device_alloc(t.bytes, what, kind));
  t.owner = this;
  return t;
}

void CudaBackend::free(Tensor& t) {
  forget_activations();  // a later tensor may get the same address
  if (t.data) {
    drop_graphs();
    cudaStreamSynchronize(stream_);  // a kernel may still read it
    device_free(t.data);
  }
  t = Tensor();
}

Status CudaBackend::upload(Tensor& dst, int64_t row0, int64_t n_rows, const void* src) {
  forget_activations();
  if (row0 < 0 || n_rows < 0 || row0 + n_rows > dst.rows)
    return error("upload of rows %lld..%lld outside a tensor of %lld rows",
                 static_cast<long long>(row0), static_cast<long long>(row0 + n_rows),
                 static_cast<long long>(dst.rows));
  const size_t rb = dst.row_bytes();
  // The source is ordinary host memory that the caller may reuse on return: a synchronous copy.
  CUDA_TRY(cudaMemcpyAsync(static_cast<uint8_t*>(dst.data) + rb * row0, src, rb * n_rows,
                           cudaMemcpyHostToDevice, stream_),
           "upload to the GPU");
  CUDA_TRY(cudaStreamSynchronize(stream_), "upload to the GPU");
  return Status::ok();
}

Status CudaBackend::download(const Tensor& src, int64_t row0, int64_t n_rows, void* dst) {
  if (row0 < 0 || n_rows < 0 || row0 + n_rows > src.rows)
    return error("download of rows %lld..%lld outside a tensor of %lld rows",
                 static_cast<long long>(row0), static_cast<long long>(row0 + n_rows),
                 static_cast<long long>(src.rows));
  const size_t rb = src.row_bytes();
  CUDA_TRY(cudaMemcpyAsync(dst, static_cast<const uint8_t*>(src.data) + rb * row0, rb * n_rows,
                           cudaMemcpyDeviceToHost, stream_),
           "download from the GPU");
  op_synchronized_ = true;
  return synchronize();
}

Status CudaBackend::synchronize() {
  const cudaError_t e = cudaStreamSynchronize(stream_);
  if (e != cudaSuccess)
    return error("a CUDA kernel failed: %s (%s); rerun with CUDA_LAUNCH_BLOCKING=1 to find the op",
                 cudaGetErrorString(e), cudaGetErrorName(e));
  return flush_profile();
}

Status CudaBackend::profile_op(std::string_view kind, OpProfiler& profiler,
                               const std::function<Status()>& op) {
  cudaEvent_t ev[2];
  for (cudaEvent_t& e : ev) {
    if (!free_events_.empty()) {
      e = free_events_.back();
      free_events_.pop_back();
    } else {
      CUDA_TRY(cudaEventCreate(&e), "cudaEventCreate");
    }
  }
  op_synchronized_ = false;
  CUDA_TRY(cudaEventRecord(ev[0], stream_), "cudaEventRecord");
  Status st = op();
  CUDA_TRY(cudaEventRecord(ev[1], stream_), "cudaEventRecord");
  pending_.push_back({std::string(kind), &profiler, ev[0], ev[1]});
  // An op that waited for the stream itself (a download) read the pending times before its own
  // entry existed: read it now, as no later synchronize() may come (the last pass's logits; the
  // H200 profiles counted 383 logits copies of 384).
  if (op_synchronized_ && st) st = synchronize();
  return st;
}

// Device timers are read once the stream has passed them (synchronize), so profiling adds no
// host waits between ops.
Status CudaBackend::flush_profile() {
  for (Pending& p : pending_) {
    float ms = 0;
    CUDA_TRY(cudaEventElapsedTime(&ms, p.start, p.stop), "cudaEventElapsedTime");
    p.profiler->add(p.kind, ms);
    free_events_.push_back(p.start);
    free_events_.push_back(p.stop);
  }
  pending_.clear();
  return Status::ok();
}

// A captured upload into a new slot: which of run_recorded's inputs holds it. One that none (or
// more than one) holds leaves the recording to stage through its body.
void CudaBackend::note_fill(const int32_t* host, int n, size_t slot) {
  if (n <= 0) return;  // nothing to refill
  const RecordFill f = find_record_fill(capture_inputs_, n_capture_inputs_, host, n, slot);
  if (f.input < 0)
    recording_->direct = false;
  else
    recording_->fills.push_back(f);
}

Expected<const int32_t*> CudaBackend::upload_ints(const int32_t* host, int n) {
  if (mode_ != Mode::Eager) {
    // Recorded bodies read their inputs from fixed slots: the recording copies pinned slot k to
    // device slot k; a replay refills the pinned slots first.
    // (graph_slot_ > 0: the previous upload was of this body.)
    const bool same = graph_upload_once_ && graph_slot_ > 0 && host == last_slot_host_ &&
                      n == last_slot_n_ &&
                      std::memcmp(slots_host_ + last_slot_off_, host, n * sizeof(int32_t)) == 0;
    if (mode_ == Mode::Capture) {
      recording_->reused.push_back(same);
    } else if (upload_index_ >= recording_->reused.size() ||
               recording_->reused[upload_index_] != same) {
      stage_diverged_ = true;  // run_recorded runs this pass eagerly instead
      return static_cast<const int32_t*>(slots_dev_);
    }
    ++upload_index_;
    if (same) return static_cast<const int32_t*>(slots_dev_ + last_slot_off_);
    if (graph_slot_ >= kGraphSlots || n > kSlotInts)
      return error("a recorded forward pass uploads more indices than its slots hold");
    const size_t off = static_cast<size_t>(graph_slot_++) * kSlotInts;
    std::memcpy(slots_host_ + off, host, n * sizeof(int32_t));
    last_slot_host_ = host;
    last_slot_n_ = n;
    last_slot_off_ = off;
    if (mode_ == Mode::Capture) {
      note_fill(host, n, off);
      if (graph_slot_ <= copied_slots_) return static_cast<const int32_t*>(slots_dev_ + off);
      CUDA_TRY(cudaMemcpyAsync(slots_dev_ + off, slots_host_ + off, n * sizeof(int32_t),
                               cudaMemcpyHostToDevice, stream_),
               "index upload");
    }
    return static_cast<const int32_t*>(slots_dev_ + off);
  }
  if (eager_uploads_ >= 0) ++eager_uploads_;
  if (n <= 0) return static_cast<const int32_t*>(ring_dev_);
  if (static_cast<size_t>(n) > kRingInts) return error("%d indices exceed the upload ring", n);
  if (last_ints_dev_ && last_ints_.size() == static_cast<size_t>(n) &&
      std::memcmp(last_ints_.data(), host, n * sizeof(int32_t)) == 0)
    return last_ints_dev_;
  if (ring_pos_ + n > kRingInts) {
    // The ring wraps: earlier copies out of it must have happened before it is overwritten.
    CUDA_TRY(cudaStreamSynchronize(stream_), "index upload");
    ring_pos_ = 0;
  }
  std::memcpy(ring_host_ + ring_pos_, host, n * sizeof(int32_t));
  int32_t* dev = ring_dev_ + ring_pos_;
  CUDA_TRY(cudaMemcpyAsync(dev, ring_host_ + ring_pos_, n * sizeof(int32_t), cudaMemcpyHostToDevice,
                           stream_),
           "index upload");
  ring_pos_ += (n + 31) & ~31;
  last_ints_.assign(host, host + n);
  last_ints_dev_ = dev;
  return static_cast<const int32_t*>(dev);
}

Expected<std::unique_ptr<Weight>> CudaBackend::load_weight(const HostMatrix& m) {
  if (!quant::is_supported(m.type))
    return error("%s: type %s is not supported by the CUDA backend", m.name.c_str(),
                 quant::type_name(m.type));
  const int64_t rb = quant::row_bytes(m.type, m.n_in);
  if (m.n_in % 32 != 0)
    return error("%s: rows of %lld elements: the CUDA backend needs a multiple of 32",
                 m.name.c_str(), static_cast<long long>(m.n_in));
  if (rb < 0 || m.n_out <= 0)
    return error("%s: %lld x %lld is not a valid %s matrix", m.name.c_str(),
                 static_cast<long long>(m.n_out), static_cast<long long>(m.n_in),
                 quant::type_name(m.type));
  auto w = std::make_unique<CudaWeight>();
  w->owner = this;
  w->id = next_weight_id_++;
  w->type = m.type;
  w->n_in = m.n_in;
  w->n_out = m.n_out;
  w->name = m.name;
  const size_t total = static_cast<size_t>(rb) * m.n_out;
  w->bytes = total;
  weights_[w->id] = w.get();
  KESTREL_ASSIGN_OR_RETURN(w->data, device_alloc(total, m.name.c_str(), MemKind::kWeights));
  w->qs = static_cast<uint8_t*>(w->data);
  const bool repack = m.type == quant::DType::Q4_0 || m.type == quant::DType::Q8_0;
  if (!repack) {
    CUDA_TRY(cudaMemcpy(w->data, m.data, total, cudaMemcpyHostToDevice), "weight upload");
    return std::unique_ptr<Weight>(std::move(w));
  }
  // Repack: quants of all rows first ([n_out][qbytes]), then the fp16 scales ([n_out][nb]).
  const bool q4 = m.type == quant::DType::Q4_0;
  const int64_t nb = m.n_in / 32, qb = q4 ? 16 : 32, block = q4 ? 18 : 34;
  std::vector<uint8_t> packed(total);
  uint8_t* qs = packed.data();
  uint8_t* ds = packed.data() + static_cast<size_t>(m.n_out) * nb * qb;
  const auto* src = static_cast<const uint8_t*>(m.data);
  for (int64_t r = 0; r < m.n_out; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = src + (r * nb + b) * block;
      std::memcpy(ds + (r * nb + b) * 2, blk, 2);
      std::memcpy(qs + (r * nb + b) * qb, blk + 2, qb);
    }
  CUDA_TRY(cudaMemcpy(w->data, packed.data(), total, cudaMemcpyHostToDevice), "weight upload");
  w->d = reinterpret_cast<__half*>(w->qs + static_cast<size_t>(m.n_out) * nb * qb);
  return std::unique_ptr<Weight>(std::move(w));
}

Expected<Tensor> CudaBackend::load_vector(const float* data, int64_t n, const char* what) {
  KESTREL_ASSIGN_OR_RETURN(Tensor t, alloc_as(quant::DType::F32, 1, n, what, MemKind::kWeights));
  Status st = upload(t, 0, 1, data);
  if (!st) {
    free(t);
    return st;
  }
  return t;
}

Expected<const uint8_t*> CudaBackend::device_table(const HostMatrix& table) {
  if (auto it = tables_.find(table.data); it != tables_.end())
    return static_cast<const uint8_t*>(it->second);
  const size_t bytes = static_cast<size_t>(quant::row_bytes(table.type, table.n_in)) * table.n_out;
  KESTREL_ASSIGN_OR_RETURN(void* dev, device_alloc(bytes, "token embeddings", MemKind::kWeights));
  Status st = cuda_status(cudaMemcpy(dev, table.data, bytes, cudaMemcpyHostToDevice),
                          "token embeddings upload");
  if (!st) {
    device_free(dev);
    return st;
  }
  tables_[table.data] = dev;
  return static_cast<const uint8_t*>(dev);
}

Status CudaBackend::embed(const HostMatrix& table, const int32_t* tokens, int n_tokens,
                          Tensor& out) {
  forget_activations();
  for (int i = 0; i < n_tokens; ++i)
    if (tokens[i] < 0 || tokens[i] >= table.n_out)
      return error("token id %d is outside the vocabulary of %lld tokens", tokens[i],
                   static_cast<long long>(table.n_out));
  KESTREL_ASSIGN_OR_RETURN(const uint8_t* dev, device_table(table));
  KESTREL_ASSIGN_OR_RETURN(const int32_t* ids, upload_ints(tokens, n_tokens));
  if (mode_ == Mode::Stage) return Status::ok();
  return launch_embed(table.type, dev, quant::row_bytes(table.type, table.n_in), table.n_in, ids,
                      n_tokens, static_cast<float*>(out.data), stream_);
}

Status CudaBackend::rms_norm(const Tensor& x, int n_tokens, const Tensor& weight, float eps,
                             Tensor& out) {
  forget_activations();
  KESTREL_ASSIGN_OR_RETURN(const MatmulInputOut also,
                           fused_matmul_input(static_cast<float*>(out.data), n_tokens, out.cols));
  if (mode_ == Mode::Stage || lab_skips("norm")) return Status::ok();
  return launch_rms_norm(static_cast<float*>(x.data), nullptr, n_tokens, x.cols,
                         static_cast<const float*>(weight.data), eps, static_cast<float*>(out.data),
                         also, stream_);
}

Status CudaBackend::add_rms_norm(Tensor& x, const Tensor& y, int n_tokens, const Tensor& weight,
                                 float eps, Tensor& out) {
  if (!fuse_add_) return Backend::add_rms_norm(x, y, n_tokens, weight, eps, out);
  forget_activations();
  KESTREL_ASSIGN_OR_RETURN(const MatmulInputOut also,
                           fused_matmul_input(static_cast<float*>(out.data), n_tokens, out.cols));
  if (mode_ == Mode::Stage || lab_skips("norm")) return Status::ok();
  return launch_rms_norm(static_cast<float*>(x.data), static_cast<const float*>(y.data), n_tokens,
                         x.cols, static_cast<const float*>(weight.data), eps,
                         static_cast<float*>(out.data), also, stream_);
}

Status CudaBackend::rope(Tensor& x, int n_tokens, const int32_t* positions, const RopeParams& p) {
  forget_activations();
  KESTREL_ASSIGN_OR_RETURN(const int32_t* pos, upload_ints(positions, n_tokens));
  if (mode_ == Mode::Stage) return Status::ok();
  return launch_rope(static_cast<float*>(x.data), nullptr, 0, n_tokens, pos, p, stream_);
}

Status CudaBackend::rope_qk(Tensor& q, Tensor& k, int n_tokens, const int32_t* positions,
                            const RopeParams& pq, const RopeParams& pk) {
  // One launch for both (KESTREL_CUDA_NO_ROPE_QK=1: two). H200, tg128: 371 t/s against 354 for
  // the unchanged baseline row of the same run (-32 launches per token).
  if (!rope_qk_one_launch_ || pq.head_dim != pk.head_dim || pq.freq_base != pk.freq_base ||
      pq.layout != pk.layout)
    return Backend::rope_qk(q, k, n_tokens, positions, pq, pk);
  forget_activations();
  KESTREL_ASSIGN_OR_RETURN(const int32_t* pos, upload_ints(positions, n_tokens));
  if (mode_ == Mode::Stage) return Status::ok();
  return launch_rope(static_cast<float*>(q.data), static_cast<float*>(k.data), pk.n_heads, n_tokens,
                     pos, pq, stream_);
}

Status CudaBackend::swiglu(const Tensor& gate, const Tensor& up, int n_tokens, Tensor& out) {
  forget_activations();
  KESTREL_ASSIGN_OR_RETURN(const MatmulInputOut also,
                           fused_matmul_input(static_cast<float*>(out.data), n_tokens, out.cols));
  if (mode_ == Mode::Stage || lab_skips("swiglu")) return Status::ok();
  return launch_swiglu(static_cast<const float*>(gate.data), static_cast<const float*>(up.data),
                       static_cast<int64_t>(n_tokens) * gate.cols, static_cast<float*>(out.data),
                       also, swiglu4_, stream_);
}

Status CudaBackend::add(Tensor& x, const Tensor& y, int n_tokens) {
  forget_activations();
  if (mode_ == Mode::Stage) return Status::ok();
  return launch_add(static_cast<float*>(x.data), static_cast<const float*>(y.data),
                    static_cast<int64_t>(n_tokens) * x.cols, stream_);
}

Status CudaBackend::get_rows(const Tensor& x, const int32_t* rows, int n_rows, Tensor& out) {
  forget_activations();
  for (int i = 0; i < n_rows; ++i)
    if (rows[i] < 0 || rows[i] >= x.rows)
      return error("get_rows: row %d outside a tensor of %lld rows", rows[i],
                   static_cast<long long>(x.rows));
  KESTREL_ASSIGN_OR_RETURN(const int32_t* dev_rows, upload_ints(rows, n_rows));
  if (mode_ == Mode::Stage) return Status::ok();
  return launch_get_rows(static_cast<const float*>(x.data), x.cols, dev_rows, n_rows,
                         static_cast<float*>(out.data), stream_);
}

Status CudaBackend::check_cache_positions(const int32_t* positions, int n_tokens,
                                          int64_t cache_rows) {
  for (int t = 0; t < n_tokens; ++t)
    if (positions[t] < 0 || positions[t] >= cache_rows)
      return error("kv_store: position %d outside the cache of %lld positions", positions[t],
                   static_cast<long long>(cache_rows));
  return Status::ok();
}

Status CudaBackend::kv_store(const Tensor& k, const Tensor& v, int n_tokens,
                             const int32_t* positions, Tensor& k_cache, Tensor& v_cache) {
  forget_activations();
  const int64_t cache_rows = std::min(k_cache.rows, v_cache.rows);
  if (k.cols != k_cache.cols || v.cols != v_cache.cols || n_tokens > k.rows || n_tokens > v.rows)
    return error("kv_store: rows of %lld/%lld values do not match the caches' %lld/%lld",
                 static_cast<long long>(k.cols), static_cast<long long>(v.cols),
                 static_cast<long long>(k_cache.cols), static_cast<long long>(v_cache.cols));
  KESTREL_TRY(check_cache_positions(positions, n_tokens, cache_rows));
  KESTREL_ASSIGN_OR_RETURN(const int32_t* pos, upload_ints(positions, n_tokens));
  if (mode_ == Mode::Stage) return Status::ok();
  const KvStoreSide sides[2] = {
      {static_cast<const float*>(k.data), k.cols, k_cache.type, static_cast<uint8_t*>(k_cache.data),
       static_cast<int64_t>(k_cache.row_bytes())},
      {static_cast<const float*>(v.data), v.cols, v_cache.type, static_cast<uint8_t*>(v_cache.data),
       static_cast<int64_t>(v_cache.row_bytes())}};
  if (k_cache.type == v_cache.type) return launch_kv_store(sides, 2, n_tokens, pos, stream_);
  KESTREL_TRY(launch_kv_store(&sides[0], 1, n_tokens, pos, stream_));
  return launch_kv_store(&sides[1], 1, n_tokens, pos, stream_);
}

}  // namespace kestrel::backend::cuda
