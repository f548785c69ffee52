// The CUDA backend: device memory, one stream, cuBLAS for the large products, and the kernels
// of matmul.cu, attention.cu and elementwise.cu. Ops are enqueued without blocking; the host
// waits only in synchronize() and download() (once per chunk in the forward pass).
//
// Matmul strategy (see bench/NOTES.md for the floors and measurements), by tokens T:
//  - Q4_0 / Q8_0, T < kFragMinTokens: dp4a on activations quantized to two int8 planes
//    (matvec_int8.cu; decode is bandwidth-bound and must issue few instructions per byte);
//  - Q4_0 / Q8_0, kFragMinTokens <= T <= kFragMaxTokens: weights decoded straight into mma.sync
//    fragments (matmul_frag_v2.cu; opt-in for Q4_0 on sm_90a, KESTREL_CUDA_STREAM16=1: streamed by
//    the copy engine into wgmma, matmul_stream16.cu); up to kMmaMaxTokens: f16 weight tiles in
//    shared memory and mma.sync (matmul_mma.cu);
//  - other types up to kSmallBatch tokens: fused kernels that decode blocks in registers;
//  - larger micro-batches: the weight is dequantized to f16 in row tiles and multiplied on the
//    tensor cores by cuBLAS (f16 x f16 -> f32), the activations rounded to f16 once.
#pragma once

#include <cublas_v2.h>
#include <cuda.h>

#include <array>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/rope_device.cuh"

namespace kestrel::backend::cuda {

// Scratch buffers of the backend, one per purpose (CudaBackend::scratch).
enum ScratchSlot {
  kX16 = 0,
  kQ16,
  kK16,
  kV16,
  kScores,
  kProbs,
  kPartial,
  kActs,
  kArrivals,        // counters of the split-K kernels that reduce in their last block (kept zeroed)
  kAttnArrivals,    // attention_split.cu's and attention_tc16.cu's counters, one a head (zeroed)
  kAttnSplit,       // their partial softmaxes
  kStreamTickets,   // matvec_stream.cu's tile counters (kept zeroed)
  kActs2,           // int8 planes written while a launch reads kActs' (matmul_swiglu)
  kSwigluArrivals,  // matmul_swiglu's counters, one a 32-row block (zeroed)
  kNormArrivals,    // matmul_add_rms_norm's counters, one a 32-row block (zeroed)
  kNormSums,        // its sums of squares, one a 32-row block
  kSlots
};

// Up to this many tokens a matmul runs on the fused small-batch kernels; up to kMmaMaxTokens on
// the fused tensor-core kernel (Q4_0, Q8_0); beyond, on cuBLAS with f16 weight tiles.
constexpr int kSmallBatch = 8;
constexpr int kMmaMaxTokens = 64;
// From kFragMinTokens to kFragMaxTokens tokens, Q4_0 / Q8_0 matmuls decode the weights straight
// into tensor-core fragments (matmul_frag_v2.cu); fewer tokens run on the dp4a kernel
// (matvec_int8.cu), more on the shared-memory tile kernel (matmul_mma.cu).
constexpr int kFragMinTokens = 5;
constexpr int kFragMaxTokens = 16;

// A 32-element block of int8 activations (two planes, matvec_int8.cu): x ~= unit * (128 q1 + q2).
struct ActBlock {
  float unit;
  int sum;  // sum over the block of 128 * q1 + q2
};
// Where an op also writes its output as the next matmul's input (acts_device.cuh): the int8
// planes, or f16, or neither (all null).
struct MatmulInputOut {
  int8_t* q1 = nullptr;
  int8_t* q2 = nullptr;
  ActBlock* meta = nullptr;
  __half* x16 = nullptr;
};
// Where a decode matvec adds its rows into the residual x and, for each 32-row block, the last of
// its writers turns that block into the next matmuls' input (matmul_add_rms_norm): x * weight as
// int8 planes, not yet divided by rms(x) (the readers apply it: QuantizedActs::row_ss), and the
// block's sum of squares of x.
struct AddNormOut {
  float* x = nullptr;             // [n] the residual (+= the product)
  const float* weight = nullptr;  // [n] the norm's
  float* ss = nullptr;            // [n / 32]
  unsigned* arrivals = nullptr;   // [n / 32] zeroed counters, left zero
  MatmulInputOut planes;          // the int8 planes (q1, q2, meta)
};

// The kernels a matmul runs on (CudaBackend::matmul_path): weights decoded into tensor-core
// fragments, dp4a on int8 activations, fused small-batch kernels, the shared-memory tile kernel,
// Q4_0 decoded in registers for Hopper's warpgroup products, or f16 weight tiles through cuBLAS.
enum class MatmulPath { kFrag, kInt8, kSmall, kMma, kWgmma, kGemm };

// Tensor maps of the wgmma matmul (matmul_wgmma.cu), owned by the backend.
class WgmmaMapCache;
struct WgmmaMapCacheDeleter {
  void operator()(WgmmaMapCache* c) const;
};

// With `rope`, q, k_new and v_new are the token's unrotated Q, K and V rows: the launch rotates
// Q and K (rope_device.cuh) and stores K and V at the token's position before it reads the cache.
struct DecodeRope {
  const float* k_new = nullptr;
  const float* v_new = nullptr;
  const RopeTable* table = nullptr;  // nullptr: q is rotated and the cache row stored already
  bool neox = false;
};

// A weight on the device. Q4_0 and Q8_0 are repacked into separate arrays of quants (16-byte
// aligned, coalesced) and fp16 scales; every other type keeps its GGUF rows.
class CudaBackend;
struct MatvecPart;
struct Stream16Rope;
struct QuantizedActs;

class CudaWeight final : public Weight {
 public:
  ~CudaWeight() override;
  CudaBackend* owner = nullptr;
  uint64_t id = 0;        // unique per backend: what the f16 tile buffers remember holding
  void* data = nullptr;   // the whole allocation
  uint8_t* qs = nullptr;  // Q4_0: [n_out][n_in / 2], Q8_0: [n_out][n_in]; else GGUF rows
  __half* d = nullptr;    // Q4_0 / Q8_0: [n_out][n_in / 32] scales
};

class CudaBackend final : public Backend {
 public:
  static Expected<std::unique_ptr<CudaBackend>> create(int device);
  ~CudaBackend() override;

  const char* name() const override { return "cuda"; }
  std::string device_name() const override { return device_name_; }
  int64_t available_memory() const override;
  int preferred_ubatch() const override;
  MemoryUse memory_use() const override;

