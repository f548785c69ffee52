// Tests of the token sampler (runtime/sampler.h).
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <map>
#include <random>
#include <vector>

#include "runtime/sampler.h"

namespace kestrel::runtime {
namespace {

SamplerParams params(float temperature, int top_k, float top_p, float min_p, uint64_t seed) {
  SamplerParams p;
  p.temperature = temperature;
  p.top_k = top_k;
  p.top_p = top_p;
  p.min_p = min_p;
  p.seed = seed;
  return p;
}

// Logits whose softmax (temperature 1) is exactly proportional to `probs`.
std::vector<float> logits_for(const std::vector<double>& probs) {
  std::vector<float> l;
  for (double p : probs) l.push_back(static_cast<float>(std::log(p)));
  return l;
}

std::vector<float> random_logits(std::mt19937_64& rng, int n, float scale) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> l(static_cast<size_t>(n));
  for (float& v : l) v = dist(rng);
  return l;
}

// Draws `draws` tokens and checks the empirical frequencies against `expected` (token ->
// probability, summing to 1): no token outside `expected` may appear, and Pearson's
// chi-square statistic must stay below df + 10 sqrt(2 df) + 15 (a false failure is far less
// likely than 1e-6, while a wrong distribution over this many draws scores in the thousands).
void expect_distribution(Sampler& s, const std::vector<float>& logits,
                         const std::map<int32_t, double>& expected, int draws) {
  std::map<int32_t, int> counts;
  for (int i = 0; i < draws; ++i) {
    const int32_t t = s.sample(logits.data(), static_cast<int>(logits.size()));
    ASSERT_TRUE(expected.count(t)) << "token " << t << " should have been filtered out";
    ++counts[t];
  }
  double chi2 = 0;
  for (const auto& [tok, p] : expected) {
    const double e = p * draws;
    const double o = counts[tok];
    chi2 += (o - e) * (o - e) / e;
  }
  const double df = static_cast<double>(expected.size()) - 1;
  if (df == 0) return;
  EXPECT_LT(chi2, df + 10 * std::sqrt(2 * df) + 15)
      << "chi-square over " << expected.size() << " tokens";
}

// softmax(l / T) over the listed tokens.
std::map<int32_t, double> softmax_over(const std::vector<float>& logits,
                                       const std::vector<int32_t>& tokens, double temperature) {
  std::map<int32_t, double> out;
  double mx = -1e300, z = 0;
  for (int32_t t : tokens) mx = std::max(mx, double{logits[t]});
  for (int32_t t : tokens) z += std::exp((logits[t] - mx) / temperature);
  for (int32_t t : tokens) out[t] = std::exp((logits[t] - mx) / temperature) / z;
  return out;
}

TEST(SamplerGreedy, PicksArgmaxLowestIdOnTies) {
  for (float temp : {0.0f, -1.0f, std::numeric_limits<float>::quiet_NaN()}) {
    Sampler s(params(temp, 40, 0.95f, 0.05f, 1));
    const std::vector<float> a = {0.1f, 3.0f, -2.0f, 2.9f};
    EXPECT_EQ(s.sample(a.data(), 4), 1);
    const std::vector<float> ties = {1.0f, 5.0f, 2.0f, 5.0f, 5.0f};
    EXPECT_EQ(s.sample(ties.data(), 5), 1);
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const std::vector<float> with_nan = {nan, -3.0f, nan, -1.0f};
    EXPECT_EQ(s.sample(with_nan.data(), 4), 3);
  }
  std::mt19937_64 rng(7);
  Sampler s(params(0.0f, 0, 1.0f, 0.0f, 1));
  for (int r = 0; r < 20; ++r) {
    const std::vector<float> l = random_logits(rng, 128256, 3.0f);
    const auto it = std::max_element(l.begin(), l.end());
    EXPECT_EQ(s.sample(l.data(), 128256), it - l.begin());
  }
}

TEST(SamplerGreedy, InvalidInput) {
  Sampler s(params(0.8f, 40, 0.95f, 0.05f, 1));
  const float one = 1.0f;
  EXPECT_EQ(s.sample(nullptr, 10), -1);
  EXPECT_EQ(s.sample(&one, 0), -1);
  EXPECT_EQ(s.sample(&one, 1), 0);
}

TEST(SamplerSeed, SameSeedSameSequence) {
  std::mt19937_64 rng(11);
  const std::vector<float> l = random_logits(rng, 5000, 2.0f);
  for (const SamplerParams& p :
       {params(1.0f, 0, 1.0f, 0.0f, 1234), params(0.8f, 40, 0.95f, 0.05f, 99)}) {
    Sampler a(p), b(p);
    SamplerParams other = p;
    other.seed = p.seed + 1;
    Sampler c(other);
    int differ = 0;
    for (int i = 0; i < 300; ++i) {
      const int32_t ta = a.sample(l.data(), 5000);
      EXPECT_EQ(ta, b.sample(l.data(), 5000));
      differ += ta != c.sample(l.data(), 5000);
    }
    EXPECT_GT(differ, 0) << "a different seed should give a different sequence";
    EXPECT_EQ(a.seed(), p.seed);
  }
}

TEST(SamplerSeed, RandomSeedIsReportedAndReproducible) {
  Sampler a(SamplerParams{});
  Sampler b(SamplerParams{});
  EXPECT_NE(a.seed(), b.seed());  // fails with probability 2^-64
  SamplerParams p;
  p.seed = a.seed();
  Sampler again(p);
  std::mt19937_64 rng(3);
  const std::vector<float> l = random_logits(rng, 1000, 1.0f);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(a.sample(l.data(), 1000), again.sample(l.data(), 1000));
}

TEST(SamplerTopK, TopK1EqualsGreedy) {
  std::mt19937_64 rng(5);
  Sampler greedy(params(0.0f, 0, 1.0f, 0.0f, 1));
  for (float temp : {0.5f, 1.0f, 3.0f}) {
    Sampler s(params(temp, 1, 1.0f, 0.0f, 42));
    for (int r = 0; r < 30; ++r) {
      std::vector<float> l = random_logits(rng, 32000, 1.0f);
      if (r % 3 == 0) l[100] = l[7] = 50.0f;  // tie for the maximum -> lowest id
      EXPECT_EQ(s.sample(l.data(), 32000), greedy.sample(l.data(), 32000));
    }
  }
}

TEST(SamplerDistribution, TopKWithTemperatureMatchesSoftmax) {
  const std::vector<float> l = {0.5f, 2.0f, -1.0f, 1.5f, 1.0f, 0.0f, 1.8f, -3.0f, 0.2f, 1.2f};
  for (float temp : {0.7f, 1.0f, 2.0f}) {
    Sampler s(params(temp, 5, 1.0f, 0.0f, 2024));
    // Top 5 logits: ids 1 (2.0), 6 (1.8), 3 (1.5), 9 (1.2), 4 (1.0).
    expect_distribution(s, l, softmax_over(l, {1, 6, 3, 9, 4}, temp), 200000);
  }
  // No filtering at all: the full softmax.
  Sampler all(params(1.3f, 0, 1.0f, 0.0f, 77));
  expect_distribution(all, l, softmax_over(l, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9}, 1.3), 200000);
}

