// Subcommands of the `kestrel` tool.
#pragma once

#include <CLI/CLI.hpp>
#include <string>

#include "core/status.h"

namespace kestrel::cli {

// Prints "kestrel: error: MESSAGE" on stderr and returns the exit status 1.
int fail(const std::string& message);
// The prompt from -p TEXT or -f FILE (at most one of them).
Expected<std::string> read_prompt(const std::string& text, const std::string& file);

struct RunOptions {
  std::string model;
  std::string tokens;  // "1,2,3"
  int n_predict = 32;
  int n_ctx = 0;  // 0: the model's training context, capped at 4096, grown to fit the job
  int n_batch = 512;
  int n_ubatch = 512;
  int n_threads = 0;
  std::string type_k = "f16";
  std::string type_v = "f16";
  std::string chunking = "balanced";
  float temp = 0.8f;
  int top_k = 40;
  float top_p = 0.95f;
  float min_p = 0.05f;
  uint64_t seed = 0xFFFFFFFFu;
  bool ignore_eos = false;
  std::string dump_logits;
  bool report = false;
  std::string report_json;
  std::string target_ms;
};
void add_run_command(CLI::App& app, RunOptions& o);
int run_command(const RunOptions& o);

struct InfoOptions {
  std::string model;
  bool all_tensors = false;
};
void add_info_command(CLI::App& app, InfoOptions& o);
int info_command(const InfoOptions& o);

struct TokenizeOptions {
  std::string model;
  std::string prompt;
  std::string file;
  bool ids_only = false;
  bool no_special = false;
  bool no_parse_special = false;
};
void add_tokenize_command(CLI::App& app, TokenizeOptions& o);
int tokenize_command(const TokenizeOptions& o);

}  // namespace kestrel::cli
