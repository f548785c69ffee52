// CPU backend conformance, part 2: rms_norm, rope (both layouts), swiglu, add, get_rows,
// kv_store and causal GQA attention, on every kernel table this CPU supports, against scalar
// double-precision references. Part 1 (matmul, embed, bad input) is test_cpu_ops.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "cpu_ops_common.h"
#include "format/quant/quant.h"

namespace kestrel::backend::cpu::ops_test {
namespace {

// ---- thresholds: normalized error ||out - ref|| / ||ref|| per output row (token) ----------

// rms_norm: a float multiply by 1/rms and by the weight per element (the sum of squares is
// in double): a few float roundings, ~2e-7 relative. 1e-6 catches a misplaced eps (tested
// with rows where eps changes the result by ~5%) or a wrong mean.
constexpr double kRmsNormMaxErr = 1e-6;
// rope: cos/sin rounded to float and one rotation in float, ~3e-7 relative. An off-by-one in
// the frequency index or the pairing is O(1).
constexpr double kRopeMaxErr = 1e-6;
// swiglu: float exp (<= 1-2 ulp), a division and a multiply: ~4e-7 relative.
constexpr double kSwigluMaxErr = 1e-6;
// add: one float rounding per element, at most 2^-24 ~ 6e-8 relative to the exact sum.
constexpr double kAddMaxErr = 1e-7;
// get_rows is a copy: bit-exact.
constexpr double kGetRowsMaxErr = 0.0;
// attention: the reference reads the same dequantized cache rows, so only float arithmetic
// differs: float q.k dots (head_dim <= 64), float exp, float axpy over <= 64 positions.
// That is ~1e-6 relative at worst; 1e-5 still catches a wrong scale (any 1% change of the
// scale moves the softmax by ~1e-2), a leaked future position, or a wrong GQA head mapping.
constexpr double kAttentionMaxErr = 1e-5;
// kv_store bytes must equal quant::quantize_row of the same rows exactly (checked bytewise).

double row_err(const std::vector<float>& got, const std::vector<double>& ref, int64_t row,
               int64_t n) {
  return norm_err(got.data() + row * n, ref.data() + row * n, static_cast<size_t>(n));
}

// ---- rms_norm -----------------------------------------------------------------------------

TEST(BackendOpsRmsNorm, MatchesReference) {
  OPS_TRACE_SEED();
  std::mt19937 rng = test_rng();
  // per-token scales: with x ~ N(0, 0.01^2), mean(x^2) = 1e-4 and eps = 1e-5 moves the
  // result by ~5%, so eps must be inside the square root as specified
  const std::vector<float> scales = {1.0f, 0.01f, 100.0f, 0.003f, 1.0f};
  const int n_tokens = static_cast<int>(scales.size());
  for (int64_t dim : {96, 4096}) {
    for (float eps : {1e-5f, 1e-6f}) {
      std::vector<float> x = randn(rng, static_cast<size_t>(n_tokens * dim));
      for (int t = 0; t < n_tokens; ++t)
        for (int64_t i = 0; i < dim; ++i) x[t * dim + i] *= scales[t];
      const std::vector<float> w = randn(rng, static_cast<size_t>(dim));
      std::vector<double> ref(x.size());
      for (int t = 0; t < n_tokens; ++t) {
        double ss = 0;
        for (int64_t i = 0; i < dim; ++i)
          ss += static_cast<double>(x[t * dim + i]) * x[t * dim + i];
        const double inv = 1.0 / std::sqrt(ss / dim + eps);
        for (int64_t i = 0; i < dim; ++i) ref[t * dim + i] = x[t * dim + i] * inv * w[i];
      }
      for (const Variant& v : variants()) {
        SCOPED_TRACE(v.label() + " dim=" + std::to_string(dim) + " eps=" + std::to_string(eps));
        CpuBackend be(v.n_threads, v.table);
        DevTensor xt(be, n_tokens, dim, x);
        DevTensor wt(be, be.load_vector(w.data(), dim, "norm"));
        DevTensor out(be, DType::F32, n_tokens, dim);
        ASSERT_TRUE(be.rms_norm(*xt, n_tokens, *wt, eps, *out).is_ok());
        const std::vector<float> got = out.floats();
        for (int t = 0; t < n_tokens; ++t) {
          const double err = row_err(got, ref, t, dim);
          EXPECT_LE(err, kRmsNormMaxErr) << "token " << t << " scale " << scales[t];
          record_error("rms_norm/f32/" + v.label(), err);
        }
      }
    }
  }
}

// ---- rope ---------------------------------------------------------------------------------

TEST(BackendOpsRope, BothLayoutsMatchReference) {
  OPS_TRACE_SEED();
  std::mt19937 rng = test_rng();
  const std::vector<int32_t> positions = {5, 9, 100, 0, 4095, 6};  // not contiguous, not sorted
  const int n_tokens = static_cast<int>(positions.size());
  for (RopeLayout layout : {RopeLayout::Normal, RopeLayout::NeoX}) {
    for (int head_dim : {64, 128, 32}) {
      for (float base : {10000.0f, 500000.0f}) {
        const int n_heads = head_dim == 128 ? 3 : 5;
        const int64_t width = static_cast<int64_t>(n_heads) * head_dim;
        const std::vector<float> x = randn(rng, static_cast<size_t>(n_tokens * width));
        std::vector<double> ref(x.begin(), x.end());
        const int half = head_dim / 2;
        for (int t = 0; t < n_tokens; ++t) {
          for (int h = 0; h < n_heads; ++h) {
            for (int i = 0; i < half; ++i) {
              const double theta =
                  positions[t] * std::pow(static_cast<double>(base), -2.0 * i / head_dim);
              const int64_t base_idx = t * width + static_cast<int64_t>(h) * head_dim;
              const int64_t i0 = base_idx + (layout == RopeLayout::Normal ? 2 * i : i);
              const int64_t i1 = base_idx + (layout == RopeLayout::Normal ? 2 * i + 1 : i + half);
              const double a = x[i0], b = x[i1];
              ref[i0] = a * std::cos(theta) - b * std::sin(theta);
              ref[i1] = a * std::sin(theta) + b * std::cos(theta);
            }
          }
        }
        const std::string lname = layout == RopeLayout::Normal ? "normal" : "neox";
        for (const Variant& v : variants()) {
          SCOPED_TRACE(lname + " " + v.label() + " head_dim=" + std::to_string(head_dim) +
                       " base=" + std::to_string(base));
          CpuBackend be(v.n_threads, v.table);
          DevTensor xt(be, n_tokens, width, x);
          const RopeParams p{n_heads, head_dim, base, layout};
          ASSERT_TRUE(be.rope(*xt, n_tokens, positions.data(), p).is_ok());
          const std::vector<float> got = xt.floats();
          for (int t = 0; t < n_tokens; ++t) {
            const double err = row_err(got, ref, t, width);
            EXPECT_LE(err, kRopeMaxErr) << "token " << t << " at position " << positions[t];
            record_error("rope-" + lname + "/f32/" + v.label(), err);
          }
        }
      }
    }
  }
}

// ---- swiglu, add, get_rows ----------------------------------------------------------------

TEST(BackendOpsElementwise, SwigluMatchesReference) {
  OPS_TRACE_SEED();
  std::mt19937 rng = test_rng();
  const int n_tokens = 3;
  const int64_t dim = 1000;  // not a multiple of any vector width
  // gate with sd 4 reaches the saturated ends of silu (g / (1 + e^-g) -> g and -> 0)
  const std::vector<float> gate = randn(rng, static_cast<size_t>(n_tokens * dim), 4.0f);
  const std::vector<float> up = randn(rng, static_cast<size_t>(n_tokens * dim));
  std::vector<double> ref(gate.size());
  for (size_t i = 0; i < ref.size(); ++i)
    ref[i] = gate[i] / (1.0 + std::exp(-static_cast<double>(gate[i]))) * up[i];
  for (const Variant& v : variants()) {
    SCOPED_TRACE(v.label());
    CpuBackend be(v.n_threads, v.table);
    DevTensor gt(be, n_tokens, dim, gate);
    DevTensor ut(be, n_tokens, dim, up);
    DevTensor out(be, DType::F32, n_tokens, dim);
    ASSERT_TRUE(be.swiglu(*gt, *ut, n_tokens, *out).is_ok());
    const std::vector<float> got = out.floats();
    for (int t = 0; t < n_tokens; ++t) {
      const double err = row_err(got, ref, t, dim);
      EXPECT_LE(err, kSwigluMaxErr) << "token " << t;
      record_error("swiglu/f32/" + v.label(), err);
    }
  }
}

TEST(BackendOpsElementwise, AddMatchesReference) {
  OPS_TRACE_SEED();
  std::mt19937 rng = test_rng();
  const int n_tokens = 3;
  const int64_t dim = 1000;
  const std::vector<float> x = randn(rng, static_cast<size_t>(n_tokens * dim));
  const std::vector<float> y = randn(rng, static_cast<size_t>(n_tokens * dim), 3.0f);
  std::vector<double> ref(x.size());
  for (size_t i = 0; i < ref.size(); ++i) ref[i] = static_cast<double>(x[i]) + y[i];
  for (const Variant& v : variants()) {
    SCOPED_TRACE(v.label());
    CpuBackend be(v.n_threads, v.table);
    DevTensor xt(be, n_tokens, dim, x);
    DevTensor yt(be, n_tokens, dim, y);
    ASSERT_TRUE(be.add(*xt, *yt, n_tokens).is_ok());
    const std::vector<float> got = xt.floats();
    for (int t = 0; t < n_tokens; ++t) {
      const double err = row_err(got, ref, t, dim);
      EXPECT_LE(err, kAddMaxErr) << "token " << t;
      record_error("add/f32/" + v.label(), err);
    }
    // y is an input only
    EXPECT_EQ(yt.floats(), y);
  }
}

TEST(BackendOpsElementwise, GetRowsCopiesTheChosenRows) {
  OPS_TRACE_SEED();
  std::mt19937 rng = test_rng();
  const int64_t n_src = 7, dim = 100;
  const std::vector<float> x = randn(rng, static_cast<size_t>(n_src * dim));
  const std::vector<int32_t> rows = {6, 0, 3, 3, 5};
  const int n_rows = static_cast<int>(rows.size());
  std::vector<double> ref(static_cast<size_t>(n_rows * dim));
  for (int i = 0; i < n_rows; ++i)
    for (int64_t c = 0; c < dim; ++c) ref[i * dim + c] = x[rows[i] * dim + c];
  for (const Variant& v : variants()) {
    SCOPED_TRACE(v.label());
    CpuBackend be(v.n_threads, v.table);
    DevTensor xt(be, n_src, dim, x);
    DevTensor out(be, DType::F32, n_rows, dim);
    ASSERT_TRUE(be.get_rows(*xt, rows.data(), n_rows, *out).is_ok());
    const std::vector<float> got = out.floats();
    for (int i = 0; i < n_rows; ++i) {
      const double err = row_err(got, ref, i, dim);
      EXPECT_LE(err, kGetRowsMaxErr) << "row " << i << " (source " << rows[i] << ")";
      record_error("get_rows/f32/" + v.label(), err);
    }
    const int32_t bad[] = {2, static_cast<int32_t>(n_src)};
    EXPECT_FALSE(be.get_rows(*xt, bad, 2, *out).is_ok());
  }
}

// ---- kv_store -----------------------------------------------------------------------------

constexpr uint8_t kKSentinel = 0xA5, kVSentinel = 0x5A;

// Checks every row of a cache: rows written (positions[t]) hold quantize_row of src row t,
// all others still hold the sentinel byte.
void check_cache_rows(const DevTensor& cache, const std::vector<float>& src, int64_t kv_dim,
                      const std::vector<int32_t>& positions, uint8_t sentinel,
                      const std::string& what) {
  SCOPED_TRACE(what);
  const DType type = (*cache).type;
  const int64_t rb = quant::row_bytes(type, kv_dim);
  const std::vector<uint8_t> got = cache.bytes();
  std::vector<uint8_t> want(static_cast<size_t>(rb));
  for (int64_t r = 0; r < (*cache).rows; ++r) {
    const auto it = std::find(positions.begin(), positions.end(), static_cast<int32_t>(r));
    if (it != positions.end()) {
      const int64_t t = it - positions.begin();
      quant::quantize_row(type, src.data() + t * kv_dim, want.data(), kv_dim);
    } else {
      std::fill(want.begin(), want.end(), sentinel);
    }
    EXPECT_EQ(std::memcmp(got.data() + r * rb, want.data(), static_cast<size_t>(rb)), 0)
        << "cache row " << r << (it != positions.end() ? " (written)" : " (must be untouched)");
  }
}

TEST(BackendOpsKvStore, BytesEqualQuantizeRowAndOtherRowsUntouched) {
  OPS_TRACE_SEED();
  std::mt19937 rng = test_rng();
  const int64_t n_ctx = 64, kv_dim = 128;
  const std::vector<int32_t> positions = {5, 40, 17, 63, 0, 18};  // arbitrary, both ends
  const int n_tokens = static_cast<int>(positions.size());
  const DType kv_types[] = {DType::F16, DType::Q8_0, DType::Q4_0};
  for (DType kt : kv_types) {
    for (DType vt : kv_types) {
      const std::vector<float> k = randn(rng, static_cast<size_t>(n_tokens * kv_dim));
      const std::vector<float> v = randn(rng, static_cast<size_t>(n_tokens * kv_dim), 2.0f);
      for (const Variant& var : variants()) {
        const std::string what = "k " + type_str(kt) + " v " + type_str(vt) + " " + var.label();
        CpuBackend be(var.n_threads, var.table);
        DevTensor kt_(be, n_tokens, kv_dim, k);
        DevTensor vt_(be, n_tokens, kv_dim, v);
        DevTensor kc(be, kt, n_ctx, kv_dim, "k_cache");
        DevTensor vc(be, vt, n_ctx, kv_dim, "v_cache");
        kc.fill_bytes(kKSentinel);
        vc.fill_bytes(kVSentinel);
        const Status s = be.kv_store(*kt_, *vt_, n_tokens, positions.data(), *kc, *vc);
        ASSERT_TRUE(s.is_ok()) << what << ": " << s.message();
        check_cache_rows(kc, k, kv_dim, positions, kKSentinel, what + " (K)");
        check_cache_rows(vc, v, kv_dim, positions, kVSentinel, what + " (V)");
      }
    }
  }
}

TEST(BackendOpsBadInput, KvStoreOutsideTheCacheIsAnError) {
  OPS_TRACE_SEED();
  std::mt19937 rng = test_rng();
  const int64_t n_ctx = 16, kv_dim = 64;
  for (DType type : {DType::F16, DType::Q8_0, DType::Q4_0}) {
    for (const Variant& var : variants()) {
      SCOPED_TRACE(type_str(type) + " " + var.label());
      CpuBackend be(var.n_threads, var.table);
      DevTensor k(be, 2, kv_dim, randn(rng, 2 * kv_dim));
      DevTensor v(be, 2, kv_dim, randn(rng, 2 * kv_dim));
      DevTensor kc(be, type, n_ctx, kv_dim);
      DevTensor vc(be, type, n_ctx, kv_dim);
      for (int32_t bad : {16, 17, 100000, -1}) {
        kc.fill_bytes(kKSentinel);
        vc.fill_bytes(kVSentinel);
        const std::vector<int32_t> pos = {3, bad};  // a valid row first
        const Status s = be.kv_store(*k, *v, 2, pos.data(), *kc, *vc);
        EXPECT_FALSE(s.is_ok()) << "position " << bad;
        // nothing written, not even the valid row
        check_cache_rows(kc, {}, kv_dim, {}, kKSentinel, "K after position " + std::to_string(bad));
        check_cache_rows(vc, {}, kv_dim, {}, kVSentinel, "V after position " + std::to_string(bad));
      }
    }
  }
}

// kv_store must check positions against the V cache too, not only K. The sizes keep a stray
// row (bytes [144, 162) of an 8 x 18-byte q4_0 cache) inside the allocation's 64-byte
// rounding, so a regression fails the test instead of corrupting memory.
TEST(BackendOpsBadInput, KvStoreChecksTheVCacheRowsToo) {
  OPS_TRACE_SEED();
  std::mt19937 rng = test_rng();
  CpuBackend be(2);
  DevTensor k(be, 1, 32, randn(rng, 32));
  DevTensor v(be, 1, 32, randn(rng, 32));
  DevTensor kc(be, DType::Q4_0, 16, 32);
  DevTensor vc(be, DType::Q4_0, 8, 32);
  const int32_t pos = 8;  // inside the K cache, one past the end of the V cache
  EXPECT_FALSE(be.kv_store(*k, *v, 1, &pos, *kc, *vc).is_ok());
}

// ---- attention ----------------------------------------------------------------------------

struct AttnCase {
  int head_dim;
  DType k_type, v_type;
  int p0, n_tokens;  // queries at positions [p0, p0 + n_tokens)
};

TEST(BackendOpsAttention, CausalGqaMatchesReference) {
  OPS_TRACE_SEED();
  std::mt19937 rng = test_rng();
  const int n_head = 8, n_head_kv = 2, n_ctx = 64;
  std::vector<AttnCase> cases;
  for (int hd : {64, 32})
    for (DType t : {DType::F16, DType::Q8_0, DType::Q4_0}) {
      cases.push_back({hd, t, t, 13, 5});  // prefill chunk after 13 cached positions
      cases.push_back({hd, t, t, 40, 1});  // decode
      cases.push_back({hd, t, t, 1, 17});  // long chunk right after the first position
    }
  cases.push_back({64, DType::F16, DType::Q4_0, 20, 9});  // mixed K/V cache types
  cases.push_back({32, DType::Q8_0, DType::F16, 7, 8});
  for (const AttnCase& c : cases) {
    const int hd = c.head_dim;
    const int64_t q_dim = static_cast<int64_t>(n_head) * hd;
    const int64_t kv_dim = static_cast<int64_t>(n_head_kv) * hd;
    const int T = c.n_tokens;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    // The whole cache gets random rows first (the "past" before p0 and stale rows after the
    // chunk, which causal attention must not see), then the chunk's own rows are stored.
    const std::vector<float> k_old = randn(rng, static_cast<size_t>(n_ctx * kv_dim));
    const std::vector<float> v_old = randn(rng, static_cast<size_t>(n_ctx * kv_dim));
    const std::vector<float> k_new = randn(rng, static_cast<size_t>(T * kv_dim));
    const std::vector<float> v_new = randn(rng, static_cast<size_t>(T * kv_dim));
    const std::vector<float> q = randn(rng, static_cast<size_t>(T * q_dim), 1.5f);
    std::vector<int32_t> all_pos(n_ctx), pos(T);
    for (int i = 0; i < n_ctx; ++i) all_pos[i] = i;
    for (int t = 0; t < T; ++t) pos[t] = c.p0 + t;
    const std::string name = "head_dim=" + std::to_string(hd) + " k=" + type_str(c.k_type) +
                             " v=" + type_str(c.v_type) + " p0=" + std::to_string(c.p0) +
                             " T=" + std::to_string(T);
    for (const Variant& var : variants()) {
      SCOPED_TRACE(name + " " + var.label());
      CpuBackend be(var.n_threads, var.table);
      DevTensor ko(be, n_ctx, kv_dim, k_old), vo(be, n_ctx, kv_dim, v_old);
      DevTensor kn(be, T, kv_dim, k_new), vn(be, T, kv_dim, v_new);
      DevTensor kc(be, c.k_type, n_ctx, kv_dim, "k_cache");
      DevTensor vc(be, c.v_type, n_ctx, kv_dim, "v_cache");
      ASSERT_TRUE(be.kv_store(*ko, *vo, n_ctx, all_pos.data(), *kc, *vc).is_ok());
      ASSERT_TRUE(be.kv_store(*kn, *vn, T, pos.data(), *kc, *vc).is_ok());
      // reference from what the cache holds, dequantized with the reference routine
      const std::vector<uint8_t> kb = kc.bytes(), vb = vc.bytes();
      std::vector<float> kf(static_cast<size_t>(n_ctx * kv_dim)), vf(kf.size());
      for (int r = 0; r < n_ctx; ++r) {
        quant::dequantize_row(c.k_type, kb.data() + r * quant::row_bytes(c.k_type, kv_dim),
                              kf.data() + r * kv_dim, kv_dim);
        quant::dequantize_row(c.v_type, vb.data() + r * quant::row_bytes(c.v_type, kv_dim),
                              vf.data() + r * kv_dim, kv_dim);
      }
      std::vector<double> ref(static_cast<size_t>(T * q_dim));
      std::vector<double> p(static_cast<size_t>(n_ctx));
      for (int t = 0; t < T; ++t) {
        for (int h = 0; h < n_head; ++h) {
          const int kvh = h / (n_head / n_head_kv);
          const float* qh = q.data() + t * q_dim + h * hd;
          double mx = -INFINITY;
          for (int j = 0; j <= pos[t]; ++j) {
            double s = 0;
            for (int d = 0; d < hd; ++d)
              s += static_cast<double>(qh[d]) * kf[j * kv_dim + kvh * hd + d];
            p[j] = s * scale;
            mx = std::max(mx, p[j]);
          }
          double sum = 0;
          for (int j = 0; j <= pos[t]; ++j) sum += (p[j] = std::exp(p[j] - mx));
          for (int d = 0; d < hd; ++d) {
            double o = 0;
            for (int j = 0; j <= pos[t]; ++j) o += p[j] / sum * vf[j * kv_dim + kvh * hd + d];
            ref[t * q_dim + h * hd + d] = o;
          }
        }
      }
      DevTensor qt(be, T, q_dim, q);
      DevTensor out(be, DType::F32, T, q_dim);
      const AttentionParams ap{n_head, n_head_kv, hd, scale};
      const Status s = be.attention(*qt, T, pos.data(), *kc, *vc, ap, *out);
      ASSERT_TRUE(s.is_ok()) << s.message();
      const std::vector<float> got = out.floats();
      for (int t = 0; t < T; ++t) {
        const double err = row_err(got, ref, t, q_dim);
        EXPECT_LE(err, kAttentionMaxErr) << "token " << t << " at position " << pos[t];
        record_error("attention/k=" + type_str(c.k_type) + ",v=" + type_str(c.v_type) + "/hd" +
                         std::to_string(hd) + "/" + var.label(),
                     err);
      }
    }
  }
}

}  // namespace
}  // namespace kestrel::backend::cpu::ops_test
