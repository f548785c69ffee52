// One conversation: the KV cache, the scratch of the forward pass, the position, and the
// time each prompt chunk took.
#pragma once

#include <algorithm>
#include <memory>
#include <vector>

#include "core/op_profiler.h"
#include "kv/kv_cache.h"
#include "model/forward.h"
#include "model/model.h"
#include "runtime/scheduler.h"

namespace kestrel::runtime {

struct SessionParams {
  int n_ctx = 4096;
  int n_batch = 512;
  int n_ubatch = 0;  // 0: the primary backend's preferred_ubatch()
  Chunking chunking = Chunking::Balanced;
  quant::DType type_k = quant::DType::F16;
  quant::DType type_v = quant::DType::F16;
};

struct ChunkStats {
  int index = 0;
  int first_token = 0;
  int n_tokens = 0;
  int n_ubatches = 0;
  double ms = 0;
  std::vector<OpTime> ops;  // per-op times of this chunk, largest first (only when profiling)
};

class Session {
 public:
  static Expected<std::unique_ptr<Session>> create(const model::Model& model,
                                                   const SessionParams& params);

  // Evaluates the prompt in chunks after what the session already holds. all_logits, when
  // given, receives [n_tokens][n_vocab] logits of every position; the last position's
  // logits are always kept (last_logits()).
  Status prefill(const std::vector<int32_t>& tokens, std::vector<float>* all_logits);
  // One generation step: feeds `token` at the next position.
  Status decode(int32_t token);
  // Runs one untimed pass of n_tokens throwaway tokens (and one of a single token, the decode
  // shape, when `decode`) after what the session holds, then forgets them: a GPU backend's first
  // passes load its kernel modules and libraries, fill its memory pools and raise the clocks,
  // which would otherwise land in the first timed chunk. Neither the chunk stats nor the profile
  // see it; last_logits() is kept.
  Status warm_up(int n_tokens, bool decode);

  // Forgets every position from `n_past` on (a chat re-rendered with different tokens there);
  // their cache rows are overwritten by what is evaluated next.
  void truncate(int n_past) { n_past_ = std::min(n_past_, std::max(n_past, 0)); }

  void reset_chunk_stats() { chunks_.clear(); }
  // While set, every op of prefill and decode is timed (per-op profile, --profile) and added
  // to `p`; each chunk's share is also kept in its ChunkStats. nullptr turns it off.
  void set_profiler(OpProfiler* p) {
    profiler_ = p;
    forward_->set_profiler(p ? &chunk_profile_ : nullptr);
  }

  const std::vector<float>& last_logits() const { return last_logits_; }
  int n_past() const { return n_past_; }
  const SessionParams& params() const { return params_; }
  const std::vector<ChunkStats>& chunk_stats() const { return chunks_; }
  const kv::KvCache& cache() const { return *cache_; }

 private:
  Session(const model::Model& model, const SessionParams& params)
      : model_(model), params_(params) {}
  Status check_tokens(const std::vector<int32_t>& tokens) const;

  const model::Model& model_;
  SessionParams params_;
  std::unique_ptr<kv::KvCache> cache_;
  std::unique_ptr<model::Forward> forward_;
  std::vector<float> last_logits_;
  std::vector<ChunkStats> chunks_;
  int n_past_ = 0;
  OpProfiler* profiler_ = nullptr;
  OpProfiler chunk_profile_;  // the ops of the chunk being evaluated
};

}  // namespace kestrel::runtime
