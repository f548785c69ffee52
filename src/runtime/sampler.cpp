// Token sampler: top-k, top-p, min-p, then a temperature draw (see sampler.h for the rules).
#include "runtime/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>

namespace kestrel::runtime {

namespace {

// NaN -> -inf (never chosen), +inf -> the largest finite float (so differences stay finite).
float sanitize(float l) {
  if (std::isnan(l)) return -std::numeric_limits<float>::infinity();
  if (l == std::numeric_limits<float>::infinity()) return std::numeric_limits<float>::max();
  return l;
}

// Index of the largest logit, the lowest id on ties; NaN never wins unless all are NaN.
int32_t argmax(const float* logits, int n) {
  int32_t best = 0;
  float best_l = sanitize(logits[0]);
  for (int i = 1; i < n; ++i) {
    const float l = sanitize(logits[i]);
    if (l > best_l) {
      best_l = l;
      best = i;
    }
  }
  return best;
}

// A uniform double in [0, 1) from the top 53 bits of one generator output.
double uniform01(std::mt19937_64& rng) {
  return static_cast<double>(rng() >> 11) * (1.0 / 9007199254740992.0);
}

}  // namespace

Sampler::Sampler(const SamplerParams& params) : params_(params), seed_(params.seed) {
  if (seed_ == kRandomSeed) {
    std::random_device rd;
    seed_ = (static_cast<uint64_t>(rd()) << 32) ^ static_cast<uint64_t>(rd());
  }
  rng_.seed(seed_);
}

int32_t Sampler::sample(const float* logits, int n_vocab) {
  if (logits == nullptr || n_vocab <= 0) return -1;
  const float temperature = params_.temperature;
  if (!(temperature > 0.0f)) return argmax(logits, n_vocab);

  // Candidate order: larger logit first, lower id first among equal logits (a total order,
  // so every selection and partial sort below has one well-defined result).
  const auto before = [](const Candidate& a, const Candidate& b) {
    return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
  };

  // 1. top-k. With a limit, one pass keeps the k best in a heap whose front is the worst of
  // them (O(n_vocab) compares, few heap updates); without one, every token is a candidate.
  // Ids arrive in increasing order, so a newcomer that ties the worst kept logit ranks after
  // it: once the heap is full, only a strictly larger logit gets in (NaN never does).
  cands_.clear();
  if (params_.top_k > 0 && params_.top_k < n_vocab) {
    const size_t k = static_cast<size_t>(params_.top_k);
    cands_.reserve(k);
    int i = 0;
    for (; i < n_vocab && cands_.size() < k; ++i) {
      cands_.push_back({sanitize(logits[i]), i});
      std::push_heap(cands_.begin(), cands_.end(), before);
    }
    float worst = cands_.front().logit;
    for (; i < n_vocab; ++i) {
      if (!(logits[i] > worst)) continue;
      const Candidate c{sanitize(logits[i]), i};
      if (!before(c, cands_.front())) continue;  // +inf sanitized to a tie with FLT_MAX
      std::pop_heap(cands_.begin(), cands_.end(), before);
      cands_.back() = c;
      std::push_heap(cands_.begin(), cands_.end(), before);
      worst = cands_.front().logit;
    }
  } else {
    cands_.resize(static_cast<size_t>(n_vocab));
    for (int i = 0; i < n_vocab; ++i) cands_[i] = {sanitize(logits[i]), i};
  }
  float max_l = -std::numeric_limits<float>::infinity();
  for (const Candidate& c : cands_) max_l = std::max(max_l, c.logit);
  if (max_l == -std::numeric_limits<float>::infinity()) return argmax(logits, n_vocab);
  const double max_d = max_l;
  const auto first = cands_.begin();
  const size_t kept = cands_.size();  // cands_[0, kept): what top-k kept

  // 2. and 3. top-p and min-p. Both keep a prefix of the survivors in candidate order; min-p's
  // prefix does not depend on what else is kept (p_i / p_max = exp(l_i - l_max)), so it is
  // found first, by a linear partition, and bounds how much top-p has to sort. The final set
  // is the shorter of the two prefixes, which is top-p followed by min-p.
  size_t pool = kept;
  if (params_.min_p > 0.0f) {
    const double log_min_p = std::log(std::min(static_cast<double>(params_.min_p), 1.0));
    const auto mid =
        std::partition(first, first + static_cast<std::ptrdiff_t>(kept),
                       [&](const Candidate& c) { return c.logit - max_d >= log_min_p; });
    pool = static_cast<size_t>(mid - first);  // >= 1: the maximum has l - max = 0
  }
  if (params_.top_p < 1.0f) {
    // Normalizer of the softmax over everything top-k kept (not only min-p's pool).
    double z = 0.0;
    for (size_t i = 0; i < kept; ++i) z += std::exp(cands_[i].logit - max_l);
    const double target = static_cast<double>(params_.top_p) * z;
    // Sort a growing head of the pool until its mass reaches the target (nucleus logits are
    // usually concentrated, so the head stays small even without top-k).
    size_t head = std::min<size_t>(pool, 64);
    size_t keep = pool;
    for (;;) {
      std::partial_sort(first, first + static_cast<std::ptrdiff_t>(head),
                        first + static_cast<std::ptrdiff_t>(pool), before);
      double cum = 0.0;
      bool reached = false;
      for (size_t i = 0; i < head; ++i) {
        cum += std::exp(cands_[i].logit - max_l);
        if (cum >= target) {
          keep = i + 1;
          reached = true;
          break;
        }
      }
      if (reached || head == pool) break;
      head = std::min(pool, head * 8);
    }
    pool = keep;
  }

  // 4. temperature: draw from softmax(l / T) over cands_[0, pool). The maximum logit is always
  // among them, so every weight is in [0, 1] and their sum is >= 1. The exponent is formed in
  // double (finite for every finite logit and temperature, never NaN, even for T = +inf or a
  // denormal T), the exp in float, the sums in double.
  const double inv_t = 1.0 / static_cast<double>(temperature);
  const auto weight = [&](float l) -> double {
    if (l == -std::numeric_limits<float>::infinity()) return 0.0;  // NaN / -inf input logits
    const double e = (static_cast<double>(l) - max_d) * inv_t;     // <= 0
    return e < -200.0 ? 0.0 : std::exp(static_cast<float>(e));
  };
  double total = 0.0;
  for (size_t i = 0; i < pool; ++i) total += weight(cands_[i].logit);
  const double u = uniform01(rng_) * total;
  double cum = 0.0;
  int32_t last_positive = cands_[0].id;
  for (size_t i = 0; i < pool; ++i) {
    const double w = weight(cands_[i].logit);
    if (w <= 0.0) continue;
    last_positive = cands_[i].id;
    cum += w;
    if (u < cum) return cands_[i].id;
  }
  return last_positive;  // only reached through rounding at the very top of the range
}

}  // namespace kestrel::runtime
