// Tests of the run history (runtime/history.h) and the trend built from it (runtime/trend.h):
// round trips through the JSON-lines file, the trend rows and their change against the first
// comparable record, and the target table's numbers. Hand-made records, no timing.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "runtime/history.h"
#include "runtime/trend.h"

namespace kestrel::runtime {
namespace {

using nlohmann::json;

class TempFile {
 public:
  TempFile() {
    path_ = ::testing::TempDir() + "kestrel_history_" + std::to_string(::getpid()) + "_" +
            std::to_string(counter_++) + ".jsonl";
    std::remove(path_.c_str());
  }
  ~TempFile() { std::remove(path_.c_str()); }
  const std::string& path() const { return path_; }
  void write(const std::string& text) const { std::ofstream(path_, std::ios::binary) << text; }

 private:
  static inline int counter_ = 0;
  std::string path_;
};

// A run record as `kestrel run --history` writes it (report.h's to_json plus kind).
json run_record(const std::string& version, int prompt, double ms_per_token, int n_batch,
                std::vector<double> chunk_ms = {}) {
  json chunks = json::array();
  for (size_t i = 0; i < chunk_ms.size(); ++i)
    chunks.push_back(
        {{"index", i}, {"n_tokens", 10}, {"ms", chunk_ms[i] * 10}, {"ms_per_token", chunk_ms[i]}});
  return {{"kind", "run"},
          {"recorded_at", 1731802324},  // 2024-11-17 00:12:04 UTC
          {"version", "0.1.0 (" + version + ")"},
          {"model", {{"path", "/models/tiny.gguf"}, {"name", "tiny"}, {"arch", "llama"}}},
          {"device", "cpu0"},
          {"prompt_tokens", prompt},
          {"total_ms", ms_per_token * prompt},
          {"ms_per_token", ms_per_token},
          {"tokens_per_s", 1000.0 / ms_per_token},
          {"settings",
           {{"n_batch", n_batch},
            {"n_ubatch", 16},
            {"chunking", "balanced"},
            {"n_threads", 8},
            {"n_gpu_layers", 0},
            {"type_k", "q4_0"},
            {"type_v", "q4_0"}}},
          {"chunks", chunks}};
}

json bench_record(int n_prompt, int n_gen, double avg_ts) {
  return {{"kind", "bench"},
          {"model_filename", "/m/tiny.gguf"},
          {"n_prompt", n_prompt},
          {"n_gen", n_gen},
          {"n_batch", 512},
          {"n_ubatch", 512},
          {"type_k", "f16"},
          {"type_v", "f16"},
          {"n_threads", 2},
          {"n_gpu_layers", 0},
          {"avg_ts", avg_ts},
          {"stddev_ts", 1.5},
          {"device", "cpu0"},
          {"kestrel_version", "0.1.0 (abc1234)"},
          {"test_time", "2025-01-02T03:04:05Z"}};
}

TEST(History, RoundTrip) {
  TempFile f;
  const json a = run_record("aaa", 327, 93.02, 128, {87.75, 90.23, 107.56});
  const json b = bench_record(512, 0, 200.0);
  ASSERT_TRUE(append_history(f.path(), a));
  ASSERT_TRUE(append_history(f.path(), b));
  auto got = read_history(f.path());
  ASSERT_TRUE(got) << got.message();
  ASSERT_EQ(got->size(), 2u);
  EXPECT_EQ((*got)[0], a);
  EXPECT_EQ((*got)[1], b);
}

TEST(History, AppendsAfterALineWithoutNewline) {
  TempFile f;
  f.write(R"({"kind": "run"})");  // no trailing newline
  ASSERT_TRUE(append_history(f.path(), json{{"kind", "bench"}}));
  auto got = read_history(f.path());
  ASSERT_TRUE(got) << got.message();
  ASSERT_EQ(got->size(), 2u);
  EXPECT_EQ((*got)[1]["kind"], "bench");
}

TEST(History, Errors) {
  TempFile missing;
  auto r = read_history(missing.path());
  ASSERT_FALSE(r);
  EXPECT_NE(r.message().find("cannot read"), std::string::npos) << r.message();

  TempFile empty;
  empty.write("\n  \n");
  r = read_history(empty.path());
  ASSERT_FALSE(r);
  EXPECT_NE(r.message().find("empty"), std::string::npos) << r.message();

  TempFile bad;
  bad.write("{\"kind\": \"run\"}\n{not json\n");
  r = read_history(bad.path());
  ASSERT_FALSE(r);
  EXPECT_NE(r.message().find("line 2"), std::string::npos) << r.message();

  TempFile array;
  array.write("[1, 2]\n");
  r = read_history(array.path());
  ASSERT_FALSE(r);
  EXPECT_NE(r.message().find("line 1"), std::string::npos) << r.message();

  EXPECT_FALSE(append_history("/nonexistent-dir/h.jsonl", json{{"kind", "run"}}));
}

TEST(Trend, RowsAndChangeAgainstFirstComparable) {
  const std::vector<json> records = {
      run_record("v1", 327, 168.82, 128),  // 1: baseline of 1, 2, 4
      run_record("v2", 327, 168.82, 128),  // 2: 0%
      run_record("v3", 327, 100.0, 64),    // 3: other settings, alone
      run_record("v4", 327, 93.02, 128),   // 4: +44.9%
      run_record("v5", 100, 50.0, 128),    // 5: other prompt length, alone
  };
  auto t = build_trend(records);
  ASSERT_TRUE(t) << t.message();
  ASSERT_EQ(t->rows.size(), 5u);
  EXPECT_TRUE(t->notes.empty());
  const auto& r = t->rows;
  EXPECT_EQ(r[0].version, "v1");
  EXPECT_EQ(r[0].date, "2024-11-17 00:12");
  EXPECT_EQ(r[0].model, "tiny.gguf");
  EXPECT_EQ(r[0].settings_summary(), "b=128 ub=16 ctk=q4_0 ctv=q4_0 t=8 ngl=0");
  EXPECT_EQ(r[0].prompt_tokens, 327);
  EXPECT_TRUE(r[0].is_baseline);
  EXPECT_EQ(r[0].baseline, 0);
  EXPECT_EQ(r[1].baseline, 1);
  EXPECT_NEAR(r[1].change_pct, 0.0, 1e-9);
  EXPECT_EQ(r[2].baseline, 0);
  EXPECT_FALSE(r[2].is_baseline);
  EXPECT_EQ(r[3].baseline, 1);
  EXPECT_NEAR(r[3].change_pct, 100.0 * (168.82 - 93.02) / 168.82, 1e-9);  // the seed's +45%
  EXPECT_NEAR(r[3].speedup, 168.82 / 93.02, 1e-9);
  EXPECT_NEAR(r[3].tokens_per_s, 1000.0 / 93.02, 1e-9);
  EXPECT_EQ(r[4].baseline, 0);

  const std::string md = render_trend_markdown(*t, {});
  EXPECT_NE(md.find("| version | date |"), std::string::npos) << md;
  EXPECT_NE(md.find("| 1 | v1 | 2024-11-17 00:12 | run | tiny.gguf | b=128 ub=16 ctk=q4_0 "
                    "ctv=q4_0 t=8 ngl=0 | 327 | 168.82 | 5.92 | baseline |"),
            std::string::npos)
      << md;
  EXPECT_NE(md.find("| 93.02 | 10.75 | +44.9% (1.81x, vs #1) |"), std::string::npos) << md;
  EXPECT_NE(md.find("| 100.00 | 10.00 | - |"), std::string::npos) << md;

  const json j = trend_to_json(*t, {}, std::nullopt);
  ASSERT_EQ(j["records"].size(), 5u);
  EXPECT_EQ(j["records"][3]["baseline"], 1);
  EXPECT_TRUE(j["records"][2]["change_pct"].is_null());
  EXPECT_FALSE(j.contains("target"));
}

TEST(Trend, BenchRecordsAndSkippedKinds) {
  const std::vector<json> records = {
      bench_record(512, 0, 200.0), json{{"kind", "tune"}, {"x", 1}},
      bench_record(0, 128, 50.0),  bench_record(512, 0, 250.0),
      json{{"kind", "run"}},  // no timing
  };
  auto t = build_trend(records);
  ASSERT_TRUE(t) << t.message();
  ASSERT_EQ(t->rows.size(), 3u);
  ASSERT_EQ(t->notes.size(), 2u);
  EXPECT_NE(t->notes[0].find("record 2"), std::string::npos);
  EXPECT_NE(t->notes[0].find("tune"), std::string::npos);
  EXPECT_NE(t->notes[1].find("record 5"), std::string::npos);
  const auto& r = t->rows;
  EXPECT_EQ(r[0].record, 1);
  EXPECT_EQ(r[0].test, "pp512");
  EXPECT_EQ(r[0].version, "abc1234");
  EXPECT_EQ(r[0].date, "2025-01-02 03:04");
  EXPECT_NEAR(r[0].ms_per_token, 5.0, 1e-12);
  EXPECT_TRUE(r[0].is_prompt_test());
  EXPECT_EQ(r[1].test, "tg128");
  EXPECT_FALSE(r[1].is_prompt_test());
  EXPECT_EQ(r[1].baseline, 0);  // a generation test does not compare with a prompt test
  EXPECT_EQ(r[2].baseline, 1);
  EXPECT_NEAR(r[2].change_pct, 20.0, 1e-9);  // 5 -> 4 ms/token
  EXPECT_NEAR(r[2].speedup, 1.25, 1e-9);
  const std::string md = render_trend_markdown(*t, {});
  EXPECT_NE(md.find("250.00 ± 1.50"), std::string::npos) << md;
  EXPECT_NE(md.find("bench tg128"), std::string::npos) << md;
  EXPECT_NE(md.find("record 2 skipped"), std::string::npos) << md;
}

TEST(Trend, LlamaBenchLinesWithoutKind) {
  json b = bench_record(512, 0, 100.0);
  b.erase("kind");
  auto t = build_trend({b});
  ASSERT_TRUE(t) << t.message();
  EXPECT_EQ(t->rows[0].kind, "bench");
}

TEST(Trend, NothingToShow) {
  auto t = build_trend({json{{"kind", "other"}}});
  ASSERT_FALSE(t);
  EXPECT_NE(t.message().find("no run or bench record"), std::string::npos) << t.message();
}

TEST(Target, SeedNumbers) {
  TrendRow row;
  row.record = 3;
  row.ms_per_token = 93.02;
  row.tokens_per_s = 1000.0 / 93.02;
  const TargetRow g = target_row(row, TargetRange{20, 50});
  EXPECT_FALSE(g.met);
  EXPECT_FALSE(g.met_best);
  EXPECT_NEAR(g.reached_low_pct, 100.0 * 20 / 93.02, 1e-9);   // 21.5%
  EXPECT_NEAR(g.reached_high_pct, 100.0 * 50 / 93.02, 1e-9);  // 53.8%
  EXPECT_NEAR(g.short_ms_high, 43.02, 1e-9);
  EXPECT_NEAR(g.short_ms_low, 73.02, 1e-9);
  EXPECT_NEAR(g.factor_high, 93.02 / 50, 1e-9);  // 1.86x
  EXPECT_NEAR(g.factor_low, 93.02 / 20, 1e-9);   // 4.65x
  EXPECT_NEAR(g.short_tps_high, 20 - 1000.0 / 93.02, 1e-9);
  EXPECT_NEAR(g.short_tps_low, 50 - 1000.0 / 93.02, 1e-9);

  Trend t;
  t.rows.push_back(row);
  const std::string md = render_trend_markdown(t, {g});
  EXPECT_NE(md.find("| 3 | prompt evaluation | 20-50 ms/token | 93.02 ms/token | 21.5-53.8% | "
                    "43.02-73.02 ms/token (1.86-4.65x too slow) |"),
            std::string::npos)
      << md;
  EXPECT_NE(md.find("| 3 | throughput | 20-50 tokens/s | 10.75 tokens/s | 21.5-53.8% | "
                    "9.25-39.25 tokens/s |"),
            std::string::npos)
      << md;
  const json j = trend_to_json(t, {g}, TargetRange{20, 50});
  EXPECT_EQ(j["target"]["low_ms_per_token"], 20.0);
  EXPECT_NEAR(j["target"]["rows"][0]["factor"]["low"].get<double>(), 93.02 / 20, 1e-9);
}

TEST(Target, WithinRangeAndMet) {
  TrendRow row;
  row.record = 1;
  row.ms_per_token = 40;
  row.tokens_per_s = 25;
  TargetRow g = target_row(row, TargetRange{20, 50});
  EXPECT_TRUE(g.met);
  EXPECT_FALSE(g.met_best);
  EXPECT_EQ(g.short_ms_high, 0);
  EXPECT_NEAR(g.short_ms_low, 20, 1e-12);
  EXPECT_NEAR(g.factor_low, 2, 1e-12);
  EXPECT_NEAR(g.short_tps_low, 25, 1e-12);
  EXPECT_EQ(g.reached_high_pct, 100);
  Trend t;
  t.rows.push_back(row);
  const std::string md = render_trend_markdown(t, {g});
  EXPECT_NE(md.find("| 40.00 ms/token | within range (50.0% of 20 ms/token) | 20.00 ms/token to "
                    "the better end (2.00x) |"),
            std::string::npos)
      << md;
  EXPECT_NE(md.find("| 25.00 tokens/s | within range (50.0% of 50 tokens/s) | 25.00 tokens/s to "
                    "the better end |"),
            std::string::npos)
      << md;

  row.ms_per_token = 10;
  row.tokens_per_s = 100;
  g = target_row(row, TargetRange{20, 50});
  EXPECT_TRUE(g.met);
  EXPECT_TRUE(g.met_best);
  EXPECT_EQ(g.short_ms_low, 0);
  EXPECT_EQ(g.reached_low_pct, 100);
}

}  // namespace
}  // namespace kestrel::runtime
