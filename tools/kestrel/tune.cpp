// `kestrel tune`: finds the fastest settings for evaluating a prompt of a given length on this
// machine (and, with --decode, for prompt plus generation), and writes them to a settings file
// that `run --config` and `bench --config` load.
//
// The search is coordinate descent, not a grid: start from the defaults, sweep one setting
// at a time (micro-batch, chunk size, threads, KV cache type, and where the build has a GPU
// backend, the layers placed on it) with the others at their best
// so far, keep the winner, and repeat the sweep while it still finds something faster (at
// most three rounds). A grid of 6 x 6 x 3 x 3 = 324 runs becomes about 20-40.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <map>
#include <random>
#include <thread>

#include "backend/registry.h"
#include "commands.h"
#include "generate.h"
#include "runtime/settings.h"

namespace kestrel::cli {

namespace {

struct Point {
  int n_batch = 512, n_ubatch = 512, n_threads = 0;
  std::string kv = "f16";
  std::string backend = "cpu";
  int n_gpu_layers = 0;
  bool operator<(const Point& o) const {
    return std::tie(n_batch, n_ubatch, n_threads, kv, backend, n_gpu_layers) <
           std::tie(o.n_batch, o.n_ubatch, o.n_threads, o.kv, o.backend, o.n_gpu_layers);
  }
  std::string describe() const {
    std::string s = format("-b %d -ub %d -t %d -ctk %s -ctv %s", n_batch, n_ubatch, n_threads,
                           kv.c_str(), kv.c_str());
    if (n_gpu_layers > 0) s += format(" --backend %s -ngl %d", backend.c_str(), n_gpu_layers);
    return s;
  }
};

struct Trial {
  Point p;
  double tokens_per_s = 0;  // median of the repetitions
  double ms = 0;            // one repetition, for the time estimate
};

class Tuner {
 public:
  Tuner(const TuneOptions& o) : o_(o) {}

  Status measure(const Point& p, Trial* out) {
    KESTREL_TRY(load_for(p));
    runtime::SessionParams sp;
    sp.n_ctx = o_.n_prompt + o_.n_gen + 1;
    sp.n_batch = p.n_batch;
    sp.n_ubatch = p.n_ubatch;
    quant::parse_type(p.kv.c_str(), &sp.type_k);
    sp.type_v = sp.type_k;
    KESTREL_ASSIGN_OR_RETURN(auto session, runtime::Session::create(*model_, sp));
    std::vector<double> rates;
    double last_ms = 0;
    for (int r = 0; r <= o_.repetitions; ++r) {  // the first run warms up and is not counted
      session->truncate(0);
      const auto t0 = std::chrono::steady_clock::now();
      KESTREL_TRY(session->prefill(prompt_, nullptr));
      int32_t next = prompt_.back();
      for (int i = 0; i < o_.n_gen; ++i) {
        const auto& logits = session->last_logits();
        next =
            static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
        KESTREL_TRY(session->decode(next));
      }
      last_ms =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      if (r > 0) rates.push_back((o_.n_prompt + o_.n_gen) * 1000.0 / last_ms);
    }
    std::sort(rates.begin(), rates.end());
    *out = {p, rates[rates.size() / 2], last_ms};
    return Status::ok();
  }

  const std::string& device() const { return device_; }
  int n_layer() const { return model_ ? model_->config().n_layer : 0; }

 private:
  Status load_for(const Point& p) {
    if (model_ && loaded_.n_threads == p.n_threads && loaded_.backend == p.backend &&
        loaded_.n_gpu_layers == p.n_gpu_layers)
      return Status::ok();
    model_.reset();  // free the previous placement first
    model::LoadParams lp;
    lp.n_threads = p.n_threads;
    lp.backend = p.backend;
    lp.n_gpu_layers = p.n_gpu_layers;
    KESTREL_ASSIGN_OR_RETURN(model_, model::Model::load(o_.model, lp));
    loaded_ = p;
    device_ = model_->primary_backend()->device_name();
    if (prompt_.empty()) {  // random ids within the vocabulary: speed does not depend on them
      std::mt19937 rng(1234);
      const int n_vocab = model_->config().n_vocab;
      for (int i = 0; i < o_.n_prompt; ++i)
        prompt_.push_back(static_cast<int32_t>(rng() % n_vocab));
    }
    return Status::ok();
  }

