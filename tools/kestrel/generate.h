// What `run` and `chat` share: the options of a session (model, context, batching, KV cache,
// sampling, report), building the session from them, the generation loop, and the
// prompt-evaluation report.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "core/status.h"
#include "model/model.h"
#include "runtime/report.h"
#include "runtime/sampler.h"
#include "runtime/session.h"
#include "tokenizer/tokenizer.h"

namespace kestrel::cli {

struct SessionOptions {
  std::string model;
  int n_predict = 32;
  int n_ctx = 0;  // 0: fit the job, at least min(training context, 4096)
  int n_batch = 512;
  int n_ubatch = 0;  // 0: the backend's choice (Backend::preferred_ubatch)
  int n_threads = 0;
  int n_gpu_layers = -1;         // -ngl (-1: all layers and the head when on a GPU)
  std::string backend = "auto";  // --backend (auto: a usable GPU, else the CPU)
  int cl_platform = -1;          // --cl-platform (-1: GPUs of every platform first)
  int cl_device = 0;             // --cl-device
  std::string type_k = "f16";
  std::string type_v = "f16";
  std::string chunking = "balanced";
  float temp = 0.8f;
  int top_k = 40;
  float top_p = 0.95f;
  float min_p = 0.05f;
  uint64_t seed = runtime::kRandomSeed;
  bool ignore_eos = false;
  bool report = false;
  std::string report_json;
  std::string target_ms;
  bool profile = false;         // per-op times (--profile)
  bool no_warmup = false;       // --no-warmup: no untimed pass before the prompt on a GPU
  std::string history;          // append the report as a JSON line (--history FILE)
  std::string config;           // settings file from `kestrel tune` (--config FILE)
  CLI::App* command = nullptr;  // to tell flags given on the command line from defaults
};
void add_session_options(CLI::App* app, SessionOptions& o, int default_n_predict);
// Loads --config FILE into the options; flags given on the command line win over the file.
Status apply_settings_file(SessionOptions& o);

// A loaded model with its tokenizer and an empty session sized for `n_needed` positions
// (prompt plus generation) unless -c fixes the size.
struct Loaded {
  std::unique_ptr<model::Model> model;
  std::unique_ptr<tok::Tokenizer> tokenizer;  // null when the GGUF has no vocabulary
  std::unique_ptr<runtime::Session> session;
  double load_ms = 0;
  double warmup_ms = 0;  // the untimed warm-up passes (warm_up), 0 when none ran
  std::string warmup_note;
  std::unique_ptr<OpProfiler> profile;  // with --profile: attached while the prompt is evaluated
};
Expected<std::unique_ptr<model::Model>> load_model(const SessionOptions& o);
Status create_session(const SessionOptions& o, int n_needed, Loaded* out);
// The untimed warm-up passes before a prompt of n_prompt tokens (Session::warm_up) when layers
// run on a GPU backend and --no-warmup is not given; their time goes to l->warmup_ms.
Status warm_up(const SessionOptions& o, int n_prompt, Loaded* l);
runtime::SamplerParams sampler_params(const SessionOptions& o);

struct Generation {
  std::vector<int32_t> ids;  // sampled tokens, the end-of-generation token included
  int decode_steps = 0;      // forward passes timed (the last sampled token needs none)
  double decode_ms = 0;
  bool ended = false;         // an end-of-generation token stopped it
  bool context_full = false;  // the context ran out first
};
// Samples up to n_predict tokens after the session's last logits, streaming text to `out`
// (ids when there is no tokenizer or `print_ids`). Without a tokenizer, `eos` ends it.
Expected<Generation> generate(runtime::Session& session, const tok::Tokenizer* tokenizer,
                              runtime::Sampler& sampler, int n_vocab, int64_t eos, int n_predict,
                              bool ignore_eos, bool print_ids, std::FILE* out);

// Prints the summary lines on stderr and, as asked, the markdown report and the JSON file.
Status finish_report(const SessionOptions& o, const Loaded& l, int prompt_tokens,
                     const Generation& gen);

}  // namespace kestrel::cli
