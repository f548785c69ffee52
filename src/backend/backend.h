// The one seam between the model and hardware. A backend owns its memory, repacks weights
// into whatever layout its kernels want (invisible above this interface) and implements the
// small fixed op set the llama family needs. Activations are row-major f32 matrices
// [n_tokens][dim]; the KV cache is a pair of [n_ctx][kv_dim] matrices per layer in f16, q8_0
// or q4_0. Ops are enqueued in order; synchronize() waits for all of them.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "core/op_profiler.h"
#include "core/status.h"
#include "format/quant/types.h"

namespace kestrel::backend {

class Backend;

// A matrix in one backend's memory. For quantized types `cols` counts elements, so a row
// takes quant::row_bytes(type, cols) bytes.
struct Tensor {
  quant::DType type = quant::DType::F32;
  int64_t rows = 0;
  int64_t cols = 0;
  void* data = nullptr;  // backend memory (a host pointer on the CPU backend)
  size_t bytes = 0;
  Backend* owner = nullptr;

  explicit operator bool() const { return data != nullptr; }
  size_t row_bytes() const { return bytes / static_cast<size_t>(rows > 0 ? rows : 1); }
};

// A host array of indices a recorded pass uploads (token ids, positions, the logits' rows):
// run_recorded's inputs.
struct RecordInput {
  const int32_t* data = nullptr;
  int n = 0;
};

// A recorded pass's upload as its capture found it among run_recorded's inputs: `n` ints of
// input `input` from `offset`, into the backend's slot at `at`.
struct RecordFill {
  int input = -1, offset = 0, n = 0;
  size_t at = 0;
};

// The fill of an upload of n ints at host into slot `at`: input -1 when no input holds it, or
// more than one (overlapping inputs: which one a replay means is unknown).
inline RecordFill find_record_fill(const RecordInput* inputs, int n_inputs, const int32_t* host,
                                   int n, size_t at) {
  RecordFill f{-1, 0, n, at};
  for (int i = 0; i < n_inputs; ++i) {
    if (host < inputs[i].data || host + n > inputs[i].data + inputs[i].n) continue;
    if (f.input != -1) return {-1, 0, n, at};
    f.input = i;
    f.offset = static_cast<int>(host - inputs[i].data);
  }
  return f;
}

// A weight matrix as stored in the GGUF file (host memory, usually the file mapping):
// n_out rows of n_in elements of `type`.
struct HostMatrix {
  quant::DType type = quant::DType::F32;
  int64_t n_in = 0;   // elements per row (the contiguous GGUF dimension)
  int64_t n_out = 0;  // rows
  const void* data = nullptr;
  std::string name;
};

// A matmul weight after the backend prepared it (repacked, uploaded). Opaque above.
class Weight {
 public:
  virtual ~Weight() = default;
  quant::DType type = quant::DType::F32;
  int64_t n_in = 0;
  int64_t n_out = 0;
  std::string name;
  size_t bytes = 0;  // device bytes it occupies
};

// Which way RoPE pairs dimensions: llama.cpp's "normal" rotates adjacent pairs
// (x[2i], x[2i+1]); "neox" rotates halves (x[i], x[i + head_dim/2]).
enum class RopeLayout { Normal, NeoX };

struct RopeParams {
  int n_heads = 0;
  int head_dim = 0;
  float freq_base = 10000.0f;
  RopeLayout layout = RopeLayout::Normal;
};

struct AttentionParams {
  int n_head = 0;
  int n_head_kv = 0;
  int head_dim = 0;
  float scale = 1.0f;  // usually 1/sqrt(head_dim)
};

// One product of a matmul_group: out = x . w^T (+ bias).
struct MatmulOut {
  const Weight* w = nullptr;
  Tensor* out = nullptr;
  const Tensor* bias = nullptr;
};

// One decode step (a single token) through a whole layer, for a backend that runs it as one unit
// (Backend::decode_layer): the tensors and weights of the forward pass's run_layer.
struct DecodeLayer {
  Tensor* x = nullptr;     // [1][E] the residual, updated in place
  Tensor* proj = nullptr;  // [1][E] added to x first when pending_add; scratch after
  bool pending_add = false;
  const Tensor* attn_norm = nullptr;
  const Tensor* ffn_norm = nullptr;
  float rms_eps = 0.0f;
  const Weight *wq = nullptr, *wk = nullptr, *wv = nullptr, *wo = nullptr;
  const Weight *w_gate = nullptr, *w_up = nullptr, *w_down = nullptr;
  const Tensor *bq = nullptr, *bk = nullptr, *bv = nullptr;  // QKV biases, or null
  RopeParams rope_q, rope_k;
  AttentionParams attn;
  Tensor* k_cache = nullptr;
  Tensor* v_cache = nullptr;
  int32_t pos = 0;  // the token's position (cache row)
  // Scratch of the op-by-op path, which the backend may use: [1][E], [1][q_dim], [1][kv_dim] x 2,
  // [1][q_dim], [1][F] x 2.
  Tensor *h = nullptr, *q = nullptr, *k = nullptr, *v = nullptr, *att = nullptr;
  Tensor *gate = nullptr, *up = nullptr;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;         // "cpu", "cuda", ...
  virtual std::string device_name() const = 0;  // e.g. the CPU model and ISA in use