TEST(SamplerTopP, KeepsSmallestNucleus) {
  const std::vector<float> l = logits_for({0.05, 0.5, 0.15, 0.3});  // order 1, 3, 2, 0
  // Cumulative in order: 0.5, 0.8, 0.95, 1.0.
  struct Case {
    float top_p;
    std::vector<int32_t> kept;
  };
  for (const Case& c : {Case{0.0f, {1}}, Case{0.45f, {1}}, Case{0.75f, {1, 3}},
                        Case{0.85f, {1, 3, 2}}, Case{0.97f, {1, 3, 2, 0}}}) {
    Sampler s(params(1.0f, 0, c.top_p, 0.0f, 5));
    expect_distribution(s, l, softmax_over(l, c.kept, 1.0), 50000);
  }
}

TEST(SamplerTopP, AppliesToTopKSurvivors) {
  // top_k = 3 renormalizes to 0.5/0.95, 0.3/0.95, 0.15/0.95 = 0.526, 0.316, 0.158: top_p 0.83
  // is reached after two tokens. Without top-k it needs three (0.5, 0.8, 0.95).
  const std::vector<float> l = logits_for({0.5, 0.3, 0.15, 0.05});
  Sampler with_k(params(1.0f, 3, 0.83f, 0.0f, 8));
  expect_distribution(with_k, l, softmax_over(l, {0, 1}, 1.0), 50000);
  Sampler without_k(params(1.0f, 0, 0.83f, 0.0f, 8));
  expect_distribution(without_k, l, softmax_over(l, {0, 1, 2}, 1.0), 50000);
}

TEST(SamplerMinP, DropsUnlikelyTokens) {
  // Probability ratios to the maximum: 1, 0.5, 0.1, 0.04, 0.01.
  const std::vector<float> l = logits_for({0.04, 1.0, 0.01, 0.5, 0.1});
  Sampler s(params(1.0f, 0, 1.0f, 0.05f, 13));
  expect_distribution(s, l, softmax_over(l, {1, 3, 4}, 1.0), 100000);
  Sampler s2(params(1.0f, 0, 1.0f, 0.3f, 13));
  expect_distribution(s2, l, softmax_over(l, {1, 3}, 1.0), 100000);
  Sampler off(params(1.0f, 0, 1.0f, 0.0f, 13));
  expect_distribution(off, l, softmax_over(l, {0, 1, 2, 3, 4}, 1.0), 100000);
  Sampler all_gone(params(1.0f, 0, 1.0f, 2.0f, 13));  // min_p > 1 still keeps the maximum
  expect_distribution(all_gone, l, {{1, 1.0}}, 1000);
}

