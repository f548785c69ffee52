// The OpenCL backend: one context, one in-order queue, one program (kernels/*.cl, built through
// the binary cache of program_cache.h). Ops are enqueued without blocking; the host waits only
// in synchronize(), download() and upload() (which must have read the caller's buffer).
//
// Tensor::data holds the tensor's cl_mem. Small host index arrays (token ids, positions, row
// lists) travel through an upload ring: a host staging area copied into a device buffer in
// queue order, reused only after the queue has passed the copies out of it.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "backend/backend.h"
#include "backend/opencl/cl_common.h"

namespace kestrel::backend::opencl {

class OpenclBackend;

// The most tokens the small-batch matmul kernel takes (MV_MAX_T of kernels/matmul.cl).
constexpr int kSmallBatch = 8;

// A matmul weight. Q4_0 and Q8_0 are repacked block-major (kernels/matmul.cl): qs holds
// [n_in / 32][n_out][16 or 32] quant bytes, d [n_in / 32][n_out] fp16 scales. Every other type
// keeps its GGUF rows in qs (d unused).
class ClWeight final : public Weight {
 public:
  ~ClWeight() override;
  OpenclBackend* owner = nullptr;
  cl_mem qs = nullptr;
  cl_mem d = nullptr;
  int64_t row_bytes = 0;  // GGUF row bytes (the generic layout)
  size_t qs_bytes = 0, d_bytes = 0;
};

// What the backend learned about its device (clGetDeviceInfo), for choosing kernels.
struct DeviceInfo {
  std::string name, vendor, version, driver, platform_name;
  bool gpu = false;
  cl_ulong global_mem = 0, max_alloc = 0, local_mem = 0;
  size_t max_work_group = 0;
  bool fp16 = false;            // cl_khr_fp16: half arithmetic allowed
  bool subgroups = false;       // cl_khr_subgroups or cl_intel_subgroups
  bool khr_subgroups = false;   // cl_khr_subgroups (its pragma is enabled)
  bool correct_divide = false;  // CL_FP_CORRECTLY_ROUNDED_DIVIDE_SQRT
  cl_uint compute_units = 0;
};

// The shape of one instance of the tiled matmul kernel (kernels/matmul_tiled.cl).
struct TileShape {
  int tm, tn;     // weight rows x tokens per work-group
  int wx, wy;     // work-group
  bool vec4;      // float4 reads of runs of four rows and tokens (KESTREL_CL_TILED_SCALAR=1: off)
  bool prefetch;  // Q4_0 / Q8_0: the next step's loads during this one's products
                  // (default; KESTREL_CL_TILED_PREFETCH=0: off)
};

class OpenclBackend final : public Backend {
 public:
  static Expected<std::unique_ptr<OpenclBackend>> create(int platform, int device);
  ~OpenclBackend() override;

  const char* name() const override { return "opencl"; }
  std::string device_name() const override { return device_name_; }
  int64_t available_memory() const override;

  Expected<Tensor> alloc(quant::DType type, int64_t rows, int64_t cols, const char* what) override;
  void free(Tensor& t) override;
  Status upload(Tensor& dst, int64_t row0, int64_t n_rows, const void* src) override;
  Status download(const Tensor& src, int64_t row0, int64_t n_rows, void* dst) override;
  Expected<std::unique_ptr<Weight>> load_weight(const HostMatrix& m) override;
  Expected<Tensor> load_vector(const float* data, int64_t n, const char* what) override;

