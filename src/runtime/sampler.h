// Token sampler: turns one row of logits into a token id.
//
// temperature <= 0 (or NaN): greedy, the argmax of the logits (ties -> the lowest id).
// Otherwise the filters run in this fixed order, each on what the previous one kept:
//   1. top-k: keep the k largest logits (k <= 0, or k >= n_vocab: no limit);
//   2. top-p: nucleus over the softmax (temperature 1) of what top-k kept: keep the smallest
//      prefix, in order of decreasing logit, whose probability mass reaches top_p; at least
//      one token (top_p >= 1 disables it);
//   3. min-p: drop tokens whose probability is below min_p times the largest probability
//      (min_p <= 0 disables it; the most likely token is always kept);
//   4. temperature: draw from softmax(logit / temperature) over what is left, with a
//      std::mt19937_64 seeded by SamplerParams::seed.
// This is the order of llama.cpp's default sampler chain (temperature is applied last, so it
// changes the draw but not which tokens the filters keep). Candidates with equal logits are
// ordered by id, so filtering is deterministic.
//
// NaN logits are treated as -infinity (never picked unless every logit is NaN or -inf, in
// which case the sampler returns the greedy choice); +infinity is treated as the largest finite
// float. Cost per call: with top_k set, one pass over the logits keeping a heap of the k best
// (O(n_vocab) compares plus O(k log k)); without it, O(n_vocab) plus a partial sort of the head
// that top-p needs. The vocabulary is never fully sorted unless top-p needs all of it.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace kestrel::runtime {

// SamplerParams::seed value meaning "pick a random seed" (from std::random_device).
inline constexpr uint64_t kRandomSeed = 0xFFFFFFFF;

struct SamplerParams {
  float temperature = 0.8f;
  int top_k = 40;
  float top_p = 0.95f;
  float min_p = 0.05f;
  uint64_t seed = kRandomSeed;  // kRandomSeed: random seed, reported by Sampler::seed()
};

class Sampler {
 public:
  explicit Sampler(const SamplerParams& params);

  // Picks the next token from n_vocab logits. Returns -1 when n_vocab <= 0 or logits is null.
  int32_t sample(const float* logits, int n_vocab);

  // The seed the generator was started with (the random one when params.seed == kRandomSeed).
  uint64_t seed() const { return seed_; }

  const SamplerParams& params() const { return params_; }

 private:
  struct Candidate {
    float logit;
    int32_t id;
  };

  SamplerParams params_;
  uint64_t seed_;
  std::mt19937_64 rng_;
  std::vector<Candidate> cands_;  // scratch, reused across calls
};

}  // namespace kestrel::runtime
