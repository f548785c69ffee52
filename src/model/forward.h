// The forward pass of the llama family: one readable sequence of backend ops over a batch
// of tokens with positions. The same function runs a prefill micro-batch and a decode step.
#pragma once

#include <map>
#include <memory>
#include <span>
#include <vector>

#include "backend/backend.h"
#include "core/op_profiler.h"
#include "kv/kv_cache.h"
#include "model/model.h"

namespace kestrel::model {

class Forward {
 public:
  // Passes of up to this many tokens, within this context, may be recorded by the backend.
  static constexpr int kRecordMaxTokens = 16;
  static constexpr int kRecordMaxContext = 8192;

  // Scratch for micro-batches of up to `max_tokens` tokens on every backend the model uses.
  static Expected<std::unique_ptr<Forward>> create(const Model& model, int max_tokens);
  ~Forward();

  int max_tokens() const { return max_tokens_; }

  // Runs tokens[0..n) at positions pos0..pos0+n-1, storing their K/V in `cache`, and writes
  // the logits of the rows listed in logit_rows (indices into the batch) to
  // logits[n_logit_rows][n_vocab]. n_logit_rows may be 0 (no head is computed).
  //
  // `overlap`: a pass without logits over a split placement (CPU layers, then GPU layers) may
  // return once its device work is enqueued, so that the next pass's CPU layers run while the
  // device finishes this one (-ngl 31: layer 0 of micro-batch i + 1 on the CPU beside layers
  // 1-31 of micro-batch i). The next pass's upload to the device waits for it; the caller ends
  // with a pass that does not overlap (the last of a chunk), which synchronizes. Never with a
  // profiler attached (the upload would carry the wait) or on one backend (nothing to overlap).
  Status run(const int32_t* tokens, int n, int32_t pos0, kv::KvCache& cache,
             const int32_t* logit_rows, int n_logit_rows, float* logits, bool overlap = false);

  // Per-op times go to `p` while it is set (nullptr: off, the default).
  void set_profiler(OpProfiler* p) { profiler_ = p; }

 private:
  // Runs one backend op; with a profiler attached, its backend times it under `kind`.
  template <typename Op>
  Status op(backend::Backend& be, std::string_view kind, Op&& f) {
    if (!profiler_) return f();
    return be.profile_op(kind, *profiler_, f);
  }
  // Activations of one backend, each [max_tokens][dim] f32.
  struct Scratch {
    backend::Tensor x;     // [T][E] residual stream
    backend::Tensor h;     // [T][E] normed input of a block
    backend::Tensor q;     // [T][q_dim]
    backend::Tensor k;     // [T][kv_dim]
    backend::Tensor v;     // [T][kv_dim]
    backend::Tensor att;   // [T][q_dim] attention output before wo
    backend::Tensor proj;  // [T][E] output of wo / w_down
    backend::Tensor gate;  // [T][F]
    backend::Tensor up;    // [T][F]
  };
  Forward(const Model& model, int max_tokens) : model_(model), max_tokens_(max_tokens) {}
  Status alloc_scratch(backend::Backend* be);
  Status move_residual(backend::Backend* from, backend::Backend* to, int n);
  // What a layer leaves to the next: nothing, its last residual add (x += proj, so that the next
  // layer on the same backend can fuse it into its first norm; flush_add runs one that has no
  // next norm), or the add done and the next layer's normed input already in h (a backend that
  // fuses the down projection, the add and that norm: Backend::matmul_add_rms_norm).
  enum class Pending { kNothing, kAdd, kNormedInput };
  Status run_layer(int il, int n, const int32_t* positions, kv::KvCache& cache, Pending& pending);
  // The layer's feed-forward block (h holds its normed input); sets `pending`.
  Status run_ffn(int il, int n, const int32_t* positions, kv::KvCache& cache, Pending& pending);
  backend::DecodeLayer decode_layer_args(int il, int32_t pos, kv::KvCache& cache, bool pending_add);
  Status flush_add(backend::Backend* be, int n, Pending& pending);
  Status matmul_group(backend::Backend& be, const backend::Tensor& x, int n,
                      std::span<const backend::MatmulOut> outs);
  Status enqueue(const int32_t* tokens, int n, kv::KvCache& cache, const int32_t* logit_rows,
                 int n_logit_rows);
  Status ensure_head_buffers(int n_rows);
  Status run_head(int n_rows, const int32_t* rows);

  const Model& model_;
  int max_tokens_;
  OpProfiler* profiler_ = nullptr;
  bool one_backend_ = false;  // every layer and the head on the input backend
  std::map<backend::Backend*, Scratch> scratch_;
  backend::Tensor head_in_;  // [max_rows][E] rows gathered for the head
  backend::Tensor logits_;   // [max_rows][V]
  std::vector<float> host_x_;
  std::vector<int32_t> positions_;
};

}  // namespace kestrel::model