  Status embed(const HostMatrix& table, const int32_t* tokens, int n_tokens, Tensor& out) override;
  Status rms_norm(const Tensor& x, int n_tokens, const Tensor& weight, float eps,
                  Tensor& out) override;
  Status matmul(const Weight& w, const Tensor& x, int n_tokens, Tensor& out,
                const Tensor* bias) override;
  Status matmul_group(const Tensor& x, int n_tokens, const MatmulOut* outs, int n_outs) override;
  Status add_rms_norm(Tensor& x, const Tensor& y, int n_tokens, const Tensor& weight, float eps,
                      Tensor& out) override;
  Status rope(Tensor& x, int n_tokens, const int32_t* positions, const RopeParams& p) override;
  Status rope_qk(Tensor& q, Tensor& k, int n_tokens, const int32_t* positions, const RopeParams& pq,
                 const RopeParams& pk) override;
  Status kv_store(const Tensor& k, const Tensor& v, int n_tokens, const int32_t* positions,
                  Tensor& k_cache, Tensor& v_cache) override;
  // rope_qk and kv_store as one launch (kernels/attention.cl), unless KESTREL_CL_FUSED_ROPE_KV=0.
  bool fuses_rope_kv_store(const Tensor& k_cache, const Tensor& v_cache) const override;
  Status rope_kv_store(Tensor& q, Tensor& k, const Tensor& v, int n_tokens,
                       const int32_t* positions, const RopeParams& pq, const RopeParams& pk,
                       Tensor& k_cache, Tensor& v_cache) override;
  Status attention(const Tensor& q, int n_tokens, const int32_t* positions, const Tensor& k_cache,
                   const Tensor& v_cache, const AttentionParams& p, Tensor& out) override;
  Status swiglu(const Tensor& gate, const Tensor& up, int n_tokens, Tensor& out) override;
  Status add(Tensor& x, const Tensor& y, int n_tokens) override;
  Status get_rows(const Tensor& x, const int32_t* rows, int n_rows, Tensor& out) override;
  Status synchronize() override;
  // record.cpp: passes recorded into cl_khr_command_buffer and replayed (KESTREL_CL_RECORD=1).
  Status run_recorded(uint64_t key, const RecordInput* inputs, int n_inputs,
                      const std::function<Status()>& body) override;
  Status profile_op(std::string_view kind, OpProfiler& profiler,
                    const std::function<Status()>& op) override;

  const DeviceInfo& info() const { return info_; }
  // One-time setup (context, program build or cache load) in ms, and what the cache did.
  double setup_ms() const override { return setup_ms_; }
  std::string setup_note() const override { return setup_note_; }
  // A weight's buffers are released (called by ~ClWeight).
  void release_weight(ClWeight& w);

