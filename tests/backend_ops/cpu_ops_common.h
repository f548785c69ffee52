// Shared helpers of the CPU backend conformance tests (test_cpu_ops*.cpp): the kernel tables
// this CPU runs, random inputs with a printed seed, RAII backend tensors, the normalized error
// metric and a log of the largest error seen per op / type / ISA.
//
// Environment variables:
//   KESTREL_TEST_SEED=<n>  reproduce a run (every test prints the seed it used on failure)
//   KESTREL_OPS_REPORT=1   print the largest normalized error per op / type / ISA at the end
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/kernels.h"
#include "format/quant/quant.h"
#include "format/quant/types.h"
#include "test_seed.h"

namespace kestrel::backend::cpu::ops_test {

using quant::DType;

// ---- seeds ---------------------------------------------------------------------------------

using kestrel::testing::test_seed;

#define OPS_TRACE_SEED()                                                                      \
  SCOPED_TRACE(                                                                               \
      "KESTREL_TEST_SEED=" + std::to_string(::kestrel::backend::cpu::ops_test::test_seed()) + \
      " (set it to reproduce)")

// A generator for the current test: the run's seed mixed with the test's full name, so that
// tests draw independent inputs and each is reproducible on its own from the seed.
inline std::mt19937 test_rng() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string name = info ? std::string(info->test_suite_name()) + "." + info->name() : "";
  const uint64_t h = std::hash<std::string>{}(name);
  const uint64_t s = test_seed();
  std::seed_seq seq{static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32),
                    static_cast<uint32_t>(h), static_cast<uint32_t>(h >> 32)};
  return std::mt19937(seq);
}

// n samples of N(mean, sd); an exact zero (probability ~0) is drawn again, so no input is zero.
inline std::vector<float> randn(std::mt19937& rng, size_t n, float sd = 1.0f, float mean = 0.0f) {
  std::normal_distribution<float> dist(mean, sd);
  std::vector<float> v(n);
  for (auto& x : v) {
    do {
      x = dist(rng);
    } while (x == 0.0f);
  }
  return v;
}

// ---- kernel tables -------------------------------------------------------------------------

// Every kernel table that is compiled in and that this CPU can execute, generic first.
inline std::vector<const KernelTable*> supported_tables() {
  std::vector<const KernelTable*> tables{&generic_kernels()};
#if defined(__x86_64__) && defined(__GNUC__)
  // The CPU first: the first call of avx*_kernels() runs code compiled for that ISA.
  if (cpu_has("avx2") && avx2_kernels()) tables.push_back(avx2_kernels());
  if (cpu_has("avx512") && avx512_kernels()) tables.push_back(avx512_kernels());
#endif
  return tables;
}

// One backend configuration under test: a kernel table and a thread count.
struct Variant {
  const KernelTable* table;
  int n_threads;
  std::string label() const { return std::string(table->isa) + "/t" + std::to_string(n_threads); }
};

// Every supported table with 2 threads, then the best table with 1 thread (the pool's serial
// path, which runs every task on the calling thread).
inline std::vector<Variant> variants() {
  std::vector<Variant> v;
  for (const KernelTable* t : supported_tables()) v.push_back({t, 2});
  v.push_back({&best_kernels(), 1});
  return v;
}

// ---- the error metric and its log ----------------------------------------------------------

// ||out - ref||_2 / ||ref||_2 over n values (NaN anywhere in out gives NaN, which fails every
// EXPECT_LE). A zero reference gives the absolute norm of out.
inline double norm_err(const float* out, const double* ref, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(out[i]) - ref[i];
    num += d * d;
    den += ref[i] * ref[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// Largest error seen per key ("op/type/isa/threads"), printed by the environment registered
// in test_cpu_ops.cpp when KESTREL_OPS_REPORT is set.
inline std::map<std::string, double>& error_log() {
  static std::map<std::string, double> log;
  return log;
}
inline void record_error(const std::string& key, double err) {
  double& m = error_log()[key];
  if (!(err <= m)) m = err;  // keeps NaN once seen
}

// ---- backend tensors -----------------------------------------------------------------------

// A tensor owned by the test, freed on scope exit.
class DevTensor {
 public:
  DevTensor(Backend& be, DType type, int64_t rows, int64_t cols, const char* what = "test")
      : be_(&be) {
    auto r = be.alloc(type, rows, cols, what);
    EXPECT_TRUE(r.has_value()) << r.message();
    if (r) t_ = *r;
  }
  // An f32 tensor [rows][cols] holding `host`.
  DevTensor(Backend& be, int64_t rows, int64_t cols, const std::vector<float>& host)
      : DevTensor(be, DType::F32, rows, cols) {
    EXPECT_EQ(host.size(), static_cast<size_t>(rows * cols));
    if (t_) {
      EXPECT_TRUE(be.upload(t_, 0, rows, host.data()).is_ok());
    }
  }
  // Adopts a tensor the backend made (load_vector).
  DevTensor(Backend& be, Expected<Tensor> r) : be_(&be) {
    EXPECT_TRUE(r.has_value()) << r.message();
    if (r) t_ = *r;
  }
  ~DevTensor() {
    if (t_) be_->free(t_);
  }
  DevTensor(const DevTensor&) = delete;
  DevTensor& operator=(const DevTensor&) = delete;

  Tensor& operator*() { return t_; }
  const Tensor& operator*() const { return t_; }
  Tensor* operator->() { return &t_; }
  const Tensor* operator->() const { return &t_; }
  explicit operator bool() const { return static_cast<bool>(t_); }

  std::vector<uint8_t> bytes() const {
    std::vector<uint8_t> out(t_.bytes);
    EXPECT_TRUE(be_->download(t_, 0, t_.rows, out.data()).is_ok());
    return out;
  }
  std::vector<float> floats() const {
    std::vector<float> out(static_cast<size_t>(t_.rows * t_.cols));
    EXPECT_TRUE(be_->download(t_, 0, t_.rows, out.data()).is_ok());
    return out;
  }
  void fill_bytes(uint8_t value) {
    std::vector<uint8_t> host(t_.bytes, value);
    EXPECT_TRUE(be_->upload(t_, 0, t_.rows, host.data()).is_ok());
  }
  void fill_floats(float value) {
    std::vector<float> host(static_cast<size_t>(t_.rows * t_.cols), value);
    EXPECT_TRUE(be_->upload(t_, 0, t_.rows, host.data()).is_ok());
  }

 private:
  Backend* be_;
  Tensor t_{};
};

// n_rows rows of n floats each encoded as `type` with the reference quantizer, back to back
// (the GGUF row layout).
inline std::vector<uint8_t> quantize_rows(DType type, const std::vector<float>& src, int64_t n_rows,
                                          int64_t n) {
  const int64_t rb = quant::row_bytes(type, n);
  std::vector<uint8_t> out(static_cast<size_t>(rb * n_rows));
  for (int64_t r = 0; r < n_rows; ++r)
    quant::quantize_row(type, src.data() + r * n, out.data() + r * rb, n);
  return out;
}

inline std::string type_str(DType t) {
  return quant::type_name(t);
}

}  // namespace kestrel::backend::cpu::ops_test
