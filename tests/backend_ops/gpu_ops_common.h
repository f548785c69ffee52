// Shared helpers of the GPU backend conformance tests (test_gpu_ops*.cpp): the error bounds,
// the list of GPU backends under test, a fixture that creates one, poisoned outputs, the
// per-row error metrics and the log printed under KESTREL_OPS_REPORT.
//
// Every op of every GPU backend of the registry that can run here is checked against a
// double-precision host reference built on the scalar block formats of format/quant. On a
// machine (or build) without a usable GPU backend the only test that runs is
// GpuOpsSetup.BackendsUnderTest, which skips and says why.
//
// Environment variables:
//   KESTREL_GPU_BACKEND=cuda  test only this backend (an error, not a skip, if it cannot run);
//                             =cpu runs them on the CPU backend, a self-check of the tests
//   KESTREL_TEST_SEED=<n>     reproduce a run (the seed is printed at the start and on failure)
//   KESTREL_OPS_REPORT=1      print the largest error per backend / op / type against its bound
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "backend/backend.h"
#include "backend/registry.h"
#include "core/thread_pool.h"
#include "cpu_ops_common.h"
#include "format/quant/quant.h"

namespace kestrel::backend::gpu_ops_test {

using cpu::ops_test::DevTensor;
using cpu::ops_test::norm_err;
using cpu::ops_test::quantize_rows;
using cpu::ops_test::randn;
using cpu::ops_test::test_rng;
using cpu::ops_test::test_seed;
using cpu::ops_test::type_str;
using quant::DType;

// ---- bounds ---------------------------------------------------------------------------------
//
// Two metrics per output row (token), the worst row counts:
//   l2  = ||out - ref||_2 / ||ref||_2                 (the metric of the CPU tests)
//   max = max_i |out_i - ref_i| / rms(ref)            (one wrong element in a large row shows)
// A GPU backend may round activations and dequantized weights to f16 before a tensor-core
// product (relative 2^-11 per operand) and accumulate in f32; the bounds allow that with a
// few times margin and still fail a wrong element, tile edge, scale or mask, which is O(1).
// They are first guesses for a GPU nobody has run yet: KESTREL_OPS_REPORT=1 prints the worst
// value seen next to each bound, so they can be tightened after the first run.
struct Bound {
  const char* op;
  double l2;
  double max;
};

inline constexpr Bound kBounds[] = {
    // F32 / F16 weights: both operands rounded to f16 (or tf32), products accumulated in f32.
    // Per product ~2^-11 * sqrt(2) relative, a random-walk sum: l2 ~4e-4, max ~4 sigma ~2e-3.
    {"matmul/dense", 3e-3, 1e-2},
    // BF16 and quantized weights: the reference uses the same quantized weights, so only the
    // activation path differs. f16 activations give ~5e-4 as above; bf16 activations (2^-9)
    // ~2e-3; int8 block activations (q8_1 style, step max|x_block| / 127 ~ 0.017 for N(0,1)
    // rows) ~5e-3 l2 and ~2e-2 max. A wrong sub-block scale or min moves rows by >= 5e-2.
    {"matmul/quant", 1e-2, 3e-2},
    // Activation rows with 1000x outliers (one per row, or one in every 32-element block):
    // f16 activations are unaffected (~1e-3); int8 block activations make the other 31
    // elements of an outlier's block coarse (step ~8), ~1.3e-2 of the dot product. Outputs
    // reach ~1e5, so an f16 accumulator or f16 output overflows to inf and fails.
    {"matmul/outliers", 3e-2, 1e-1},
    // embed: the table's rows dequantized in f32 on the device; fma and operation order may
    // differ from dequantize_row by an ulp or two of the larger term (2^-23 relative).
    {"embed", 1e-6, 2e-6},
    // rms_norm: f32 sum of squares in a tree (~1e-7 * log2 n), rsqrtf (<= 2 ulp), two
    // multiplies: ~5e-7 per element relative. A misplaced eps is ~5% on the small rows.
    {"rms_norm", 1e-5, 3e-5},
    // rope at positions < 256: theta = pos * inv_freq in f32 errs by <= pos * 2^-23
    // (3e-5 rad at 256), plus sinf/cosf (a few ulp, fast-math __sinf ~2^-21 near [-pi, pi]).
    {"rope/small-pos", 1e-4, 3e-4},
    // rope at positions up to 4100: the same f32 theta errs by up to ~5e-4 rad at 4100, and
    // fast-math __sinf / __cosf outside [-pi, pi] by ~1e-3; elements up to ~4x rms: ~5e-3 max.
    // The l2 averages over frequencies, most of which have small theta. A wrong pairing,
    // frequency index or base is O(1) at any position.
    {"rope/large-pos", 1e-3, 5e-3},
    // swiglu: __expf (2 + 1.16|x| ulp, |gate| <= ~20: ~3e-6) and a division, on elements up to
    // ~10x the row rms.
    {"swiglu", 1e-5, 5e-5},
    // add: one f32 rounding per element (2^-24 of |x + y|, elements up to ~5x rms).
    {"add", 1e-6, 1e-6},
    // get_rows: a copy, bit-exact.
    {"get_rows", 0.0, 0.0},
    // attention: Q, K, V and P in f16 (2^-11 each), scores and sums in f32: scores err by
    // ~1e-3 absolute, P by ~1e-3 relative, the output by ~1e-3 l2 and ~4e-3 max; int8 Q (a
    // q8_1-style dot with q8_0 K) ~5e-3 l2. A leaked future row, a wrong GQA head or a
    // wrong scale (1% moves the softmax by ~1e-2) fails.
    {"attention", 1e-2, 3e-2},
    // decode_layer (a whole layer for one token as one op) against the same backend's op
    // sequence: the same int8 activations, RoPE, cache rounding and attention arithmetic, the
    // matvec sums in another f32 order (~1e-7 relative), so only a value that lands on a
    // rounding edge (an int8 activation, rarely a q4_0 cache code) moves the residual further,
    // by ~1e-5. A wrong row, head, position or missing add is O(1e-1).
    {"decode_layer", 2e-4, 2e-3},
    // The matmuls that read matmul_add_rms_norm's output, against the same backend's three ops:
    // the same int8 planes up to the row's 1 / rms, which the readers apply to their sums
    // instead of the norm to the activations (f32, ~1e-7 relative); an activation on a rounding
    // edge moves by one step of its second plane (~1e-6 of the block's largest), rarely one of
    // the first plane made up by the second. A wrong block, missing add or wrong rms is O(1e-2).
    {"matmul+add_rms_norm", 1e-4, 1e-3},
};
// kv_store has no numeric bound: f16 caches must equal quant::quantize_row byte for byte;
// q8_0 / q4_0 blocks may differ from it by one f16 ulp of the scale d and one step of each
// code (a kernel that multiplies by 1/d, or divides by d before rounding d to f16, rounds a
// few elements the other way), and every dequantized value must stay within one step |d| of
// the stored float. Rows not written must keep their previous bytes exactly.

inline const Bound& bound(const std::string& op) {
  for (const Bound& b : kBounds)
    if (op == b.op) return b;
  ADD_FAILURE() << "no bound named " << op;
  static const Bound none{"none", 0.0, 0.0};
  return none;
}

inline const char* matmul_bound_name(DType t) {
  return (t == DType::F32 || t == DType::F16) ? "matmul/dense" : "matmul/quant";
}

// ---- the backends under test -----------------------------------------------------------------

struct GpuBackendList {
  std::vector<std::string> names;  // GPU backends that probe ok (and match KESTREL_GPU_BACKEND)
  std::string why_none;            // each GPU backend's reason not to run, or the build's
  std::string requested;           // KESTREL_GPU_BACKEND, if set
};

inline const GpuBackendList& gpu_backend_list() {
  static const GpuBackendList list = [] {
    GpuBackendList l;
    if (const char* env = std::getenv("KESTREL_GPU_BACKEND")) l.requested = env;
    for (const std::string& name : available_backends()) {
      // KESTREL_GPU_BACKEND=cpu: a self-check of these tests on the CPU backend
      if (!is_gpu_backend(name) && !(name == "cpu" && l.requested == "cpu")) continue;
      if (!l.requested.empty() && name != l.requested) continue;
      const Status s = probe_backend(name);
      if (s.is_ok()) {
        l.names.push_back(name);
      } else {
        l.why_none += (l.why_none.empty() ? "" : "; ") + name + ": " + s.message();
      }
    }
    if (l.names.empty() && l.why_none.empty()) {
      l.why_none =
          l.requested.empty()
              ? "this build has no GPU backend (available: " + available_backends_text() + ")"
              : "KESTREL_GPU_BACKEND=" + l.requested +
                    " is not a GPU backend of this build (available: " + available_backends_text() +
                    ")";
    }
    return l;
  }();
  return list;
}

inline std::vector<std::string> gpu_backends() {
  return gpu_backend_list().names;
}

inline std::string backend_param_name(const ::testing::TestParamInfo<std::string>& info) {
  return info.param;
}

// Every test owns a fresh backend (so caches a backend keeps per host pointer or per weight
// cannot leak from one test into the next), created from the test's parameter.
class GpuOpsTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    auto r = create_backend(GetParam(), BackendOptions{});
    ASSERT_TRUE(r.has_value()) << "create_backend(" << GetParam() << "): " << r.message();
    be_ = std::move(*r);
  }
  void TearDown() override {
    if (be_) {
      EXPECT_TRUE(be_->synchronize().is_ok());
    }
    be_.reset();
  }
  Backend& be() { return *be_; }
  // "cuda matmul/q4_0/T=17": the key of the error log.
  std::string key(const std::string& what) const { return GetParam() + " " + what; }

  std::unique_ptr<Backend> be_;
};

