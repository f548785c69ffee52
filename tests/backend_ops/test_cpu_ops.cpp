// CPU backend conformance, part 1: matmul for every weight type, embed, bad input. Every op
// runs on every kernel table this CPU supports (generic, AVX2, AVX-512 VNNI) with 2 threads,
// and on the best table with 1 thread, on fresh random inputs, and is compared with a scalar
// double-precision reference built on the quant.h reference routines. Part 2 (norm, rope,
// elementwise ops, KV store, attention) is test_cpu_ops_attn.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/kernels.h"
#include "cpu_ops_common.h"
#include "format/quant/quant.h"

namespace kestrel::backend::cpu::ops_test {
namespace {

// ---- thresholds: normalized error ||out - ref|| / ||ref|| per output row (token) ----------

// Dense weights (F32, F16, BF16): the reference is dot_row on the same stored weights, so the
// only difference is float32 accumulation. A random-walk sum of k products loses about
// eps * sqrt(k) / 2 relative (~1e-6 at k = 2048, eps = 6e-8; observed <= 1.4e-6 for the
// sequential generic sum, <= 5e-7 for the SIMD ones); 1e-5 leaves 7x margin and still catches
// a wrong element conversion (bf16/f16 decode errors are >= 2^-11 ~ 5e-4).
constexpr double kMatmulDenseMaxErr = 1e-5;
// Q4_0 / Q4_1 / Q8_0 weights: the reference uses the same quantized weights, so the error is
// the kernels' two-plane int8 quantization of the activations, x ~ unit * (128 q1 + q2) with
// unit = max|x_block| / (127 * 128): rms element error unit / sqrt(12) ~ 4e-5 of a N(0,1)
// element, i.e. a normalized error of about 5e-5 on a dot product (observed <= 1e-4, and
// <= 1.4e-4 on the outlier rows). 1e-3 leaves 7x margin and still fails a one-plane
// (q8_0-style, ~128x coarser: measured 5e-3 by dropping q2) or mis-scaled kernel.
constexpr double kMatmulQuantMaxErr = 1e-3;
// Embedding rows are decoded by the backend with the reference dequantize_row itself, so they
// must be bit-identical.
constexpr double kEmbedMaxErr = 0.0;

double matmul_limit(DType t) {
  return (t == DType::F32 || t == DType::F16 || t == DType::BF16) ? kMatmulDenseMaxErr
                                                                  : kMatmulQuantMaxErr;
}

// Output cells the op must not write (rows past n_tokens, columns past n_out) hold this.
constexpr float kSentinel = -12345.0f;
// Extra output columns beyond n_out (ld_out > n_out), checked to stay untouched.
constexpr int64_t kPadCols = 3;

// ---- setup --------------------------------------------------------------------------------

TEST(BackendOpsSetup, BestTableIsAmongTheTestedOnes) {
  const auto tables = supported_tables();
  std::string names;
  for (const KernelTable* t : tables) names += std::string(t->isa) + " ";
  std::printf("[ BackendOps ] kernel tables under test: %s(best: %s)\n", names.c_str(),
              best_kernels().isa);
  EXPECT_NE(std::find(tables.begin(), tables.end(), &best_kernels()), tables.end())
      << "best_kernels() picked " << best_kernels().isa << ", which this test does not cover";
  for (const KernelTable* t : tables) {
    EXPECT_TRUE(t->quantize_acts && t->panel_q4_0 && t->panel_q4_1 && t->panel_q8_0 &&
                t->panel_u8min && t->panel_q6 && t->dense && t->dot_f32 && t->axpy_f32)
        << t->isa << " has an empty slot";
  }
}

// ---- matmul -------------------------------------------------------------------------------

// A random weight matrix n_out x n_in in GGUF rows of `type`, kept alive on the host (dense
// weights are read in place by the CPU backend).
struct HostWeight {
  DType type;
  int64_t n_in, n_out;
  std::vector<uint8_t> data;
  HostMatrix matrix(const char* name = "w") const {
    return HostMatrix{type, n_in, n_out, data.data(), name};
  }
  const uint8_t* row(int64_t r) const { return data.data() + r * quant::row_bytes(type, n_in); }
};

HostWeight random_weight(std::mt19937& rng, DType type, int64_t n_in, int64_t n_out) {
  const std::vector<float> w = randn(rng, static_cast<size_t>(n_in * n_out), 0.5f);
  return HostWeight{type, n_in, n_out, quantize_rows(type, w, n_out, n_in)};
}

// ref[t][r] = dot_row(W row r, x row t) (+ bias[r]), for t < n_tokens.
std::vector<double> matmul_reference(const HostWeight& w, const std::vector<float>& x, int n_tokens,
                                     const std::vector<float>* bias) {
  std::vector<double> ref(static_cast<size_t>(n_tokens * w.n_out));
  for (int t = 0; t < n_tokens; ++t)
    for (int64_t r = 0; r < w.n_out; ++r)
      ref[t * w.n_out + r] = quant::dot_row(w.type, w.row(r), x.data() + t * w.n_in, w.n_in) +
                             (bias ? (*bias)[r] : 0.0);
  return ref;
}

// Runs out = x W^T (+ bias) for the first n_tokens rows of x on `be` and checks, per token,
// the normalized error against ref (computed for at least n_tokens rows), and that no output
// cell outside [n_tokens][n_out] was written. Returns the largest per-token error.
double run_and_check_matmul(CpuBackend& be, const Weight& weight, const DevTensor& x, int n_tokens,
                            const std::vector<double>& ref, const Tensor* bias,
                            const std::string& what) {
  SCOPED_TRACE(what);
  const int64_t n_out = weight.n_out;
  DevTensor out(be, DType::F32, x->rows, n_out + kPadCols);
  if (!out) return NAN;
  out.fill_floats(kSentinel);
  const Status s = be.matmul(weight, *x, n_tokens, *out, bias);
  EXPECT_TRUE(s.is_ok()) << s.message();
  EXPECT_TRUE(be.synchronize().is_ok());
  const std::vector<float> got = out.floats();
  const int64_t ld = n_out + kPadCols;
  double worst = 0;
  std::vector<float> row(static_cast<size_t>(n_out));
  for (int t = 0; t < n_tokens; ++t) {
    std::copy_n(got.data() + t * ld, n_out, row.data());
    const double err = norm_err(row.data(), ref.data() + t * n_out, static_cast<size_t>(n_out));
    EXPECT_LE(err, matmul_limit(weight.type)) << "token " << t << " of " << n_tokens;
    if (!(err <= worst)) worst = err;
  }
  int64_t stray = 0;
  for (int64_t t = 0; t < x->rows; ++t)
    for (int64_t c = 0; c < ld; ++c)
      if ((t >= n_tokens || c >= n_out) && got[t * ld + c] != kSentinel) ++stray;
  EXPECT_EQ(stray, 0) << "matmul wrote outside out[" << n_tokens << "][" << n_out << "]";
  return worst;
}

// Every shape on every variant for one weight type.
void check_matmul_shapes(DType type) {
  OPS_TRACE_SEED();
  std::mt19937 rng = test_rng();
  const bool dense = type == DType::F32 || type == DType::F16 || type == DType::BF16;
  // n_in 32..2048 (one to 64 blocks); dense types also take widths that are not a multiple of
  // the SIMD width (20: every ISA's scalar fallback; 40: AVX2 vector path, AVX-512 fallback).
  std::vector<int64_t> n_ins = {32, 64, 96, 2048};
  if (dense) n_ins.insert(n_ins.end(), {20, 40});
  // K-quants: one to eight 256-element superblocks
  const bool kquant = quant::type_info(type)->block_elems == quant::kSuperBlock;
  if (kquant) n_ins = {256, 768, 2048};
  // n_out: a partial last panel of 16 rows (37 = 2*16 + 5, 100 = 6*16 + 4) and an exact one.
  const std::vector<int64_t> n_outs = {37, 100, 16};
  // 1 (decode), 3, 8 (one AVX-512 tile), 9 and 17 (tile + tails), 33 (token strip of 32 + 1)
  const std::vector<int> token_counts = {1, 3, 8, 9, 17, 33};
  constexpr int kMaxTokens = 33;
  for (int64_t n_in : n_ins) {
    for (int64_t n_out : n_outs) {
      if (n_out == 16 && n_in != (kquant ? 256 : 64)) continue;  // one exact panel is enough
      const HostWeight w = random_weight(rng, type, n_in, n_out);
      const std::vector<float> x = randn(rng, static_cast<size_t>(kMaxTokens * n_in));
      const std::vector<float> bias = randn(rng, static_cast<size_t>(n_out));
      const std::vector<double> ref = matmul_reference(w, x, kMaxTokens, nullptr);
      const std::vector<double> ref_b = matmul_reference(w, x, kMaxTokens, &bias);
      for (const Variant& v : variants()) {
        CpuBackend be(v.n_threads, v.table);
        auto weight = be.load_weight(w.matrix());
        ASSERT_TRUE(weight.has_value()) << weight.message();
        DevTensor xt(be, kMaxTokens, n_in, x);
        DevTensor bt(be, be.load_vector(bias.data(), n_out, "bias"));
        for (int nt : token_counts) {
          // a bias on every other token count, so both paths see every tile shape over the run
          const bool with_bias = (nt % 2) == (n_out % 2);
          const std::string what = type_str(type) + " " + v.label() +
                                   " n_in=" + std::to_string(n_in) +
                                   " n_out=" + std::to_string(n_out) +
                                   " n_tokens=" + std::to_string(nt) + (with_bias ? " +bias" : "");
          const double err = run_and_check_matmul(be, **weight, xt, nt, with_bias ? ref_b : ref,
                                                  with_bias ? &*bt : nullptr, what);
          record_error("matmul/" + type_str(type) + "/" + v.label(), err);
        }
      }
    }
  }
}

// Activation rows with huge outliers: one element 1000x the others, and a row with such an
// outlier in every 32-element block. The per-block activation scale then makes the other
// elements of those blocks coarse (unit = 1000 / 16256 against N(0,1) values), but their
// contribution to the dot product is small next to the outlier's, so the error relative to
// the reference row must stay within the same bound; rows without outliers in the same batch
// must be unaffected.
void check_matmul_outliers(DType type) {
  OPS_TRACE_SEED();
  std::mt19937 rng = test_rng();
  const int64_t n_in = 2048, n_out = 100;
  constexpr int kTokens = 9;
  const HostWeight w = random_weight(rng, type, n_in, n_out);
  std::vector<float> x = randn(rng, static_cast<size_t>(kTokens * n_in));
  std::uniform_int_distribution<int64_t> where(0, n_in - 1);
  for (int t = 0; t < kTokens; ++t) {
    float* row = x.data() + t * n_in;
    if (t % 3 == 0) {
      const int64_t i = where(rng);
      row[i] = std::copysign(1000.0f, row[i]);  // one outlier
    } else if (t % 3 == 1) {
      for (int64_t b = 0; b < n_in / 32; ++b) {  // one outlier per block, alternating place
        const int64_t i = b * 32 + (b * 7) % 32;
        row[i] = std::copysign(1000.0f, row[i]);
      }
    }  // t % 3 == 2: plain N(0,1) row in the same batch
  }
  const std::vector<double> ref = matmul_reference(w, x, kTokens, nullptr);
  for (const Variant& v : variants()) {
    CpuBackend be(v.n_threads, v.table);
    auto weight = be.load_weight(w.matrix());
    ASSERT_TRUE(weight.has_value()) << weight.message();
    DevTensor xt(be, kTokens, n_in, x);
    const double err = run_and_check_matmul(be, **weight, xt, kTokens, ref, nullptr,
                                            type_str(type) + " outliers " + v.label());
    record_error("matmul-outliers/" + type_str(type) + "/" + v.label(), err);
  }
}

// One test per weight type (so a filter like BackendOpsMatmul.Q4_0* runs one of them).
TEST(BackendOpsMatmul, F32) {
  check_matmul_shapes(DType::F32);
}
TEST(BackendOpsMatmul, F16) {
  check_matmul_shapes(DType::F16);
}
TEST(BackendOpsMatmul, BF16) {
  check_matmul_shapes(DType::BF16);
}
TEST(BackendOpsMatmul, Q4_0) {
  check_matmul_shapes(DType::Q4_0);
}
TEST(BackendOpsMatmul, Q4_1) {
  check_matmul_shapes(DType::Q4_1);
}
TEST(BackendOpsMatmul, Q8_0) {
  check_matmul_shapes(DType::Q8_0);
}
TEST(BackendOpsMatmul, Q5_0) {
  check_matmul_shapes(DType::Q5_0);
}
TEST(BackendOpsMatmul, Q5_1) {
  check_matmul_shapes(DType::Q5_1);
}
TEST(BackendOpsMatmul, Q4_K) {
  check_matmul_shapes(DType::Q4_K);
}
TEST(BackendOpsMatmul, Q5_K) {
  check_matmul_shapes(DType::Q5_K);
}
TEST(BackendOpsMatmul, Q6_K) {
  check_matmul_shapes(DType::Q6_K);
}
TEST(BackendOpsMatmul, F32Outliers) {
  check_matmul_outliers(DType::F32);
}
TEST(BackendOpsMatmul, F16Outliers) {
  check_matmul_outliers(DType::F16);
}
TEST(BackendOpsMatmul, BF16Outliers) {
  check_matmul_outliers(DType::BF16);
}
TEST(BackendOpsMatmul, Q4_0Outliers) {
  check_matmul_outliers(DType::Q4_0);
}
TEST(BackendOpsMatmul, Q4_1Outliers) {
  check_matmul_outliers(DType::Q4_1);
}
TEST(BackendOpsMatmul, Q8_0Outliers) {
  check_matmul_outliers(DType::Q8_0);
}
TEST(BackendOpsMatmul, Q5_0Outliers) {
  check_matmul_outliers(DType::Q5_0);
}
TEST(BackendOpsMatmul, Q5_1Outliers) {
  check_matmul_outliers(DType::Q5_1);
}
TEST(BackendOpsMatmul, Q4_KOutliers) {
  check_matmul_outliers(DType::Q4_K);
}
TEST(BackendOpsMatmul, Q5_KOutliers) {
  check_matmul_outliers(DType::Q5_K);
}
TEST(BackendOpsMatmul, Q6_KOutliers) {
  check_matmul_outliers(DType::Q6_K);
}

// ---- embed --------------------------------------------------------------------------------

TEST(BackendOpsEmbed, RowsEqualDequantizeRowForEveryType) {
  OPS_TRACE_SEED();
  std::mt19937 rng = test_rng();
  for (DType type : {DType::F32, DType::F16, DType::BF16, DType::Q4_0, DType::Q4_1, DType::Q8_0,
                     DType::Q5_0, DType::Q5_1, DType::Q4_K, DType::Q5_K, DType::Q6_K}) {
    const int64_t dim = quant::type_info(type)->block_elems == quant::kSuperBlock ? 512 : 96;
    const int64_t vocab = 50;
    constexpr int kTokens = 11;
    const std::vector<float> table_f = randn(rng, static_cast<size_t>(vocab * dim));
    const std::vector<uint8_t> table = quantize_rows(type, table_f, vocab, dim);
    const HostMatrix host{type, dim, vocab, table.data(), "token_embd"};
    std::uniform_int_distribution<int32_t> id(0, static_cast<int32_t>(vocab - 1));
    std::vector<int32_t> tokens(kTokens);
    for (auto& t : tokens) t = id(rng);
    tokens[0] = 0;                                // first row
    tokens[1] = static_cast<int32_t>(vocab - 1);  // last row
    tokens[2] = tokens[3];                        // a repeated id
    std::vector<double> ref(static_cast<size_t>(kTokens * dim));
    std::vector<float> row(static_cast<size_t>(dim));
    for (int t = 0; t < kTokens; ++t) {
      quant::dequantize_row(type, table.data() + tokens[t] * quant::row_bytes(type, dim),
                            row.data(), dim);
      std::copy(row.begin(), row.end(), ref.begin() + t * dim);
    }
    for (const Variant& v : variants()) {
      SCOPED_TRACE(type_str(type) + " " + v.label());
      CpuBackend be(v.n_threads, v.table);
      DevTensor out(be, DType::F32, kTokens, dim);
      const Status s = be.embed(host, tokens.data(), kTokens, *out);
      ASSERT_TRUE(s.is_ok()) << s.message();
      const std::vector<float> got = out.floats();
      double worst = 0;
      for (int t = 0; t < kTokens; ++t) {
        const double err =
            norm_err(got.data() + t * dim, ref.data() + t * dim, static_cast<size_t>(dim));
        EXPECT_LE(err, kEmbedMaxErr) << "token " << t << " (id " << tokens[t] << ")";
        if (!(err <= worst)) worst = err;
      }
      record_error("embed/" + type_str(type) + "/" + v.label(), worst);
    }
  }
}

// ---- bad input ----------------------------------------------------------------------------

TEST(BackendOpsBadInput, MatmulShapeMismatchIsAnError) {
  OPS_TRACE_SEED();
  std::mt19937 rng = test_rng();
  for (DType type : {DType::F32, DType::Q4_0}) {
    const HostWeight w = random_weight(rng, type, 64, 37);
    for (const Variant& v : variants()) {
      SCOPED_TRACE(type_str(type) + " " + v.label());
      CpuBackend be(v.n_threads, v.table);
      auto weight = be.load_weight(w.matrix());
      ASSERT_TRUE(weight.has_value()) << weight.message();
      DevTensor x_narrow(be, 4, 32, randn(rng, 4 * 32));  // n_in 32 != 64
      DevTensor x_wide(be, 4, 96, randn(rng, 4 * 96));    // n_in 96 != 64
      DevTensor x_ok(be, 4, 64, randn(rng, 4 * 64));
      DevTensor out_ok(be, DType::F32, 4, 37);
      DevTensor out_narrow(be, DType::F32, 4, 36);  // n_out 36 < 37
      DevTensor out_short(be, DType::F32, 2, 37);   // 2 rows < 4 tokens
      EXPECT_FALSE(be.matmul(**weight, *x_narrow, 4, *out_ok, nullptr).is_ok());
      EXPECT_FALSE(be.matmul(**weight, *x_wide, 4, *out_ok, nullptr).is_ok());
      EXPECT_FALSE(be.matmul(**weight, *x_ok, 4, *out_narrow, nullptr).is_ok());
      EXPECT_FALSE(be.matmul(**weight, *x_ok, 4, *out_short, nullptr).is_ok());
      EXPECT_FALSE(be.matmul(**weight, *x_ok, 5, *out_ok, nullptr).is_ok());  // x has 4 rows
      const Status s = be.matmul(**weight, *x_narrow, 4, *out_ok, nullptr);
      EXPECT_NE(s.message().find("'w'"), std::string::npos) << s.message();
      // and the backend still works afterwards
      EXPECT_TRUE(be.matmul(**weight, *x_ok, 4, *out_ok, nullptr).is_ok());
    }
  }
}

TEST(BackendOpsBadInput, LoadWeightRejectsWhatItCannotMultiply) {
  OPS_TRACE_SEED();
  std::mt19937 rng = test_rng();
  CpuBackend be(2);
  // quantized rows whose width is not a whole number of 32-element blocks
  const std::vector<float> wf = randn(rng, 4 * 48);
  const std::vector<uint8_t> f32 = quantize_rows(DType::F32, wf, 4, 48);
  auto bad = be.load_weight(HostMatrix{DType::Q4_0, 40, 4, f32.data(), "odd"});
  EXPECT_FALSE(bad.has_value());
  // K-quant rows that are not whole 256-element superblocks
  const std::vector<uint8_t> q4k(4 * 144, 0x11);
  auto bad_k = be.load_weight(HostMatrix{DType::Q4_K, 128, 4, q4k.data(), "short"});
  EXPECT_FALSE(bad_k.has_value());
  // a type the CPU backend has no kernels for
  const std::vector<uint8_t> raw(4 * 84, 0x11);
  auto k = be.load_weight(HostMatrix{DType::Q2_K, 256, 4, raw.data(), "q2k"});
  EXPECT_FALSE(k.has_value());
  if (!k.has_value()) {
    EXPECT_NE(k.message().find("q2k"), std::string::npos) << k.message();
  }
}

TEST(BackendOpsBadInput, EmbedOutOfRangeTokenNamesTheId) {
  OPS_TRACE_SEED();
  std::mt19937 rng = test_rng();
  const int64_t vocab = 50, dim = 32;
  const std::vector<float> table_f = randn(rng, static_cast<size_t>(vocab * dim));
  const std::vector<uint8_t> table = quantize_rows(DType::Q8_0, table_f, vocab, dim);
  const HostMatrix host{DType::Q8_0, dim, vocab, table.data(), "token_embd"};
  for (const Variant& v : variants()) {
    SCOPED_TRACE(v.label());
    CpuBackend be(v.n_threads, v.table);
    DevTensor out(be, DType::F32, 3, dim);
    for (int32_t bad : {50, 51, 1000000, -1}) {
      const std::vector<int32_t> tokens = {3, bad, 7};
      const Status s = be.embed(host, tokens.data(), 3, *out);
      EXPECT_FALSE(s.is_ok()) << "token id " << bad;
      EXPECT_NE(s.message().find(std::to_string(bad)), std::string::npos)
          << "message does not name id " << bad << ": " << s.message();
    }
  }
}

// A table the reference routines cannot decode (q2_K) must be an error, not NaN rows.
TEST(BackendOpsBadInput, EmbedUnsupportedTableTypeIsAnError) {
  const std::vector<uint8_t> raw(4 * 84, 0x11);  // 4 rows of one q2_K block each
  const HostMatrix host{DType::Q2_K, 256, 4, raw.data(), "token_embd"};
  CpuBackend be(2);
  DevTensor out(be, DType::F32, 1, 256);
  const int32_t token = 1;
  const Status s = be.embed(host, &token, 1, *out);
  EXPECT_FALSE(s.is_ok()) << "embed from a q2_K table returned ok";
}

// Prints the largest error seen per op / type / ISA at the end of the run (opt-in).
class ErrorReport : public ::testing::Environment {
 public:
  void TearDown() override {
    if (!std::getenv("KESTREL_OPS_REPORT")) return;
    std::printf("[ BackendOps ] largest normalized error per op/type/isa/threads:\n");
    for (const auto& [key, err] : error_log()) std::printf("  %-40s %.3e\n", key.c_str(), err);
  }
};
[[maybe_unused]] ::testing::Environment* const kErrorReport =
    ::testing::AddGlobalTestEnvironment(new ErrorReport);

}  // namespace
}  // namespace kestrel::backend::cpu::ops_test
