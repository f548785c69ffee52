// `kestrel bench` results and how they are written: llama-bench's markdown table, JSON array,
// JSON lines and CSV, with llama-bench's field names where they mean the same; and the
// comparison with a llama-bench JSON file (--vs-llama-bench).
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "core/status.h"

namespace kestrel::cli {

// One measured test of one combination of settings.
struct BenchResult {
  std::string kestrel_version;  // KESTREL_VERSION (KESTREL_GIT_VERSION)
  std::string build_commit;     // KESTREL_GIT_VERSION
  std::string cpu_info;
  std::string gpu_info;
  std::string backend;  // "cpu", ...
  std::string device;   // the backend's device name
  std::string model_filename;
  std::string model_type;   // "llama 1.50B Q4_0"
  uint64_t model_size = 0;  // bytes of every tensor
  uint64_t model_n_params = 0;
  int n_batch = 0;
  int n_ubatch = 0;
  int n_threads = 0;
  std::string type_k;
  std::string type_v;
  int n_gpu_layers = 0;
  std::string chunking;
  int n_prompt = 0;
  int n_gen = 0;
  int n_depth = 0;        // tokens already in the context (-d), not counted in t/s
  std::string test_time;  // RFC 3339, UTC
  std::vector<uint64_t> samples_ns;
  bool compared = false;                 // --vs-llama-bench was given
  std::optional<double> llama_bench_ts;  // llama-bench's avg_ts of the same test, if found
  nlohmann::json profile;                // per-op times (--profile); null when not profiled
  // The primary backend's device memory after the test (Backend::MemoryUse; the scratch peak is
  // the process's so far); null where it is not counted.
  nlohmann::json device_memory;
  std::string profile_markdown;  // the same, the top entries as a markdown table

  std::string test_name() const;  // pp512, tg128, pp512+tg128; "tg128 @ d4096" at a depth
  std::vector<double> samples_ts() const;
  double avg_ns() const;
  double stddev_ns() const;
  double avg_ts() const;
  double stddev_ts() const;
  std::optional<double> vs_llama_cpp() const;  // avg_ts / llama_bench_ts
};

// The record of one result (JSON, JSONL, --history): llama-bench's fields, then Kestrel's.
nlohmann::ordered_json bench_result_json(const BenchResult& r);

// Writes results as they come: header() once, row() per result, footer() at the end.
class BenchPrinter {
 public:
  virtual ~BenchPrinter() = default;
  virtual std::string header() { return ""; }
  virtual std::string row(const BenchResult& r) = 0;
  virtual std::string footer(const std::vector<BenchResult>& all) {
    (void)all;
    return "";
  }
};
bool is_bench_format(const std::string& format);  // md, json, jsonl, csv
// `compare`: add the "vs llama.cpp" column (md) or fields (json, jsonl, csv).
std::unique_ptr<BenchPrinter> make_bench_printer(const std::string& format, bool compare);

// One test from llama-bench's `-o json` (or `-o jsonl`) output. Fields it does not have
// match anything.
struct LlamaBenchEntry {
  std::string model_filename;
  int n_prompt = 0;
  int n_gen = 0;
  int n_depth = 0;
  std::optional<int> n_batch, n_ubatch, n_threads;
  std::optional<std::string> type_k, type_v;
  double avg_ts = 0;
};
Expected<std::vector<LlamaBenchEntry>> load_llama_bench(const std::string& path);
// avg_ts of the llama-bench test with the same n_prompt, n_gen, n_batch, n_ubatch, n_threads,
// type_k and type_v, of the same model (by file name; any model when the file holds one).
std::optional<double> match_llama_bench(const std::vector<LlamaBenchEntry>& entries,
                                        const BenchResult& r);

}  // namespace kestrel::cli
