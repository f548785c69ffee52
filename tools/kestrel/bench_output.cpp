#include "bench_output.h"

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

namespace kestrel::cli {

namespace {

double mean(const std::vector<double>& v) {
  double sum = 0;
  for (double x : v) sum += x;
  return v.empty() ? 0 : sum / static_cast<double>(v.size());
}

// Sample standard deviation (n - 1), 0 for fewer than two samples, as llama-bench.
double stddev(const std::vector<double>& v) {
  if (v.size() < 2) return 0;
  const double m = mean(v);
  double sq = 0;
  for (double x : v) sq += (x - m) * (x - m);
  return std::sqrt(sq / static_cast<double>(v.size() - 1));
}

std::vector<double> as_doubles(const std::vector<uint64_t>& v) {
  return std::vector<double>(v.begin(), v.end());
}

std::string printf_string(const char* fmt, double a, double b = 0) {
  char buf[128];
  std::snprintf(buf, sizeof(buf), fmt, a, b);
  return buf;
}

std::string human_size(uint64_t bytes) {
  const double mib = static_cast<double>(bytes) / (1024.0 * 1024.0);
  return mib < 1024 ? printf_string("%.2f MiB", mib) : printf_string("%.2f GiB", mib / 1024.0);
}

std::string human_params(uint64_t n) {
  const double d = static_cast<double>(n);
  return d < 1e9 ? printf_string("%.2f M", d / 1e6) : printf_string("%.2f B", d / 1e9);
}

}  // namespace

std::string BenchResult::test_name() const {
  const std::string at = n_depth > 0 ? " @ d" + std::to_string(n_depth) : "";
  if (n_gen == 0) return "pp" + std::to_string(n_prompt) + at;
  if (n_prompt == 0) return "tg" + std::to_string(n_gen) + at;
  return "pp" + std::to_string(n_prompt) + "+tg" + std::to_string(n_gen) + at;
}

std::vector<double> BenchResult::samples_ts() const {
  std::vector<double> ts;
  for (uint64_t ns : samples_ns)
    ts.push_back(ns ? 1e9 * (n_prompt + n_gen) / static_cast<double>(ns) : 0.0);
  return ts;
}

double BenchResult::avg_ns() const {
  return mean(as_doubles(samples_ns));
}
double BenchResult::stddev_ns() const {
  return stddev(as_doubles(samples_ns));
}
double BenchResult::avg_ts() const {
  return mean(samples_ts());
}
double BenchResult::stddev_ts() const {
  return stddev(samples_ts());
}

std::optional<double> BenchResult::vs_llama_cpp() const {
  if (!llama_bench_ts || *llama_bench_ts <= 0) return std::nullopt;
  return avg_ts() / *llama_bench_ts;
}

nlohmann::ordered_json bench_result_json(const BenchResult& r) {
  nlohmann::ordered_json j;
  j["build_commit"] = r.build_commit;
  j["kestrel_version"] = r.kestrel_version;
  j["cpu_info"] = r.cpu_info;
  j["gpu_info"] = r.gpu_info;
  j["backends"] = r.backend;
  j["device"] = r.device;
  j["model_filename"] = r.model_filename;
  j["model_type"] = r.model_type;
  j["model_size"] = r.model_size;
  j["model_n_params"] = r.model_n_params;
  j["n_batch"] = r.n_batch;
  j["n_ubatch"] = r.n_ubatch;
  if (!r.device_memory.is_null()) j["device_memory"] = r.device_memory;
  j["n_threads"] = r.n_threads;
  j["type_k"] = r.type_k;
  j["type_v"] = r.type_v;
  j["n_gpu_layers"] = r.n_gpu_layers;
  j["chunking"] = r.chunking;
  j["n_prompt"] = r.n_prompt;
  j["n_gen"] = r.n_gen;
  j["n_depth"] = r.n_depth;
  j["test"] = r.test_name();
  j["test_time"] = r.test_time;
  j["avg_ns"] = static_cast<uint64_t>(std::llround(r.avg_ns()));
  j["stddev_ns"] = static_cast<uint64_t>(std::llround(r.stddev_ns()));
  j["avg_ts"] = r.avg_ts();
  j["stddev_ts"] = r.stddev_ts();
  if (r.compared) {
    j["llama_bench_avg_ts"] =
        r.llama_bench_ts ? nlohmann::ordered_json(*r.llama_bench_ts) : nlohmann::ordered_json();
    const auto ratio = r.vs_llama_cpp();
    j["vs_llama_cpp"] = ratio ? nlohmann::ordered_json(*ratio) : nlohmann::ordered_json();
  }
  j["samples_ns"] = r.samples_ns;
  j["samples_ts"] = r.samples_ts();
  if (!r.profile.is_null()) j["profile"] = r.profile;
  return j;
}

namespace {

// llama-bench's table: one row per test, t/s as "mean ± sd".
class MarkdownPrinter final : public BenchPrinter {
 public:
  explicit MarkdownPrinter(bool compare) {
    columns_ = {{"model", -30}, {"size", 10},   {"params", 10},  {"backend", -7},
                {"threads", 7}, {"n_batch", 7}, {"n_ubatch", 8}, {"type_k", -6},
                {"type_v", -6}, {"ngl", 3},     {"test", 13},    {"t/s", 20}};
    if (compare) columns_.push_back({"vs llama.cpp", 12});
  }

