// The prompt-evaluation report: totals, a per-chunk table, the settings used and, when a
// target is given, how far the result is from it. Rendered as markdown (the form of the
// seed's hand-made analysis) and as JSON.
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "runtime/profiler.h"
#include "runtime/session.h"

namespace kestrel::runtime {

struct TargetRange {
  double low_ms = 0;   // ms/token, the better end
  double high_ms = 0;  // ms/token, the acceptable end
};
// Parses "20-50" (ms/token); false when malformed.
bool parse_target(const std::string& s, TargetRange* out);

struct PromptReport {
  std::string model_path;
  std::string model_name;
  std::string arch;
  std::string backend;
  std::string device;
  std::string version;
  int n_threads = 0;
  int n_gpu_layers = 0;
  SessionParams settings;
  double load_ms = 0;  // model load and weight preparation, before any chunk is timed
  // Of load_ms: the GPU backend's one-time setup (kernel build or program-cache load), and what
  // it did (a cold start compiles, a warm one loads cached binaries). 0 / "": none.
  double backend_setup_ms = 0;
  std::string backend_setup_note;
  // The primary backend's device memory after the run (known = false: not counted).
  backend::Backend::MemoryUse memory;
  // Untimed warm-up passes between load and the first chunk (GPU layers; 0 / "": none).
  double warmup_ms = 0;
  std::string warmup_note;
  int prompt_tokens = 0;
  std::vector<ChunkStats> chunks;
  int gen_tokens = 0;
  double gen_ms = 0;
  std::optional<TargetRange> target;
  std::optional<OpProfiler> profile;  // --profile: the ops of the prompt chunks

  double total_ms() const;
  double ms_per_token() const;
  double tokens_per_s() const;
};

std::string chunk_note(const PromptReport& r, size_t i);
std::string render_markdown(const PromptReport& r);
nlohmann::json to_json(const PromptReport& r);
// A backend's device memory by purpose as JSON (bytes); null when it is not counted.
nlohmann::json memory_use_json(const backend::Backend::MemoryUse& m);

}  // namespace kestrel::runtime