  Expected<Tensor> alloc(quant::DType type, int64_t rows, int64_t cols, const char* what) override;
  void free(Tensor& t) override;
  Status upload(Tensor& dst, int64_t row0, int64_t n_rows, const void* src) override;
  Status download(const Tensor& src, int64_t row0, int64_t n_rows, void* dst) override;
  Expected<std::unique_ptr<Weight>> load_weight(const HostMatrix& m) override;
  Expected<Tensor> load_vector(const float* data, int64_t n, const char* what) override;

  Status embed(const HostMatrix& table, const int32_t* tokens, int n_tokens, Tensor& out) override;
  Status rms_norm(const Tensor& x, int n_tokens, const Tensor& weight, float eps,
                  Tensor& out) override;
  Status add_rms_norm(Tensor& x, const Tensor& y, int n_tokens, const Tensor& weight, float eps,
                      Tensor& out) override;
  Status matmul_group(const Tensor& x, int n_tokens, const MatmulOut* outs, int n_outs) override;
  Status matmul(const Weight& w, const Tensor& x, int n_tokens, Tensor& out,
                const Tensor* bias) override;
  Status rope(Tensor& x, int n_tokens, const int32_t* positions, const RopeParams& p) override;
  Status rope_qk(Tensor& q, Tensor& k, int n_tokens, const int32_t* positions, const RopeParams& pq,
                 const RopeParams& pk) override;
  Status kv_store(const Tensor& k, const Tensor& v, int n_tokens, const int32_t* positions,
                  Tensor& k_cache, Tensor& v_cache) override;
  // rope_kv_store.cu: RoPE of Q and K and the KV store in one launch.
  Status rope_kv_store(Tensor& q, Tensor& k, const Tensor& v, int n_tokens,
                       const int32_t* positions, const RopeParams& pq, const RopeParams& pk,
                       Tensor& k_cache, Tensor& v_cache) override;
  bool fuses_rope_kv_store(const Tensor& k_cache, const Tensor& v_cache) const override;
  // attention_decode.cu with RoPE and the KV store in its prologue (decode steps).
  Status rope_kv_attention(Tensor& q, Tensor& k, const Tensor& v, int n_tokens,
                           const int32_t* positions, const RopeParams& pq, const RopeParams& pk,
                           Tensor& k_cache, Tensor& v_cache, const AttentionParams& p,
                           Tensor& out) override;
  bool fuses_rope_kv_attention(int n_tokens, const Tensor& k_cache,
                               const Tensor& v_cache) const override;
  // 1 where a decode step over n_keys keys leaves attention_decode.cu for tc16 (a recorded step
  // must replay only where it would choose the same kernel), else 0.
  int record_bucket(int n_keys) const override;
  // Whether a decode step whose last position is max_pos goes to attention_decode.cu.
  bool decode_kernel_for(int max_pos) const {
    return att_decode_ && max_pos < att_decode_max_keys_;
  }
  // An error naming the first of positions[0, n_tokens) outside a cache of cache_rows rows.
  Status decode_attention(const Tensor& q, const int32_t* positions, const Tensor& k_cache,
                          const Tensor& v_cache, const AttentionParams& p, const DecodeRope& rope,
                          Tensor& out);
  static Status check_attention_shapes(const Tensor& q, int n_tokens, const Tensor& k_cache,
                                       const Tensor& v_cache, const AttentionParams& p,
                                       const Tensor& out);
  static Status check_cache_positions(const int32_t* positions, int n_tokens, int64_t cache_rows);
  Status attention(const Tensor& q, int n_tokens, const int32_t* positions, const Tensor& k_cache,
                   const Tensor& v_cache, const AttentionParams& p, Tensor& out) override;
  // decode_layer.cu: a decode step of a whole layer as one persistent kernel.
  bool fuses_decode_layer(const DecodeLayer& layer) const override;
  Status decode_layer(const DecodeLayer& layer) override;
  Status swiglu(const Tensor& gate, const Tensor& up, int n_tokens, Tensor& out) override;
  // matmul.cu: decode's SwiGLU and ffn down as one matvec_stream.cu launch (opt-in).
  Status swiglu_matmul(Tensor& gate, const Tensor& up, int n_tokens, const Weight& w,
                       Tensor& out) override;
  bool fuses_swiglu_matmul(const Weight& w, int n_tokens) const override;
  // A micro-batch's Q, K, V with RoPE and the KV store in stream16's epilogue (matmul_rope_kv.cu),
  // opt-in.
  Status matmul_rope_kv_store(const Tensor& x, int n_tokens, const MatmulOut* qkv,
                              const int32_t* positions, const RopeParams& pq, const RopeParams& pk,
                              Tensor& k_cache, Tensor& v_cache) override;
  bool fuses_matmul_rope_kv_store(const Weight& wq, int n_tokens, const Tensor& k_cache,
                                  const Tensor& v_cache) const override;
  // Decode's gate and up with SwiGLU in the matvec's epilogue (launch_matvec_swiglu), opt-in.
  Status matmul_swiglu(const Tensor& x, int n_tokens, const Weight& w_gate, const Weight& w_up,
                       Tensor& gate, Tensor& up) override;
  bool fuses_matmul_swiglu(const Weight& w_gate, const Weight& w_up, int n_tokens) const override;
  // Decode's output / down projection with the residual add and the next norm in the matvec's
  // epilogue (launch_matvec_add_norm): the norm launch gone.
  Status matmul_add_rms_norm(const Weight& w, const Tensor& in, int n_tokens, Tensor& proj,
                             Tensor& x, const Tensor& weight, float eps, Tensor& out) override;
  bool fuses_matmul_add_rms_norm(const Weight& w, int n_tokens, const Weight* const* next,
                                 int n_next) const override;
  // Whether matmul_add_rms_norm runs w's product as the fused launch (the readers aside).
  bool add_norm_producer(const CudaWeight& w, int n_tokens) const;
  Status add(Tensor& x, const Tensor& y, int n_tokens) override;
  Status get_rows(const Tensor& x, const int32_t* rows, int n_rows, Tensor& out) override;
  Status synchronize() override;
  Status run_recorded(uint64_t key, const RecordInput* inputs, int n_inputs,
                      const std::function<Status()>& body) override;
  Status profile_op(std::string_view kind, OpProfiler& profiler,
                    const std::function<Status()>& op) override;

  cudaStream_t stream() const { return stream_; }
  // Recording state of run_recorded: Eager runs ops; Capture records them into a graph; Stage
  // only takes in host inputs (the ops return before launching) for a replay.
  enum class Mode { Eager, Capture, Stage };
  Mode mode() const { return mode_; }
  // A weight is being freed: no prefetch may read it any more.
  void forget(const CudaWeight& w);