  std::string header() override {
    std::string names = "|", rule = "|";
    for (const Column& c : columns_) {
      names.append(" ").append(pad(c.name, c.width)).append(" |");
      const size_t w = static_cast<size_t>(std::abs(c.width));
      rule.append(" ").append(w - 1, '-').append(c.width > 0 ? ":" : "-").append(" |");
    }
    return names + "\n" + rule + "\n";
  }

  std::string row(const BenchResult& r) override {
    const std::vector<std::string> values = {
        r.model_type,
        human_size(r.model_size),
        human_params(r.model_n_params),
        r.backend,
        std::to_string(r.n_threads),
        std::to_string(r.n_batch),
        std::to_string(r.n_ubatch),
        r.type_k,
        r.type_v,
        std::to_string(r.n_gpu_layers),
        r.test_name(),
        printf_string("%.2f ± %.2f", r.avg_ts(), r.stddev_ts()),
        r.vs_llama_cpp() ? printf_string("%.2f", *r.vs_llama_cpp()) : "-",
    };
    std::string line = "|";
    for (size_t i = 0; i < columns_.size(); ++i) {
      // "±" takes two bytes for one column.
      const int extra = values[i].find("±") != std::string::npos ? 1 : 0;
      const int w = columns_[i].width;
      line.append(" ").append(pad(values[i], w > 0 ? w + extra : w - extra)).append(" |");
    }
    return line + "\n";
  }

  std::string footer(const std::vector<BenchResult>& all) override {
    std::string out = "\n";
    std::set<std::string> devices;
    for (const BenchResult& r : all)
      if (devices.insert(r.backend + ": " + r.device).second)
        out += "device: " + r.backend + ": " + r.device + "\n";
    out += "build: kestrel " + (all.empty() ? std::string() : all.front().kestrel_version) + "\n";
    for (const BenchResult& r : all) {
      if (r.profile_markdown.empty()) continue;
      out += "\n## Per-op profile: " + r.model_type + ", " + r.test_name() + ", b " +
             std::to_string(r.n_batch) + ", ub " + std::to_string(r.n_ubatch) + ", t " +
             std::to_string(r.n_threads) + ", " + r.type_k + "/" + r.type_v + "\n\n" +
             r.profile_markdown;
    }
    return out;
  }

 private:
  struct Column {
    std::string name;
    int width;  // negative: left-aligned
  };
  static std::string pad(const std::string& s, int width) {
    const size_t w = static_cast<size_t>(std::abs(width));
    if (s.size() >= w) return s;
    return width < 0 ? s + std::string(w - s.size(), ' ') : std::string(w - s.size(), ' ') + s;
  }
  std::vector<Column> columns_;
};

// A JSON array, one object per test, written as results come.
class JsonPrinter final : public BenchPrinter {
 public:
  std::string header() override { return "[\n"; }
  std::string row(const BenchResult& r) override {
    std::string text = bench_result_json(r).dump(2);
    std::string indented = first_ ? "  " : ",\n  ";
    first_ = false;
    for (char c : text) {
      indented += c;
      if (c == '\n') indented += "  ";
    }
    return indented;
  }
  std::string footer(const std::vector<BenchResult>&) override { return "\n]\n"; }

 private:
  bool first_ = true;
};

class JsonLinesPrinter final : public BenchPrinter {
 public:
  std::string row(const BenchResult& r) override { return bench_result_json(r).dump() + "\n"; }
};

// Header and one row per test with the scalar fields of the JSON record, every value quoted
// as llama-bench does.
class CsvPrinter final : public BenchPrinter {
 public:
  explicit CsvPrinter(bool compare) {
    BenchResult probe;
    probe.compared = compare;
    const nlohmann::ordered_json record = bench_result_json(probe);
    for (const auto& [key, value] : record.items())
      if (!value.is_array() && !value.is_object()) fields_.push_back(key);
  }
  std::string header() override { return join(fields_); }
  std::string row(const BenchResult& r) override {
    const nlohmann::ordered_json j = bench_result_json(r);
    std::vector<std::string> values;
    for (const std::string& f : fields_) {
      const auto& v = j.at(f);
      values.push_back(v.is_null() ? "" : v.is_string() ? v.get<std::string>() : v.dump());
    }
    return join(values);
  }