// One value-parametrized suite over the GPU backends. With no usable GPU backend the suite has
// no instances (allowed: GpuOpsSetup.BackendsUnderTest carries the visible skip).
#define KESTREL_GPU_OPS_SUITE(Suite)                                                              \
  class Suite : public ::kestrel::backend::gpu_ops_test::GpuOpsTest {};                           \
  INSTANTIATE_TEST_SUITE_P(Gpu, Suite,                                                            \
                           ::testing::ValuesIn(::kestrel::backend::gpu_ops_test::gpu_backends()), \
                           ::kestrel::backend::gpu_ops_test::backend_param_name);                 \
  GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(Suite)

#define GPU_TRACE_SEED()                                                                     \
  SCOPED_TRACE(                                                                              \
      "KESTREL_TEST_SEED=" + std::to_string(::kestrel::backend::gpu_ops_test::test_seed()) + \
      " backend " + GetParam() + " (set KESTREL_TEST_SEED to reproduce)")

// An environment variable set for a scope (the OpenCL backend reads its KESTREL_CL_* settings
// when a backend is created), its earlier value back after.
struct ScopedEnv {
  std::string name;
  std::optional<std::string> old;
  ScopedEnv(const char* n, const char* value) : name(n) {
    if (const char* v = std::getenv(n)) old = v;
    setenv(n, value, 1);
  }
  ~ScopedEnv() { old ? setenv(name.c_str(), old->c_str(), 1) : unsetenv(name.c_str()); }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;
};

