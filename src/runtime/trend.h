// The trend across a run history (runtime/history.h): one row per record, in file order, with
// the change against the first comparable record, and how far records are from a target.
// This is the seed's hand-made "Trend" and "Against the target" tables, computed.
//
// Records understood:
//   "kind": "run"    the report JSON of `kestrel run/chat --history` (runtime/report.h)
//   "kind": "bench"  one `kestrel bench --history` result, llama-bench's fields (model_filename,
//                    n_prompt, n_gen, n_batch, n_ubatch, type_k, type_v, n_threads,
//                    n_gpu_layers, avg_ts, stddev_ts, kestrel_version, device)
// A record without "kind" is read as a run when it has "prompt_tokens", as a bench result when
// it has "avg_ts" (so llama-bench's own JSON lines read too). Other kinds, and records that
// lack their timing, are skipped with a note.
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "core/status.h"
#include "runtime/report.h"

namespace kestrel::runtime {

struct TrendRow {
  int record = 0;       // 1-based position among the history's records
  std::string kind;     // "run" or "bench"
  std::string version;  // the git version ("e4da511" from "0.1.0 (e4da511)")
  std::string date;     // "YYYY-MM-DD HH:MM" (UTC), "-" when the record has none
  std::string model;    // the model file's name
  std::string device;   // "" when unknown
  std::string test;     // "pp327", "tg128", "pp512+tg128" (llama-bench's names)
  int n_batch = 0, n_ubatch = 0, n_threads = 0, n_gpu_layers = 0;
  std::string type_k, type_v, chunking;  // chunking "" when the record does not say
  int prompt_tokens = 0;
  int gen_tokens = 0;
  double ms_per_token = 0;  // prompt evaluation (bench: 1000 / avg_ts of its test)
  double tokens_per_s = 0;
  double stddev_ts = 0;  // bench only
  // The first earlier record with the same model, device, test and settings; 0 when none.
  int baseline = 0;
  bool is_baseline = false;  // a later record compares against this one
  double change_pct = 0;     // ms/token saved against the baseline, in % (+ is faster)
  double speedup = 0;        // baseline ms/token / this ms/token
  std::vector<double> chunk_ms_per_token;  // runs: per chunk

  std::string settings_summary() const;  // "b=128 ub=16 ctk=q4_0 ctv=q4_0 t=8 ngl=0"
  std::string comparable_key() const;
  bool is_prompt_test() const;  // a run, or a bench test without generation
};

struct Trend {
  std::vector<TrendRow> rows;
  std::vector<std::string> notes;  // records skipped, and why
};

// Errors: no record is a usable run or bench result.
Expected<Trend> build_trend(const std::vector<nlohmann::json>& records);

struct TargetRow {
  int record = 0;
  double low_ms = 0, high_ms = 0;  // the target, ms/token
  double now_ms = 0, now_tps = 0;
  bool met = false;                                  // now <= high: within the acceptable end
  bool met_best = false;                             // now <= low
  double reached_low_pct = 0, reached_high_pct = 0;  // target speed / now, in % (capped at 100)
  // How much is missing to reach the acceptable (high) and the best (low) end: ms/token to
  // shed, tokens/s to gain, and the speed-up factor; 0 where that end is already met.
  double short_ms_high = 0, short_ms_low = 0;
  double short_tps_high = 0, short_tps_low = 0;
  double factor_high = 0, factor_low = 0;
};
TargetRow target_row(const TrendRow& row, const TargetRange& target);

// Renders the trend table (and, with a target, the target table for `target_rows`) as markdown,
// or the same data as JSON.
std::string render_trend_markdown(const Trend& t, const std::vector<TargetRow>& target_rows);
nlohmann::json trend_to_json(const Trend& t, const std::vector<TargetRow>& target_rows,
                             const std::optional<TargetRange>& target);

}  // namespace kestrel::runtime
