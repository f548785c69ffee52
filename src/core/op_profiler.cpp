#include "core/op_profiler.h"

#include <algorithm>

namespace kestrel {

std::vector<OpTime> OpProfiler::sorted() const {
  std::vector<OpTime> out = ops_;
  std::stable_sort(out.begin(), out.end(),
                   [](const OpTime& a, const OpTime& b) { return a.ms > b.ms; });
  return out;
}

double OpProfiler::total_ms() const {
  double t = 0;
  for (const OpTime& o : ops_) t += o.ms;
  return t;
}

}  // namespace kestrel
