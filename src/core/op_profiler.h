// Per-op time accumulator for `--profile`. The forward pass hands each backend op to its
// backend's profile_op() only when a profiler is attached, so the unprofiled path pays one
// pointer test per op and nothing else (no synchronization, no clock reads).
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace kestrel {

struct OpTime {
  std::string kind;  // "matmul q4_0", "attention", "rms_norm", "copy to device", ...
  double ms = 0;
  long long calls = 0;
};

class OpProfiler {
 public:
  void reset() { ops_.clear(); }
  void add(std::string_view kind, double ms) {
    for (OpTime& o : ops_)
      if (o.kind == kind) {
        o.ms += ms;
        ++o.calls;
        return;
      }
    ops_.push_back({std::string(kind), ms, 1});
  }
  // Adds another profile's entry (its time and calls).
  void add_all(const OpTime& t) {
    for (OpTime& o : ops_)
      if (o.kind == t.kind) {
        o.ms += t.ms;
        o.calls += t.calls;
        return;
      }
    ops_.push_back(t);
  }
  // Largest first.
  std::vector<OpTime> sorted() const;
  double total_ms() const;

 private:
  std::vector<OpTime> ops_;  // a handful of kinds: a linear scan beats a map
};

}  // namespace kestrel
