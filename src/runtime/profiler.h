// The per-op profile of `--profile`: where the time of the timed chunks went, by op kind
// (matmul by weight type, attention, norms, RoPE, KV store, copies between devices), with
// each kind's share of the wall time it was measured against.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

#include "core/op_profiler.h"

namespace kestrel::runtime {

using OpProfiler = kestrel::OpProfiler;

// Markdown: the top `top_n` kinds with ms, calls, ms/call and share of `wall_ms`, plus a
// line for the rest and one for time outside the ops (scheduling, host code).
std::string render_profile_markdown(const OpProfiler& p, double wall_ms, int top_n = 12);
nlohmann::json profile_to_json(const OpProfiler& p, double wall_ms);

}  // namespace kestrel::runtime