  // Memory. alloc never leaves a partial allocation behind on failure.
  virtual Expected<Tensor> alloc(quant::DType type, int64_t rows, int64_t cols,
                                 const char* what) = 0;
  virtual void free(Tensor& t) = 0;
  // Host <-> backend copies of whole rows [row0, row0 + n_rows).
  virtual Status upload(Tensor& dst, int64_t row0, int64_t n_rows, const void* src) = 0;
  virtual Status download(const Tensor& src, int64_t row0, int64_t n_rows, void* dst) = 0;

  virtual Expected<std::unique_ptr<Weight>> load_weight(const HostMatrix& m) = 0;
  // A small f32 vector (norm weight, bias) as a 1 x n tensor.
  virtual Expected<Tensor> load_vector(const float* data, int64_t n, const char* what) = 0;

  // Ops. Shapes: T = tokens in the micro-batch; all activations f32.
  // out[T][E] = table[tokens[t]] (table on the host, any supported type).
  virtual Status embed(const HostMatrix& table, const int32_t* tokens, int n_tokens,
                       Tensor& out) = 0;
  // out[T][E] = x / rms(x) * weight[E]
  virtual Status rms_norm(const Tensor& x, int n_tokens, const Tensor& weight, float eps,
                          Tensor& out) = 0;
  // x[T][E] += y[T][E], then out = rms_norm(x): the residual add and the next block's norm.
  // The default runs add and rms_norm; a backend may do both in one pass (decode spends more
  // on launching these small kernels than on running them).
  virtual Status add_rms_norm(Tensor& x, const Tensor& y, int n_tokens, const Tensor& weight,
                              float eps, Tensor& out);
  // out[T][n_out] = x[T][n_in] . W[n_out][n_in]^T (+ bias[n_out])
  virtual Status matmul(const Weight& w, const Tensor& x, int n_tokens, Tensor& out,
                        const Tensor* bias) = 0;
  // Several matmuls of one input (Q, K and V; gate and up): outs[0..n_outs), in order. The
  // default runs matmul for each; a backend may run them as one launch. (A pointer and a count,
  // not std::span: the CUDA sources are compiled as C++17.)
  virtual Status matmul_group(const Tensor& x, int n_tokens, const MatmulOut* outs, int n_outs);
  // In place on x[T][n_heads * head_dim], token t at position positions[t].
  virtual Status rope(Tensor& x, int n_tokens, const int32_t* positions, const RopeParams& p) = 0;
  // rope of q with pq, then of k with pk; a backend may do both in one launch.
  virtual Status rope_qk(Tensor& q, Tensor& k, int n_tokens, const int32_t* positions,
                         const RopeParams& pq, const RopeParams& pk);
  // Writes k[T][kv_dim], v[T][kv_dim] into rows positions[t] of the caches, converting to
  // the cache type (quantize on write).
  virtual Status kv_store(const Tensor& k, const Tensor& v, int n_tokens, const int32_t* positions,
                          Tensor& k_cache, Tensor& v_cache) = 0;
  // rope_qk, then kv_store of the rotated k and v. A backend that runs both as one op says so
  // in fuses_rope_kv_store (the forward pass then times them as one op, "rope+kv_store"); the
  // default runs the two.
  virtual Status rope_kv_store(Tensor& q, Tensor& k, const Tensor& v, int n_tokens,
                               const int32_t* positions, const RopeParams& pq, const RopeParams& pk,
                               Tensor& k_cache, Tensor& v_cache);
  virtual bool fuses_rope_kv_store(const Tensor& /*k_cache*/, const Tensor& /*v_cache*/) const {
    return false;
  }
  // qkv[0..2] = x . W^T (+ bias) for Q, K and V (matmul_group of the three), then rope_kv_store
  // of those outputs: a layer's projections, RoPE and KV store as one op. A backend that runs it
  // as one says so in fuses_matmul_rope_kv_store (the forward pass then times it as one op,
  // "matmul+rope+kv_store"); the default runs the two.
  virtual Status matmul_rope_kv_store(const Tensor& x, int n_tokens, const MatmulOut* qkv,
                                      const int32_t* positions, const RopeParams& pq,
                                      const RopeParams& pk, Tensor& k_cache, Tensor& v_cache);
  virtual bool fuses_matmul_rope_kv_store(const Weight& /*wq*/, int /*n_tokens*/,
                                          const Tensor& /*k_cache*/,
                                          const Tensor& /*v_cache*/) const {
    return false;
  }
  // rope_kv_store, then attention of the rotated q into out: a layer's attention as one op. A
  // backend that runs it as one says so in fuses_rope_kv_attention (the forward pass then times
  // it as one op, "rope+kv_store+attention"); q and k may then be left unrotated (callers read
  // neither afterwards). The default runs the two ops.
  virtual Status rope_kv_attention(Tensor& q, Tensor& k, const Tensor& v, int n_tokens,
                                   const int32_t* positions, const RopeParams& pq,
                                   const RopeParams& pk, Tensor& k_cache, Tensor& v_cache,
                                   const AttentionParams& p, Tensor& out);
  virtual bool fuses_rope_kv_attention(int /*n_tokens*/, const Tensor& /*k_cache*/,
                                       const Tensor& /*v_cache*/) const {
    return false;
  }
  // A decode step of a whole layer as one op: the result of the forward pass's op sequence for
  // one token (x updated in place, including the pending add; the cache row pos written), within
  // the op bounds. Called only when fuses_decode_layer says the backend takes this layer. The
  // default runs that op sequence (the reference a backend's own version is tested against).
  virtual bool fuses_decode_layer(const DecodeLayer& /*layer*/) const { return false; }
  virtual Status decode_layer(const DecodeLayer& layer);
  // Causal attention: token t attends to cache rows [0, positions[t]].
  // q[T][n_head*head_dim] -> out[T][n_head*head_dim].
  virtual Status attention(const Tensor& q, int n_tokens, const int32_t* positions,
                           const Tensor& k_cache, const Tensor& v_cache, const AttentionParams& p,
                           Tensor& out) = 0;
  // out[T][F] = silu(gate) * up
  virtual Status swiglu(const Tensor& gate, const Tensor& up, int n_tokens, Tensor& out) = 0;
  // out[T][n_out] = (silu(gate) * up) . W^T: SwiGLU and the feed-forward's down projection. The
  // default runs swiglu into gate (overwritten), then matmul. A backend that runs both as one op
  // says so in fuses_swiglu_matmul (the forward pass then times them as one op,
  // "swiglu+matmul"); gate may then be left as it was: callers read neither afterwards.
  virtual Status swiglu_matmul(Tensor& gate, const Tensor& up, int n_tokens, const Weight& w,
                               Tensor& out);
  virtual bool fuses_swiglu_matmul(const Weight& /*w*/, int /*n_tokens*/) const { return false; }
  // gate[T][F] = silu(x . W_gate^T) * (x . W_up^T), up[T][F] = x . W_up^T: the feed-forward's two
  // projections and SwiGLU. The default runs matmul_group, then swiglu into gate. A backend that
  // runs them as one op says so in fuses_matmul_swiglu (the forward pass then times them as one
  // op, "matmul+swiglu").
  virtual Status matmul_swiglu(const Tensor& x, int n_tokens, const Weight& w_gate,
                               const Weight& w_up, Tensor& gate, Tensor& up);
  virtual bool fuses_matmul_swiglu(const Weight& /*w_gate*/, const Weight& /*w_up*/,
                                   int /*n_tokens*/) const {
    return false;
  }
  // proj[T][E] = in . W^T, x += proj, then out = rms_norm(x) * weight: a block's last
  // projection, the residual add and the next block's norm. `next` are all the matmuls that read
  // out afterwards (Q, K and V; gate and up). The default runs matmul, then add_rms_norm. A
  // backend that runs them as one op says so in fuses_matmul_add_rms_norm (the forward pass then
  // times them as one op, "matmul+add_rms_norm"); proj and out may then be left as only `next`
  // reads them: no other op may read either afterwards, and `next` must follow at once (an
  // upload or free in between may drop what the backend holds for them).
  virtual Status matmul_add_rms_norm(const Weight& w, const Tensor& in, int n_tokens, Tensor& proj,
                                     Tensor& x, const Tensor& weight, float eps, Tensor& out);
  virtual bool fuses_matmul_add_rms_norm(const Weight& /*w*/, int /*n_tokens*/,
                                         const Weight* const* /*next*/, int /*n_next*/) const {
    return false;
  }
  // x[T][E] += y[T][E]
  virtual Status add(Tensor& x, const Tensor& y, int n_tokens) = 0;
  // out[i][:] = x[rows[i]][:] (gathers the rows whose logits are wanted)
  virtual Status get_rows(const Tensor& x, const int32_t* rows, int n_rows, Tensor& out) = 0;