TEST(SamplerOrder, TopPRunsBeforeMinP) {
  // Tokens 0..2 carry 0.45, 0.35, 0.1; 1000 tail tokens 0.0001 each (total 0.1).
  std::vector<double> probs = {0.45, 0.35, 0.1};
  for (int i = 0; i < 1000; ++i) probs.push_back(0.0001);
  const std::vector<float> l = logits_for(probs);
  // top-p 0.85 over the full softmax keeps {0, 1, 2} (0.45, 0.8, 0.9); min-p 0.01 then drops
  // the tail (already gone). Had min-p run first, top-p would see 0.5, 0.889 and keep {0, 1}.
  Sampler s(params(1.0f, 0, 0.85f, 0.01f, 21));
  expect_distribution(s, l, softmax_over(l, {0, 1, 2}, 1.0), 30000);
  // Temperature runs last: it reshapes the draw among the kept tokens, not the filtering.
  Sampler hot(params(3.0f, 0, 0.85f, 0.01f, 21));
  expect_distribution(hot, l, softmax_over(l, {0, 1, 2}, 3.0), 30000);
}

// Independent, deliberately naive statement of the filtering rules: full sort, then top-k,
// top-p over the softmax of the top-k survivors, min-p relative to the most likely token.
std::vector<int32_t> reference_kept(const std::vector<float>& l, const SamplerParams& p) {
  std::vector<int32_t> ids(l.size());
  for (size_t i = 0; i < l.size(); ++i) ids[i] = static_cast<int32_t>(i);
  std::sort(ids.begin(), ids.end(),
            [&](int32_t a, int32_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); });
  if (p.top_k > 0 && static_cast<size_t>(p.top_k) < ids.size()) ids.resize(p.top_k);
  std::vector<double> prob;
  double z = 0;
  for (int32_t t : ids) z += std::exp(double{l[t]} - l[ids[0]]);
  for (int32_t t : ids) prob.push_back(std::exp(double{l[t]} - l[ids[0]]) / z);
  if (p.top_p < 1.0f) {
    double cum = 0;
    size_t keep = 0;
    while (keep < ids.size()) {
      cum += prob[keep++];
      if (cum >= p.top_p) break;
    }
    ids.resize(keep);
  }
  std::vector<int32_t> out;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (p.min_p <= 0.0f || prob[i] >= p.min_p * prob[0]) out.push_back(ids[i]);
  }
  return out;
}

TEST(SamplerDistribution, LargeVocabularyMatchesReferenceFilters) {
  // 128256 tokens: up to 30 distinct "good" logits and a flat tail far below them, so the
  // filters cut among the good tokens; the expected set comes from reference_kept().
  const int n = 128256;
  std::mt19937_64 rng(17);
  std::vector<float> l(n, -12.0f);
  for (int i = 0; i < 30; ++i) l[rng() % n] = 4.0f - 0.2f * static_cast<float>(i);
  std::vector<SamplerParams> cases = {
      SamplerParams{}, params(1.0f, 0, 0.5f, 0.0f, 0), params(1.5f, 0, 1.0f, 0.2f, 0),
      params(0.6f, 8, 0.9f, 0.0f, 0), params(1.0f, 25, 0.8f, 0.1f, 0)};
  uint64_t seed = 31;
  for (SamplerParams& p : cases) {
    p.seed = seed++;
    const std::vector<int32_t> kept = reference_kept(l, p);
    ASSERT_GE(kept.size(), 2u);
    ASSERT_LE(kept.size(), 30u);
    Sampler s(p);
    expect_distribution(s, l, softmax_over(l, kept, p.temperature), 2500);
  }
}

TEST(SamplerDistribution, RandomRowsMatchReferenceSupport) {
  // Random logits and parameters: every drawn token lies in the reference set, and with enough
  // draws every token of a small reference set shows up.
  std::mt19937_64 rng(41);
  for (int r = 0; r < 40; ++r) {
    const int n = 50 + static_cast<int>(rng() % 2000);
    const std::vector<float> l = random_logits(rng, n, 0.5f + static_cast<float>(rng() % 4));
    SamplerParams p = params(
        0.5f + static_cast<float>(rng() % 3) * 0.5f, static_cast<int>(rng() % 60),
        0.5f + 0.1f * static_cast<float>(rng() % 6), 0.02f * static_cast<float>(rng() % 5), rng());
    const std::vector<int32_t> kept = reference_kept(l, p);
    std::map<int32_t, int> seen;
    Sampler s(p);
    for (int i = 0; i < 3000; ++i) ++seen[s.sample(l.data(), n)];
    for (const auto& [tok, count] : seen) {
      ASSERT_TRUE(std::find(kept.begin(), kept.end(), tok) != kept.end())
          << "row " << r << ": token " << tok << " drawn but filtered by the reference";
    }
    if (kept.size() <= 5) {
      const std::map<int32_t, double> want = softmax_over(l, kept, p.temperature);
      for (const auto& [tok, prob] : want) {
        if (prob > 0.01) {
          EXPECT_GT(seen[tok], 0) << "row " << r << ": token " << tok;
        }
      }
    }
  }
}