 private:
  OpenclBackend() = default;
  Status init(int platform, int device);
  Status build_kernels();
  // A device buffer of `bytes`, checked against the device's limits first and touched so that
  // a lazily allocating driver fails here, not in a later kernel. Errors give the numbers.
  Expected<cl_mem> device_alloc(size_t bytes, const char* what);
  void device_free(cl_mem m, size_t bytes);
  // A scratch buffer of at least `bytes` for `slot`, grown on demand.
  Expected<cl_mem> scratch(int slot, size_t bytes);
  // Copies n ints to the device through the ring; returns their offset in ring_dev_.
  Expected<int> upload_ints(const int32_t* host, int n, const char* what);
  // The rows of a host embedding table, uploaded once per table.
  Expected<cl_mem> device_table(const HostMatrix& table);
  // Device table of base^(-2i / head_dim), cached per (base, head_dim).
  Expected<cl_mem> rope_freqs(float base, int head_dim);
  // Whether a matmul of w over n_tokens runs in half arithmetic (matmul_tiled_half.cl), and the
  // conversion of its activations (x_half_blocks into scratch slots 2 and 3).
  // (Also true on the tensor-core path, whose f16 rows take the same scratch slots.)
  bool uses_half(const ClWeight& w, int n_tokens) const;
  // The fewest tokens that a matmul of weights of `type` runs on the tiled kernels with: fewer
  // take the small-batch kernel (matmul_small_batch).
  int first_tiled_tokens(quant::DType type) const;
  Status half_activations(const Tensor& x, int n_tokens, const char* op);
  // The f16 companion of an activation (kernels/elementwise.cl): the form those matmuls read
  // for n_tokens (0 none, 1 nv_x_f16's, 2 x_half_blocks'), its buffers (scratch slots 2 and 3,
  // the same sizes for every writer and reader), and whether x's was written by the last launch.
  int companion_mode(int n_tokens, int64_t cols) const;
  Status companion_buffers(int mode, int n_tokens, int64_t cols, cl_mem& xh, cl_mem& xs);
  bool companion_ready(const Tensor& x, int n_tokens) const;
  void companion_written(const Tensor& x, int n_tokens);
  // Set-up probes (probe.cpp): a one-work-group kernel run once, its inputs copied in and
  // `out` read back; "" when it ran, else why not.
  struct ProbeInput {
    const void* data;
    size_t bytes;
  };
  std::string run_probe(const std::vector<std::string>& srcs, const std::string& options,
                        const char* name, const std::vector<ProbeInput>& inputs,
                        std::vector<float>& out, size_t n_items);
  std::string run_subgroup_probe(const std::string& options, int n);
  void choose_subgroups(std::string& options);
  // The tensor-core path on NVIDIA's driver (nv_mma.cpp, kernels/matmul_nv_mma.cl).
  std::string run_nv_probe(const std::string& options);
  void choose_nv_mma();
  void add_nv_mma_sources(std::vector<std::string>& srcs, std::vector<const char*>& names,
                          std::string& options);  // clears nv_mma_ where the tiles do not fit
  Status nv_activations(const Tensor& x, int n_tokens, const char* op);
  struct MatmulSegment {
    const ClWeight* w;
    Tensor* out;
    const Tensor* bias;
  };
  Status matmul_nv(const MatmulSegment* segs, int n_segs, const Tensor& x, int n_tokens,
                   const char* op);
  int matmul_splits(size_t groups, bool mid_sized, int n_blocks) const;
  Status reduce_splits(cl_mem part, int splits, cl_long stride, int n_out, int t0, int count,
                       const Tensor& out, const Tensor* bias, const char* op);
  bool group_fits(const Tensor& x, int n_tokens, const MatmulOut* outs, int n_outs) const;
  Status matmul_small_batch(const MatmulSegment* segs, int n_segs, const Tensor& x, int n_tokens,
                            const char* op);
  Status norm_rows(Tensor& x, const Tensor* y, int n_tokens, const Tensor& weight, float eps,
                   Tensor& out);
  Status rope_rows(Tensor& x, const RopeParams& p, Tensor* x1, int heads1, int n_tokens,
                   const int32_t* positions);
  // Enqueues `kernel` over `global` (rounded up to `local` multiples when local is given).
  Status launch(cl_kernel kernel, const char* op, cl_uint dims, const size_t* global,
                const size_t* local);
  Status flush_profile();

  cl_kernel kernel(const char* name) const;

  // Recording (record.cpp). The index ring's last kRecordSlotInts ints are a recorded pass's
  // input slots, the same offsets on every replay.
  static constexpr size_t kRingInts = 1 << 18;  // upload ring for positions and row lists (1 MiB)
  static constexpr size_t kRecordSlotInts = 1 << 15;
  struct CommandBufferFns {  // cl_khr_command_buffer's entry points (0.9.0 to 1.0.0)
    using Buffer = struct _cl_command_buffer_khr*;
    using Create = Buffer(CL_API_CALL*)(cl_uint, const cl_command_queue*, const cl_ulong*, cl_int*);
    using Finalize = cl_int(CL_API_CALL*)(Buffer);
    using Release = cl_int(CL_API_CALL*)(Buffer);
    using NDRange = cl_int(CL_API_CALL*)(Buffer, cl_command_queue, const cl_ulong*, cl_kernel,
                                         cl_uint, const size_t*, const size_t*, const size_t*,
                                         cl_uint, const cl_uint*, cl_uint*, void**);
    using Enqueue = cl_int(CL_API_CALL*)(cl_uint, cl_command_queue*, Buffer, cl_uint,
                                         const cl_event*, cl_event*);
    Create create = nullptr;
    Finalize finalize = nullptr;
    Release release = nullptr;
    NDRange ndrange = nullptr;
    Enqueue enqueue = nullptr;
  };
  enum class RecMode { Eager, Capture, Stage };
  struct Recording {
    CommandBufferFns::Buffer cb = nullptr;
    int runs = 0;
    bool failed = false;
    size_t slot_end = 0;  // the slots the pass takes (ints from the slots' start)
    // Where each slot's contents come from among run_recorded's inputs (input, offset, count,
    // ring offset): when every upload of the capture came from them (`direct`), a replay fills
    // the slots from the inputs without walking the body.
    std::vector<RecordFill> fills;
    std::vector<int> input_sizes;  // the inputs' lengths at the capture
    bool direct = false;
  };
  std::string load_command_buffer_fns();
  void choose_recording();
  void drop_recordings();
  Expected<bool> record_launch(cl_kernel k, const char* op, cl_uint dims, const size_t* global,
                               const size_t* local);
  Expected<int> upload_slot(const int32_t* host, int n, const char* what);
  Status write_slots(size_t n_ints);
  bool stage_direct(Recording& r, const RecordInput* inputs, int n_inputs);
  bool record_ = false;
  CommandBufferFns cb_;
  RecMode rec_mode_ = RecMode::Eager;
  CommandBufferFns::Buffer rec_cb_ = nullptr;
  size_t slot_pos_ = 0;
  // KESTREL_CL_RECORD_DIRECT=0: every replay stages by walking its body.
  bool record_direct_ = true;
  Recording* capturing_ = nullptr;  // the recording being captured, and run_recorded's inputs
  const RecordInput* capture_inputs_ = nullptr;
  int n_capture_inputs_ = 0;
  std::map<uint64_t, Recording> recordings_;
  bool recordings_stale_ = false;  // a buffer was freed or a tensor uploaded: drop them