// ---- host helpers ----------------------------------------------------------------------------

// The references are O(T * n_out * n_in) in double: spread them over the host's cores.
inline void host_parallel_for(int64_t n, const std::function<void(int64_t)>& fn) {
  static ThreadPool pool(
      static_cast<int>(std::clamp(std::thread::hardware_concurrency(), 1u, 32u)));
  pool.parallel_for(n, [&](int64_t i, int) { fn(i); });
}

// sum_i a[i] * b[i] with every product and sum in double (four partial sums).
inline double dot_double(const float* a, const float* b, int64_t n) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += static_cast<double>(a[i]) * b[i];
    s1 += static_cast<double>(a[i + 1]) * b[i + 1];
    s2 += static_cast<double>(a[i + 2]) * b[i + 2];
    s3 += static_cast<double>(a[i + 3]) * b[i + 3];
  }
  for (; i < n; ++i) s0 += static_cast<double>(a[i]) * b[i];
  return (s0 + s1) + (s2 + s3);
}

// n_rows rows of n elements of `type`, decoded with the reference dequantize_row.
inline std::vector<float> dequantize_rows(DType type, const uint8_t* data, int64_t n_rows,
                                          int64_t n) {
  std::vector<float> out(static_cast<size_t>(n_rows * n));
  const int64_t rb = quant::row_bytes(type, n);
  for (int64_t r = 0; r < n_rows; ++r)
    quant::dequantize_row(type, data + r * rb, out.data() + r * n, n);
  return out;
}

// ---- poisoned outputs ------------------------------------------------------------------------

// Outputs are filled with this quiet NaN before an op: an element the op should write and did
// not stays NaN (and fails the metrics); rows it must not write are checked to keep the bits.
constexpr uint32_t kPoisonBits = 0x7fc0beefu;
inline float poison() {
  float f;
  std::memcpy(&f, &kPoisonBits, 4);
  return f;
}

