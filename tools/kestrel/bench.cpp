// `kestrel bench`: llama-bench's habits for Kestrel. Every combination of the comma lists
// (models, backends, -ngl, -t, -b, -ub, -ctk, -ctv, --chunking) runs every test (pp N: N
// random prompt tokens from an empty context; tg N: N one-token decode steps from an empty
// context; pg N,M: both in a row), one warm-up run then -r timed repetitions, each from an
// empty context. Results go to stdout as they come (md, json, jsonl, csv), progress to stderr.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <random>

#include "backend/cpu/cpu_backend.h"
#include "backend/registry.h"
#include "bench_output.h"
#include "commands.h"
#include "format/quant/quant.h"
#include "model/model.h"
#include "runtime/history.h"
#include "runtime/profiler.h"
#include "runtime/report.h"
#include "runtime/session.h"
#include "runtime/settings.h"

namespace kestrel::cli {

namespace {

constexpr int kProfileTop = 8;  // op kinds shown per test in the markdown profile

struct Test {
  int n_prompt = 0;
  int n_gen = 0;
  int n_depth = 0;  // tokens put in the context before the test, untimed (-d)
};

// One combination of settings; every test runs on it.
struct Combo {
  std::string model;
  std::string backend;
  int n_gpu_layers = 0;
  int n_threads = 0;
  int n_batch = 0;
  int n_ubatch = 0;
  std::string type_k;
  std::string type_v;
  std::string chunking;
  int cl_platform = -1, cl_device = 0;
};

struct Plan {
  std::vector<Combo> combos;
  std::vector<Test> tests;
  std::vector<LlamaBenchEntry> llama_bench;  // --vs-llama-bench
};

// Settings from --config replace a list whose flag was not given.
Status apply_bench_settings(BenchOptions& o) {
  if (o.config.empty()) return Status::ok();
  KESTREL_ASSIGN_OR_RETURN(runtime::Settings s, runtime::load_settings(o.config));
  auto given = [&](const char* flag) { return o.command && o.command->count(flag) > 0; };
  if (s.n_batch && !given("--batch-size")) o.n_batch = {*s.n_batch};
  if (s.n_ubatch && !given("--ubatch-size")) o.n_ubatch = {*s.n_ubatch};
  if (s.n_threads && !given("--threads")) o.n_threads = {*s.n_threads};
  if (s.n_gpu_layers && !given("--n-gpu-layers")) o.n_gpu_layers = {*s.n_gpu_layers};
  if (s.backend && !given("--backend")) o.backends = {*s.backend};
  if (s.type_k && !given("--cache-type-k")) o.type_k = {*s.type_k};
  if (s.type_v && !given("--cache-type-v")) o.type_v = {*s.type_v};
  if (s.chunking && !given("--chunking")) o.chunking = {*s.chunking};
  return Status::ok();
}

Expected<Test> parse_prompt_gen(const std::string& s) {
  int n = 0, m = 0;
  char tail = 0;
  if (std::sscanf(s.c_str(), "%d,%d%c", &n, &m, &tail) != 2 || n <= 0 || m <= 0)
    return error("-pg %s: expected two positive counts, prompt then generation, e.g. -pg 512,128",
                 s.c_str());
  return Test{n, m, 0};
}

Status check_positive(const std::vector<int>& values, const char* flag, int min) {
  for (int v : values)
    if (v < min) return error("%s %d: must be %s", flag, v, min > 0 ? "positive" : "0 or more");
  return Status::ok();
}

Status check_kv_types(const std::vector<std::string>& types, const char* flag) {
  for (const std::string& t : types) {
    quant::DType d;
    if (!quant::parse_type(t.c_str(), &d) || !quant::is_kv_type(d))
      return error("%s %s: the KV cache type must be f16, q8_0 or q4_0", flag, t.c_str());
  }
  return Status::ok();
}

Expected<std::vector<Test>> make_tests(const BenchOptions& o) {
  KESTREL_TRY(check_positive(o.n_prompt, "-p", 0));
  KESTREL_TRY(check_positive(o.n_gen, "-n", 0));
  KESTREL_TRY(check_positive(o.n_depth, "-d", 0));
  std::vector<Test> tests;
  for (int p : o.n_prompt)
    if (p > 0) tests.push_back({p, 0, 0});
  for (int n : o.n_gen)
    if (n > 0) tests.push_back({0, n, 0});
  for (const std::string& pg : o.prompt_gen) {
    KESTREL_ASSIGN_OR_RETURN(Test t, parse_prompt_gen(pg));
    tests.push_back(t);
  }
  if (tests.empty()) return error("nothing to measure: give -p N, -n N or -pg N,M above 0");
  std::vector<Test> at_depths;  // every test at every depth, depth outermost (as llama-bench)
  for (int d : o.n_depth)
    for (Test t : tests) {
      t.n_depth = d;
      at_depths.push_back(t);
    }
  return at_depths;
}

// Every setting is checked before anything is loaded or measured.
Status check_settings(const BenchOptions& o) {
  if (!is_bench_format(o.output))
    return error("-o %s: the output format must be md, json, jsonl or csv", o.output.c_str());
  if (o.repetitions < 1) return error("-r %d: give at least one repetition", o.repetitions);
  KESTREL_TRY(check_positive(o.n_batch, "-b", 1));
  KESTREL_TRY(check_positive(o.n_ubatch, "-ub", 0));  // 0: the backend's choice
  KESTREL_TRY(check_positive(o.n_threads, "-t", 0));
  KESTREL_TRY(check_kv_types(o.type_k, "-ctk"));
  KESTREL_TRY(check_kv_types(o.type_v, "-ctv"));
  for (const std::string& c : o.chunking) {
    runtime::Chunking mode;
    if (!runtime::parse_chunking(c, &mode))
      return error("--chunking %s: expected balanced or fixed", c.c_str());
  }
  for (const std::string& b : o.backends) KESTREL_TRY(backend::check_backend(b));
  for (const std::string& b : o.backends)
    for (int ngl : o.n_gpu_layers) KESTREL_TRY(backend::check_gpu_layers(b, ngl));
  if (o.models.empty()) return error("give at least one model with -m FILE");
  for (const std::string& m : o.models) KESTREL_TRY(gguf::File::open(m).status());
  if (!o.history.empty()) {
    const auto dir = std::filesystem::absolute(o.history).parent_path();
    if (!std::filesystem::is_directory(dir))
      return error("--history %s: the directory '%s' does not exist", o.history.c_str(),
                   dir.string().c_str());
  }
  return Status::ok();
}

// Adds one dimension to the cartesian product: every combination so far times every value.
template <typename T, typename Set>
void expand(std::vector<Combo>* combos, const std::vector<T>& values, Set set) {
  std::vector<Combo> out;
  for (const Combo& c : *combos)
    for (const T& v : values) {
      Combo n = c;
      set(n, v);
      out.push_back(std::move(n));
    }
  *combos = std::move(out);
}

// The model is the outermost dimension, then what needs a reload, so a model is loaded once
// per backend, -ngl and thread count.
std::vector<Combo> make_combos(const BenchOptions& o) {
  std::vector<Combo> c(1);
  c[0].cl_platform = o.cl_platform;
  c[0].cl_device = o.cl_device;
  expand(&c, o.models, [](Combo& x, const std::string& v) { x.model = v; });
  expand(&c, o.backends, [](Combo& x, const std::string& v) { x.backend = v; });
  expand(&c, o.n_gpu_layers, [](Combo& x, int v) { x.n_gpu_layers = v; });
  expand(&c, o.n_threads, [](Combo& x, int v) { x.n_threads = v; });
  expand(&c, o.n_batch, [](Combo& x, int v) { x.n_batch = v; });
  expand(&c, o.n_ubatch, [](Combo& x, int v) { x.n_ubatch = v; });
  expand(&c, o.type_k, [](Combo& x, const std::string& v) { x.type_k = v; });
  expand(&c, o.type_v, [](Combo& x, const std::string& v) { x.type_v = v; });
  expand(&c, o.chunking, [](Combo& x, const std::string& v) { x.chunking = v; });
  return c;
}

Expected<Plan> make_plan(BenchOptions& o) {
  KESTREL_TRY(apply_bench_settings(o));
  KESTREL_TRY(check_settings(o));
  Plan plan;
  KESTREL_ASSIGN_OR_RETURN(plan.tests, make_tests(o));
  if (!o.vs_llama_bench.empty()) {
    KESTREL_ASSIGN_OR_RETURN(plan.llama_bench, load_llama_bench(o.vs_llama_bench));
  }
  plan.combos = make_combos(o);
  return plan;
}

// What llama-bench reports about a model: bytes and parameters of every tensor, and a
// description "ARCH SIZE TYPE" with the type that holds most of the weights.
struct ModelInfo {
  std::string type;
  uint64_t size = 0;
  uint64_t n_params = 0;
};

ModelInfo describe_model(const model::Model& m) {
  ModelInfo info;
  std::map<quant::DType, uint64_t> elements_by_type;
  for (const gguf::TensorInfo& t : m.file().tensors()) {
    info.size += t.n_bytes;
    info.n_params += static_cast<uint64_t>(t.n_elements());
    if (t.dims.size() >= 2) elements_by_type[t.type] += static_cast<uint64_t>(t.n_elements());
  }
  auto most = std::max_element(elements_by_type.begin(), elements_by_type.end(),
                               [](const auto& a, const auto& b) { return a.second < b.second; });
  std::string type = most == elements_by_type.end() ? "?" : quant::type_name(most->first);
  std::transform(type.begin(), type.end(), type.begin(), ::toupper);
  char size[32];
  const double p = static_cast<double>(info.n_params);
  if (p >= 1e9)
    std::snprintf(size, sizeof(size), "%.1fB", p / 1e9);
  else
    std::snprintf(size, sizeof(size), p >= 1e7 ? "%.0fM" : "%.1fM", p / 1e6);
  info.type = m.config().arch + " " + size + " " + type;
  return info;
}

// Random token ids within the vocabulary from a fixed seed; a prompt starts with BOS when
// the model adds one (as llama-bench's does).
class TokenSource {
 public:
  TokenSource(const model::Model& m, uint64_t seed) : rng_(seed), pick_(0, m.config().n_vocab - 1) {
    const int64_t bos = m.file().get_int("tokenizer.ggml.bos_token_id", -1);
    if (bos >= 0 && bos < m.config().n_vocab &&
        m.file().get_bool("tokenizer.ggml.add_bos_token", true))
      bos_ = static_cast<int32_t>(bos);
  }
  int32_t random() { return pick_(rng_); }
  int32_t start() { return bos_ >= 0 ? bos_ : random(); }
  std::vector<int32_t> sequence(int n, bool from_start) {
    std::vector<int32_t> ids(n);
    for (int i = 0; i < n; ++i) ids[i] = i == 0 && from_start ? start() : random();
    return ids;
  }

