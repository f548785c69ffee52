#include "generate.h"

#include <algorithm>
#include <chrono>
#include <ctime>

#include "commands.h"
#include "format/quant/quant.h"
#include "runtime/history.h"
#include "runtime/settings.h"

namespace kestrel::cli {

namespace {

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

void add_session_options(CLI::App* app, SessionOptions& o, int default_n_predict) {
  o.n_predict = default_n_predict;
  app->add_option("-m,--model", o.model, "GGUF model file")->required();
  app->add_option("-n,--n-predict", o.n_predict, "tokens to generate")->capture_default_str();
  app->add_option("-c,--ctx-size", o.n_ctx,
                  "context size (0: fit the job, at least min(training context, 4096))")
      ->capture_default_str();
  app->add_option("-b,--batch-size", o.n_batch, "chunk size: tokens per timed chunk")
      ->capture_default_str();
  app->add_option("--ubatch-size", o.n_ubatch,
                  "(-ub) micro-batch size: tokens per forward pass (0: the backend's choice, "
                  "2048 on CUDA, 512 elsewhere)")
      ->capture_default_str();
  app->add_option("-t,--threads", o.n_threads, "CPU threads (0: all cores)")->capture_default_str();
  app->add_option("--n-gpu-layers", o.n_gpu_layers,
                  "(-ngl) layers on the GPU backend: the last N, N > layers adds the head")
      ->capture_default_str();
  app->add_option("--backend", o.backend, "backend for -ngl layers (see `kestrel bench --help`)")
      ->capture_default_str();
  app->add_option("--cl-platform", o.cl_platform,
                  "OpenCL platform index (-1: the GPUs of every platform first)")
      ->capture_default_str();
  app->add_option("--cl-device", o.cl_device, "OpenCL device index (within --cl-platform if given)")
      ->capture_default_str();
  app->add_option("--cache-type-k", o.type_k, "(-ctk) KV cache type for K: f16, q8_0, q4_0")
      ->capture_default_str();
  app->add_option("--cache-type-v", o.type_v, "(-ctv) KV cache type for V: f16, q8_0, q4_0")
      ->capture_default_str();
  app->add_option("--chunking", o.chunking, "balanced (equal chunks) or fixed (llama.cpp's split)")
      ->check(CLI::IsMember({"balanced", "fixed"}))
      ->capture_default_str();
  app->add_option("--temp", o.temp, "sampling temperature (0: greedy)")->capture_default_str();
  app->add_option("--top-k", o.top_k, "top-k sampling (0: off)")->capture_default_str();
  app->add_option("--top-p", o.top_p, "top-p sampling (1: off)")->capture_default_str();
  app->add_option("--min-p", o.min_p, "min-p sampling (0: off)")->capture_default_str();
  app->add_option("--seed", o.seed, "sampling seed (default: random)");
  app->add_flag("--ignore-eos", o.ignore_eos, "keep generating past end of sequence");
  app->add_flag("--report", o.report, "print the prompt-evaluation report (markdown)");
  app->add_option("--report-json", o.report_json, "write the report as JSON");
  app->add_option("--target-ms", o.target_ms, "target ms/token range, e.g. 20-50");
  app->add_flag("--profile", o.profile, "time every op kind and print the top ones per chunk");
  app->add_flag("--no-warmup", o.no_warmup,
                "no untimed warm-up pass before the prompt (GPU backends: their first pass loads "
                "kernels and raises clocks inside the first chunk)");
  app->add_option("--history", o.history, "append this run's report to a JSON-lines file");
  app->add_option("--config", o.config, "settings file written by `kestrel tune`");
  o.command = app;
}

Status apply_settings_file(SessionOptions& o) {
  if (o.config.empty()) return Status::ok();
  KESTREL_ASSIGN_OR_RETURN(runtime::Settings s, runtime::load_settings(o.config));
  auto given = [&](const char* flag) { return o.command && o.command->count(flag) > 0; };
  if (s.n_batch && !given("--batch-size")) o.n_batch = *s.n_batch;
  if (s.n_ubatch && !given("--ubatch-size")) o.n_ubatch = *s.n_ubatch;
  if (s.n_threads && !given("--threads")) o.n_threads = *s.n_threads;
  if (s.type_k && !given("--cache-type-k")) o.type_k = *s.type_k;
  if (s.type_v && !given("--cache-type-v")) o.type_v = *s.type_v;
  if (s.chunking && !given("--chunking")) o.chunking = *s.chunking;
  if (s.n_gpu_layers && !given("--n-gpu-layers")) o.n_gpu_layers = *s.n_gpu_layers;
  if (s.backend && !given("--backend")) o.backend = *s.backend;
  return Status::ok();
}

Expected<std::unique_ptr<model::Model>> load_model(const SessionOptions& o) {
  model::LoadParams lp;
  lp.n_threads = o.n_threads;
  lp.backend = o.backend;
  lp.n_gpu_layers = o.n_gpu_layers;
  lp.platform = o.cl_platform;
  lp.device = o.cl_device;
  KESTREL_ASSIGN_OR_RETURN(auto m, model::Model::load(o.model, lp));
  if (!m->placement_note().empty())
    std::fprintf(stderr, "kestrel: %s\n", m->placement_note().c_str());
  return m;
}

Status create_session(const SessionOptions& o, int n_needed, Loaded* l) {
  runtime::SessionParams sp;
  if (!quant::parse_type(o.type_k.c_str(), &sp.type_k) || !quant::is_kv_type(sp.type_k))
    return error("-ctk %s: the KV cache type must be f16, q8_0 or q4_0", o.type_k.c_str());
  if (!quant::parse_type(o.type_v.c_str(), &sp.type_v) || !quant::is_kv_type(sp.type_v))
    return error("-ctv %s: the KV cache type must be f16, q8_0 or q4_0", o.type_v.c_str());
  if (o.n_batch <= 0 || o.n_ubatch < 0)
    return error("-b must be positive and -ub positive or 0 (the backend's choice)");
  sp.n_batch = o.n_batch;
  sp.n_ubatch = o.n_ubatch;
  runtime::parse_chunking(o.chunking, &sp.chunking);
  const int n_ctx_train = l->model->config().n_ctx_train;
  if (o.n_ctx > 0) {
    sp.n_ctx = o.n_ctx;
    if (n_needed > o.n_ctx)
      return error(
          "the prompt plus generation needs %d positions but the context is %d: raise "
          "-c, lower -n or shorten the prompt",
          n_needed, o.n_ctx);
  } else {
    sp.n_ctx = std::max(std::min(n_ctx_train, 4096), n_needed);
    if (n_needed > n_ctx_train)
      return error(
          "the prompt plus generation needs %d positions, more than the model's "
          "training context of %d: shorten the prompt or lower -n (or force it with -c)",
          n_needed, n_ctx_train);
  }
  KESTREL_ASSIGN_OR_RETURN(l->session, runtime::Session::create(*l->model, sp));
  if (o.profile) {
    l->profile = std::make_unique<OpProfiler>();
    l->session->set_profiler(l->profile.get());
  }
  return Status::ok();
}

Status warm_up(const SessionOptions& o, int n_prompt, Loaded* l) {
  // The CPU backend has nothing to warm that a pass would not also cost (its weights are read
  // at load), so only GPU layers get the pass.
  if (o.no_warmup || l->model->n_gpu_layers() == 0) return Status::ok();
  const int n = std::min(n_prompt, l->session->params().n_ubatch);
  const bool decode = o.n_predict > 0 && n > 1;
  const auto t0 = std::chrono::steady_clock::now();
  KESTREL_TRY(l->session->warm_up(n, decode));
  l->warmup_ms = ms_since(t0);
  l->warmup_note = "one pass of " + std::to_string(n) + (n == 1 ? " token" : " tokens") +
                   (decode ? " and one of 1 token" : "") + ", not timed";
  return Status::ok();
}

runtime::SamplerParams sampler_params(const SessionOptions& o) {
  runtime::SamplerParams p;
  p.temperature = o.temp;
  p.top_k = o.top_k;
  p.top_p = o.top_p;
  p.min_p = o.min_p;
  p.seed = o.seed;
  return p;
}

Expected<Generation> generate(runtime::Session& session, const tok::Tokenizer* tokenizer,
                              runtime::Sampler& sampler, int n_vocab, int64_t eos, int n_predict,
                              bool ignore_eos, bool print_ids, std::FILE* out) {
  Generation g;
  session.set_profiler(nullptr);  // the profile covers prompt evaluation
  std::unique_ptr<tok::Detokenizer> detok;
  if (tokenizer && !print_ids)
    detok = std::make_unique<tok::Detokenizer>(*tokenizer, /*at_text_start=*/false);
  for (int i = 0; i < n_predict; ++i) {
    const int32_t next = sampler.sample(session.last_logits().data(), n_vocab);
    g.ids.push_back(next);
    const bool end = tokenizer ? tokenizer->is_end_of_generation(next) : next == eos;
    if (detok) {
      if (!end) std::fputs(detok->push(next).c_str(), out);
    } else {
      std::fprintf(out, "%s%d", i ? " " : "", next);
    }
    std::fflush(out);
    if (end && !ignore_eos) {
      g.ended = true;
      break;
    }
    if (i + 1 == n_predict) break;  // the last token needs no forward pass
    if (session.n_past() >= session.params().n_ctx) {
      g.context_full = true;
      break;
    }
    const auto t0 = std::chrono::steady_clock::now();
    KESTREL_TRY(session.decode(next));
    g.decode_ms += ms_since(t0);
    ++g.decode_steps;
  }
  if (detok) std::fputs(detok->flush().c_str(), out);
  std::fflush(out);
  return g;
}

Status finish_report(const SessionOptions& o, const Loaded& l, int prompt_tokens,
                     const Generation& gen) {
  runtime::PromptReport rep;
  const auto& cfg = l.model->config();
  rep.model_path = o.model;
  rep.model_name = cfg.name;
  rep.arch = cfg.arch;
  rep.backend = l.model->primary_backend()->name();
  rep.device = l.model->primary_backend()->device_name();
  rep.backend_setup_ms = l.model->primary_backend()->setup_ms();
  rep.backend_setup_note = l.model->primary_backend()->setup_note();
  rep.memory = l.model->primary_backend()->memory_use();
  rep.version = std::string(KESTREL_VERSION) + " (" + KESTREL_GIT_VERSION + ")";
  rep.n_threads = l.model->n_threads();
  rep.n_gpu_layers = l.model->n_gpu_layers();
  rep.settings = l.session->params();
  rep.load_ms = l.load_ms;
  rep.warmup_ms = l.warmup_ms;
  rep.warmup_note = l.warmup_note;
  rep.prompt_tokens = prompt_tokens;
  rep.chunks = l.session->chunk_stats();
  if (l.profile) rep.profile = *l.profile;
  rep.gen_tokens = gen.decode_steps;
  rep.gen_ms = gen.decode_ms;
  if (!o.target_ms.empty()) {
    runtime::TargetRange target;
    if (!runtime::parse_target(o.target_ms, &target))
      return error("--target-ms %s: expected LOW-HIGH in ms/token, e.g. 20-50",
                   o.target_ms.c_str());
    rep.target = target;
  }
  std::fflush(stdout);  // the generated text first, then the summary
  std::fprintf(stderr, "prompt: %d tokens in %.1f ms (%.2f ms/token, %.2f tokens/s)\n",
               prompt_tokens, rep.total_ms(), rep.ms_per_token(), rep.tokens_per_s());
  if (rep.gen_tokens > 0)
    std::fprintf(stderr, "generation: %d tokens in %.1f ms (%.2f tokens/s)\n", rep.gen_tokens,
                 rep.gen_ms, rep.gen_tokens * 1000.0 / rep.gen_ms);
  if (o.report) {
    std::printf("\n%s", runtime::render_markdown(rep).c_str());
  } else if (rep.profile) {
    std::fflush(stdout);
    std::fprintf(stderr, "\n%s",
                 runtime::render_profile_markdown(*rep.profile, rep.total_ms()).c_str());
  }
  if (!o.report_json.empty()) {
    const std::string js = runtime::to_json(rep).dump(2) + "\n";
    KESTREL_TRY(runtime::write_file_atomic(o.report_json, js));
  }
  if (!o.history.empty()) {
    nlohmann::json record = runtime::to_json(rep);
    record["kind"] = "run";
    record["recorded_at"] = static_cast<int64_t>(std::time(nullptr));
    KESTREL_TRY(runtime::append_history(o.history, record));
  }
  return Status::ok();
}

}  // namespace kestrel::cli
