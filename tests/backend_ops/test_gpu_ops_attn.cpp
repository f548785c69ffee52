// GPU backend conformance, part 3: kv_store into f16 / q8_0 / q4_0 caches at non-contiguous
// positions (against quant::quantize_row of the same values), and causal GQA attention over
// caches of every type with prior context, against a double-precision reference that reads the
// cache the backend holds, dequantized with quant::dequantize_row.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "format/quant/fp16.h"
#include "gpu_ops_common.h"

namespace kestrel::backend::gpu_ops_test {
namespace {

// ---- kv_store -------------------------------------------------------------------------------

constexpr uint8_t kKSentinel = 0xA5, kVSentinel = 0x5A;

// Differences from quantize_row over the rows compared (see the kv_store note in
// gpu_ops_common.h for what is allowed).
struct KvStats {
  int64_t codes = 0, codes_off = 0, blocks = 0, scales_off = 0;
};

// Code j of a q8_0 or q4_0 block, as a signed integer value multiple of d.
int code_value(DType type, const uint8_t* block, int j) {
  if (type == DType::Q8_0) return reinterpret_cast<const quant::BlockQ8_0*>(block)->qs[j];
  const auto* b = reinterpret_cast<const quant::BlockQ4_0*>(block);
  return (j < 16 ? (b->qs[j] & 15) : (b->qs[j - 16] >> 4)) - 8;
}

// Checks one written cache row against the source floats; returns "" or the first problem.
std::string check_written_row(DType type, const uint8_t* got, const float* src, int64_t n,
                              KvStats& st) {
  std::vector<uint8_t> want(static_cast<size_t>(quant::row_bytes(type, n)));
  quant::quantize_row(type, src, want.data(), n);
  if (type == DType::F16) {
    for (int64_t i = 0; i < n; ++i)
      if (std::memcmp(got + 2 * i, want.data() + 2 * i, 2) != 0)
        return "element " + std::to_string(i) + " is not fp32_to_fp16(" + std::to_string(src[i]) +
               ")";
    return "";
  }
  const int64_t bb = quant::type_info(type)->block_bytes;
  for (int64_t b = 0; b < n / quant::kBlock; ++b) {
    const uint8_t* gb = got + b * bb;
    const uint8_t* wb = want.data() + b * bb;
    uint16_t gd, wd;  // d is the first field of both block types
    std::memcpy(&gd, gb, 2);
    std::memcpy(&wd, wb, 2);
    ++st.blocks;
    if (gd != wd) {
      ++st.scales_off;
      if ((gd ^ wd) & 0x8000 || std::abs(static_cast<int>(gd) - static_cast<int>(wd)) > 1)
        return "block " + std::to_string(b) + ": scale " + std::to_string(quant::fp16_to_fp32(gd)) +
               " vs reference " + std::to_string(quant::fp16_to_fp32(wd)) + " (more than 1 ulp)";
    }
    const float d = quant::fp16_to_fp32(gd);
    for (int j = 0; j < quant::kBlock; ++j) {
      const int gq = code_value(type, gb, j), wq = code_value(type, wb, j);
      ++st.codes;
      st.codes_off += gq != wq;
      const float x = src[b * quant::kBlock + j];
      if (std::abs(gq - wq) > 1 || std::fabs(gq * d - x) > 1.01f * std::fabs(d))
        return "element " + std::to_string(b * quant::kBlock + j) + " = " + std::to_string(x) +
               ": code " + std::to_string(gq) + " (reference " + std::to_string(wq) +
               ") with scale " + std::to_string(d);
    }
  }
  return "";
}

// Every row of a cache: the last write to it (source row of `values`) or the sentinel.
void check_cache(const std::vector<uint8_t>& got, DType type, int64_t n_ctx, int64_t kv_dim,
                 const std::vector<int>& writer, const std::vector<float>& values, uint8_t sentinel,
                 KvStats& st, const std::string& what) {
  SCOPED_TRACE(what);
  const int64_t rb = quant::row_bytes(type, kv_dim);
  int64_t bad = 0;
  for (int64_t r = 0; r < n_ctx; ++r) {
    const uint8_t* row = got.data() + r * rb;
    if (writer[r] < 0) {
      const bool kept = std::all_of(row, row + rb, [&](uint8_t b) { return b == sentinel; });
      EXPECT_TRUE(kept) << "cache row " << r << " was not written to but changed";
      bad += !kept;
    } else {
      const std::string problem =
          check_written_row(type, row, values.data() + writer[r] * kv_dim, kv_dim, st);
      EXPECT_EQ(problem, "") << "cache row " << r << " (source row " << writer[r] << ")";
      bad += !problem.empty();
    }
    if (bad > 5) break;  // enough to see the pattern
  }
}

KESTREL_GPU_OPS_SUITE(GpuOpsKvStore);

// Three stores without synchronize() in between: 23 shuffled positions including both ends,
// then 9 (two of them overwriting rows of the first), then one (decode). Values N(0, 1) (K)
// and N(0, 4) (V) with one +-20 outlier per row.
TEST_P(GpuOpsKvStore, NonContiguousPositionsMatchQuantizeRowOthersUntouched) {
  GPU_TRACE_SEED();
  std::mt19937 rng = test_rng();
  const int64_t n_ctx = 300;
  const std::pair<DType, DType> type_pairs[] = {{DType::F16, DType::F16},
                                                {DType::Q8_0, DType::Q8_0},
                                                {DType::Q4_0, DType::Q4_0},
                                                {DType::Q8_0, DType::Q4_0},
                                                {DType::F16, DType::Q8_0}};
  std::map<DType, KvStats> stats;
  for (int64_t kv_dim : {128, 192, 1024}) {
    for (const auto& [kt, vt] : type_pairs) {
      const std::string what =
          "kv_dim=" + std::to_string(kv_dim) + " k=" + type_str(kt) + " v=" + type_str(vt);
      SCOPED_TRACE(what);
      std::vector<int32_t> perm(n_ctx);
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin() + 1, perm.end() - 1, rng);
      // perm[0] = 0 and perm[n_ctx - 1] = n_ctx - 1 stay; the rest is shuffled
      std::vector<int32_t> pa(perm.begin(), perm.begin() + 22);
      pa.push_back(perm[n_ctx - 1]);
      std::shuffle(pa.begin(), pa.end(), rng);    // 23 positions, both ends among them
      std::vector<int32_t> pb = {pa[4], pa[17]};  // overwrites
      for (int i = 0; i < 7; ++i) pb.push_back(perm[static_cast<size_t>(30 + i)]);  // new rows
      std::shuffle(pb.begin(), pb.end(), rng);
      const std::vector<int32_t> pc = {perm[100]};
      const std::vector<std::vector<int32_t>> batches = {pa, pb, pc};
      int total = 0;
      for (const auto& b : batches) total += static_cast<int>(b.size());
      std::vector<float> k = randn(rng, static_cast<size_t>(total * kv_dim));
      std::vector<float> v = randn(rng, static_cast<size_t>(total * kv_dim), 2.0f);
      std::uniform_int_distribution<int64_t> where(0, kv_dim - 1);
      for (int r = 0; r < total; ++r) {
        float& a = k[r * kv_dim + where(rng)];
        a = std::copysign(20.0f, a);
        float& b = v[r * kv_dim + where(rng)];
        b = std::copysign(20.0f, b);
      }
      DevTensor kc(be(), kt, n_ctx, kv_dim, "k_cache"), vc(be(), vt, n_ctx, kv_dim, "v_cache");
      ASSERT_TRUE(kc && vc);
      const std::vector<uint8_t> ks(kc->bytes, kKSentinel), vs(vc->bytes, kVSentinel);
      ASSERT_TRUE(be().upload(*kc, 0, n_ctx, ks.data()).is_ok());
      ASSERT_TRUE(be().upload(*vc, 0, n_ctx, vs.data()).is_ok());
      std::vector<int> writer(n_ctx, -1);
      int row0 = 0;
      for (const auto& pos : batches) {
        const int T = static_cast<int>(pos.size());
        const std::vector<float> kb(k.begin() + row0 * kv_dim, k.begin() + (row0 + T) * kv_dim);
        const std::vector<float> vb(v.begin() + row0 * kv_dim, v.begin() + (row0 + T) * kv_dim);
        DevTensor kt_(be(), T, kv_dim, kb), vt_(be(), T, kv_dim, vb);
        const Status s = be().kv_store(*kt_, *vt_, T, pos.data(), *kc, *vc);
        ASSERT_TRUE(s.is_ok()) << s.message();
        for (int t = 0; t < T; ++t) writer[pos[t]] = row0 + t;
        row0 += T;
        // kt_ and vt_ are freed here, possibly before the store ran: free() must be ordered
        // after the ops that use the tensor
      }
      check_cache(fetch_bytes(be(), kc), kt, n_ctx, kv_dim, writer, k, kKSentinel, stats[kt],
                  "K cache");
      check_cache(fetch_bytes(be(), vc), vt, n_ctx, kv_dim, writer, v, kVSentinel, stats[vt],
                  "V cache");
    }
  }
  for (const auto& [type, st] : stats) {
    if (type == DType::F16) continue;
    char note[200];
    std::snprintf(note, sizeof note,
                  "%lld of %lld codes and %lld of %lld scales differ from quantize_row by one "
                  "step / ulp",
                  static_cast<long long>(st.codes_off), static_cast<long long>(st.codes),
                  static_cast<long long>(st.scales_off), static_cast<long long>(st.blocks));
    gpu_note_log()[key("kv_store/" + type_str(type))] = note;
  }
}

TEST_P(GpuOpsKvStore, PositionsOutsideTheCacheAreAnErrorAndWriteNothing) {
  GPU_TRACE_SEED();
  std::mt19937 rng = test_rng();
  const int64_t kv_dim = 64;
  for (DType type : {DType::F16, DType::Q8_0, DType::Q4_0}) {
    SCOPED_TRACE(type_str(type));
    DevTensor k(be(), 2, kv_dim, randn(rng, 2 * kv_dim)),
        v(be(), 2, kv_dim, randn(rng, 2 * kv_dim));
    DevTensor kc(be(), type, 16, kv_dim), vc(be(), type, 8, kv_dim);  // V shorter than K
    const std::vector<uint8_t> ks(kc->bytes, kKSentinel), vs(vc->bytes, kVSentinel);
    for (int32_t bad : {8, 16, 100000, -1}) {
      ASSERT_TRUE(be().upload(*kc, 0, kc->rows, ks.data()).is_ok());
      ASSERT_TRUE(be().upload(*vc, 0, vc->rows, vs.data()).is_ok());
      const int32_t pos[] = {3, bad};  // a valid row first
      EXPECT_FALSE(be().kv_store(*k, *v, 2, pos, *kc, *vc).is_ok()) << "position " << bad;
      EXPECT_EQ(fetch_bytes(be(), kc), ks) << "K cache written at position " << bad;
      EXPECT_EQ(fetch_bytes(be(), vc), vs) << "V cache written at position " << bad;
    }
  }
}

// ---- attention ------------------------------------------------------------------------------

struct AttnCase {
  int n_head, n_head_kv, head_dim;
  DType k_type, v_type;
  int p0, T;        // queries at positions [p0, p0 + T)
  float scale = 0;  // 0: 1 / sqrt(head_dim)
  float q_sd = 1.5f;
};

std::string case_str(const AttnCase& c) {
  return std::to_string(c.n_head) + "/" + std::to_string(c.n_head_kv) + " heads of " +
         std::to_string(c.head_dim) + " k=" + type_str(c.k_type) + " v=" + type_str(c.v_type) +
         " p0=" + std::to_string(c.p0) + " T=" + std::to_string(c.T) +
         " scale=" + std::to_string(c.scale) + " q_sd=" + std::to_string(c.q_sd);
}

// out[t][h] = softmax_j(scale * q[t][h] . K[j][g(h)]) V[j][g(h)] over j <= pos[t], in double,
// with g(h) = h / (n_head / n_head_kv).
std::vector<double> attention_reference(const AttnCase& c, float scale, const std::vector<float>& q,
                                        const std::vector<int32_t>& pos,
                                        const std::vector<float>& kf,
                                        const std::vector<float>& vf) {
  const int hd = c.head_dim, group = c.n_head / c.n_head_kv;
  const int64_t q_dim = static_cast<int64_t>(c.n_head) * hd;
  const int64_t kv_dim = static_cast<int64_t>(c.n_head_kv) * hd;
  std::vector<double> ref(static_cast<size_t>(c.T * q_dim));
  host_parallel_for(static_cast<int64_t>(c.T) * c.n_head, [&](int64_t task) {
    const int64_t t = task / c.n_head;
    const int h = static_cast<int>(task % c.n_head), g = h / group;
    const float* qh = q.data() + t * q_dim + static_cast<int64_t>(h) * hd;
    const int64_t n = pos[t] + 1;
    std::vector<double> p(static_cast<size_t>(n)), o(static_cast<size_t>(hd), 0.0);
    double mx = -INFINITY;
    for (int64_t j = 0; j < n; ++j) {
      p[j] = scale * dot_double(qh, kf.data() + j * kv_dim + static_cast<int64_t>(g) * hd, hd);
      mx = std::max(mx, p[j]);
    }
    double sum = 0;
    for (int64_t j = 0; j < n; ++j) sum += (p[j] = std::exp(p[j] - mx));
    for (int64_t j = 0; j < n; ++j) {
      const float* vj = vf.data() + j * kv_dim + static_cast<int64_t>(g) * hd;
      for (int d = 0; d < hd; ++d) o[d] += p[j] * vj[d];
    }
    for (int d = 0; d < hd; ++d) ref[t * q_dim + h * hd + d] = o[d] / sum;
  });
  return ref;
}

// The whole cache is filled with random rows uploaded as quantize_row bytes (the past before
// p0, and stale rows after the chunk that causal attention must not see), the chunk's own rows
// are stored with kv_store as the model does, then attention runs into a poisoned output.
void run_attention_case(Backend& be, const std::string& backend, std::mt19937& rng,
                        const AttnCase& c) {
  SCOPED_TRACE(case_str(c));
  const int hd = c.head_dim, T = c.T;
  const int64_t q_dim = static_cast<int64_t>(c.n_head) * hd;
  const int64_t kv_dim = static_cast<int64_t>(c.n_head_kv) * hd;
  const int64_t n_ctx = c.p0 + T + 5;
  const float scale = c.scale > 0 ? c.scale : 1.0f / std::sqrt(static_cast<float>(hd));
  const std::vector<float> k_old = randn(rng, static_cast<size_t>(n_ctx * kv_dim));
  const std::vector<float> v_old = randn(rng, static_cast<size_t>(n_ctx * kv_dim));
  const std::vector<float> k_new = randn(rng, static_cast<size_t>(T * kv_dim));
  const std::vector<float> v_new = randn(rng, static_cast<size_t>(T * kv_dim));
  const std::vector<float> q = randn(rng, static_cast<size_t>((T + 1) * q_dim), c.q_sd);
  std::vector<int32_t> pos(static_cast<size_t>(T));
  std::iota(pos.begin(), pos.end(), c.p0);

  DevTensor kc(be, c.k_type, n_ctx, kv_dim, "k_cache"), vc(be, c.v_type, n_ctx, kv_dim, "v_cache");
  ASSERT_TRUE(kc && vc);
  const std::vector<uint8_t> kq = quantize_rows(c.k_type, k_old, n_ctx, kv_dim);
  const std::vector<uint8_t> vq = quantize_rows(c.v_type, v_old, n_ctx, kv_dim);
  ASSERT_TRUE(be.upload(*kc, 0, n_ctx, kq.data()).is_ok());
  ASSERT_TRUE(be.upload(*vc, 0, n_ctx, vq.data()).is_ok());
  DevTensor kn(be, T, kv_dim, k_new), vn(be, T, kv_dim, v_new);
  ASSERT_TRUE(be.kv_store(*kn, *vn, T, pos.data(), *kc, *vc).is_ok());
  DevTensor qt(be, T + 1, q_dim, q);
  DevTensor out(be, DType::F32, T + 1, q_dim);
  fill_poison(be, out);
  const AttentionParams ap{c.n_head, c.n_head_kv, hd, scale};
  const Status s = be.attention(*qt, T, pos.data(), *kc, *vc, ap, *out);
  ASSERT_TRUE(s.is_ok()) << s.message();
  const std::vector<float> got = fetch(be, out);

  // the reference reads what the caches hold
  const std::vector<float> kf =
      dequantize_rows(c.k_type, fetch_bytes(be, kc).data(), n_ctx, kv_dim);
  const std::vector<float> vf =
      dequantize_rows(c.v_type, fetch_bytes(be, vc).data(), n_ctx, kv_dim);
  const std::vector<double> ref = attention_reference(c, scale, q, pos, kf, vf);
  check_err(compare_rows(got.data(), q_dim, ref.data(), T, q_dim), "attention",
            backend + " attention/k=" + type_str(c.k_type) + ",v=" + type_str(c.v_type) + "/hd" +
                std::to_string(hd) + "/T=" + std::to_string(T),
            "attention");
  EXPECT_EQ(count_unpoisoned(got, q_dim, T, T + 1), 0) << "attention wrote rows past T";
}

KESTREL_GPU_OPS_SUITE(GpuOpsAttention);

// GQA 8/2 (head_dim 64 and 128), 32/32 (llama-2-7b), 9/3 (SmolLM2), 32/8 (llama-3.2-1b);
// prior context p0 in {0, 5, 300}; T from decode (1) to a micro-batch past 512.
void check_cache_types(Backend& be, const std::string& backend, DType kt, DType vt) {
  std::mt19937 rng = test_rng();
  const int shapes[][3] = {{8, 2, 64}, {8, 2, 128}, {32, 32, 128}, {9, 3, 64}, {32, 8, 64}};
  for (const auto& sh : shapes)
    for (int p0 : {0, 5, 300})
      for (int T : {1, 7, 16, 100, 513}) {
        run_attention_case(be, backend, rng, AttnCase{sh[0], sh[1], sh[2], kt, vt, p0, T});
        if (::testing::Test::HasFatalFailure()) return;
      }
}

TEST_P(GpuOpsAttention, CacheF16) {
  GPU_TRACE_SEED();
  check_cache_types(be(), GetParam(), DType::F16, DType::F16);
}
TEST_P(GpuOpsAttention, CacheQ8_0) {
  GPU_TRACE_SEED();
  check_cache_types(be(), GetParam(), DType::Q8_0, DType::Q8_0);
}
TEST_P(GpuOpsAttention, CacheQ4_0) {
  GPU_TRACE_SEED();
  check_cache_types(be(), GetParam(), DType::Q4_0, DType::Q4_0);
}
TEST_P(GpuOpsAttention, CacheKQ8_0VQ4_0) {
  GPU_TRACE_SEED();
  check_cache_types(be(), GetParam(), DType::Q8_0, DType::Q4_0);
}

// rope_kv_store (one launch on CUDA and OpenCL) is exactly rope_qk, then kv_store: the same q, k
// and cache bytes, for every cache type (and K and V of different types, which OpenCL's launch
// takes and CUDA's leaves to the two ops) and both layouts, at shuffled positions with sentinels
// around them. The rope and kv_store tests check the two ops against the references. 13 tokens
// run CUDA's block-per-head kernel, 77 its prompt-chunk kernel (head sizes 64 and 128).
TEST_P(GpuOpsAttention, RopeKvStoreIsRopeThenStore) {
  GPU_TRACE_SEED();
  std::mt19937 rng = test_rng();
  const int n_ctx = 128, n_head = 8, n_kv = 2;
  const std::pair<DType, DType> cache_types[] = {{DType::F16, DType::F16},
                                                 {DType::Q8_0, DType::Q8_0},
                                                 {DType::Q4_0, DType::Q4_0},
                                                 {DType::Q8_0, DType::Q4_0}};
  for (const auto& [T, hd] : {std::pair{13, 128}, std::pair{77, 128}, std::pair{77, 64}})
    for (const auto& [type, v_type] : cache_types) {
      for (RopeLayout layout : {RopeLayout::Normal, RopeLayout::NeoX}) {
        const int kv_dim = n_kv * hd;
        std::vector<int32_t> pos(T);
        for (int t = 0; t < T; ++t) pos[t] = static_cast<int32_t>((7 * t + 5) % n_ctx);
        SCOPED_TRACE(std::to_string(T) + " tokens, head size " + std::to_string(hd) + ", " +
                     type_str(type) + "/" + type_str(v_type) +
                     (layout == RopeLayout::NeoX ? " neox" : " normal"));
        const RopeParams pq{n_head, hd, 10000.0f, layout}, pk{n_kv, hd, 10000.0f, layout};
        const std::vector<float> q = randn(rng, static_cast<size_t>(T * n_head * hd));
        const std::vector<float> k = randn(rng, static_cast<size_t>(T * kv_dim));
        const std::vector<float> v = randn(rng, static_cast<size_t>(T * kv_dim));
        DevTensor q1(be(), T, n_head * hd, q), k1(be(), T, kv_dim, k), v1(be(), T, kv_dim, v);
        DevTensor q2(be(), T, n_head * hd, q), k2(be(), T, kv_dim, k), v2(be(), T, kv_dim, v);
        DevTensor kc1(be(), type, n_ctx, kv_dim, "k_cache"), vc1(be(), v_type, n_ctx, kv_dim, "v");
        DevTensor kc2(be(), type, n_ctx, kv_dim, "k_cache"), vc2(be(), v_type, n_ctx, kv_dim, "v");
        ASSERT_TRUE(kc1 && vc1 && kc2 && vc2);
        const std::vector<uint8_t> sentinel(kc1->bytes, kKSentinel);
        const std::vector<uint8_t> v_sentinel(vc1->bytes, kKSentinel);
        for (DevTensor* c : {&kc1, &kc2})
          ASSERT_TRUE(be().upload(**c, 0, n_ctx, sentinel.data()).is_ok());
        for (DevTensor* c : {&vc1, &vc2})
          ASSERT_TRUE(be().upload(**c, 0, n_ctx, v_sentinel.data()).is_ok());
        {  // A position outside the cache is an error that stores nothing (checked below).
          DevTensor q3(be(), T, n_head * hd, q), k3(be(), T, kv_dim, k), v3(be(), T, kv_dim, v);
          std::vector<int32_t> bad_pos = pos;
          bad_pos[T / 2] = n_ctx;
          EXPECT_FALSE(
              be().rope_kv_store(*q3, *k3, *v3, T, bad_pos.data(), pq, pk, *kc1, *vc1).is_ok());
          EXPECT_EQ(fetch_bytes(be(), kc1), sentinel) << "stored despite the error";
          EXPECT_EQ(fetch_bytes(be(), vc1), v_sentinel) << "stored despite the error";
        }
        Status s = be().rope_kv_store(*q1, *k1, *v1, T, pos.data(), pq, pk, *kc1, *vc1);
        ASSERT_TRUE(s.is_ok()) << s.message();
        ASSERT_TRUE(be().rope_qk(*q2, *k2, T, pos.data(), pq, pk).is_ok());
        s = be().kv_store(*k2, *v2, T, pos.data(), *kc2, *vc2);
        ASSERT_TRUE(s.is_ok()) << s.message();
        EXPECT_EQ(fetch(be(), q1), fetch(be(), q2)) << "q";
        EXPECT_EQ(fetch(be(), k1), fetch(be(), k2)) << "k";
        EXPECT_NE(fetch(be(), k1), k) << "k was not rotated";
        EXPECT_EQ(fetch_bytes(be(), kc1), fetch_bytes(be(), kc2)) << "K cache";
        EXPECT_EQ(fetch_bytes(be(), vc1), fetch_bytes(be(), vc2)) << "V cache";
        EXPECT_NE(fetch_bytes(be(), kc1), sentinel) << "nothing stored";
        EXPECT_NE(fetch_bytes(be(), vc1), v_sentinel) << "no V stored";
      }
    }
}

// rope_kv_attention (on CUDA, a decode step's RoPE and KV store in the attention kernel's
// prologue) is exactly rope_kv_store, then attention: the same output and cache bytes for every
// cache type pair, both layouts, GQA and head sizes 64 and 128, over random older rows (a short
// cache, and one of several key splits). Three tokens take the two ops on every backend.
TEST_P(GpuOpsAttention, RopeKvAttentionIsTheOps) {
  GPU_TRACE_SEED();
  std::mt19937 rng = test_rng();
  const int shapes[][3] = {{8, 2, 64}, {8, 2, 128}, {32, 32, 128}, {9, 3, 64}};
  const std::pair<DType, DType> cache_types[] = {{DType::F16, DType::F16},
                                                 {DType::Q8_0, DType::Q8_0},
                                                 {DType::Q4_0, DType::Q4_0},
                                                 {DType::Q8_0, DType::Q4_0}};
  const std::pair<int, int> steps[] = {{1, 0}, {1, 37}, {1, 700}, {3, 20}};  // (tokens, p0)
  for (const auto& sh : shapes)
    for (const auto& [kt, vt] : cache_types)
      for (const auto& [T, p0] : steps)
        for (RopeLayout layout : {RopeLayout::Normal, RopeLayout::NeoX}) {
          const int n_head = sh[0], n_kv = sh[1], hd = sh[2];
          const int q_dim = n_head * hd, kv_dim = n_kv * hd, n_ctx = p0 + T + 3;
          SCOPED_TRACE(std::to_string(n_head) + "/" + std::to_string(n_kv) + " heads of " +
                       std::to_string(hd) + ", " + type_str(kt) + "/" + type_str(vt) + ", " +
                       std::to_string(T) + " tokens at " + std::to_string(p0) +
                       (layout == RopeLayout::NeoX ? " neox" : " normal"));
          const RopeParams pq{n_head, hd, 10000.0f, layout}, pk{n_kv, hd, 10000.0f, layout};
          const AttentionParams ap{n_head, n_kv, hd, 1.0f / std::sqrt(static_cast<float>(hd))};
          const std::vector<float> q = randn(rng, static_cast<size_t>(T) * q_dim);
          const std::vector<float> k = randn(rng, static_cast<size_t>(T) * kv_dim);
          const std::vector<float> v = randn(rng, static_cast<size_t>(T) * kv_dim);
          const std::vector<float> k_old = randn(rng, static_cast<size_t>(n_ctx) * kv_dim);
          const std::vector<float> v_old = randn(rng, static_cast<size_t>(n_ctx) * kv_dim);
          std::vector<int32_t> pos(T);
          std::iota(pos.begin(), pos.end(), p0);
          DevTensor q1(be(), T, q_dim, q), k1(be(), T, kv_dim, k), v1(be(), T, kv_dim, v);
          DevTensor q2(be(), T, q_dim, q), k2(be(), T, kv_dim, k), v2(be(), T, kv_dim, v);
          DevTensor kc1(be(), kt, n_ctx, kv_dim, "k_cache"), vc1(be(), vt, n_ctx, kv_dim, "v");
          DevTensor kc2(be(), kt, n_ctx, kv_dim, "k_cache"), vc2(be(), vt, n_ctx, kv_dim, "v");
          ASSERT_TRUE(kc1 && vc1 && kc2 && vc2);
          const std::vector<uint8_t> kq = quantize_rows(kt, k_old, n_ctx, kv_dim);
          const std::vector<uint8_t> vq = quantize_rows(vt, v_old, n_ctx, kv_dim);
          for (DevTensor* c : {&kc1, &kc2})
            ASSERT_TRUE(be().upload(**c, 0, n_ctx, kq.data()).is_ok());
          for (DevTensor* c : {&vc1, &vc2})
            ASSERT_TRUE(be().upload(**c, 0, n_ctx, vq.data()).is_ok());
          DevTensor out1(be(), DType::F32, T, q_dim), out2(be(), DType::F32, T, q_dim);
          Status s =
              be().rope_kv_attention(*q1, *k1, *v1, T, pos.data(), pq, pk, *kc1, *vc1, ap, *out1);
          ASSERT_TRUE(s.is_ok()) << s.message();
          s = be().rope_kv_store(*q2, *k2, *v2, T, pos.data(), pq, pk, *kc2, *vc2);
          ASSERT_TRUE(s.is_ok()) << s.message();
          s = be().attention(*q2, T, pos.data(), *kc2, *vc2, ap, *out2);
          ASSERT_TRUE(s.is_ok()) << s.message();
          EXPECT_EQ(fetch(be(), out1), fetch(be(), out2)) << "output";
          EXPECT_EQ(fetch_bytes(be(), kc1), fetch_bytes(be(), kc2)) << "K cache";
          EXPECT_EQ(fetch_bytes(be(), vc1), fetch_bytes(be(), vc2)) << "V cache";
          if (HasFailure()) return;
        }
}

// The OpenCL backend divides the keys of a micro-batch among work-groups when its (head, 16-query)
// work-groups are too few for the device (32 heads x 1 for micro-batches of 16 on a 132-unit GPU),
// merging the partial softmaxes in a second kernel. PoCL's few units never ask for it, so
// KESTREL_CL_ATT_SPLITS (read when a backend is created) forces it here, in a backend of its own
// per count (the other backends ignore the variable).
TEST_P(GpuOpsAttention, KeysSplitAmongWorkGroups) {
  GPU_TRACE_SEED();
  struct Unset {
    ~Unset() { unsetenv("KESTREL_CL_ATT_SPLITS"); }
  } unset;
  const std::pair<const char*, DType> runs[] = {
      {"3", DType::Q4_0}, {"16", DType::Q4_0}, {"3", DType::F16}};
  for (const auto& [n, type] : runs) {
    setenv("KESTREL_CL_ATT_SPLITS", n, 1);
    auto split_be = create_backend(GetParam(), BackendOptions{});
    ASSERT_TRUE(split_be.has_value()) << split_be.message();
    check_cache_types(**split_be, GetParam() + " (" + n + " key splits)", type, type);
    if (::testing::Test::HasFatalFailure()) return;
  }
}

// Decode and a micro-batch over a long cache: the few-token kernels' key loops take many rounds
// (CUDA's attention_tc16.cu: several 16-key sub-tiles a warp, double-buffered, and 16 splits to
// merge; the rows kernel: 3,000 scores in shared memory).
TEST_P(GpuOpsAttention, FewTokensOverALongCache) {
  GPU_TRACE_SEED();
  std::mt19937 rng = test_rng();
  for (DType type : {DType::F16, DType::Q4_0})
    for (int T : {1, 16}) {
      run_attention_case(be(), GetParam(), rng, AttnCase{8, 2, 128, type, type, 3000, T});
      if (HasFatalFailure()) return;
    }
}

// A scale other than 1/sqrt(head_dim) must be the one used; sharp softmaxes (q sd 6: scores
// of sd ~6) need the running maximum; decode right after a long prefill.
TEST_P(GpuOpsAttention, GivenScaleAndSharpSoftmax) {
  GPU_TRACE_SEED();
  std::mt19937 rng = test_rng();
  for (int T : {1, 16, 100}) {
    run_attention_case(be(), GetParam(), rng,
                       AttnCase{9, 3, 64, DType::F16, DType::F16, 300, T, 0.08f, 1.5f});
    run_attention_case(be(), GetParam(), rng,
                       AttnCase{8, 2, 128, DType::F16, DType::Q8_0, 300, T, 0.0f, 6.0f});
    if (HasFatalFailure()) return;
  }
}

TEST_P(GpuOpsAttention, BadShapesAndPositionsAreErrors) {
  GPU_TRACE_SEED();
  std::mt19937 rng = test_rng();
  const int hd = 64;
  DevTensor kc(be(), DType::F16, 16, 2 * hd), vc(be(), DType::F16, 16, 2 * hd);
  const std::vector<uint8_t> zeros(kc->bytes, 0x11);
  ASSERT_TRUE(be().upload(*kc, 0, 16, zeros.data()).is_ok());
  ASSERT_TRUE(be().upload(*vc, 0, 16, zeros.data()).is_ok());
  DevTensor q(be(), 2, 8 * hd, randn(rng, 2 * 8 * hd));
  DevTensor out(be(), DType::F32, 2, 8 * hd);
  const AttentionParams ok{8, 2, hd, 0.125f};
  for (int32_t bad : {16, 1000, -1}) {
    const int32_t pos[] = {3, bad};
    EXPECT_FALSE(be().attention(*q, 2, pos, *kc, *vc, ok, *out).is_ok()) << "position " << bad;
  }
  const int32_t pos[] = {3, 4};
  const AttentionParams not_a_group{8, 3, hd, 0.125f};  // 8 heads over 3 KV heads
  const AttentionParams too_wide{8, 4, hd, 0.125f};     // caches hold 2 KV heads
  const AttentionParams q_too_wide{16, 2, hd, 0.125f};  // q holds 8 heads
  EXPECT_FALSE(be().attention(*q, 2, pos, *kc, *vc, not_a_group, *out).is_ok());
  EXPECT_FALSE(be().attention(*q, 2, pos, *kc, *vc, too_wide, *out).is_ok());
  EXPECT_FALSE(be().attention(*q, 2, pos, *kc, *vc, q_too_wide, *out).is_ok());
  EXPECT_TRUE(be().attention(*q, 2, pos, *kc, *vc, ok, *out).is_ok());
  EXPECT_TRUE(be().synchronize().is_ok());
}

}  // namespace
}  // namespace kestrel::backend::gpu_ops_test
