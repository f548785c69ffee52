#include "runtime/profiler.h"

#include <cstdio>

#include "core/status.h"

namespace kestrel::runtime {

namespace {

std::string share(double ms, double wall_ms) {
  return wall_ms > 0 ? format("%.1f%%", 100.0 * ms / wall_ms) : "-";
}

}  // namespace

std::string render_profile_markdown(const OpProfiler& p, double wall_ms, int top_n) {
  const auto ops = p.sorted();
  std::string out = "## Per-op profile\n\n";
  out += "Measured over " + format("%.1f", wall_ms) + " ms of timed work (" +
         std::to_string(ops.size()) + " op kinds).\n\n";
  out += "| op | ms | calls | ms/call | share |\n|---|---|---|---|---|\n";
  double rest = 0;
  long long rest_calls = 0;
  for (size_t i = 0; i < ops.size(); ++i) {
    const OpTime& o = ops[i];
    if (static_cast<int>(i) >= top_n) {
      rest += o.ms;
      rest_calls += o.calls;
      continue;
    }
    out += "| " + o.kind + " | " + format("%.2f", o.ms) + " | " + std::to_string(o.calls) + " | " +
           format("%.4f", o.ms / static_cast<double>(o.calls)) + " | " + share(o.ms, wall_ms) +
           " |\n";
  }
  if (rest_calls)
    out += "| (other kinds) | " + format("%.2f", rest) + " | " + std::to_string(rest_calls) +
           " | - | " + share(rest, wall_ms) + " |\n";
  const double outside = wall_ms - p.total_ms();
  if (wall_ms > 0)
    out += "| (outside ops) | " + format("%.2f", outside > 0 ? outside : 0.0) + " | - | - | " +
           share(outside > 0 ? outside : 0.0, wall_ms) + " |\n";
  return out;
}

nlohmann::json profile_to_json(const OpProfiler& p, double wall_ms) {
  nlohmann::json ops = nlohmann::json::array();
  for (const OpTime& o : p.sorted())
    ops.push_back({{"op", o.kind},
                   {"ms", o.ms},
                   {"calls", o.calls},
                   {"share", wall_ms > 0 ? o.ms / wall_ms : 0.0}});
  return {{"wall_ms", wall_ms}, {"ops_ms", p.total_ms()}, {"ops", ops}};
}

}  // namespace kestrel::runtime