  const TuneOptions& o_;
  std::unique_ptr<model::Model> model_;
  Point loaded_;
  std::string device_;
  std::vector<int32_t> prompt_;
};

// The values each setting may take, for a prompt of n_prompt tokens on n_cores cores.
std::vector<std::vector<int>> candidate_values(int n_prompt, int n_cores) {
  std::vector<int> batch, ubatch, threads;
  for (int b = 32; b < 2 * n_prompt && b <= 4096; b *= 2) batch.push_back(b);
  if (batch.empty() || batch.back() < n_prompt) batch.push_back(std::max(n_prompt, 1));
  for (int u = 8; u <= 1024; u *= 2) ubatch.push_back(u);
  for (int t : {1, n_cores / 2, n_cores, n_cores + n_cores / 2})
    if (t >= 1 && std::find(threads.begin(), threads.end(), t) == threads.end())
      threads.push_back(t);
  return {batch, ubatch, threads};
}

}  // namespace

void add_tune_command(CLI::App& app, TuneOptions& o) {
  CLI::App* c = app.add_subcommand("tune", "Find the fastest settings for this model and machine");
  c->add_option("-m,--model", o.model, "GGUF model")->required();
  c->add_option("-p,--n-prompt", o.n_prompt, "prompt length to tune for")->capture_default_str();
  c->add_flag("--decode", o.decode, "tune prompt plus generation (-n tokens), not prompt alone");
  c->add_option("-n,--n-gen", o.n_gen_decode, "tokens generated per trial with --decode")
      ->capture_default_str();
  c->add_option("-r,--repetitions", o.repetitions, "timed runs per trial (after one warm-up)")
      ->capture_default_str();
  c->add_option("-o,--output", o.output, "settings file to write")->capture_default_str();
  c->add_option("--max-trials", o.max_trials, "stop after this many trials")->capture_default_str();
}

int tune_command(TuneOptions& o) {
  if (o.n_prompt < 1 || o.n_prompt > 1 << 20) return fail("-p must be between 1 and 1048576");
  if (o.repetitions < 1) return fail("-r must be at least 1");
  if (o.n_gen_decode < 1) return fail("-n must be at least 1");
  if (o.max_trials < 1) return fail("--max-trials must be at least 1");
  o.n_gen = o.decode ? o.n_gen_decode : 0;
  const int n_cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const auto values = candidate_values(o.n_prompt, n_cores);
  const std::vector<std::string> kv_types{"f16", "q8_0", "q4_0"};

  Tuner tuner(o);
  std::map<Point, Trial> tried;
  double best_rate = 0;
  Point best;
  best.n_threads = n_cores;
  best.n_batch = 512;
  best.n_ubatch = 512;
  auto trial = [&](const Point& p, Trial* out) -> Status {
    if (auto it = tried.find(p); it != tried.end()) {
      *out = it->second;
      return Status::ok();
    }
    Status m = tuner.measure(p, out);
    if (!m && p.n_gpu_layers == 0) return m;
    if (!m) {  // a GPU placement that does not fit: say so and go on
      std::fprintf(stderr, "[%zu] %s: skipped: %s\n", tried.size() + 1, p.describe().c_str(),
                   m.message().c_str());
      *out = {p, 0.0, 0.0};
      tried[p] = *out;
      return Status::ok();
    }
    tried[p] = *out;
    best_rate = std::max(best_rate, out->tokens_per_s);
    std::fprintf(stderr, "[%zu] %s: %.1f t/s (best so far %.1f)\n", tried.size(),
                 p.describe().c_str(), out->tokens_per_s, best_rate);
    return Status::ok();
  };
  Trial base;
  Status st = trial(best, &base);
  if (!st) return fail(st.message());
  // Placement: every GPU backend of the build (backend/registry.h) with all layers and the
  // head, all layers, half and a quarter of them; the CPU alone is the starting point. A
  // placement that does not fit the device's memory fails to load and is skipped.
  std::vector<std::pair<std::string, int>> placements{{"cpu", 0}};
  for (const std::string& b : backend::available_backends()) {
    if (!backend::is_gpu_backend(b) || !backend::probe_backend(b).is_ok()) continue;
    const int L = tuner.n_layer();
    for (int n : {L + 1, L, L / 2, L / 4})
      if (n > 0) placements.emplace_back(b, n);
  }
  const int per_round = static_cast<int>(values[0].size() + values[1].size() + values[2].size() +
                                         kv_types.size() + placements.size() - 1);
  std::fprintf(
      stderr,
      "tuning %s for %s: about %d trials per round, at most 3 rounds; one trial takes "
      "~%.1f s, so about %.0f-%.0f s in all (a full grid would be %zu trials)\n",
      o.model.c_str(), o.decode ? "prompt + generation" : "prompt evaluation", per_round,
      base.ms * (o.repetitions + 1) / 1000.0, per_round * base.ms * (o.repetitions + 1) / 1000.0,
      3 * per_round * base.ms * (o.repetitions + 1) / 1000.0,
      values[0].size() * values[1].size() * values[2].size() * kv_types.size() * placements.size());
  // The settings swept, one at a time, each over its candidate values.
  struct Dimension {
    size_t count;
    std::function<void(Point&, size_t)> set;
  };
  const std::vector<Dimension> dims = {
      {values[1].size(), [&](Point& p, size_t i) { p.n_ubatch = values[1][i]; }},
      {values[0].size(),
       [&](Point& p, size_t i) {
         p.n_batch = values[0][i];
         p.n_ubatch = std::min(p.n_ubatch, p.n_batch);  // a smaller chunk caps the micro-batch
       }},
      {values[2].size(), [&](Point& p, size_t i) { p.n_threads = values[2][i]; }},
      {kv_types.size(), [&](Point& p, size_t i) { p.kv = kv_types[i]; }},
      {placements.size(),
       [&](Point& p, size_t i) {
         p.backend = placements[i].first;
         p.n_gpu_layers = placements[i].second;
       }},
  };
  Trial winner = base;
  for (int round = 0; round < 3; ++round) {
    const Point start = winner.p;
    for (const Dimension& d : dims) {
      for (size_t i = 0; i < d.count && static_cast<int>(tried.size()) < o.max_trials; ++i) {
        Point p = winner.p;
        d.set(p, i);
        if (p.n_ubatch > p.n_batch) continue;  // the same as n_ubatch = n_batch
        Trial t;
        st = trial(p, &t);
        if (!st) return fail(st.message());
        if (t.tokens_per_s > winner.tokens_per_s) winner = t;
      }
    }
    if (!(start < winner.p) && !(winner.p < start)) break;  // a round without a change: done
  }

  const double search_base_rate = base.tokens_per_s;  // the table compares search figures
  // Confirm in one run: the defaults and the winner measured again, alternately, so that a
  // lucky trial cannot pass for a win. If the winner is not faster here, keep the defaults.
  double base_sum = 0, winner_sum = 0;
  for (int i = 0; i < 3 && (winner.p < base.p || base.p < winner.p); ++i) {
    Trial again_base, again_winner;
    st = tuner.measure(base.p, &again_base);
    if (st) st = tuner.measure(winner.p, &again_winner);
    if (!st) return fail(st.message());
    base_sum += again_base.tokens_per_s;
    winner_sum += again_winner.tokens_per_s;
  }
  if (base_sum > 0) {
    std::fprintf(stderr, "confirming in one run: defaults %.1f t/s, winner %.1f t/s\n",
                 base_sum / 3, winner_sum / 3);
    if (winner_sum <= base_sum) {
      std::fprintf(stderr, "the winner was not faster when measured again: keeping the defaults\n");
      winner = base;
    }
    base.tokens_per_s = base_sum / 3;
    winner.tokens_per_s = winner_sum <= base_sum ? base_sum / 3 : winner_sum / 3;
  }

  std::vector<Trial> rows;
  for (const auto& [p, t] : tried) rows.push_back(t);
  std::sort(rows.begin(), rows.end(),
            [](const Trial& a, const Trial& b) { return a.tokens_per_s > b.tokens_per_s; });
  std::printf("| n_batch | n_ubatch | threads | KV cache | placement | t/s | vs defaults |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  for (const Trial& t : rows) {
    const bool is_default = !(t.p < base.p) && !(base.p < t.p);
    const bool is_winner = !(t.p < winner.p) && !(winner.p < t.p);
    const std::string placement =
        t.p.n_gpu_layers > 0 ? format("%s -ngl %d", t.p.backend.c_str(), t.p.n_gpu_layers) : "cpu";
    const std::string rate = t.tokens_per_s > 0 ? format("%.1f", t.tokens_per_s) : "does not fit";
    std::printf("| %d | %d | %d | %s | %s | %s | %.2fx%s%s |\n", t.p.n_batch, t.p.n_ubatch,
                t.p.n_threads, t.p.kv.c_str(), placement.c_str(), rate.c_str(),
                t.tokens_per_s / search_base_rate, is_winner ? " **winner**" : "",
                is_default ? " (defaults)" : "");
  }
  runtime::Settings s;
  s.n_batch = winner.p.n_batch;
  s.n_ubatch = winner.p.n_ubatch;
  s.n_threads = winner.p.n_threads;
  s.type_k = s.type_v = winner.p.kv;
  s.n_gpu_layers = winner.p.n_gpu_layers;
  s.backend = winner.p.backend;
  s.tuned_for = {{"model", o.model},
                 {"n_prompt", o.n_prompt},
                 {"n_gen", o.n_gen},
                 {"device", tuner.device()},
                 {"confirmed_in_one_run", base_sum > 0},
                 {"tokens_per_s", winner.tokens_per_s},
                 {"defaults_tokens_per_s", base.tokens_per_s},
                 {"trials", tried.size()},
                 {"version", std::string(KESTREL_VERSION) + " (" + KESTREL_GIT_VERSION + ")"}};
  st = runtime::save_settings(o.output, s);
  if (!st) return fail(st.message());
  std::printf("\nwinner: %s, %.1f t/s (%.2fx the defaults' %.1f) after %zu trials; written to %s\n",
              winner.p.describe().c_str(), winner.tokens_per_s,
              winner.tokens_per_s / base.tokens_per_s, base.tokens_per_s, tried.size(),
              o.output.c_str());
  return 0;
}

}  // namespace kestrel::cli
