// Subcommands of the `kestrel` tool.
#pragma once

#include <CLI/CLI.hpp>
#include <string>
#include <vector>

#include "core/status.h"
#include "generate.h"

namespace kestrel::cli {

// Prints "kestrel: error: MESSAGE" on stderr and returns the exit status 1.
int fail(const std::string& message);
// The prompt from -p TEXT or -f FILE (at most one of them).
Expected<std::string> read_prompt(const std::string& text, const std::string& file);

struct RunOptions {
  SessionOptions session;
  std::string prompt;  // -p
  std::string file;    // -f
  std::string tokens;  // "1,2,3"
  std::string dump_logits;
  std::string dump_last_logits;
};
void add_run_command(CLI::App& app, RunOptions& o);
int run_command(RunOptions& o);

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

struct ChatOptions {
  SessionOptions session;
  std::string prompt;  // one turn; empty (and no file): interactive
  std::string file;
  std::string system;
  std::string template_file;
  bool verbose_prompt = false;
};
void add_chat_command(CLI::App& app, ChatOptions& o);
int chat_command(ChatOptions& o);

struct ReportOptions {
  std::string history;  // the JSON-lines file written by --history
  std::string format = "md";
  std::string target_ms;
  bool target_all = false;
  std::string plot;  // OUT.svg or OUT.png
};
void add_report_command(CLI::App& app, ReportOptions& o);
int report_command(const ReportOptions& o);

struct BenchOptions {  // bench.cpp; every list is a comma list, every combination is measured
  std::vector<std::string> models;              // -m
  std::vector<int> n_prompt{512};               // -p
  std::vector<int> n_gen{128};                  // -n
  std::vector<std::string> prompt_gen;          // -pg N,M (repeatable)
  std::vector<int> n_depth{0};                  // -d: tokens in the context before each test
  std::vector<int> n_batch{2048}, n_ubatch{0};  // -b, -ub (0: the backend's choice)
  // -t, -ngl (-1: all layers and the head when on a GPU, as llama-bench's 99)
  std::vector<int> n_threads{0}, n_gpu_layers{-1};
  // "auto": the first GPU backend with a usable device, else the CPU
  std::vector<std::string> type_k{"f16"}, type_v{"f16"}, backends{"auto"}, chunking{"balanced"};
  int cl_platform = -1, cl_device = 0;  // --cl-platform, --cl-device (the OpenCL device)
  int repetitions = 5;                  // -r, after one warm-up run
  std::string output = "md";            // -o md|json|jsonl|csv
  std::string config, history, vs_llama_bench;
  bool profile = false;
  bool no_warmup = false;
  uint64_t seed = 1234;
  CLI::App* command = nullptr;
};
void add_bench_command(CLI::App& app, BenchOptions& o);
int bench_command(BenchOptions& o);

struct TuneOptions {
  std::string model;
  int n_prompt = 512;
  bool decode = false;
  int n_gen_decode = 32;
  int n_gen = 0;  // resolved: n_gen_decode with --decode, else 0
  int repetitions = 2;
  int max_trials = 60;
  std::string output = "kestrel-settings.json";
};
void add_tune_command(CLI::App& app, TuneOptions& o);
int tune_command(TuneOptions& o);

}  // namespace kestrel::cli
