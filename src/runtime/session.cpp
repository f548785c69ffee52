#include "runtime/session.h"

#include <algorithm>
#include <chrono>
#include <numeric>

namespace kestrel::runtime {

Expected<std::unique_ptr<Session>> Session::create(const model::Model& model,
                                                   const SessionParams& params) {
  if (params.n_batch <= 0 || params.n_ubatch < 0)
    return error("-b must be positive and -ub positive or 0 (got -b %d -ub %d)", params.n_batch,
                 params.n_ubatch);
  std::unique_ptr<Session> s(new Session(model, params));
  KESTREL_ASSIGN_OR_RETURN(s->cache_,
                           kv::KvCache::create(model, params.n_ctx, params.type_k, params.type_v));
  // -ub 0: the primary backend's choice, asked once the cache holds its memory.
  const int ub =
      params.n_ubatch > 0 ? params.n_ubatch : model.primary_backend()->preferred_ubatch();
  s->params_.n_ubatch = std::min(ub, params.n_batch);
  KESTREL_ASSIGN_OR_RETURN(s->forward_, model::Forward::create(model, s->params_.n_ubatch));
  s->last_logits_.resize(model.config().n_vocab);
  return s;
}

Status Session::check_tokens(const std::vector<int32_t>& tokens) const {
  const int n_vocab = model_.config().n_vocab;
  for (size_t i = 0; i < tokens.size(); ++i)
    if (tokens[i] < 0 || tokens[i] >= n_vocab)
      return error("token %zu has id %d, outside the vocabulary [0, %d)", i, tokens[i], n_vocab);
  if (n_past_ + static_cast<int64_t>(tokens.size()) > params_.n_ctx)
    return error(
        "%zu tokens after %d already in the context do not fit its %d positions: "
        "raise -c or shorten the prompt",
        tokens.size(), n_past_, params_.n_ctx);
  return Status::ok();
}

Status Session::prefill(const std::vector<int32_t>& tokens, std::vector<float>* all_logits) {
  if (tokens.empty()) return error("the prompt is empty: give at least one token");
  KESTREL_TRY(check_tokens(tokens));
  const int n_vocab = model_.config().n_vocab;
  if (all_logits) all_logits->assign(tokens.size() * static_cast<size_t>(n_vocab), 0.0f);
  const auto plan = plan_chunks(static_cast<int>(tokens.size()), params_.n_batch, params_.n_ubatch,
                                params_.chunking);
  std::vector<int32_t> rows;
  for (const Chunk& chunk : plan) {
    chunk_profile_.reset();
    const auto t0 = std::chrono::steady_clock::now();
    int first = chunk.first_token;
    for (int n : chunk.ubatches) {
      const bool last_ubatch = first + n == static_cast<int>(tokens.size());
      float* out = nullptr;
      rows.clear();
      if (all_logits) {
        rows.resize(n);
        std::iota(rows.begin(), rows.end(), 0);
        out = all_logits->data() + static_cast<size_t>(first) * n_vocab;
      } else if (last_ubatch) {
        rows.push_back(n - 1);
        out = last_logits_.data();
      }
      // Micro-batches overlap within a chunk (Forward::run); its last one synchronizes, so that
      // the chunk's time holds all of its work.
      const bool last_of_chunk = first + n == chunk.first_token + chunk.n_tokens;
      KESTREL_TRY(forward_->run(tokens.data() + first, n, n_past_ + first, *cache_, rows.data(),
                                static_cast<int>(rows.size()), out, !last_of_chunk));
      first += n;
    }
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    chunks_.push_back({static_cast<int>(chunks_.size()),
                       n_past_ + chunk.first_token,
                       chunk.n_tokens,
                       static_cast<int>(chunk.ubatches.size()),
                       ms,
                       {}});
    if (profiler_) {
      chunks_.back().ops = chunk_profile_.sorted();
      for (const OpTime& o : chunks_.back().ops) profiler_->add_all(o);
    }
  }
  if (all_logits)
    std::copy_n(all_logits->data() + (tokens.size() - 1) * static_cast<size_t>(n_vocab), n_vocab,
                last_logits_.data());
  n_past_ += static_cast<int>(tokens.size());
  return Status::ok();
}

Status Session::warm_up(int n_tokens, bool decode) {
  const int n = std::min(std::min(n_tokens, params_.n_ubatch), params_.n_ctx - n_past_);
  if (n <= 0) return Status::ok();
  std::vector<float> logits(last_logits_.size());  // an output row: the pass ends synchronized
  const std::vector<int32_t> tokens(n, 0);
  const int32_t last = n - 1, first = 0;
  KESTREL_TRY(forward_->run(tokens.data(), n, n_past_, *cache_, &last, 1, logits.data()));
  if (decode && n > 1)
    KESTREL_TRY(forward_->run(tokens.data(), 1, n_past_, *cache_, &first, 1, logits.data()));
  chunk_profile_.reset();  // n_past_ stays: the rows written are overwritten by what comes next
  return Status::ok();
}

Status Session::decode(int32_t token) {
  const std::vector<int32_t> one{token};
  KESTREL_TRY(check_tokens(one));
  const int32_t row = 0;
  chunk_profile_.reset();
  KESTREL_TRY(forward_->run(&token, 1, n_past_, *cache_, &row, 1, last_logits_.data()));
  if (profiler_)
    for (const OpTime& o : chunk_profile_.sorted()) profiler_->add_all(o);
  ++n_past_;
  return Status::ok();
}

}  // namespace kestrel::runtime
