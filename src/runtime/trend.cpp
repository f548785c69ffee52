#include "runtime/trend.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <map>
#include <sstream>

#include "core/status.h"

namespace kestrel::runtime {

namespace {

using nlohmann::json;

const json* find(const json& j, const char* key) {
  if (!j.is_object()) return nullptr;
  auto it = j.find(key);
  return it == j.end() || it->is_null() ? nullptr : &*it;
}
std::string get_str(const json& j, const char* key, const std::string& def = "") {
  const json* v = find(j, key);
  if (!v) return def;
  if (v->is_string()) return v->get<std::string>();
  if (v->is_number()) return v->dump();
  return def;
}
int get_int(const json& j, const char* key, int def = 0) {
  const json* v = find(j, key);
  if (!v || !v->is_number()) return def;
  const double d = v->get<double>();
  return std::isfinite(d) && std::fabs(d) < 2e9 ? static_cast<int>(d) : def;
}
std::optional<double> get_num(const json& j, const char* key) {
  const json* v = find(j, key);
  if (!v || !v->is_number()) return std::nullopt;
  const double d = v->get<double>();
  if (!std::isfinite(d)) return std::nullopt;
  return d;
}

std::string basename_of(const std::string& path) {
  const size_t slash = path.find_last_of("/\\");
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

// "0.1.0 (e4da511)" -> "e4da511"; anything else as it is.
std::string git_version(const std::string& v) {
  const size_t open = v.rfind('(');
  const size_t close = v.rfind(')');
  if (open != std::string::npos && close != std::string::npos && close > open + 1)
    return v.substr(open + 1, close - open - 1);
  return v.empty() ? "-" : v;
}

// recorded_at (seconds since the epoch) or llama-bench's test_time ("2024-11-17T00:12:04Z").
std::string record_date(const json& j) {
  if (auto t = get_num(j, "recorded_at"); t && *t > 0) {
    const std::time_t tt = static_cast<std::time_t>(*t);
    std::tm tm{};
    if (gmtime_r(&tt, &tm)) {
      char buf[32];
      std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M", &tm);
      return buf;
    }
  }
  std::string s = get_str(j, "test_time");
  if (s.size() >= 16 && s[10] == 'T') {
    s = s.substr(0, 16);
    s[10] = ' ';
    return s;
  }
  return s.empty() ? "-" : s;
}

std::string kind_of(const json& j) {
  const std::string k = get_str(j, "kind");
  if (!k.empty()) return k;
  if (find(j, "prompt_tokens")) return "run";
  if (find(j, "avg_ts")) return "bench";
  return "";
}

// A run record: the report JSON of runtime/report.h. Empty string when usable, else why not.
std::string parse_run(const json& j, TrendRow* r) {
  const json* model = find(j, "model");
  if (model && model->is_object()) {
    r->model = basename_of(get_str(*model, "path"));
    if (r->model.empty()) r->model = get_str(*model, "name");
  } else if (model && model->is_string()) {
    r->model = basename_of(model->get<std::string>());
  }
  r->version = git_version(get_str(j, "version"));
  r->device = get_str(j, "device");
  static const json kEmpty = json::object();
  const json* s = find(j, "settings");
  const json& st = s && s->is_object() ? *s : kEmpty;
  r->n_batch = get_int(st, "n_batch");
  r->n_ubatch = get_int(st, "n_ubatch");
  r->n_threads = get_int(st, "n_threads");
  r->n_gpu_layers = get_int(st, "n_gpu_layers");
  r->type_k = get_str(st, "type_k", "?");
  r->type_v = get_str(st, "type_v", "?");
  r->chunking = get_str(st, "chunking");
  r->prompt_tokens = get_int(j, "prompt_tokens");
  if (r->prompt_tokens <= 0) return "no prompt tokens";
  auto ms = get_num(j, "ms_per_token");
  if (!ms) {
    auto total = get_num(j, "total_ms");
    if (total) ms = *total / r->prompt_tokens;
  }
  if (!ms || *ms <= 0) return "no prompt timing (ms_per_token)";
  r->ms_per_token = *ms;
  r->tokens_per_s = 1000.0 / *ms;
  r->test = "pp" + std::to_string(r->prompt_tokens);
  if (const json* g = find(j, "generation")) r->gen_tokens = get_int(*g, "tokens");
  if (const json* chunks = find(j, "chunks"); chunks && chunks->is_array()) {
    for (const auto& c : *chunks) {
      auto cm = get_num(c, "ms_per_token");
      if (!cm) {
        auto cms = get_num(c, "ms");
        const int n = get_int(c, "n_tokens");
        if (cms && n > 0) cm = *cms / n;
      }
      r->chunk_ms_per_token.push_back(cm.value_or(0.0));
    }
  }
  return "";
}

// A bench record: llama-bench's fields.
std::string parse_bench(const json& j, TrendRow* r) {
  r->model = basename_of(get_str(j, "model_filename", get_str(j, "model")));
  std::string v = get_str(j, "kestrel_version");
  if (v.empty()) v = get_str(j, "build_commit");
  r->version = git_version(v);
  r->device = get_str(j, "device");
  r->n_batch = get_int(j, "n_batch");
  r->n_ubatch = get_int(j, "n_ubatch");
  r->n_threads = get_int(j, "n_threads");
  r->n_gpu_layers = get_int(j, "n_gpu_layers");
  r->type_k = get_str(j, "type_k", "?");
  r->type_v = get_str(j, "type_v", "?");
  r->chunking = get_str(j, "chunking");
  r->prompt_tokens = std::max(0, get_int(j, "n_prompt"));
  r->gen_tokens = std::max(0, get_int(j, "n_gen"));
  if (r->prompt_tokens == 0 && r->gen_tokens == 0) return "neither n_prompt nor n_gen";
  auto ts = get_num(j, "avg_ts");
  if (!ts || *ts <= 0) return "no avg_ts";
  r->tokens_per_s = *ts;
  r->ms_per_token = 1000.0 / *ts;
  r->stddev_ts = get_num(j, "stddev_ts").value_or(0.0);
  if (r->prompt_tokens > 0) r->test = "pp" + std::to_string(r->prompt_tokens);
  if (r->gen_tokens > 0)
    r->test += (r->test.empty() ? "tg" : "+tg") + std::to_string(r->gen_tokens);
  return "";
}

std::string range(double a, double b, const char* f) {
  return format(f, a) + "-" + format(f, b);
}

std::string change_cell(const TrendRow& r) {
  if (r.baseline > 0)
    return (r.change_pct >= 0 ? "+" : "") + format("%.1f", r.change_pct) + "% (" +
           format("%.2f", r.speedup) + "x, vs #" + std::to_string(r.baseline) + ")";
  return r.is_baseline ? "baseline" : "-";
}

std::string kind_cell(const TrendRow& r) {
  if (r.kind == "run") return "run";
  return r.gen_tokens > 0 ? "bench " + r.test : "bench";
}

}  // namespace

std::string TrendRow::settings_summary() const {
  std::string s = "b=" + std::to_string(n_batch) + " ub=" + std::to_string(n_ubatch) +
                  " ctk=" + type_k + " ctv=" + type_v + " t=" + std::to_string(n_threads) +
                  " ngl=" + std::to_string(n_gpu_layers);
  if (!chunking.empty() && chunking != "balanced") s += " " + chunking;
  return s;
}

bool TrendRow::is_prompt_test() const {
  return kind == "run" || gen_tokens == 0;
}

std::string TrendRow::comparable_key() const {
  return model + "|" + device + "|" + test + "|" + settings_summary() + "|" +
         (chunking.empty() ? "balanced" : chunking);
}

Expected<Trend> build_trend(const std::vector<json>& records) {
  Trend t;
  std::map<std::string, size_t> first;  // comparable key -> row index of its first record
  for (size_t i = 0; i < records.size(); ++i) {
    const json& j = records[i];
    TrendRow r;
    r.record = static_cast<int>(i + 1);
    r.kind = kind_of(j);
    std::string why;
    if (r.kind == "run")
      why = parse_run(j, &r);
    else if (r.kind == "bench")
      why = parse_bench(j, &r);
    else
      why = r.kind.empty() ? "no \"kind\" (run or bench)"
                           : "kind \"" + r.kind + "\" is not run or bench";
    if (!why.empty()) {
      t.notes.push_back("record " + std::to_string(r.record) + " skipped: " + why);
      continue;
    }
    r.date = record_date(j);
    auto [it, inserted] = first.emplace(r.comparable_key(), t.rows.size());
    if (!inserted) {
      TrendRow& base = t.rows[it->second];
      base.is_baseline = true;
      r.baseline = base.record;
      r.change_pct = 100.0 * (base.ms_per_token - r.ms_per_token) / base.ms_per_token;
      r.speedup = base.ms_per_token / r.ms_per_token;
    }
    t.rows.push_back(std::move(r));
  }
  if (t.rows.empty()) {
    std::string why = "no run or bench record to show";
    if (!t.notes.empty()) why += " (" + t.notes.front() + ")";
    return Status::error(why);
  }
  return t;
}

TargetRow target_row(const TrendRow& row, const TargetRange& target) {
  TargetRow t;
  t.record = row.record;
  t.low_ms = target.low_ms;
  t.high_ms = target.high_ms;
  t.now_ms = row.ms_per_token;
  t.now_tps = row.tokens_per_s;
  t.met = t.now_ms <= t.high_ms;
  t.met_best = t.now_ms <= t.low_ms;
  t.reached_low_pct = std::min(100.0, 100.0 * t.low_ms / t.now_ms);
  t.reached_high_pct = std::min(100.0, 100.0 * t.high_ms / t.now_ms);
  if (!t.met) {
    t.short_ms_high = t.now_ms - t.high_ms;
    t.short_tps_high = 1000.0 / t.high_ms - t.now_tps;
    t.factor_high = t.now_ms / t.high_ms;
  }
  if (!t.met_best) {
    t.short_ms_low = t.now_ms - t.low_ms;
    t.short_tps_low = 1000.0 / t.low_ms - t.now_tps;
    t.factor_low = t.now_ms / t.low_ms;
  }
  return t;
}

std::string render_trend_markdown(const Trend& t, const std::vector<TargetRow>& target_rows) {
  std::ostringstream o;
  o << "## Trend\n| # | version | date | kind | model | settings | prompt tokens | ms/token | "
       "tokens/s | change vs first |\n|---|---|---|---|---|---|---|---|---|---|\n";
  for (const auto& r : t.rows) {
    o << "| " << r.record << " | " << r.version << " | " << r.date << " | " << kind_cell(r) << " | "
      << r.model << " | " << r.settings_summary() << " | "
      << (r.prompt_tokens > 0 ? std::to_string(r.prompt_tokens) : "-") << " | "
      << format("%.2f", r.ms_per_token) << " | " << format("%.2f", r.tokens_per_s);
    if (r.stddev_ts > 0) o << " ± " << format("%.2f", r.stddev_ts);
    o << " | " << change_cell(r) << " |\n";
  }
  o << "\nchange: ms/token saved against the first record with the same model, device, test "
       "and settings (+ is faster).\n";
  for (const auto& n : t.notes) o << "- " << n << "\n";
  if (target_rows.empty()) return o.str();
  const auto& first = target_rows.front();
  o << "\n## Against the target (" << format("%g", first.low_ms) << "-"
    << format("%g", first.high_ms)
    << " ms/token)\n| # | item | target | now | reached | short by |\n"
       "|---|---|---|---|---|---|\n";
  for (const auto& g : target_rows) {
    // Within range but not at the better end: how close to it, in each row's own unit.
    auto reached = [&](double best_end, const char* unit) {
      if (g.met_best) return std::string("yes");
      if (g.met)
        return "within range (" + format("%.1f", g.reached_low_pct) + "% of " +
               format("%g", best_end) + " " + unit + ")";
      return range(g.reached_low_pct, g.reached_high_pct, "%.1f") + "%";
    };
    std::string short_ms, short_tps;
    if (g.met_best) {
      short_ms = short_tps = "-";
    } else if (g.met) {
      short_ms = format("%.2f", g.short_ms_low) + " ms/token to the better end (" +
                 format("%.2f", g.factor_low) + "x)";
      short_tps = format("%.2f", g.short_tps_low) + " tokens/s to the better end";
    } else {
      short_ms = range(g.short_ms_high, g.short_ms_low, "%.2f") + " ms/token (" +
                 range(g.factor_high, g.factor_low, "%.2f") + "x too slow)";
      short_tps = range(g.short_tps_high, g.short_tps_low, "%.2f") + " tokens/s";
    }
    o << "| " << g.record << " | prompt evaluation | " << range(g.low_ms, g.high_ms, "%g")
      << " ms/token | " << format("%.2f", g.now_ms) << " ms/token | "
      << reached(g.low_ms, "ms/token") << " | " << short_ms << " |\n";
    o << "| " << g.record << " | throughput | " << range(1000 / g.high_ms, 1000 / g.low_ms, "%g")
      << " tokens/s | " << format("%.2f", g.now_tps) << " tokens/s | "
      << reached(1000 / g.low_ms, "tokens/s") << " | " << short_tps << " |\n";
  }
  return o.str();
}

json trend_to_json(const Trend& t, const std::vector<TargetRow>& target_rows,
                   const std::optional<TargetRange>& target) {
  json rows = json::array();
  for (const auto& r : t.rows) {
    json row = {{"record", r.record},
                {"kind", r.kind},
                {"version", r.version},
                {"date", r.date},
                {"model", r.model},
                {"device", r.device},
                {"test", r.test},
                {"settings",
                 {{"n_batch", r.n_batch},
                  {"n_ubatch", r.n_ubatch},
                  {"type_k", r.type_k},
                  {"type_v", r.type_v},
                  {"n_threads", r.n_threads},
                  {"n_gpu_layers", r.n_gpu_layers},
                  {"chunking", r.chunking.empty() ? json(nullptr) : json(r.chunking)}}},
                {"settings_summary", r.settings_summary()},
                {"prompt_tokens", r.prompt_tokens},
                {"gen_tokens", r.gen_tokens},
                {"ms_per_token", r.ms_per_token},
                {"tokens_per_s", r.tokens_per_s},
                {"baseline", r.baseline > 0 ? json(r.baseline) : json(nullptr)},
                {"is_baseline", r.is_baseline},
                {"change_pct", r.baseline > 0 ? json(r.change_pct) : json(nullptr)},
                {"speedup", r.baseline > 0 ? json(r.speedup) : json(nullptr)}};
    if (r.kind == "bench") row["stddev_ts"] = r.stddev_ts;
    if (!r.chunk_ms_per_token.empty()) row["chunk_ms_per_token"] = r.chunk_ms_per_token;
    rows.push_back(std::move(row));
  }
  json j = {{"records", rows}, {"notes", t.notes}};
  if (target) {
    json tr = json::array();
    for (const auto& g : target_rows)
      tr.push_back({{"record", g.record},
                    {"now_ms_per_token", g.now_ms},
                    {"now_tokens_per_s", g.now_tps},
                    {"met", g.met},
                    {"met_best", g.met_best},
                    // "high": the acceptable end of the target, "low": the better end.
                    {"reached_pct", {{"high", g.reached_high_pct}, {"low", g.reached_low_pct}}},
                    {"short_ms_per_token", {{"high", g.short_ms_high}, {"low", g.short_ms_low}}},
                    {"short_tokens_per_s", {{"high", g.short_tps_high}, {"low", g.short_tps_low}}},
                    {"factor", {{"high", g.factor_high}, {"low", g.factor_low}}}});
    j["target"] = {
        {"low_ms_per_token", target->low_ms}, {"high_ms_per_token", target->high_ms}, {"rows", tr}};
  }
  return j;
}

}  // namespace kestrel::runtime