 private:
  CudaBackend() = default;
  // Device memory with a message that gives the numbers when it fails, counted under `kind`
  // for memory_use() until device_free (or uncount, for memory freed elsewhere).
  enum class MemKind { kWeights, kKvCache, kScratch };
  Expected<void*> device_alloc(size_t bytes, const char* what, MemKind kind = MemKind::kScratch);
  void device_free(void* p);
  void uncount(void* p);
  // alloc() counted as `kind` (load_vector: weights).
  Expected<Tensor> alloc_as(quant::DType type, int64_t rows, int64_t cols, const char* what,
                            MemKind kind);
  // A scratch buffer of at least `bytes`, grown on demand (slot: one per purpose).
  Expected<void*> scratch(int slot, size_t bytes);
  // Which kernels a matmul of `type` weights, n_in columns and n_tokens tokens runs on.
  MatmulPath matmul_path(quant::DType type, int64_t n_in, int n_tokens) const;
  // x [n_tokens][k] rounded to f16 in the kX16 scratch; converted again unless `held` (the
  // scratch already holds it: x16_).
  Expected<const __half*> f16_activations(const float* x, int n_tokens, int64_t k, bool held);
  // The dp4a products `parts` of x from its int8 planes in the `planes` scratch (kActs unless
  // they are `held` elsewhere; converted there unless `held`), one launch.
  Status matvec_int8(const float* x, int n_tokens, int64_t n_in, bool held, const MatvecPart* parts,
                     int n_parts, int planes);
  // The held planes of x (`planes` scratch), with their pending row scale (acts_) if `held`.
  Expected<QuantizedActs> int8_activations(const float* x, int n_tokens, int64_t n_in, bool held,
                                           int planes);
  // acts_ names x's planes from now on (in the scratch that holds them, or kActs where they are
  // to be converted; a held row scale stays); returns that scratch.
  int hold_int8(const float* x, int n_tokens, int64_t k, bool held);
  // An error when x exists only as int8 planes with a row scale (matmul_add_rms_norm) and the
  // matmul of w would read it on another path.
  Status check_planes_only(const CudaWeight& w, const float* x, int n_tokens,
                           MatmulPath path) const;
  // The 5-16-token tensor-core products `parts` of x (its f16 copy converted unless `held`), one
  // launch.
  Status matmul_frag(const float* x, int n_tokens, int64_t n_in, bool held, const MatvecPart* parts,
                     int n_parts, const Stream16Rope* rope = nullptr);
  // matmul_group, with RoPE and the KV store in the launch's epilogue where `rope` is given
  // (matmul_rope_kv_store: then an error unless the one stream16 launch takes them).
  Status matmul_group_launch(const Tensor& x, int n_tokens, const MatmulOut* outs, int n_outs,
                             const Stream16Rope* rope);
  // Whether matmul_rope_kv_store's arguments take the fused launch (else the two ops).
  bool rope_epilogue_fits(const Tensor& x, int n_tokens, const MatmulOut* qkv, const RopeParams& pq,
                          const RopeParams& pk, const Tensor& k_cache, const Tensor& v_cache) const;
  // Where an op writing out [n_tokens][k] also writes it as the input of a Q4_0 matmul of that
  // size (int8 planes or f16, in their scratch, remembered as held for `out`); nothing when the
  // matmul would read f32 or KESTREL_CUDA_NO_FUSED_INPUTS=1. Call after forget_activations().
  // (Int8 planes in the `planes` scratch.)
  Expected<MatmulInputOut> fused_matmul_input(const float* out, int n_tokens, int64_t k,
                                              int planes = kActs);
  // n zeroed counters in the `slot` scratch (zeroed again when it grows): the kernels that take
  // them leave them zero.
  Expected<unsigned*> arrival_counters(int n, int slot = kArrivals);
  // Every op that writes device activations calls this: the scratch copies of activations
  // (int8 planes, f16) may no longer match their source.
  void forget_activations() { acts_.valid = x16_.valid = false; }
  // Small host arrays (positions, row lists) copied to the device through a pinned ring, in
  // stream order; identical consecutive arrays are uploaded once.
  Expected<const int32_t*> upload_ints(const int32_t* host, int n);
  // The rows of a host embedding table, uploaded once per table.
  Expected<const uint8_t*> device_table(const HostMatrix& table);
  Status flush_profile();

  Status matmul_small(const CudaWeight& w, const float* x, int n_tokens, float* out,
                      const float* bias);
  Status matmul_gemm(const CudaWeight& w, const float* x, int n_tokens, float* out,
                     const float* bias, bool x16_held);
  // f16 tiles of dequantized weights for the GEMM path: two buffers, so that the weight of the
  // next matmul (learned from the order of the previous forward pass) is dequantized on the aux
  // stream while the current GEMM runs on the tensor cores.
  struct TileBuffer {
    __half* ptr = nullptr;
    int64_t elems = 0;
    uint64_t holds = 0;           // CudaWeight::id whose whole f16 copy it holds (0: none)
    cudaEvent_t ready = nullptr;  // its dequantization finished
    cudaEvent_t free = nullptr;   // the GEMM reading it finished
  };
  Expected<TileBuffer*> tile_buffer(int i, int64_t elems);
  Status prefetch_next(uint64_t current);