  virtual Status synchronize() = 0;

  // Runs `body`, a sequence of this backend's ops whose kernels and shapes are fixed by `key`, as
  // one unit. A backend may record it when the key comes again and replay the recording after
  // that (CUDA graphs: one launch instead of hundreds), calling body only to take in its inputs
  // (token ids, positions, row lists, host-side checks). `inputs` [n_inputs] are the host arrays
  // the body uploads from: a backend may take a replay's inputs straight from them without calling
  // body at all, so body may depend on nothing but `key` and their contents (a recording whose
  // uploads came from anywhere else stages through body). The default runs body.
  virtual Status run_recorded(uint64_t key, const RecordInput* inputs, int n_inputs,
                              const std::function<Status()>& body) {
    (void)key;
    (void)inputs;
    (void)n_inputs;
    return body();
  }
  // What, besides the batch's shape, fixes the kernels of a pass whose last token sees n_keys
  // keys: the caller puts it in run_recorded's key, so that a recording is replayed only for
  // passes that would choose the same kernels (CUDA: a decode step's attention kernel by the
  // cache's length). The default: nothing.
  virtual int record_bucket(int n_keys) const {
    (void)n_keys;
    return 0;
  }
  // Bytes that can still be allocated on the device (host: MemAvailable), or -1 if unknown.
  // Checked before large allocations so that they fail with numbers, not half-way.
  virtual int64_t available_memory() const { return -1; }
  // The micro-batch (-ub) this backend runs best at when none is given: larger ones let a GPU
  // dequantize each weight once for more tokens (CUDA: pp2048 35,339 t/s at 2048 against 26,841
  // at 512 on the H200, bench/NOTES.md), at the price of more activation memory.
  virtual int preferred_ubatch() const { return 512; }
  // Device memory held by purpose, for the report (known = false: not counted, host memory).
  // Tensors whose alloc() `what` starts with "KV cache" count as the KV cache.
  struct MemoryUse {
    bool known = false;
    int64_t weights = 0, kv_cache = 0, scratch = 0;  // bytes held now
    int64_t scratch_peak = 0;  // the most scratch (activations, staging, tiles) held at once
  };
  virtual MemoryUse memory_use() const { return {}; }
  // One-time setup done when the backend was created (device context, kernel compilation or a
  // program-cache load), part of the model's load time: its ms and what it did ("kernels loaded
  // from the program cache ..."), for the report. 0 and "" when there is nothing to say.
  virtual double setup_ms() const { return 0; }
  virtual std::string setup_note() const { return {}; }

  // Runs `op` for the per-op profile (--profile) and adds its time to `profiler` under
  // `kind`. The default brackets the op with synchronize() and the host clock, which is exact
  // for synchronous backends; asynchronous ones override it with device timers (events) so
  // that profiling does not serialize more than it must. Never called when not profiling.
  virtual Status profile_op(std::string_view kind, OpProfiler& profiler,
                            const std::function<Status()>& op);
};

}  // namespace kestrel::backend
