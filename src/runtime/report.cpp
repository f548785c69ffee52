#include "runtime/report.h"

#include <algorithm>
#include <cstdio>
#include <sstream>

#include "core/status.h"
#include "format/quant/types.h"

namespace kestrel::runtime {

bool parse_target(const std::string& s, TargetRange* out) {
  double lo = 0, hi = 0;
  char extra = 0;
  if (std::sscanf(s.c_str(), "%lf-%lf%c", &lo, &hi, &extra) != 2) return false;
  if (!(lo > 0) || !(hi >= lo)) return false;
  *out = {lo, hi};
  return true;
}

double PromptReport::total_ms() const {
  double t = 0;
  for (const auto& c : chunks) t += c.ms;
  return t;
}
double PromptReport::ms_per_token() const {
  return prompt_tokens ? total_ms() / prompt_tokens : 0;
}
double PromptReport::tokens_per_s() const {
  const double t = total_ms();
  return t > 0 ? prompt_tokens * 1000.0 / t : 0;
}

namespace {

double gib(int64_t bytes) {
  return static_cast<double>(bytes) / (1 << 30);
}

// 12345.6 -> "12,345.6": the seed's tables group thousands.
std::string grouped(double v, int decimals) {
  const std::string s = format(decimals == 0 ? "%.0f" : decimals == 1 ? "%.1f" : "%.2f", v);
  const size_t dot = s.find('.');
  const size_t end = dot == std::string::npos ? s.size() : dot;
  const size_t start = s[0] == '-' ? 1 : 0;
  std::string out = s.substr(0, start);
  for (size_t i = start; i < end; ++i) {
    out += s[i];
    const size_t left = end - i - 1;
    if (left > 0 && left % 3 == 0) out += ',';
  }
  return out + s.substr(end);
}

}  // namespace

namespace {

// One line per chunk: its three largest op kinds and their share of the chunk.
std::string profile_by_chunk(const PromptReport& r) {
  if (r.chunks.size() < 2) return "";
  std::string out = "\n| chunk | largest ops (share of the chunk) |\n|---|---|\n";
  for (const auto& c : r.chunks) {
    std::string ops;
    for (size_t i = 0; i < c.ops.size() && i < 3; ++i)
      ops += (i ? ", " : "") + c.ops[i].kind + " " + format("%.0f%%", 100.0 * c.ops[i].ms / c.ms);
    out += "| " + std::to_string(c.index + 1) + " | " + ops + " |\n";
  }
  return out;
}

}  // namespace

std::string chunk_note(const PromptReport& r, size_t i) {
  int largest = 0;
  for (const auto& c : r.chunks) largest = std::max(largest, c.n_tokens);
  std::string note;
  if (r.chunks.size() == 1)
    note = "single chunk";
  else if (i == 0)
    note = "first chunk";
  else if (i + 1 == r.chunks.size())
    note = "last chunk";
  else
    note = "middle chunk";
  if (r.chunks.size() > 1 && r.chunks[i].n_tokens * 4 < largest * 3)
    note += " (small: " + std::to_string(r.chunks[i].n_tokens) + " tokens)";
  if (r.chunks[i].n_ubatches > 1)
    note += ", " + std::to_string(r.chunks[i].n_ubatches) + " micro-batches";
  return note;
}

std::string render_markdown(const PromptReport& r) {
  std::ostringstream o;
  o << "# Prompt evaluation report\n\n## Result\n";
  o << "- Prompt: " << r.prompt_tokens << " tokens, " << grouped(r.total_ms(), 1)
    << " ms in all: **" << format("%.2f", r.ms_per_token()) << " ms/token**, **"
    << grouped(r.tokens_per_s(), 2) << " tokens/s**.\n";
  if (r.gen_tokens > 0)
    o << "- Generation: " << r.gen_tokens << " tokens, " << grouped(r.gen_ms, 1) << " ms: **"
      << grouped(r.gen_tokens * 1000.0 / r.gen_ms, 2) << " tokens/s**.\n";
  o << "\n| chunk | tokens | time | ms/token | note |\n|---|---|---|---|---|\n";
  for (size_t i = 0; i < r.chunks.size(); ++i) {
    const auto& c = r.chunks[i];
    o << "| " << i + 1 << " | " << c.first_token << "-" << c.first_token + c.n_tokens << " | "
      << grouped(c.ms, 1) << " ms | " << format("%.2f", c.ms / c.n_tokens) << " | "
      << chunk_note(r, i) << " |\n";
  }
  if (r.target) {
    const double now = r.ms_per_token(), lo = r.target->low_ms, hi = r.target->high_ms;
    auto range = [](double a, double b, const char* f) {
      return format(f, a) + "-" + format(f, b);
    };
    const bool met_hi = now <= hi, met_lo = now <= lo;
    o << "\n## Against the target\n| item | target | now | reached | short by |\n"
      << "|---|---|---|---|---|\n";
    o << "| prompt evaluation | " << range(lo, hi, "%g") << " ms/token | " << format("%.2f", now)
      << " ms/token | "
      << (met_lo ? std::string("yes")
                 : range(100 * lo / now, std::min(100.0, 100 * hi / now), "%.1f") + "%")
      << " | "
      << (met_hi ? (met_lo ? "-" : range(now / lo, 1.0, "%.2f") + "x")
                 : range(now / hi, now / lo, "%.2f") + "x too slow")
      << " |\n";
    o << "| throughput | " << range(1000 / hi, 1000 / lo, "%g") << " tokens/s | "
      << grouped(r.tokens_per_s(), 2) << " tokens/s | "
      << (met_lo ? std::string("yes")
                 : range(100 * lo / now, std::min(100.0, 100 * hi / now), "%.1f") + "%")
      << " | " << (met_hi ? std::string(met_lo ? "-" : "within range") : "too slow") << " |\n";
  }
  const auto& s = r.settings;
  o << "\n## Settings\n| setting | value |\n|---|---|\n";
  o << "| model | " << r.model_name << " (" << r.arch << ", " << r.model_path << ") |\n";
  o << "| backend | " << r.backend << ": " << r.device << " |\n";
  o << "| n_ctx | " << s.n_ctx << " |\n| n_batch | " << s.n_batch << " |\n| n_ubatch | "
    << s.n_ubatch << " |\n| chunking | " << chunking_name(s.chunking) << " |\n";
  o << "| n_gpu_layers | " << r.n_gpu_layers << " |\n| threads | " << r.n_threads << " |\n";
  o << "| KV cache | K " << quant::type_name(s.type_k) << ", V " << quant::type_name(s.type_v)
    << " |\n";
  o << "| load (before timing) | " << grouped(r.load_ms, 1) << " ms |\n";
  if (r.backend_setup_ms > 0 || !r.backend_setup_note.empty())
    o << "| backend setup (in load) | " << grouped(r.backend_setup_ms, 1) << " ms"
      << (r.backend_setup_note.empty() ? "" : ": " + r.backend_setup_note) << " |\n";
  if (r.memory.known)
    o << "| device memory | weights " << format("%.2f", gib(r.memory.weights)) << " GiB, KV cache "
      << format("%.2f", gib(r.memory.kv_cache)) << " GiB, scratch "
      << format("%.2f", gib(r.memory.scratch)) << " GiB (at most "
      << format("%.2f", gib(r.memory.scratch_peak)) << ") |\n";
  if (r.warmup_ms > 0)
    o << "| warm-up (before timing) | " << grouped(r.warmup_ms, 1) << " ms: " << r.warmup_note
      << " |\n";
  o << "| version | " << r.version << " |\n";
  if (r.profile)
    o << "\n" << render_profile_markdown(*r.profile, r.total_ms()) << profile_by_chunk(r);
  return o.str();
}

nlohmann::json memory_use_json(const backend::Backend::MemoryUse& m) {
  if (!m.known) return nullptr;
  return {{"weights_bytes", m.weights},
          {"kv_cache_bytes", m.kv_cache},
          {"scratch_bytes", m.scratch},
          {"scratch_peak_bytes", m.scratch_peak}};
}

nlohmann::json to_json(const PromptReport& r) {
  using nlohmann::json;
  json chunks = json::array();
  for (size_t i = 0; i < r.chunks.size(); ++i) {
    const auto& c = r.chunks[i];
    chunks.push_back({{"index", c.index},
                      {"first_token", c.first_token},
                      {"n_tokens", c.n_tokens},
                      {"n_ubatches", c.n_ubatches},
                      {"ms", c.ms},
                      {"ms_per_token", c.ms / c.n_tokens},
                      {"tokens_per_s", c.ms > 0 ? c.n_tokens * 1000.0 / c.ms : 0.0},
                      {"note", chunk_note(r, i)}});
    if (!c.ops.empty()) {
      OpProfiler p;
      for (const OpTime& t : c.ops) p.add_all(t);
      chunks.back()["profile"] = profile_to_json(p, c.ms);
    }
  }
  const auto& s = r.settings;
  json j = {{"prompt_tokens", r.prompt_tokens},
            {"total_ms", r.total_ms()},
            {"ms_per_token", r.ms_per_token()},
            {"tokens_per_s", r.tokens_per_s()},
            {"load_ms", r.load_ms},
            {"backend_setup_ms", r.backend_setup_ms},
            {"backend_setup", r.backend_setup_note},
            {"device_memory", memory_use_json(r.memory)},
            {"warmup_ms", r.warmup_ms},
            {"warmup", r.warmup_note},
            {"model", {{"path", r.model_path}, {"name", r.model_name}, {"arch", r.arch}}},
            {"backend", r.backend},
            {"device", r.device},
            {"version", r.version},
            {"settings",
             {{"n_ctx", s.n_ctx},
              {"n_batch", s.n_batch},
              {"n_ubatch", s.n_ubatch},
              {"chunking", chunking_name(s.chunking)},
              {"n_threads", r.n_threads},
              {"n_gpu_layers", r.n_gpu_layers},
              {"type_k", quant::type_name(s.type_k)},
              {"type_v", quant::type_name(s.type_v)}}},
            {"chunks", chunks}};
  if (r.gen_tokens > 0)
    j["generation"] = {{"tokens", r.gen_tokens},
                       {"ms", r.gen_ms},
                       {"tokens_per_s", r.gen_tokens * 1000.0 / r.gen_ms}};
  if (r.profile) j["profile"] = profile_to_json(*r.profile, r.total_ms());
  if (r.target) {
    j["target"] = {{"low_ms_per_token", r.target->low_ms},
                   {"high_ms_per_token", r.target->high_ms},
                   {"met", r.ms_per_token() <= r.target->high_ms}};
  }
  return j;
}

}  // namespace kestrel::runtime