  int device_ = 0;
  std::string device_name_;
  bool graphs_disabled_ = false;    // KESTREL_CUDA_NO_GRAPHS=1: every pass runs eagerly
  bool mma_disabled_ = false;       // KESTREL_CUDA_NO_MMA=1: mid batches on the GEMM path instead
  bool int8_disabled_ = false;      // KESTREL_CUDA_NO_INT8=1: small batches on the float kernels
  bool frag_disabled_ = false;      // KESTREL_CUDA_NO_FRAG=1: up to 64 tokens on the older kernels
  bool fuse_inputs_ = true;         // KESTREL_CUDA_NO_FUSED_INPUTS=1: norm/swiglu write f32 only
  bool fuse_add_ = true;            // KESTREL_CUDA_NO_FUSED_ADD=1: add_rms_norm as two launches
  bool rope_qk_one_launch_ = true;  // KESTREL_CUDA_NO_ROPE_QK=1: RoPE of Q and K apart
  bool fused_rope_kv_ = true;       // KESTREL_CUDA_NO_FUSED_ROPE_KV=1: RoPE, then the KV store
  bool swiglu4_ = true;             // KESTREL_CUDA_NO_SWIGLU4=1: SwiGLU one value a thread
  bool rows_rope_kv_ = true;   // KESTREL_CUDA_NO_ROWS_ROPE_KV=1: prompt chunks' fused RoPE + KV
                               // store on the block-per-head kernel too
  bool group_matmuls_ = true;  // KESTREL_CUDA_NO_GROUP=1: matmul_group as one launch each
  bool group_wgmma_ = true;    // KESTREL_CUDA_WGMMA_NO_GROUP=1: not on the wgmma path
  // Decode steps of Q4_0 / Q8_0 layers as one kernel a layer (decode_layer.cu) when
  // KESTREL_CUDA_FUSED_DECODE=1 on sm_90 with cooperative launches. Opt-in: slower than the op
  // sequence until it streams its weights at the matvecs' rate (bench/NOTES.md).
  bool fused_decode_ = false;
  unsigned long long* decode_barrier_ = nullptr;  // its grid barrier's counter
  // Per cache type (f16, q8_0, q4_0): the shared memory its kernel was last set up for and the
  // blocks an SM that then fit.
  size_t decode_smem_set_[3] = {};
  int decode_per_sm_[3] = {};
  // KESTREL_CUDA_DECODE_TIMING=1: its phases' times, summed on the device and printed to stderr
  // when the backend is destroyed.
  unsigned long long* decode_timing_ = nullptr;
  Status init_decode_timing();
  Status init_graph_timing();
  void print_decode_timing() const;
  // The Q, K, V weights of the fused layer that followed each one (by its Q weight) in the last
  // pass, asked of L2 at the end of that layer; forgotten with any weight.
  const CudaWeight* decode_last_wq_ = nullptr;
  std::map<const CudaWeight*, std::array<const Weight*, 3>> decode_next_;
  int sm_count_ = 0;
  // Q4_0 prompt chunks on matmul_wgmma.cu (an sm_90a build on a 9.0 device) unless
  // KESTREL_CUDA_WGMMA=0 (then cuBLAS on dequantized tiles): llama2-7b pp512 34,437 t/s against
  // 31,081 on the H200 (twelfth session), llama3-8b even (29,792 against 30,136).
  bool wgmma_ = false;
  std::unique_ptr<WgmmaMapCache, WgmmaMapCacheDeleter> wgmma_maps_;
  // 5-16-token Q4_0 matmuls on matmul_stream16.cu where it is available and the shape fits
  // (KESTREL_CUDA_STREAM16=0: never) instead of the fragment kernel; the shared memory a block
  // may opt into.
  bool stream16_ = false;
  size_t smem_optin_ = 0;
  unsigned long long* stream16_timing_ = nullptr;  // KESTREL_CUDA_STREAM16_TIMING=1 (lab)
  // Opt-in (KESTREL_CUDA_MATVEC_STREAM=1, sm_90): decode's Q4_0 / Q8_0 matmuls of long rows (ffn
  // down) on matvec_stream.cu, the rest on matvec_int8.cu's kernels; each launch on the next of
  // its counter pairs. Off by default: slower than the K-split matvec now (H100, twenty-seventh
  // session: llama2-7b tg128 475 against 440 with it, llama3-8b 400 against 396; bench/NOTES.md).
  bool matvec_stream_ = false;
  int matvec_stream_slot_ = 0;
  // Opt-in (KESTREL_CUDA_FUSED_SWIGLU=1): decode's SwiGLU inside the stream's ffn down launch
  // (swiglu_matmul), one kernel a layer fewer. Slower (H100 tg128 352 against 411: every block
  // reads all of gate and up from L2 and quantizes its slice, bench/NOTES.md), so it stays opt-in.
  bool fused_swiglu_ = false;
  // Opt-in (KESTREL_CUDA_MATMUL_SWIGLU=1): decode's SwiGLU in the gate/up matvec's epilogue
  // (matmul_swiglu), the SwiGLU launch gone. Slower: H100 tg128 402 against 439-441 (the
  // epilogue's fence and count lengthen every block of the launch; bench/NOTES.md).
  bool matmul_swiglu_ = false;
  // Opt-in (KESTREL_CUDA_MATMUL_ADD_NORM=1): decode's residual add and norm in the output and down
  // projections' epilogues (matmul_add_rms_norm). Slower, as above: tg128 383 against 439-441
  // (ncu: the weight stream +9 us a launch, the K-split launches +6 us a layer).
  bool matmul_add_norm_ = false;
  // RoPE and the KV store in the epilogue of the 5-16-token Q, K, V launch (matmul_rope_kv_store,
  // matmul_rope_kv.cu), the rope+kv_store launch gone: KESTREL_CUDA_MATMUL_ROPE_KV=1 (opt-in:
  // slower so far, seed b128 ub16 -6%; likely the positions' memcpy node before the launch,
  // bench/NOTES.md, thirtieth session).
  bool matmul_rope_kv_ = false;
  // The next counter pair of matvec_stream.cu's launches.
  Expected<unsigned*> matvec_stream_counters();
  // Prompt attention fused in f32 (attention_flash.cu): -1 where it measured faster (a quantized
  // cache, few keys), 1 always (KESTREL_CUDA_FLASH=1), 0 never (=0).
  int flash_attention_ = -1;
  // Prompt attention over f16 caches on the tensor cores (attention_mma.cu) unless
  // KESTREL_CUDA_FLASH_MMA=0 (the cuBLAS path) or KESTREL_CUDA_FLASH=1 (the f32 kernel).
  bool mma_attention_ = true;
  // What the kActs scratch holds (the int8 quantization of these activations, for the dp4a
  // kernel) and what the kX16 scratch holds (their f16 rounding, for the tensor-core kernels and
  // cuBLAS). Q, K and V (and gate and up) read the same normed x: converted once, not three times.
  // Every op that writes device activations forgets both (forget_activations), before its
  // Stage-mode return, so that recorded and replayed passes make the same choice.
  struct ActivationSource {
    bool valid = false;
    const float* x = nullptr;
    int n_tokens = 0;
    int64_t k = 0;
    int slot = kActs;  // acts_: the scratch that holds the planes (kActs2 after matmul_swiglu)
    // acts_ after matmul_add_rms_norm: the planes are of x * weight, their row scale 1 / rms
    // still to apply from these sums of squares (QuantizedActs::row_ss); no f32 copy exists.
    const float* row_ss = nullptr;
    float eps = 0.0f;
    bool holds(const float* x_, int n, int64_t k_) const {
      return valid && x == x_ && n_tokens == n && k == k_;
    }
  } acts_, x16_;
  int rows_max_tokens_ = 16;  // few-token attention kernel up to this many tokens
                              // (KESTREL_CUDA_ROWS_MAX_TOKENS lowers it, for comparisons)
  // From this many tokens to 16, attention splits the keys among blocks (attention_split.cu):
  // opt-in (slower so far), KESTREL_CUDA_ATT_SPLIT_MIN=N (1: decode steps too); 17: never.
  int att_split_min_tokens_ = 17;
  // From this many tokens to 16, attention runs on the tensor cores straight from the cache
  // (attention_tc16.cu; the seed's b128 ub16 on an H100: 4,377 / 4,389 t/s against 4,207 / 4,232
  // on the rows kernel; decode steps too: tg128 on an H200 462 against 427);
  // KESTREL_CUDA_ATT_TC16_MIN=N sets it (17: never, the rows kernel).
  int att_tc16_min_tokens_ = 1;
  // Decode steps (1 token) on attention_decode.cu (KESTREL_CUDA_ATT_DECODE=0: on tc16), with
  // RoPE and the KV store in its launch (KESTREL_CUDA_ROPE_ATTENTION=0: not). tg128 on an H100
  // 428 against 406 (bench/NOTES.md, twenty-fifth session).
  bool att_decode_ = true;
  // ... while the cache holds at most this many keys (KESTREL_CUDA_ATT_DECODE_MAX_KEYS), tc16
  // beyond: at 3,968 keys (llama2-7b) tc16's double-buffered 16-key sub-tiles stream the cache
  // faster (tg128 291 against 276), at 960-1,984 the decode kernel (350 / 328 against 344 / 323;
  // H100, bench/NOTES.md, twenty-fifth session).
  int att_decode_max_keys_ = 2048;
  bool rope_attention_ = true;
  cudaStream_t stream_ = nullptr;
  cudaStream_t aux_ = nullptr;  // prefetching dequantization
  cublasHandle_t cublas_ = nullptr;
  TileBuffer tiles_[2];
  int last_tile_ = 1;
  uint64_t next_weight_id_ = 1;
  uint64_t last_gemm_ = 0;                         // id of the previous GEMM-path weight
  std::map<uint64_t, const CudaWeight*> weights_;  // live GEMM-path weights by id
  std::map<uint64_t, uint64_t> next_;              // weight id -> the id that followed it last time
  std::vector<std::pair<void*, size_t>> scratch_;
  // Live device allocations (bytes, kind) and the bytes held per kind, now and at most.
  std::map<void*, std::pair<size_t, MemKind>> live_;
  int64_t held_[3] = {}, peak_[3] = {};
  // Pinned ring for upload_ints.
  int32_t* ring_host_ = nullptr;
  int32_t* ring_dev_ = nullptr;
  size_t ring_pos_ = 0;
  std::vector<int32_t> last_ints_;
  const int32_t* last_ints_dev_ = nullptr;
  std::map<const void*, void*> tables_;
  // run_recorded: graphs by key and the fixed upload slots their inputs go through.
  struct Recorded {
    int runs = 0;
    bool failed = false;
    cudaGraphExec_t exec = nullptr;
    // Which of the body's uploads reused the previous upload's slot when it was captured: a
    // staging must make the same choices, or the graph would read slots nobody refilled.
    std::vector<bool> reused;
    // Where each slot's contents come from among run_recorded's inputs (input, offset, count,
    // slot): when every upload of the capture came from them (`direct`), a replay refills the
    // slots from the inputs without walking the body (the walk cost the host 19-26 us a
    // replay, bench/NOTES.md, thirty-second session).
    std::vector<RecordFill> fills;
    std::vector<int> input_sizes;  // the inputs' lengths at the capture
    bool direct = false;
    int first_uploads = 0;  // of the first (eager) run: at least as many as the slots it takes
    // Refills the slots from `inputs` when it can (direct, the same lengths as the capture's).
    bool stage_direct(const RecordInput* inputs, int n_inputs, int32_t* slots_host) const;
  };
  std::map<uint64_t, Recorded> graphs_;
  // Fixed upload slots of recorded graphs: a slot per upload_ints call of the recorded body.
  static constexpr int kGraphSlots = 1024, kSlotInts = 64;
  Mode mode_ = Mode::Eager;
  int graph_slot_ = 0;
  // An upload of the same host array with the same contents as the body's previous upload reuses
  // its slot (upload_ints), so that a recorded pass copies its positions once, not before every
  // layer's RoPE and attention: each copy is a memcpy node, and a kernel after one cannot start
  // early (programmatic dependent launch). H100: tg128 503-507 t/s against 477-481, the seed's
  // b128 ub16 4,894-5,015 against 4,615-4,619 (bench/NOTES.md, thirty-first session).
  // KESTREL_CUDA_GRAPH_UPLOAD_ONCE=0: a copy an upload.
  bool graph_upload_once_ = true;
  // KESTREL_CUDA_GRAPH_DIRECT_STAGE=1 (opt-in until run on a GPU): a replay whose capture took
  // every upload from run_recorded's inputs refills its slots from them (Recorded::fills);
  // otherwise every replay stages by walking its body.
  bool graph_direct_stage_ = false;
  // KESTREL_CUDA_GRAPH_ONE_COPY=1 (lab): a recording copies all its slots in one node at its
  // start, sized by the body's first run, instead of a copy node at each upload (a kernel after
  // a copy node cannot start early: the positions' copy sat between layer 0's Q/K/V and its
  // attention, the logits rows' between the last layer and the head).
  bool graph_one_copy_ = false;
  int eager_uploads_ = -1;  // the uploads of a body's first run so far (-1: not counting)
  int copied_slots_ = 0;    // slots the capture copies at its start
  const RecordInput* capture_inputs_ = nullptr;  // run_recorded's inputs while it captures
  int n_capture_inputs_ = 0;
  Recorded* recording_ = nullptr;  // the body being captured or staged
  void note_fill(const int32_t* host, int n, size_t slot);
  size_t upload_index_ = 0;      // its uploads so far
  bool stage_diverged_ = false;  // a staging's uploads chose other slots than its capture
  const int32_t* last_slot_host_ = nullptr;  // the body's previous upload: its array, size, slot
  int last_slot_n_ = 0;
  size_t last_slot_off_ = 0;
  int32_t* slots_host_ = nullptr;
  int32_t* slots_dev_ = nullptr;
  // KESTREL_CUDA_GRAPH_TIMING=1 (lab): where a replayed pass's wall time goes, printed at exit
  // (graphs.cu): the GPU inside the graph and between replays (events), the host's staging,
  // launch call and wait.
  struct GraphTiming {
    cudaEvent_t start[2] = {}, stop[2] = {};  // two replays' events: this one's and the last's
    int cur = 0;                              // the slot of the next (or pending) replay
    bool pending = false;                     // replay `cur`'s events recorded, not yet read
    bool follows[2] = {};      // the replay in a slot came right after the one in the other
    bool recorded = false;     // a replay's events were recorded before
    bool interrupted = false;  // another pass ran since (a capture, an eager pass)
    double replays = 0, gpu_us = 0, betweens = 0, between_us = 0;
    double wait_us = 0, stage_us = 0, launch_us = 0;
    void read();  // after a synchronize: adds the pending replay's times
    ~GraphTiming();
  };
  std::unique_ptr<GraphTiming> graph_timing_;
  void drop_graphs();  // after any buffer a recording may use is freed or moved
  // Set when decode steps fall back from the fused layer to ops: the next run_recorded drops
  // every recording first (not during one: the current recording is still being used).
  bool drop_graphs_pending_ = false;
  struct Pending {
    std::string kind;
    OpProfiler* profiler;
    cudaEvent_t start, stop;
  };
  std::vector<Pending> pending_;
  std::vector<cudaEvent_t> free_events_;
  bool op_synchronized_ = false;  // set by download(): see profile_op
};

// Kernel launchers (matmul.cu, attention.cu, elementwise.cu). All enqueue on `s` and return the
// launch status.
Status launch_dequant_f16(quant::DType t, const uint8_t* rows, const __half* d, int64_t n_in,
                          int64_t row0, int64_t n_rows, __half* out, cudaStream_t s);
Status launch_to_f16(const float* x, int64_t n, __half* out, cudaStream_t s);
Status launch_matmul_small(const CudaWeight& w, const float* x, int n_tokens, float* out,
                           const float* bias, cudaStream_t s);
// matmul_mma.cu: whether the fused tensor-core kernel takes this matmul, its split-K factor
// (partial needs splits * T * n_out floats) and the launch.
class CudaWeight;
bool mma_supports(quant::DType type, int64_t n_in, int n_tokens);
int mma_splits(const CudaWeight& w);
Status launch_matmul_mma(const CudaWeight& w, const __half* x16, int n_tokens, float* out,
                         const float* bias, float* partial, cudaStream_t s);
// matmul_wgmma.cu: Q4_0 weights decoded in registers for wgmma (sm_90a). Available when the
// device is sm_90, the build holds sm_90a code (a probe kernel says which) and the driver gives
// the tensor-map encoder; it then also raises the kernel's shared-memory limit. The launch takes
// its tensor maps from the backend's cache.
Expected<bool> wgmma_available(int device);
WgmmaMapCache* new_wgmma_map_cache();
bool wgmma_supports(quant::DType type, int64_t n_in, int n_tokens);
// parts[0, n_parts): up to kMatvecMaxParts weights of one width, one launch; sms: the device's
// SMs (the tile width depends on the waves of blocks).
Status launch_matmul_wgmma(WgmmaMapCache& maps, const MatvecPart* parts, int n_parts,
                           const __half* x16, int n_tokens, int sms, cudaStream_t s);
// Tensor maps by kind (matmul_wgmma.cu's cache; rows x cols of the matrix at p, boxes as named).
enum WgmmaMapKind {
  kMapActs64x128 = 0,   // f16 [rows = T][n_in], 64 x 128 boxes, 128-byte swizzle
  kMapCodes32x64 = 1,   // Q4_0 codes [n_out][n_in / 2], 32 x 64
  kMapScales8x64 = 2,   // Q4_0 scales [n_out][n_in / 32], 8 x 64
  kMapActs64x256 = 3,   // as 0, 256-token boxes
  kMapCodes32x128 = 4,  // as 1, 128-row boxes
  kMapScales8x128 = 5,  // as 2, 128-row boxes
  kMapActs64x16 = 6,    // as 0, 16-token boxes
  kMapCodes128x64 = 7,  // codes in 128-byte x 64-row boxes, 128-byte swizzle
  kMapActs64x192 = 8,   // as 0, 192-token boxes
};
Expected<CUtensorMap> wgmma_tensor_map(WgmmaMapCache& maps, WgmmaMapKind kind, const void* p,
                                       int64_t n_in, int64_t rows);
// matmul_stream16.cu: 5-16 tokens of Q4_0 weights (up to kMatvecMaxParts of one width) streamed
// by the copy engine, decoded in registers for wgmma (sm_90a), one persistent block an SM; K split
// over thread block clusters. Available under the same conditions as wgmma_available.
struct MatvecPart;
struct Stream16Plan {
  int splits = 0;  // 0: nothing fits
  int clusters = 0;
  int steps_per_split = 0;
  int groups_per_block = 0;
  size_t smem = 0;
};
Expected<bool> stream16_available(int device);
// Runs probe<<<1, 1>>>(flag) and says whether it wrote 1: each optional kernel's file has a probe
// that does so only when that kernel was compiled for the running device (errors name `what`).
Expected<bool> probe_says_compiled(void (*probe)(int*), const char* what);
// decode_layer.cu: whether the fused decode layer (sm_90: bulk copies, cooperative launch) runs.
Expected<bool> decode_layer_available(int device);
// The launch plan of the products `parts` of n_tokens tokens on sms SMs with smem_limit bytes of
// shared memory a block; splits == 0 when the kernel does not take them (not Q4_0, another token
// count or width) or no split of K fits: they stay on the fragment kernel.
Stream16Plan stream16_plan(const MatvecPart* parts, int n_parts, int n_tokens, int sms,
                           size_t smem_limit);
// RoPE of Q and K and the KV store of the rotated K and V in the epilogue of a Q, K, V launch
// (matmul_rope_kv_store): the rope_kv_store op's work, bit for bit.
struct Stream16Rope {
  const int32_t* pos = nullptr;  // [T] on the device
  uint8_t* k_cache = nullptr;
  uint8_t* v_cache = nullptr;
  int64_t row_bytes = 0;  // of both caches
  int head_dim = 0;
  int cache_type = 0;  // quant::DType of both caches (F16, Q8_0 or Q4_0); 0: no RoPE
  RopeTable table;     // the normal layout's pairs only
};
// Whether a launch of `plan` can take the epilogue above (its clusters sum by push, in slices of
// whole 32-float4 runs).
bool stream16_takes_rope(const Stream16Plan& plan);
Status launch_matmul_stream16(WgmmaMapCache& maps, const MatvecPart* parts, int n_parts,
                              const __half* x16, int n_tokens, const Stream16Plan& plan,
                              unsigned long long* timing, cudaStream_t s,
                              const Stream16Rope* rope = nullptr);
// KESTREL_CUDA_STREAM16_TIMING=1: the device buffer of the kernel's clock sums, and their table
// (stderr; when the backend is destroyed).
size_t stream16_timing_bytes();
void print_stream16_timing(const unsigned long long* timing);
// matvec_int8.cu: activations quantized into two int8 planes per 32-element block,
// x ~= unit * (128 * q1 + q2), for the dp4a kernels of small batches of Q4_0 / Q8_0 weights.
struct QuantizedActs {
  int8_t* q1 = nullptr;      // [T][k]
  int8_t* q2 = nullptr;      // [T][k]
  ActBlock* meta = nullptr;  // [T][k / 32]
  // Non-null: the planes are of x * w, whose rms norm 1 / sqrt(sum(row_ss) / k + eps) the
  // reading matvec applies to its sums (one token; matmul_add_rms_norm wrote them).
  const float* row_ss = nullptr;  // [k / 32] sums of squares of x
  float eps = 0.0f;
  static QuantizedActs in(void* buffer, int n_tokens, int64_t k);
  MatmulInputOut as_output() const { return {q1, q2, meta, nullptr}; }  // for their writers
  static size_t bytes(int n_tokens, int64_t k);
};
bool int8_matvec_supports(quant::DType type, int64_t n_in, int n_tokens);
Status launch_quantize_acts(const float* x, int n_tokens, int64_t k, const QuantizedActs& a,
                            cudaStream_t s);
// One launch computes up to kMatvecMaxParts products of the same activations (one weight type
// and width): out = x . w^T (+ bias) for each part.
constexpr int kMatvecMaxParts = 3;
struct MatvecPart {
  const CudaWeight* w = nullptr;
  float* out = nullptr;
  const float* bias = nullptr;
};
Status launch_matvec_int8(const MatvecPart* parts, int n_parts, const QuantizedActs& a,
                          int n_tokens, cudaStream_t s);
// One token's gate and up (parts 0 and 1: Q4_0 or Q8_0, of one shape, rows a multiple of 32, no
// bias) from x's planes `a`, then gate = silu(gate) * up, also written as the down projection's
// input `also` (which must not be `a`'s buffer: the launch still reads it). arrivals: n_out / 32
// zeroed counters, left zero. matvec_int8.cu.
bool matvec_swiglu_fits(const CudaWeight& gate, const CudaWeight& up);
Status launch_matvec_swiglu(const MatvecPart (&parts)[2], const QuantizedActs& a,
                            unsigned* arrivals, const MatmulInputOut& also, cudaStream_t s);
// One token's product `part` (no bias) from x's planes `a`, added into the residual o.x (the
// part's out is ignored), then o's planes and sums of squares for each 32-row block (rows a
// multiple of 32; o.planes must not be `a`'s buffer), on matvec_ksplit_kernel.
bool matvec_add_norm_fits(const CudaWeight& w);
Status launch_matvec_add_norm(const MatvecPart& part, const QuantizedActs& a, const AddNormOut& o,
                              cudaStream_t s);
// matvec_stream.cu: one token's products `parts` (Q4_0 / Q8_0, rows of 256-512 blocks of 32) as
// a weight stream through shared memory, one persistent block an SM (sm_90). `launched` false:
// the shape or type does not fit it (nothing launched; use launch_matvec_int8). counters: a pair
// of zeroed counters, left zero; a launch must not share its pair with the launch before it.
Expected<bool> matvec_stream_available(int device);
int matvec_stream_counter_pairs();
// The activations: the int8 planes of acts, or (gate non-null) silu(gate) * up [n_in] in f32,
// quantized by the kernel itself into the same planes.
struct MatvecStreamInput {
  QuantizedActs acts;
  const float* gate = nullptr;
  const float* up = nullptr;
  // With add_norm.arrivals: one part, its product added into add_norm.x (the part's out is not
  // written), then the add and norm epilogue for each 32-row block (matmul_add_rms_norm).
  AddNormOut add_norm = {};
};
// Whether launch_matvec_stream takes weight w (type, row width, alignment).
bool matvec_stream_takes(const CudaWeight& w, size_t smem_optin);
Status launch_matvec_stream(const MatvecPart* parts, int n_parts, const MatvecStreamInput& in,
                            unsigned* counters, int sms, size_t smem_optin, cudaStream_t s,
                            bool& launched);
// Sums partial[splits][T][n_out] in a fixed order into out (+ bias).
Status launch_reduce_splits(const float* partial, int splits, int n_tokens, int64_t n_out,
                            float* out, const float* bias, cudaStream_t s);
// matmul_frag_v2.cu: Q4_0 / Q8_0 weights decoded straight into tensor-core fragments (16-byte
// weight loads, activations shared by the block), f16 activations; up to kMatvecMaxParts
// products of one type and width in one launch. With frag_v2_splits(n_in, row blocks) > 1 it
// needs splits * T * (sum of n_out) floats of partial and frag_v2_row_blocks zeroed counters
// (arrivals), which it leaves zeroed.
bool frag_supports(quant::DType type, int64_t n_in, int n_tokens);
int frag_v2_row_blocks(const MatvecPart* parts, int n_parts);
int frag_v2_splits(int64_t n_in, int row_blocks);
Status launch_matmul_frag_v2(const MatvecPart* parts, int n_parts, const __half* x16, int n_tokens,
                             float* partial, unsigned* arrivals, cudaStream_t s);
Status launch_add_bias(float* out, const float* bias, int n_tokens, int64_t n, cudaStream_t s);
Status launch_embed(quant::DType t, const uint8_t* table, int64_t row_bytes, int64_t n_embd,
                    const int32_t* tokens, int n_tokens, float* out, cudaStream_t s);
// RMS norm (and SwiGLU) also write their output as the next matmul's input `also`. With y,
// x += y first (add_rms_norm); without, x is only read.
Status launch_rms_norm(float* x, const float* y, int n_tokens, int64_t n, const float* w, float eps,
                       float* out, const MatmulInputOut& also, cudaStream_t s);
// RoPE in place on x (p.n_heads heads) and, if x1, on x1's heads1 heads of the same size.
Status launch_rope(float* x, float* x1, int heads1, int n_tokens, const int32_t* pos,
                   const RopeParams& p, cudaStream_t s);
// vec4: four values a thread where n allows (KESTREL_CUDA_NO_SWIGLU4=1: one, to compare).
Status launch_swiglu(const float* gate, const float* up, int64_t n, float* out,
                     const MatmulInputOut& also, bool vec4, cudaStream_t s);
Status launch_add(float* x, const float* y, int64_t n, cudaStream_t s);
Status launch_get_rows(const float* x, int64_t n_cols, const int32_t* rows, int n_rows, float* out,
                       cudaStream_t s);
// K and V (or one of them) into their caches, quantizing on write: one launch when both caches
// have one type.
struct KvStoreSide {
  const float* src = nullptr;  // [T][dim]
  int64_t dim = 0;
  quant::DType type = quant::DType::F16;
  uint8_t* cache = nullptr;
  int64_t row_bytes = 0;
};
Status launch_kv_store(const KvStoreSide* sides, int n_sides, int n_tokens, const int32_t* pos,
                       cudaStream_t s);
// Rows [0, n_rows) of a KV cache of `type` as f16 hi + lo parts, each [n_rows][dim].
Status launch_cache_to_f16(quant::DType type, const uint8_t* cache, int64_t row_bytes, int64_t dim,
                           int64_t n_rows, __half* hi, __half* lo, cudaStream_t s);
// Causal softmax over scores [n_heads][T][n_kv] (row t may see keys 0..pos[t]) into P as f16
// hi + lo parts.
Status launch_softmax_causal(const float* scores, int n_heads, int n_tokens, int64_t n_kv,
                             const int32_t* pos, __half* p_hi, __half* p_lo, cudaStream_t s);
// The K and V cache types the few-token attention kernels are instantiated for (f16, q8_0, q4_0
// each side): f(CacheTypes<K, V>{}) for the pair (kt, vt); false, f not called, for any other.
template <quant::DType K, quant::DType V>
struct CacheTypes {
  static constexpr quant::DType kK = K, kV = V;
};
template <quant::DType K, class F>
bool with_v_cache_type(quant::DType vt, F& f) {
  switch (vt) {
    case quant::DType::F16:
      f(CacheTypes<K, quant::DType::F16>{});
      return true;
    case quant::DType::Q8_0:
      f(CacheTypes<K, quant::DType::Q8_0>{});
      return true;
    case quant::DType::Q4_0:
      f(CacheTypes<K, quant::DType::Q4_0>{});
      return true;
    default:
      return false;
  }
}
template <class F>
bool with_cache_types(quant::DType kt, quant::DType vt, F&& f) {
  switch (kt) {
    case quant::DType::F16:
      return with_v_cache_type<quant::DType::F16>(vt, f);
    case quant::DType::Q8_0:
      return with_v_cache_type<quant::DType::Q8_0>(vt, f);
    case quant::DType::Q4_0:
      return with_v_cache_type<quant::DType::Q4_0>(vt, f);
    default:
      return false;
  }
}
// Bytes of one KV head's part of a cache row (D elements of an f16, q8_0 or q4_0 cache).
template <quant::DType T, int D>
constexpr int cache_slice_bytes() {
  return T == quant::DType::F16 ? 2 * D : D / 32 * (T == quant::DType::Q8_0 ? 34 : 18);
}
// Whether the few-token attention kernels (tc16, decode) can copy K and V rows of these caches:
// types with_cache_types takes, rows in 16-byte pieces (f16) or 4-byte ones (quantized).
inline bool cache_rows_copyable(const Tensor& kc, const Tensor& vc) {
  const auto aligned = [](const Tensor& t) {
    return t.type == quant::DType::F16 ? t.row_bytes() % 16 == 0 : t.row_bytes() % 4 == 0;
  };
  return with_cache_types(kc.type, vc.type, [](auto) {}) && aligned(kc) && aligned(vc);
}
// Fused causal attention on the tensor cores (attention_mma.cu): K and V as f16 [rows][kv_dim]
// (an f16 cache), or as hi + lo parts (a quantized cache expanded); head sizes 64 and 128.
bool mma_attention_fits(const AttentionParams& p, int64_t kv_dim);
Status launch_attention_mma(const float* q, int n_tokens, const int32_t* pos, const __half* k_hi,
                            const __half* k_lo, const __half* v_hi, const __half* v_lo,
                            int64_t kv_dim, const AttentionParams& p, float* out, cudaStream_t s);
// Fused causal attention in f32 (attention_flash.cu): head sizes 64 and 128, any cache type.
bool flash_attention_fits(const AttentionParams& p);
Status launch_attention_flash(const float* q, int n_tokens, const int32_t* pos, const Tensor& kc,
                              const Tensor& vc, const AttentionParams& p, float* out,
                              cudaStream_t s);
// Attention of 1-16 tokens with the keys split among blocks (attention_split.cu): whether the
// shape fits, the split count for a device of sm_count SMs, the scratch it needs (partial
// softmaxes; the n_head arrival counters, zeroed, come separately), and the launch.
bool attention_split_fits(const AttentionParams& p, int n_tokens);
int attention_split_count(const AttentionParams& p, int sm_count);
size_t attention_split_scratch_bytes(const AttentionParams& p, int splits);
Status launch_attention_split(const float* q, int n_tokens, const int32_t* pos, const Tensor& kc,
                              const Tensor& vc, const AttentionParams& p, int splits,
                              unsigned* arrivals, void* scratch, float* out,
                              const MatmulInputOut& also, cudaStream_t s);
// Attention of 1-16 tokens on the tensor cores straight from an f16, q8_0 or q4_0 cache, the keys
// split among blocks (attention_tc16.cu): whether it fits (head sizes 64 and 128), the split
// count for a device of sm_count SMs (its scratch: attention_split_scratch_bytes), the launch.
// Attention of one token (a decode step) in f32 (attention_decode.cu): grid (KV head, splits),
// splits by the cache's rows (attention_decode_splits), scratch for their partials.
bool attention_decode_fits(const AttentionParams& p, int n_tokens, const Tensor& kc,
                           const Tensor& vc);
int attention_decode_splits(int64_t cache_rows);
size_t attention_decode_scratch_bytes(const AttentionParams& p, int splits);
Status launch_attention_decode(const float* q, const int32_t* pos, const Tensor& kc,
                               const Tensor& vc, const AttentionParams& p, const DecodeRope& rope,
                               int splits, unsigned* arrivals, void* scratch, float* out,
                               const MatmulInputOut& also, cudaStream_t s);
bool attention_tc16_fits(const AttentionParams& p, int n_tokens, const Tensor& kc,
                         const Tensor& vc);
int attention_tc16_count(const AttentionParams& p, int sm_count);
Status launch_attention_tc16(const float* q, int n_tokens, const int32_t* pos, const Tensor& kc,
                             const Tensor& vc, const AttentionParams& p, int splits,
                             unsigned* arrivals, void* scratch, float* out,
                             const MatmulInputOut& also, cudaStream_t s);
// x[n] = hi + lo in f16 (lo: the rounding error of hi).
Status launch_split_f16(const float* x, int64_t n, __half* hi, __half* lo, cudaStream_t s);

}  // namespace kestrel::backend::cuda