TEST(SamplerRobustness, ExtremeLogitsGiveValidTokens) {
  const float big = 1e30f;
  const float fmax = std::numeric_limits<float>::max();
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<std::vector<float>> rows = {
      {big, -big, 0.0f, 1.0f},   {-big, -big, -big, -big + 1e24f},
      {fmax, -fmax, fmax, 0.0f}, {-fmax, -fmax, -fmax},
      {1e-30f, -1e-30f, 0.0f},   {inf, 1.0f, -inf, nan},
      {nan, nan, nan},           {-inf, -inf, 3.0f},
      {big, big, big, big},
  };
  for (const SamplerParams& p : {params(0.8f, 40, 0.95f, 0.05f, 1), params(1.0f, 0, 1.0f, 0.0f, 2),
                                 params(1e-6f, 0, 0.5f, 0.0f, 3), params(1e6f, 2, 1.0f, 0.0f, 4),
                                 params(0.0f, 0, 1.0f, 0.0f, 5), params(1e-45f, 0, 1.0f, 0.0f, 6),
                                 params(std::numeric_limits<float>::infinity(), 0, 1.0f, 0.0f, 7),
                                 params(std::numeric_limits<float>::max(), 3, 0.9f, 0.1f, 8)}) {
    Sampler s(p);
    for (const std::vector<float>& row : rows) {
      const int n = static_cast<int>(row.size());
      for (int i = 0; i < 50; ++i) {
        const int32_t t = s.sample(row.data(), n);
        ASSERT_GE(t, 0);
        ASSERT_LT(t, n);
        bool any_usable = false;  // some logit is neither NaN nor -inf
        for (float v : row) any_usable = any_usable || (!std::isnan(v) && v != -inf);
        if (any_usable) {
          ASSERT_FALSE(std::isnan(row[t]) || row[t] == -inf) << "picked a NaN / -inf logit";
        }
      }
    }
  }
  // A vanishing temperature is greedy; an infinite one is uniform over the kept tokens.
  std::mt19937_64 rng(19);
  Sampler cold(params(1e-45f, 0, 1.0f, 0.0f, 10));
  Sampler greedy(params(0.0f, 0, 1.0f, 0.0f, 10));
  for (int r = 0; r < 20; ++r) {
    const std::vector<float> l = random_logits(rng, 1000, 1.0f);
    EXPECT_EQ(cold.sample(l.data(), 1000), greedy.sample(l.data(), 1000));
  }
  Sampler hot(params(inf, 3, 1.0f, 0.0f, 11));
  const std::vector<float> spread = {-100.0f, 1.0f, -inf, 50.0f, 7.0f, nan};
  expect_distribution(hot, spread, {{1, 1.0 / 3}, {3, 1.0 / 3}, {4, 1.0 / 3}}, 30000);
  // The unique huge logit always wins; with huge ties only the tied tokens are drawn.
  Sampler s(params(1.0f, 0, 1.0f, 0.0f, 9));
  const std::vector<float> one = {-big, 0.0f, big, 1e29f};
  for (int i = 0; i < 100; ++i) EXPECT_EQ(s.sample(one.data(), 4), 2);
  const std::vector<float> tied = {-fmax, fmax, 0.0f, fmax};
  for (int i = 0; i < 100; ++i) {
    const int32_t t = s.sample(tied.data(), 4);
    EXPECT_TRUE(t == 1 || t == 3) << t;
  }
}

TEST(SamplerLargeVocabulary, ManySamplesStayValidAndPrintTime) {
  const int n = 128256;
  std::mt19937_64 rng(23);
  const std::vector<float> l = random_logits(rng, n, 4.0f);
  for (const SamplerParams& p :
       {params(0.8f, 40, 0.95f, 0.05f, 1), params(0.8f, 0, 0.95f, 0.05f, 1),
        params(0.8f, 0, 0.9f, 0.0f, 1)}) {
    Sampler s(p);
    const int iters = 100;
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < iters; ++i) ASSERT_GE(s.sample(l.data(), n), 0);
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    std::printf("[          ] top_k %d top_p %.2f min_p %.2f: %.3f ms per sample (n=%d)\n", p.top_k,
                p.top_p, p.min_p, ms / iters, n);
  }
}

}  // namespace
}  // namespace kestrel::runtime