 private:
  std::mt19937_64 rng_;
  std::uniform_int_distribution<int32_t> pick_;
  int32_t bos_ = -1;
};

// One run of a test from a context of t.n_depth tokens (filled by fill_depth): the prompt in
// chunks, then one decode step per generated token (random ids: no sampling is timed). Returns
// its wall time in ns.
Expected<uint64_t> run_test_once(runtime::Session& s, TokenSource& tokens, const Test& t) {
  s.truncate(t.n_depth);
  s.reset_chunk_stats();
  const bool at_start = t.n_depth == 0;
  const std::vector<int32_t> prompt = tokens.sequence(t.n_prompt, at_start);
  const std::vector<int32_t> gen = tokens.sequence(t.n_gen, at_start && t.n_prompt == 0);
  const auto t0 = std::chrono::steady_clock::now();
  if (!prompt.empty()) KESTREL_TRY(s.prefill(prompt, nullptr));
  for (int32_t id : gen) KESTREL_TRY(s.decode(id));
  const auto ns =
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0);
  return static_cast<uint64_t>(ns.count());
}

// The test's depth: n_depth random tokens (from BOS where the model adds one) prefilled once,
// untimed; every run keeps them (truncates back to them) and adds its own tokens after.
Status fill_depth(runtime::Session& s, TokenSource& tokens, const Test& t) {
  s.truncate(0);
  if (t.n_depth == 0) return Status::ok();
  return s.prefill(tokens.sequence(t.n_depth, true), nullptr);
}

std::string utc_now() {
  char buf[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(buf, sizeof(buf), "%FT%TZ", std::gmtime(&now));
  return buf;
}

// A model loaded for the combinations that share its file, backend, -ngl and thread count.
struct LoadedModel {
  std::unique_ptr<model::Model> model;
  ModelInfo info;
  std::string model_path, backend;
  int n_gpu_layers = -1;
  int n_threads = -1;
  bool serves(const Combo& c) const {
    return model && model_path == c.model && backend == c.backend &&
           n_gpu_layers == c.n_gpu_layers && n_threads == c.n_threads;
  }
};

Status ensure_loaded(const Combo& c, LoadedModel* lm) {
  if (lm->serves(c)) return Status::ok();
  lm->model.reset();  // free the previous one first
  model::LoadParams lp;
  lp.n_threads = c.n_threads;
  lp.backend = c.backend;
  lp.n_gpu_layers = c.n_gpu_layers;
  lp.platform = c.cl_platform;
  lp.device = c.cl_device;
  std::fprintf(stderr, "kestrel bench: loading %s\n", c.model.c_str());
  KESTREL_ASSIGN_OR_RETURN(lm->model, model::Model::load(c.model, lp));
  lm->info = describe_model(*lm->model);
  lm->model_path = c.model;
  lm->backend = c.backend;
  lm->n_gpu_layers = c.n_gpu_layers;
  lm->n_threads = c.n_threads;
  return Status::ok();
}

runtime::SessionParams session_params(const Combo& c, const Test& t) {
  runtime::SessionParams sp;
  sp.n_ctx = t.n_depth + t.n_prompt + t.n_gen;
  sp.n_batch = c.n_batch;
  sp.n_ubatch = c.n_ubatch;
  quant::parse_type(c.type_k.c_str(), &sp.type_k);
  quant::parse_type(c.type_v.c_str(), &sp.type_v);
  runtime::parse_chunking(c.chunking, &sp.chunking);
  return sp;
}

BenchResult describe_result(const Combo& c, const Test& t, const LoadedModel& lm) {
  BenchResult r;
  r.kestrel_version = std::string(KESTREL_VERSION) + " (" + KESTREL_GIT_VERSION + ")";
  r.build_commit = KESTREL_GIT_VERSION;
  r.cpu_info = backend::cpu::cpu_model_name();
  r.backend = lm.model->primary_backend()->name();
  r.device = lm.model->primary_backend()->device_name();
  r.model_filename = c.model;
  r.model_type = lm.info.type;
  r.model_size = lm.info.size;
  r.model_n_params = lm.info.n_params;
  r.n_batch = c.n_batch;
  r.n_ubatch = c.n_ubatch;
  r.n_threads = lm.model->n_threads();
  r.type_k = c.type_k;
  r.type_v = c.type_v;
  r.n_gpu_layers = c.n_gpu_layers < 0 ? lm.model->n_gpu_layers() : c.n_gpu_layers;
  r.chunking = c.chunking;
  r.n_prompt = t.n_prompt;
  r.n_gen = t.n_gen;
  r.n_depth = t.n_depth;
  r.test_time = utc_now();
  return r;
}

struct Progress {
  size_t index = 0;  // 1-based number of the test being measured
  size_t total = 0;
  std::string what;
};

// Warm-up (the prompt and one generated token, as llama-bench), then the timed repetitions.
Status measure(const BenchOptions& o, const Combo& c, const Test& t, LoadedModel& lm,
               const Progress& p, BenchResult* r) {
  KESTREL_ASSIGN_OR_RETURN(auto session, runtime::Session::create(*lm.model, session_params(c, t)));
  if (c.n_ubatch == 0) r->n_ubatch = session->params().n_ubatch;  // the backend's choice
  TokenSource tokens(*lm.model, o.seed);
  auto say = [&](const std::string& step) {
    std::fprintf(stderr, "kestrel bench: %zu/%zu %s: %s\n", p.index, p.total, p.what.c_str(),
                 step.c_str());
  };
  if (c.n_ubatch == 0) say("ub " + std::to_string(r->n_ubatch) + ", the backend's choice");
  if (t.n_depth > 0) say("depth: " + std::to_string(t.n_depth) + " tokens, untimed");
  KESTREL_TRY(fill_depth(*session, tokens, t));
  if (!o.no_warmup) {
    say("warm-up");
    KESTREL_TRY(
        run_test_once(*session, tokens, {t.n_prompt, std::min(t.n_gen, 1), t.n_depth}).status());
  }
  runtime::OpProfiler profile;  // the timed repetitions only, not the warm-up
  if (o.profile) session->set_profiler(&profile);
  double wall_ms = 0;
  for (int i = 0; i < o.repetitions; ++i) {
    say("repetition " + std::to_string(i + 1) + "/" + std::to_string(o.repetitions));
    KESTREL_ASSIGN_OR_RETURN(uint64_t ns, run_test_once(*session, tokens, t));
    r->samples_ns.push_back(ns);
    wall_ms += static_cast<double>(ns) / 1e6;
  }
  r->device_memory = runtime::memory_use_json(lm.model->primary_backend()->memory_use());
  if (o.profile) {
    session->set_profiler(nullptr);
    r->profile = runtime::profile_to_json(profile, wall_ms);
    r->profile_markdown = runtime::render_profile_markdown(profile, wall_ms, kProfileTop);
    const std::string title = "## Per-op profile\n\n";  // bench writes its own per test
    if (r->profile_markdown.rfind(title, 0) == 0) r->profile_markdown.erase(0, title.size());
  }
  return Status::ok();
}

std::string describe_combo(const Combo& c, const BenchResult& r) {
  char buf[512];
  // -ub 0 is resolved by the backend when the session is made (measure() says to what).
  const std::string ub = c.n_ubatch ? std::to_string(c.n_ubatch) : std::string("auto");
  std::snprintf(buf, sizeof(buf), "%s %s, %s, b %d, ub %s, t %d, ngl %d, %s/%s, %s",
                std::filesystem::path(c.model).filename().string().c_str(), r.test_name().c_str(),
                r.backend.c_str(), c.n_batch, ub.c_str(), r.n_threads, r.n_gpu_layers,
                c.type_k.c_str(), c.type_v.c_str(), c.chunking.c_str());
  return buf;
}

Status record_history(const std::string& path, const BenchResult& r) {
  nlohmann::json record = bench_result_json(r);
  record["kind"] = "bench";
  record["recorded_at"] = static_cast<int64_t>(std::time(nullptr));
  return runtime::append_history(path, record);
}

void emit(const std::string& text) {
  std::fputs(text.c_str(), stdout);
  std::fflush(stdout);
}

// Measures every test of every combination, writing each result as it comes.
Status run_plan(const BenchOptions& o, const Plan& plan, BenchPrinter& printer,
                std::vector<BenchResult>* results) {
  LoadedModel lm;
  Progress progress;
  progress.total = plan.combos.size() * plan.tests.size();
  for (const Combo& c : plan.combos) {
    KESTREL_TRY(ensure_loaded(c, &lm));
    for (const Test& t : plan.tests) {
      BenchResult r = describe_result(c, t, lm);
      ++progress.index;
      progress.what = describe_combo(c, r);
      KESTREL_TRY(measure(o, c, t, lm, progress, &r));
      if (!o.vs_llama_bench.empty()) {
        r.compared = true;
        r.llama_bench_ts = match_llama_bench(plan.llama_bench, r);
      }
      emit(printer.row(r));
      if (!o.history.empty()) KESTREL_TRY(record_history(o.history, r));
      results->push_back(std::move(r));
    }
  }
  return Status::ok();
}

}  // namespace

void add_bench_command(CLI::App& app, BenchOptions& o) {
  CLI::App* b = app.add_subcommand(
      "bench", "Measure prompt and generation speed like llama-bench (every combination)");
  b->add_option("-m,--model", o.models, "GGUF model file(s); repeat or comma-separate")
      ->delimiter(',')
      ->required();
  b->add_option("-p,--n-prompt", o.n_prompt, "prompt tokens (pp tests)")
      ->delimiter(',')
      ->capture_default_str();
  b->add_option("-n,--n-gen", o.n_gen, "generated tokens (tg tests)")
      ->delimiter(',')
      ->capture_default_str();
  b->add_option("--prompt-gen", o.prompt_gen, "(-pg N,M) prompt then generation; repeatable");
  b->add_option("-d,--n-depth", o.n_depth,
                "tokens already in the context before each test (prefilled untimed), as "
                "llama-bench's -d")
      ->delimiter(',')
      ->capture_default_str();
  b->add_option("-r,--repetitions", o.repetitions, "timed runs per test, after one warm-up")
      ->capture_default_str();
  b->add_option("-b,--batch-size", o.n_batch, "chunk sizes")->delimiter(',')->capture_default_str();
  b->add_option("--ubatch-size", o.n_ubatch,
                "(-ub) micro-batch sizes (0: the backend's choice, 2048 on CUDA, 512 elsewhere)")
      ->delimiter(',')
      ->capture_default_str();
  b->add_option("-t,--threads", o.n_threads, "CPU threads (0: all cores)")
      ->delimiter(',')
      ->capture_default_str();
  b->add_option("--n-gpu-layers", o.n_gpu_layers, "(-ngl) layers on the GPU backend")
      ->delimiter(',')
      ->capture_default_str();
  b->add_option("--cache-type-k", o.type_k, "(-ctk) KV cache types for K: f16, q8_0, q4_0")
      ->delimiter(',')
      ->capture_default_str();
  b->add_option("--cache-type-v", o.type_v, "(-ctv) KV cache types for V: f16, q8_0, q4_0")
      ->delimiter(',')
      ->capture_default_str();
  b->add_option("--backend", o.backends,
                "backends (available: " + backend::available_backends_text() + ")")
      ->delimiter(',')
      ->capture_default_str();
  b->add_option("--cl-platform", o.cl_platform,
                "OpenCL platform index (-1: the GPUs of every platform first)")
      ->capture_default_str();
  b->add_option("--cl-device", o.cl_device, "OpenCL device index (within --cl-platform if given)")
      ->capture_default_str();
  b->add_option("--chunking", o.chunking, "balanced and/or fixed (llama.cpp's split)")
      ->delimiter(',')
      ->capture_default_str();
  b->add_option("-o,--output", o.output, "output format: md, json, jsonl, csv")
      ->capture_default_str();
  b->add_option("--config", o.config, "settings file written by `kestrel tune`");
  b->add_option("--history", o.history, "append one JSON line per result to this file");
  b->add_option("--vs-llama-bench", o.vs_llama_bench,
                "llama-bench -o json output: add the ratio to llama.cpp's t/s");
  b->add_flag("--profile", o.profile,
              "time every op kind in the timed repetitions (adds a little overhead to t/s)");
  b->add_flag("--no-warmup", o.no_warmup, "skip the warm-up run");
  b->add_option("--seed", o.seed, "seed of the random token ids")->capture_default_str();
  o.command = b;
}

int bench_command(BenchOptions& o) {
  auto plan = make_plan(o);
  if (!plan) return fail(plan.message());
  auto printer = make_bench_printer(o.output, !o.vs_llama_bench.empty());
  emit(printer->header());
  std::vector<BenchResult> results;
  const Status st = run_plan(o, *plan, *printer, &results);
  emit(printer->footer(results));  // keeps what was written well-formed, even after an error
  if (!st) return fail(st.message());
  return 0;
}

}  // namespace kestrel::cli
