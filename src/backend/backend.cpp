#include "backend/backend.h"

#include <chrono>

namespace kestrel::backend {

Status Backend::profile_op(std::string_view kind, OpProfiler& profiler,
                           const std::function<Status()>& op) {
  KESTREL_TRY(synchronize());  // earlier work must not be charged to this op
  const auto t0 = std::chrono::steady_clock::now();
  Status st = op();
  if (st) st = synchronize();
  profiler.add(
      kind,
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  return st;
}

}  // namespace kestrel::backend