inline void fill_poison(Backend& be, DevTensor& t) {
  std::vector<float> host(static_cast<size_t>(t->rows * t->cols), poison());
  const Status s = be.upload(*t, 0, t->rows, host.data());
  EXPECT_TRUE(s.is_ok()) << s.message();
}

// synchronize(), then the whole tensor as floats.
inline std::vector<float> fetch(Backend& be, const DevTensor& t) {
  const Status s = be.synchronize();
  EXPECT_TRUE(s.is_ok()) << s.message();
  std::vector<float> out(static_cast<size_t>(t->rows * t->cols));
  const Status d = be.download(*t, 0, t->rows, out.data());
  EXPECT_TRUE(d.is_ok()) << d.message();
  return out;
}

inline std::vector<uint8_t> fetch_bytes(Backend& be, const DevTensor& t) {
  const Status s = be.synchronize();
  EXPECT_TRUE(s.is_ok()) << s.message();
  std::vector<uint8_t> out(t->bytes);
  const Status d = be.download(*t, 0, t->rows, out.data());
  EXPECT_TRUE(d.is_ok()) << d.message();
  return out;
}

// Elements of rows [row0, row1) (ld floats each) whose bits are no longer the poison.
inline int64_t count_unpoisoned(const std::vector<float>& got, int64_t ld, int64_t row0,
                                int64_t row1) {
  int64_t n = 0;
  for (int64_t i = row0 * ld; i < row1 * ld; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &got[static_cast<size_t>(i)], 4);
    n += bits != kPoisonBits;
  }
  return n;
}

// ---- the error metrics and their log -----------------------------------------------------------

struct RowErr {
  double l2 = 0, max = 0;  // worst row of each metric
  int64_t l2_row = -1, max_row = -1;
  int64_t non_finite = 0;  // elements that are NaN or inf (NaN: never written)
};

// Compares rows [0, n_rows) of got (ld floats per row, the first n_cols checked) with ref
// (n_cols doubles per row).
inline RowErr compare_rows(const float* got, int64_t ld, const double* ref, int64_t n_rows,
                           int64_t n_cols) {
  RowErr e;
  for (int64_t r = 0; r < n_rows; ++r) {
    double num = 0, den = 0, worst = 0;
    for (int64_t c = 0; c < n_cols; ++c) {
      const double g = got[r * ld + c], x = ref[r * n_cols + c];
      if (!std::isfinite(g)) {
        ++e.non_finite;
        worst = INFINITY;
        num = INFINITY;
        continue;
      }
      const double d = std::fabs(g - x);
      num += d * d;
      den += x * x;
      worst = std::max(worst, d);
    }
    const double l2 = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
    const double rms = std::sqrt(den / static_cast<double>(n_cols));
    const double mx = rms > 0 ? worst / rms : worst;
    if (!(l2 <= e.l2)) {  // keeps NaN / inf once seen
      e.l2 = l2;
      e.l2_row = r;
    }
    if (!(mx <= e.max)) {
      e.max = mx;
      e.max_row = r;
    }
  }
  return e;
}

struct LogEntry {
  double l2 = 0, max = 0;
  Bound bound{};
};

// Largest error seen per "backend op/type/shape", printed under KESTREL_OPS_REPORT.
inline std::map<std::string, LogEntry>& gpu_error_log() {
  static std::map<std::string, LogEntry> log;
  return log;
}
// Free-form observations for the report (kv_store rounding differences, ...).
inline std::map<std::string, std::string>& gpu_note_log() {
  static std::map<std::string, std::string> log;
  return log;
}

// Checks e against the bound named `bound_name` and logs it under `log_key`.
inline void check_err(const RowErr& e, const std::string& bound_name, const std::string& log_key,
                      const std::string& what) {
  const Bound& b = bound(bound_name);
  EXPECT_EQ(e.non_finite, 0) << what << ": " << e.non_finite
                             << " elements are NaN/inf (not written, or overflowed)";
  EXPECT_LE(e.l2, b.l2) << what << ": l2 error, worst row " << e.l2_row << " (bound " << bound_name
                        << ")";
  EXPECT_LE(e.max, b.max) << what << ": max error / rms, worst row " << e.max_row << " (bound "
                          << bound_name << ")";
  LogEntry& l = gpu_error_log()[log_key];
  if (!(e.l2 <= l.l2)) l.l2 = e.l2;
  if (!(e.max <= l.max)) l.max = e.max;
  l.bound = b;
}

}  // namespace kestrel::backend::gpu_ops_test
