// `kestrel run`: evaluate a prompt in chunks, generate, and report where the time went.
#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "commands.h"
#include "format/quant/quant.h"
#include "model/model.h"
#include "runtime/report.h"
#include "runtime/sampler.h"
#include "runtime/session.h"

namespace kestrel::cli {

int fail(const std::string& message) {
  std::fprintf(stderr, "kestrel: error: %s\n", message.c_str());
  return 1;
}

namespace {

Expected<std::vector<int32_t>> parse_token_list(const std::string& s) {
  std::vector<int32_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    const size_t b = item.find_first_not_of(" \t");
    const size_t e = item.find_last_not_of(" \t");
    if (b == std::string::npos) return error("--tokens: empty item in '%s'", s.c_str());
    item = item.substr(b, e - b + 1);
    char* end = nullptr;
    const long long v = std::strtoll(item.c_str(), &end, 10);
    if (*end != '\0' || v < 0 || v > INT32_MAX)
      return error("--tokens: '%s' is not a token id (a non-negative integer)", item.c_str());
    out.push_back(static_cast<int32_t>(v));
  }
  if (out.empty()) return error("--tokens is empty: give ids like --tokens 1,2,3");
  return out;
}

// Writes a file atomically: a temporary beside it, renamed into place when complete.
Status write_file(const std::string& path, const void* data, size_t bytes) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return error("cannot write '%s'", path.c_str());
    out.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
    if (!out) return error("writing '%s' failed (disk full?)", path.c_str());
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0)
    return error("cannot move '%s' into place", path.c_str());
  return Status::ok();
}

}  // namespace

void add_run_command(CLI::App& app, RunOptions& o) {
  CLI::App* run = app.add_subcommand("run", "Evaluate a prompt and generate tokens");
  run->add_option("-m,--model", o.model, "GGUF model file")->required();
  run->add_option("--tokens", o.tokens, "prompt as token ids, e.g. 1,2,3")->required();
  run->add_option("-n,--n-predict", o.n_predict, "tokens to generate")->capture_default_str();
  run->add_option("-c,--ctx-size", o.n_ctx,
                  "context size (0: fit the job, at least min(training context, 4096))")
      ->capture_default_str();
  run->add_option("-b,--batch-size", o.n_batch, "chunk size: tokens per timed chunk")
      ->capture_default_str();
  run->add_option("--ubatch-size", o.n_ubatch, "(-ub) micro-batch size: tokens per forward pass")
      ->capture_default_str();
  run->add_option("-t,--threads", o.n_threads, "CPU threads (0: all cores)")->capture_default_str();
  run->add_option("--cache-type-k", o.type_k, "(-ctk) KV cache type for K: f16, q8_0, q4_0")
      ->capture_default_str();
  run->add_option("--cache-type-v", o.type_v, "(-ctv) KV cache type for V: f16, q8_0, q4_0")
      ->capture_default_str();
  run->add_option("--chunking", o.chunking, "balanced (equal chunks) or fixed (llama.cpp's split)")
      ->check(CLI::IsMember({"balanced", "fixed"}))
      ->capture_default_str();
  run->add_option("--temp", o.temp, "sampling temperature (0: greedy)")->capture_default_str();
  run->add_option("--top-k", o.top_k, "top-k sampling (0: off)")->capture_default_str();
  run->add_option("--top-p", o.top_p, "top-p sampling (1: off)")->capture_default_str();
  run->add_option("--min-p", o.min_p, "min-p sampling (0: off)")->capture_default_str();
  run->add_option("--seed", o.seed, "sampling seed (default: random)");
  run->add_flag("--ignore-eos", o.ignore_eos, "keep generating past end of sequence");
  run->add_option("--dump-logits", o.dump_logits,
                  "write float32 logits of every prompt position, [n_prompt][n_vocab]");
  run->add_flag("--report", o.report, "print the prompt-evaluation report (markdown)");
  run->add_option("--report-json", o.report_json, "write the report as JSON");
  run->add_option("--target-ms", o.target_ms, "target ms/token range, e.g. 20-50");
}