  DeviceInfo info_;
  bool wide_ = false;  // work-groups of 256 and 32 KiB of local memory
  TileShape tile_{};   // matmul_tiled's shape
  // Micro-batches of up to this many tokens (and the tails of larger ones, under a tile) run on
  // matmul_mid; KESTREL_CL_MID_MAX_TOKENS overrides it (to compare the kernels).
  // (H100 through NVIDIA's OpenCL, llama2-7b: matmul_mid leads at 16 tokens, matmul_tiled from
  // about 64.)
  int mid_max_tokens_ = 32;
  int mid_rows_ = 128, mid_split_ = 2;  // matmul_mid's work-group (MID_ROWS x MID_SPLIT)
  // Mid-sized micro-batches on matmul_tiled16 (the tiled template at 16 tokens, weights decoded
  // once per step into local memory); KESTREL_CL_MID_KERNEL=mid: on matmul_mid instead.
  TileShape mid_tile_{};
  bool mid_tiled_ = true;
  // Q4_0 / Q8_0 micro-batches of more than 8 tokens in half arithmetic (x_half_blocks, then
  // matmul_tiled_half / matmul_tiled16_half): on devices with cl_khr_fp16, unless
  // KESTREL_CL_HALF=0, for the tile shapes whose work-items hold runs of four rows and tokens.
  bool half_tiled_ = false, half_tiled16_ = false;
  // Q4_0 / Q8_0 micro-batches of nv_min_tokens_ or more on mma.sync through inline PTX
  // (kernels/matmul_nv_mma.cl), ahead of the half and f32 kernels: "" off, else the asm
  // keyword's spelling that NVIDIA's compiler took in the setup probe, or "emulate"
  // (KESTREL_CL_NV_MMA=emulate: the same kernels on any device, for the tests).
  std::string nv_mma_;
  // Its split-K sums by each tile's last work-group (default; KESTREL_CL_NV_REDUCE=launch: a
  // matmul_reduce launch); the tiles' arrival counters, zeroed once and reset by the kernel.
  bool nv_reduce_in_kernel_ = false;
  // Micro-batches of up to 16 tokens on matmul_nvf16_* (kernels/matmul_nv_frag.cl; default,
  // KESTREL_CL_NV_FRAG=0 turns it off) instead of the template's local tiles.
  bool nv_frag_ = false;
  // The fewest tokens the tensor-core kernels take (fewer: the small-batch kernel). 5 by default:
  // a tensor-core launch reads the weights once whatever its tokens (up to 16), so a 7-token
  // micro-batch costs what one of 16 does, where the small-batch kernel's cost grows with its
  // tokens (the seed's 71-token tail, H100: ~14.8 ms for its 7-token micro-batch against ~10.6
  // for one of 16). KESTREL_CL_NV_MIN_TOKENS=N (2..9; 9: the small-batch kernel up to 8 tokens).
  int nv_min_tokens_ = 5;
  cl_mem nv_arrivals_ = nullptr;
  size_t nv_arrivals_n_ = 0;
  Expected<cl_mem> nv_arrivals(size_t tiles);
  // group_sum / group_max on subgroups (the probe passed; KESTREL_CL_SUBGROUPS=0 turns it off).
  bool subgroups_ = false;
  // attention_block's local memory fits the device (else the one-query kernel takes every call).
  bool attention_block_fits_ = true;
  // Set by matmul_group while its matmuls run: the input whose half blocks are in scratch.
  const void* half_x_ready_ = nullptr;
  // Norms and SwiGLU write the f16 companion of their output for the half and tensor-core
  // matmuls (KESTREL_CL_FUSED_F16=0: those convert it in a launch of their own). The companion
  // in scratch belongs to `data` while no other launch (launches_) nor an upload into it came.
  bool fused_f16_ = true;
  struct Companion {
    const void* data = nullptr;
    int n_tokens = 0;
    int64_t cols = 0;
    uint64_t after = 0;  // launches_ when it was written
  } companion_;
  uint64_t launches_ = 0;  // kernels launched: any may have overwritten the tensor or scratch
  // Work-groups per compute unit that split-K aims at for mid-sized batches, and the most slices
  // (KESTREL_CL_MID_GROUPS_PER_CU, 1-16, and KESTREL_CL_MID_MAX_SPLITS override them, to
  // compare); matmul_tiled aims at 4 with at most 8. H200 through NVIDIA's OpenCL, seed b128 ub16:
  // on matmul_mid (8 slices at most) 1 -> 396 t/s, 2 -> 530, 4 -> 540; on matmul_tiled16 4 / 8
  // -> 641, 8 / 16 -> 754, 16 / 32 -> 724.
  int mid_groups_per_cu_ = 8;
  int mid_max_splits_ = 16;
  // KESTREL_CL_ATT_SPLITS: attention_block's key splits forced to N (to compare, and to test the
  // split path on devices of few units); 0: no splitting; -1 (unset): chosen per call.
  int att_splits_forced_ = -1;
  // RoPE and the KV store in one launch (rope_kv_store); KESTREL_CL_FUSED_ROPE_KV=0: two.
  bool fused_rope_kv_ = true;
  // The positions' checks shared by kv_store and rope_kv_store.
  static Status check_kv_positions(const int32_t* positions, int n_tokens, int64_t cache_rows);
  std::string device_name_;
  cl_platform_id platform_ = nullptr;
  cl_device_id device_ = nullptr;
  cl_context context_ = nullptr;
  cl_command_queue queue_ = nullptr;
  bool queue_profiling_ = false;
  cl_program program_ = nullptr;
  std::map<std::string, cl_kernel> kernels_;
  double setup_ms_ = 0;
  std::string setup_note_;
  size_t allocated_ = 0;  // bytes of live buffers (available_memory subtracts them)

  std::vector<std::pair<cl_mem, size_t>> scratch_;
  // Upload ring for small index arrays.
  std::vector<int32_t> ring_host_;
  cl_mem ring_dev_ = nullptr;
  size_t ring_pos_ = 0;
  std::vector<int32_t> last_ints_;
  int last_ints_off_ = -1;
  std::map<const void*, std::pair<cl_mem, size_t>> tables_;
  std::map<std::pair<float, int>, cl_mem> rope_freqs_;

  // Profiling: while an op runs under profile_op, every launch records an event here; the
  // events are read in flush_profile, after the queue has passed them.
  std::vector<cl_event>* capture_ = nullptr;
  struct Pending {
    std::string kind;
    OpProfiler* profiler;
    std::vector<cl_event> events;
  };
  std::vector<Pending> pending_;
  // Set by an op that waited for the queue itself (a download): profile_op reads its times at
  // once, since no later synchronize() may come (the last pass's logits).
  bool op_finished_queue_ = false;
};

}  // namespace kestrel::backend::opencl