 private:
  static std::string join(const std::vector<std::string>& values) {
    std::string line;
    for (size_t i = 0; i < values.size(); ++i) {
      line += i ? ",\"" : "\"";
      for (char c : values[i]) line += c == '"' ? std::string("\"\"") : std::string(1, c);
      line += "\"";
    }
    return line + "\n";
  }
  std::vector<std::string> fields_;
};

}  // namespace

bool is_bench_format(const std::string& format) {
  return format == "md" || format == "json" || format == "jsonl" || format == "csv";
}

std::unique_ptr<BenchPrinter> make_bench_printer(const std::string& format, bool compare) {
  if (format == "json") return std::make_unique<JsonPrinter>();
  if (format == "jsonl") return std::make_unique<JsonLinesPrinter>();
  if (format == "csv") return std::make_unique<CsvPrinter>(compare);
  return std::make_unique<MarkdownPrinter>(compare);
}

namespace {

std::optional<int> optional_int(const nlohmann::json& j, const char* key) {
  if (!j.contains(key) || !j.at(key).is_number_integer()) return std::nullopt;
  return j.at(key).get<int>();
}

std::optional<std::string> optional_string(const nlohmann::json& j, const char* key) {
  if (!j.contains(key) || !j.at(key).is_string()) return std::nullopt;
  return j.at(key).get<std::string>();
}

Expected<LlamaBenchEntry> read_entry(const nlohmann::json& j) {
  if (!j.is_object()) return error("not a JSON object");
  for (const char* key : {"n_prompt", "n_gen"})
    if (!j.contains(key) || !j.at(key).is_number_integer())
      return error("'%s' is missing or not an integer", key);
  if (!j.contains("avg_ts") || !j.at("avg_ts").is_number())
    return error("'avg_ts' is missing or not a number");
  LlamaBenchEntry e;
  e.model_filename = optional_string(j, "model_filename").value_or("");
  e.n_prompt = j.at("n_prompt").get<int>();
  e.n_gen = j.at("n_gen").get<int>();
  e.n_depth = optional_int(j, "n_depth").value_or(0);
  e.n_batch = optional_int(j, "n_batch");
  e.n_ubatch = optional_int(j, "n_ubatch");
  e.n_threads = optional_int(j, "n_threads");
  e.type_k = optional_string(j, "type_k");
  e.type_v = optional_string(j, "type_v");
  e.avg_ts = j.at("avg_ts").get<double>();
  return e;
}

std::string base_name(const std::string& path) {
  return std::filesystem::path(path).filename().string();
}

}  // namespace

Expected<std::vector<LlamaBenchEntry>> load_llama_bench(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return error("--vs-llama-bench: cannot read '%s'", path.c_str());
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  std::vector<nlohmann::json> objects;
  const nlohmann::json whole = nlohmann::json::parse(text, nullptr, false);
  if (!whole.is_discarded() && whole.is_array()) {
    objects.assign(whole.begin(), whole.end());
  } else {  // llama-bench -o jsonl: one object per line
    std::istringstream lines(text);
    std::string line;
    while (std::getline(lines, line)) {
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
      if (j.is_discarded())
        return error(
            "--vs-llama-bench: '%s' is neither a JSON array nor JSON lines (write it with "
            "llama-bench -o json)",
            path.c_str());
      objects.push_back(j);
    }
  }
  std::vector<LlamaBenchEntry> entries;
  for (size_t i = 0; i < objects.size(); ++i) {
    auto e = read_entry(objects[i]);
    if (!e)
      return error("--vs-llama-bench: '%s', test %zu: %s", path.c_str(), i + 1,
                   e.message().c_str());
    entries.push_back(*e);
  }
  if (entries.empty()) return error("--vs-llama-bench: '%s' holds no tests", path.c_str());
  return entries;
}

std::optional<double> match_llama_bench(const std::vector<LlamaBenchEntry>& entries,
                                        const BenchResult& r) {
  std::set<std::string> models;
  for (const LlamaBenchEntry& e : entries) models.insert(base_name(e.model_filename));
  const bool any_model = models.size() == 1;
  auto same = [](const auto& theirs, const auto& ours) { return !theirs || *theirs == ours; };
  for (const LlamaBenchEntry& e : entries) {
    if (e.n_prompt != r.n_prompt || e.n_gen != r.n_gen || e.n_depth != r.n_depth) continue;
    if (!any_model && base_name(e.model_filename) != base_name(r.model_filename)) continue;
    if (!same(e.n_batch, r.n_batch) || !same(e.n_ubatch, r.n_ubatch) ||
        !same(e.n_threads, r.n_threads) || !same(e.type_k, r.type_k) || !same(e.type_v, r.type_v))
      continue;
    return e.avg_ts;
  }
  return std::nullopt;
}

}  // namespace kestrel::cli