int run_command(const RunOptions& o) {
  quant::DType type_k, type_v;
  if (!quant::parse_type(o.type_k.c_str(), &type_k) || !quant::is_kv_type(type_k))
    return fail("-ctk " + o.type_k + ": the KV cache type must be f16, q8_0 or q4_0");
  if (!quant::parse_type(o.type_v.c_str(), &type_v) || !quant::is_kv_type(type_v))
    return fail("-ctv " + o.type_v + ": the KV cache type must be f16, q8_0 or q4_0");
  runtime::TargetRange target;
  if (!o.target_ms.empty() && !runtime::parse_target(o.target_ms, &target))
    return fail("--target-ms " + o.target_ms + ": expected LOW-HIGH in ms/token, e.g. 20-50");
  if (o.n_predict < 0) return fail("-n must be 0 or more");
  if (o.n_batch <= 0 || o.n_ubatch <= 0) return fail("-b and -ub must be positive");
  auto tokens = parse_token_list(o.tokens);
  if (!tokens) return fail(tokens.message());
  const int n_prompt = static_cast<int>(tokens->size());

  const auto t_load = std::chrono::steady_clock::now();
  model::LoadParams lp;
  lp.n_threads = o.n_threads;
  auto model = model::Model::load(o.model, lp);
  if (!model) return fail(model.message());
  const auto& cfg = (*model)->config();

  runtime::SessionParams sp;
  sp.n_batch = o.n_batch;
  sp.n_ubatch = o.n_ubatch;
  sp.type_k = type_k;
  sp.type_v = type_v;
  runtime::parse_chunking(o.chunking, &sp.chunking);
  const int needed = n_prompt + o.n_predict;
  if (o.n_ctx > 0) {
    sp.n_ctx = o.n_ctx;
    if (needed > o.n_ctx)
      return fail(
          format("the prompt (%d tokens) plus generation (-n %d) needs %d positions but "
                 "the context is %d: raise -c or shorten the prompt",
                 n_prompt, o.n_predict, needed, o.n_ctx));
  } else {
    sp.n_ctx = std::max(std::min(cfg.n_ctx_train, 4096), needed);
    if (needed > cfg.n_ctx_train)
      return fail(
          format("the prompt (%d tokens) plus generation (-n %d) needs %d positions, "
                 "more than the model's training context of %d: shorten the prompt or "
                 "lower -n (or force it with -c)",
                 n_prompt, o.n_predict, needed, cfg.n_ctx_train));
  }
  auto session = runtime::Session::create(**model, sp);
  if (!session) return fail(session.message());
  const double load_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t_load).count();

  std::vector<float> all_logits;
  Status st = (*session)->prefill(*tokens, o.dump_logits.empty() ? nullptr : &all_logits);
  if (!st) return fail(st.message());
  if (!o.dump_logits.empty()) {
    st = write_file(o.dump_logits, all_logits.data(), all_logits.size() * sizeof(float));
    if (!st) return fail(st.message());
  }

  // Generation: tokens are printed as they are produced.
  runtime::SamplerParams smp;
  smp.temperature = o.temp;
  smp.top_k = o.top_k;
  smp.top_p = o.top_p;
  smp.min_p = o.min_p;
  smp.seed = o.seed;
  runtime::Sampler sampler(smp);
  const int64_t eos = (*model)->file().get_int("tokenizer.ggml.eos_token_id", -1);
  int generated = 0;
  double gen_ms = 0;  // decode steps only, as llama.cpp's eval time
  for (int i = 0; i < o.n_predict; ++i) {
    const int32_t next = sampler.sample((*session)->last_logits().data(), cfg.n_vocab);
    std::printf("%s%d", generated ? " " : "", next);
    std::fflush(stdout);
    ++generated;
    if (next == eos && !o.ignore_eos) break;
    if (i + 1 == o.n_predict) break;  // the last token needs no forward pass
    const auto t_step = std::chrono::steady_clock::now();
    st = (*session)->decode(next);
    if (!st) return fail(st.message());
    gen_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t_step)
                  .count();
  }
  if (generated) std::printf("\n");

  runtime::PromptReport rep;
  rep.model_path = o.model;
  rep.model_name = cfg.name;
  rep.arch = cfg.arch;
  rep.backend = (*model)->input_backend()->name();
  rep.device = (*model)->input_backend()->device_name();
  rep.version = std::string(KESTREL_VERSION) + " (" + KESTREL_GIT_VERSION + ")";
  rep.n_threads = (*model)->n_threads();
  rep.settings = (*session)->params();
  rep.load_ms = load_ms;
  rep.prompt_tokens = n_prompt;
  rep.chunks = (*session)->chunk_stats();
  rep.gen_tokens = generated > 1 ? generated - 1 : 0;  // decode steps actually timed
  rep.gen_ms = gen_ms;
  if (!o.target_ms.empty()) rep.target = target;

  std::fprintf(stderr, "prompt: %d tokens in %.1f ms (%.2f ms/token, %.2f tokens/s)\n", n_prompt,
               rep.total_ms(), rep.ms_per_token(), rep.tokens_per_s());
  if (rep.gen_tokens > 0)
    std::fprintf(stderr, "generation: %d tokens in %.1f ms (%.2f tokens/s)\n", rep.gen_tokens,
                 gen_ms, rep.gen_tokens * 1000.0 / gen_ms);
  if (o.report) std::printf("\n%s", runtime::render_markdown(rep).c_str());
  if (!o.report_json.empty()) {
    const std::string js = runtime::to_json(rep).dump(2) + "\n";
    st = write_file(o.report_json, js.data(), js.size());
    if (!st) return fail(st.message());
  }
  return 0;
}

}  // namespace kestrel::cli
