// GPU backend conformance, ops in the order the forward pass runs them. A backend may have the
// op that writes a tensor also write it in the form the next matmul reads (the CUDA backend's
// RMS norm, SwiGLU and few-token attention write int8 planes or f16 beside their f32 output) and
// may keep one converted copy for several matmuls of the same input (Q, K and V; gate and up).
// The single-op tests cannot see either, so here every matmul that follows such an op is checked
// against the double-precision product of the f32 tensor the backend holds at that moment, at
// token counts on each side of the CUDA backend's kernel switches, including after the input
// changed (another op wrote it, an upload replaced it, another input was converted in between).
#include <gtest/gtest.h>

#include <cmath>
#include <span>
#include <string>
#include <vector>

#include "gpu_ops_common.h"

namespace kestrel::backend::gpu_ops_test {
namespace {

// 1, 3: int8 decode kernels; 5, 8, 16: fragment kernels; 33: shared-memory tiles; 100: cuBLAS.
const std::vector<int> kChainTokens = {1, 3, 5, 8, 16, 33, 100};
constexpr int kMaxChainTokens = 100;

struct ChainWeight {
  std::vector<uint8_t> rows;  // the GGUF rows: a backend may keep pointing at them
  std::unique_ptr<Weight> w;
  std::vector<float> deq;  // [n_out][n_in]
  int64_t n_in = 0, n_out = 0;
};

ChainWeight chain_weight(Backend& be, std::mt19937& rng, DType type, int64_t n_in, int64_t n_out,
                         const char* name) {
  const std::vector<float> w = randn(rng, static_cast<size_t>(n_in * n_out), 0.5f);
  ChainWeight cw;
  cw.rows = quantize_rows(type, w, n_out, n_in);
  auto r = be.load_weight(HostMatrix{type, n_in, n_out, cw.rows.data(), name});
  EXPECT_TRUE(r.has_value()) << r.message();
  if (r.has_value()) cw.w = std::move(*r);
  cw.deq = dequantize_rows(type, cw.rows.data(), n_out, n_in);
  cw.n_in = n_in;
  cw.n_out = n_out;
  return cw;
}

// out = x W^T on the first T rows of x into a poisoned out, checked against the product of
// what x holds on the device now.
void matmul_and_check(Backend& be, const ChainWeight& cw, const DevTensor& x, int T, DevTensor& out,
                      DType type, const std::string& key, const std::string& what) {
  SCOPED_TRACE(what);
  const std::vector<float> xh = fetch(be, x);
  fill_poison(be, out);
  const Status s = be.matmul(*cw.w, *x, T, *out, nullptr);
  ASSERT_TRUE(s.is_ok()) << s.message();
  const std::vector<float> got = fetch(be, out);
  std::vector<double> ref(static_cast<size_t>(T * cw.n_out));
  for (int t = 0; t < T; ++t)
    for (int64_t r = 0; r < cw.n_out; ++r)
      ref[t * cw.n_out + r] =
          dot_double(cw.deq.data() + r * cw.n_in, xh.data() + t * cw.n_in, cw.n_in);
  check_err(compare_rows(got.data(), out->cols, ref.data(), T, cw.n_out), matmul_bound_name(type),
            key, what);
}

// matmul_group of x into several weights, each output checked as in matmul_and_check.
void group_and_check(Backend& be, std::span<const ChainWeight* const> ws, const DevTensor& x, int T,
                     std::span<DevTensor* const> outs, DType type, const std::string& key,
                     const std::string& what) {
  SCOPED_TRACE(what);
  const std::vector<float> xh = fetch(be, x);
  std::vector<MatmulOut> group;
  for (size_t i = 0; i < ws.size(); ++i) {
    fill_poison(be, *outs[i]);
    group.push_back({ws[i]->w.get(), &**outs[i], nullptr});
  }
  const Status s = be.matmul_group(*x, T, group.data(), static_cast<int>(group.size()));
  ASSERT_TRUE(s.is_ok()) << s.message();
  for (size_t i = 0; i < ws.size(); ++i) {
    const ChainWeight& cw = *ws[i];
    const std::vector<float> got = fetch(be, *outs[i]);
    std::vector<double> ref(static_cast<size_t>(T * cw.n_out));
    for (int t = 0; t < T; ++t)
      for (int64_t r = 0; r < cw.n_out; ++r)
        ref[t * cw.n_out + r] =
            dot_double(cw.deq.data() + r * cw.n_in, xh.data() + t * cw.n_in, cw.n_in);
    check_err(compare_rows(got.data(), (*outs[i])->cols, ref.data(), T, cw.n_out),
              matmul_bound_name(type), key, what + ", output " + std::to_string(i));
  }
}

KESTREL_GPU_OPS_SUITE(GpuOpsChain);

// rms_norm -> Q, K, V (one input, three weights) -> add into the input -> the same matmul again;
// a second norm into another tensor in between; an upload over the normed tensor.
void check_norm_chain(Backend& be, const std::string& backend, DType type) {
  std::mt19937 rng = test_rng();
  const int64_t E = 256, kv = 128;
  const std::vector<float> x = randn(rng, static_cast<size_t>(kMaxChainTokens * E));
  const std::vector<float> g = randn(rng, static_cast<size_t>(E), 0.3f);
  std::vector<float> gw(g.size());
  for (size_t i = 0; i < g.size(); ++i) gw[i] = 1.0f + g[i];
  DevTensor xt(be, kMaxChainTokens, E, x);
  DevTensor x2(be, kMaxChainTokens, E, randn(rng, static_cast<size_t>(kMaxChainTokens * E)));
  DevTensor wt(be, be.load_vector(gw.data(), E, "norm"));
  DevTensor h(be, DType::F32, kMaxChainTokens, E, "h");
  DevTensor h2(be, DType::F32, kMaxChainTokens, E, "h2");
  DevTensor q(be, DType::F32, kMaxChainTokens, E, "q");
  DevTensor k(be, DType::F32, kMaxChainTokens, kv, "k");
  DevTensor v(be, DType::F32, kMaxChainTokens, kv, "v");
  const ChainWeight wq = chain_weight(be, rng, type, E, E, "wq");
  const ChainWeight wk = chain_weight(be, rng, type, E, kv, "wk");
  const ChainWeight wv = chain_weight(be, rng, type, E, kv, "wv");
  const std::string key = backend + " chain/norm/" + type_str(type);
  for (int T : kChainTokens) {
    const std::string at = type_str(type) + " T=" + std::to_string(T);
    ASSERT_TRUE(be.rms_norm(*xt, T, *wt, 1e-5f, *h).is_ok());
    matmul_and_check(be, wq, h, T, q, type, key, "norm -> q, " + at);
    matmul_and_check(be, wk, h, T, k, type, key, "norm -> q -> k, " + at);
    matmul_and_check(be, wv, h, T, k, type, key, "norm -> q -> k -> v, " + at);
    // Another op writes the normed tensor: the next matmul must see the new values.
    ASSERT_TRUE(be.add(*h, *xt, T).is_ok());
    matmul_and_check(be, wq, h, T, q, type, key, "norm -> q -> add into h -> q, " + at);
    // Another norm output converted in between, then the first again.
    ASSERT_TRUE(be.rms_norm(*x2, T, *wt, 1e-5f, *h2).is_ok());
    ASSERT_TRUE(be.rms_norm(*xt, T, *wt, 1e-5f, *h).is_ok());
    matmul_and_check(be, wq, h2, T, q, type, key, "norm h2, norm h -> q(h2), " + at);
    matmul_and_check(be, wq, h, T, q, type, key, "... -> q(h), " + at);
    // An upload replaces it.
    const std::vector<float> fresh = randn(rng, static_cast<size_t>(kMaxChainTokens * E));
    ASSERT_TRUE(be.upload(*h, 0, kMaxChainTokens, fresh.data()).is_ok());
    matmul_and_check(be, wk, h, T, k, type, key, "upload into h -> k, " + at);
    // The forward pass's order: x += y and norm in one op, then Q, K and V as one group, then
    // the group again after another norm wrote a different tensor.
    ASSERT_TRUE(be.add_rms_norm(*xt, *x2, T, *wt, 1e-5f, *h).is_ok());
    const ChainWeight* qkv[] = {&wq, &wk, &wv};
    DevTensor* qkv_out[] = {&q, &k, &v};
    group_and_check(be, qkv, h, T, qkv_out, type, key, "add_rms_norm -> group q, k, v, " + at);
    ASSERT_TRUE(be.rms_norm(*x2, T, *wt, 1e-5f, *h2).is_ok());
    group_and_check(be, qkv, h, T, qkv_out, type, key, "norm h2 -> group q, k, v of h, " + at);
    const ChainWeight* kv_pair[] = {&wk, &wv};
    DevTensor* kv_out[] = {&k, &v};
    group_and_check(be, kv_pair, h2, T, kv_out, type, key, "group k, v of h2, " + at);
    if (::testing::Test::HasFatalFailure()) return;
  }
}

// swiglu (in place, as the model calls it) -> down.
void check_swiglu_chain(Backend& be, const std::string& backend, DType type) {
  std::mt19937 rng = test_rng();
  const int64_t E = 128, F = 512;
  DevTensor gate(be, kMaxChainTokens, F, randn(rng, static_cast<size_t>(kMaxChainTokens * F)));
  DevTensor up(be, kMaxChainTokens, F, randn(rng, static_cast<size_t>(kMaxChainTokens * F)));
  DevTensor out(be, DType::F32, kMaxChainTokens, E, "down");
  const ChainWeight wd = chain_weight(be, rng, type, F, E, "w_down");
  for (int T : kChainTokens) {
    ASSERT_TRUE(be.swiglu(*gate, *up, T, *gate).is_ok());
    matmul_and_check(be, wd, gate, T, out, type, backend + " chain/swiglu/" + type_str(type),
                     "swiglu -> down, " + type_str(type) + " T=" + std::to_string(T));
    if (::testing::Test::HasFatalFailure()) return;
  }
}

// kv_store -> attention -> output projection (f16 and q4_0 caches).
void check_attention_chain(Backend& be, const std::string& backend, DType type, DType cache) {
  std::mt19937 rng = test_rng();
  const int n_head = 4, n_head_kv = 2, hd = 64;
  const int64_t q_dim = n_head * hd, kv_dim = n_head_kv * hd, ctx = 256;
  const AttentionParams ap{n_head, n_head_kv, hd, 1.0f / std::sqrt(static_cast<float>(hd))};
  DevTensor q(be, kMaxChainTokens, q_dim, randn(rng, static_cast<size_t>(kMaxChainTokens * q_dim)));
  DevTensor k(be, kMaxChainTokens, kv_dim,
              randn(rng, static_cast<size_t>(kMaxChainTokens * kv_dim)));
  DevTensor v(be, kMaxChainTokens, kv_dim,
              randn(rng, static_cast<size_t>(kMaxChainTokens * kv_dim)));
  DevTensor kc(be, cache, ctx, kv_dim, "k cache");
  DevTensor vc(be, cache, ctx, kv_dim, "v cache");
  DevTensor att(be, DType::F32, kMaxChainTokens, q_dim, "att");
  DevTensor proj(be, DType::F32, kMaxChainTokens, q_dim, "proj");
  const ChainWeight wo = chain_weight(be, rng, type, q_dim, q_dim, "wo");
  int next = 0;  // the first free cache row
  for (int T : kChainTokens) {
    std::vector<int32_t> pos(static_cast<size_t>(T));
    for (int t = 0; t < T; ++t) pos[t] = (next + t) % static_cast<int>(ctx);
    next = (next + T) % static_cast<int>(ctx);
    ASSERT_TRUE(be.kv_store(*k, *v, T, pos.data(), *kc, *vc).is_ok());
    ASSERT_TRUE(be.attention(*q, T, pos.data(), *kc, *vc, ap, *att).is_ok());
    matmul_and_check(be, wo, att, T, proj, type, backend + " chain/attention/" + type_str(type),
                     "attention (" + type_str(cache) + " cache) -> wo, " + type_str(type) +
                         " T=" + std::to_string(T));
    if (::testing::Test::HasFatalFailure()) return;
  }
}

// One input into three weights of uneven widths, wide enough (2048) that the GPU kernels split
// K: a grouped launch must give each product its own rows, partial sums and bias-free output.
// Token counts around the small-batch switches, and a prompt chunk (100: CUDA's wgmma path, its
// row tiles of 128 cut inside the products); the group, then each weight alone again.
void check_wide_group(Backend& be, const std::string& backend, DType type) {
  std::mt19937 rng = test_rng();
  const int64_t E = 2048;
  DevTensor x(be, kMaxChainTokens, E, randn(rng, static_cast<size_t>(kMaxChainTokens * E)));
  const ChainWeight w0 = chain_weight(be, rng, type, E, 320, "w0");
  const ChainWeight w1 = chain_weight(be, rng, type, E, 136, "w1");
  const ChainWeight w2 = chain_weight(be, rng, type, E, 200, "w2");
  DevTensor o0(be, DType::F32, kMaxChainTokens, 320, "out0");
  DevTensor o1(be, DType::F32, kMaxChainTokens, 136, "out1");
  DevTensor o2(be, DType::F32, kMaxChainTokens, 200, "out2");
  const std::string key = backend + " chain/wide-group/" + type_str(type);
  for (int T : {1, 5, 8, 9, 16, 33, kMaxChainTokens}) {
    const std::string at = type_str(type) + " T=" + std::to_string(T);
    const ChainWeight* three[] = {&w0, &w1, &w2};
    DevTensor* three_out[] = {&o0, &o1, &o2};
    group_and_check(be, three, x, T, three_out, type, key, "group of 3, " + at);
    const ChainWeight* two[] = {&w2, &w0};
    DevTensor* two_out[] = {&o2, &o0};
    group_and_check(be, two, x, T, two_out, type, key, "group of 2, " + at);
    matmul_and_check(be, w1, x, T, o1, type, key, "alone after the groups, " + at);
    if (::testing::Test::HasFatalFailure()) return;
  }
}

TEST_P(GpuOpsChain, WideGroupQ4_0) {
  GPU_TRACE_SEED();
  check_wide_group(be(), GetParam(), DType::Q4_0);
}
TEST_P(GpuOpsChain, WideGroupQ8_0) {
  GPU_TRACE_SEED();
  check_wide_group(be(), GetParam(), DType::Q8_0);
}

// The forward pass's Q4_0 sequence at micro-batch sizes past the small-batch kernels: add_rms_norm
// -> Q/K/V-like group, swiglu -> down. Returns every product (in the order run).
std::vector<std::vector<float>> run_norm_swiglu_sequence(Backend& be, int T) {
  std::mt19937 rng(test_seed() + 17);  // the same inputs and weights on every backend
  const int64_t E = 256, F = 512, kv = 128;
  DevTensor x(be, T, E, randn(rng, static_cast<size_t>(T * E)));
  DevTensor y(be, T, E, randn(rng, static_cast<size_t>(T * E)));
  std::vector<float> g = randn(rng, static_cast<size_t>(E), 0.3f);
  for (float& v : g) v += 1.0f;
  DevTensor norm(be, be.load_vector(g.data(), E, "norm"));
  DevTensor h(be, DType::F32, T, E, "h");
  DevTensor q(be, DType::F32, T, E, "q"), k(be, DType::F32, T, kv, "k");
  DevTensor gate(be, T, F, randn(rng, static_cast<size_t>(T * F)));
  DevTensor up(be, T, F, randn(rng, static_cast<size_t>(T * F)));
  DevTensor down(be, DType::F32, T, E, "down");
  const ChainWeight wq = chain_weight(be, rng, DType::Q4_0, E, E, "wq");
  const ChainWeight wk = chain_weight(be, rng, DType::Q4_0, E, kv, "wk");
  const ChainWeight wd = chain_weight(be, rng, DType::Q4_0, F, E, "w_down");
  EXPECT_TRUE(be.add_rms_norm(*x, *y, T, *norm, 1e-5f, *h).is_ok());
  const MatmulOut group[] = {{wq.w.get(), &*q, nullptr}, {wk.w.get(), &*k, nullptr}};
  EXPECT_TRUE(be.matmul_group(*h, T, group, 2).is_ok());
  EXPECT_TRUE(be.swiglu(*gate, *up, T, *gate).is_ok());
  EXPECT_TRUE(be.matmul(*wd.w, *gate, T, *down, nullptr).is_ok());
  return {fetch(be, h), fetch(be, q), fetch(be, k), fetch(be, gate), fetch(be, down)};
}

// The OpenCL backend's norms and SwiGLU write the f16 form that its half and tensor-core matmuls
// read (one conversion launch fewer each); KESTREL_CL_FUSED_F16=0 converts in a launch of its
// own. The two must agree bit for bit, on the device's own matmuls (x_half_blocks' form where it
// has fp16) and on the tensor-core template (emulated off NVIDIA). Other backends ignore both
// variables (the runs are then the same path twice).
TEST_P(GpuOpsChain, FusedF16ConversionIsTheLaunchs) {
  GPU_TRACE_SEED();
  for (const char* nv : {"", "emulate"}) {
    std::vector<std::vector<float>> runs[2];
    for (int fused = 0; fused < 2; ++fused) {
      std::optional<ScopedEnv> nv_env;
      if (*nv) nv_env.emplace("KESTREL_CL_NV_MMA", nv);
      ScopedEnv f16_env("KESTREL_CL_FUSED_F16", fused ? "1" : "0");
      auto other = create_backend(GetParam(), BackendOptions{});
      ASSERT_TRUE(other.has_value()) << other.message();
      for (int T : {16, 40}) {
        std::vector<std::vector<float>> r = run_norm_swiglu_sequence(**other, T);
        runs[fused].insert(runs[fused].end(), r.begin(), r.end());
      }
    }
    const char* names[] = {"h", "q", "k", "silu(gate) up", "down"};
    for (size_t i = 0; i < runs[0].size(); ++i)
      EXPECT_EQ(runs[0][i], runs[1][i]) << names[i % 5] << " (run " << i << ", nv " << nv << ")";
  }
}

// Q4_0 and Q8_0 (the kernels with fused inputs), Q4_K (f32 small batches, f16 GEMM) and F16
// (its GEMM path writes hi + lo parts over the f16 scratch).
#define KESTREL_CHAIN_TESTS(Type)                                                              \
  TEST_P(GpuOpsChain, NormThenMatmuls##Type) {                                                 \
    GPU_TRACE_SEED();                                                                          \
    check_norm_chain(be(), GetParam(), DType::Type);                                           \
  }                                                                                            \
  TEST_P(GpuOpsChain, SwigluThenMatmul##Type) {                                                \
    GPU_TRACE_SEED();                                                                          \
    check_swiglu_chain(be(), GetParam(), DType::Type);                                         \
  }                                                                                            \
  TEST_P(GpuOpsChain, AttentionThenMatmul##Type) {                                             \
    GPU_TRACE_SEED();                                                                          \
    check_attention_chain(be(), GetParam(), DType::Type, DType::F16);                          \
    if (!HasFatalFailure()) check_attention_chain(be(), GetParam(), DType::Type, DType::Q4_0); \
  }
KESTREL_CHAIN_TESTS(Q4_0)
KESTREL_CHAIN_TESTS(Q8_0)
KESTREL_CHAIN_TESTS(Q4_K)
KESTREL_CHAIN_TESTS(F16)

}  // namespace
}  // namespace kestrel::backend::gpu_ops_test
