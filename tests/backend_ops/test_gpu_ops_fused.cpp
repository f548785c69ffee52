// Conformance of the fused ops against the ops they replace on the same backend (which the other
// suites hold to the double references): decode's projection, residual add and norm
// (Backend::matmul_add_rms_norm; CUDA runs it as one matvec launch with
// KESTREL_CUDA_MATMUL_ADD_NORM=1), and a micro-batch's Q, K, V projections with RoPE and the KV
// store (Backend::matmul_rope_kv_store; CUDA: in the stream16 launch's epilogue with
// KESTREL_CUDA_MATMUL_ROPE_KV=1).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "gpu_ops_common.h"

namespace kestrel::backend::gpu_ops_test {
namespace {

KESTREL_GPU_OPS_SUITE(GpuOpsFusedNorm);

struct Rows {
  DType type;
  int64_t n_in, n_out;
  std::vector<uint8_t> data;
  HostMatrix matrix(const char* name) const {
    return HostMatrix{type, n_in, n_out, data.data(), name};
  }
};

Rows random_rows(std::mt19937& rng, DType type, int64_t n_in, int64_t n_out) {
  const std::vector<float> w = randn(rng, static_cast<size_t>(n_in * n_out), 0.5f);
  return Rows{type, n_in, n_out, quantize_rows(type, w, n_out, n_in)};
}

// Largest |got - want| over the largest |want|.
double max_rel_diff(const std::vector<float>& got, const std::vector<float>& want) {
  double diff = 0.0, scale = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    diff = std::max(diff, std::abs(static_cast<double>(got[i]) - want[i]));
    scale = std::max(scale, std::abs(static_cast<double>(want[i])));
  }
  return scale > 0.0 ? diff / scale : diff;
}

// A layer's output projection (n_in 1120 -> the residual's 1024, 32 blocks of 32 rows; CUDA: the
// K-split matvec) and a down projection (n_in 11008; CUDA: the weight stream) fused with
// x += proj and the next norm, then gate and up read the normed row, once as
// matmul_group and once as matmul_swiglu (decode's fused SwiGLU, which takes the planes too),
// with Q4_0 and Q8_0 weights. The residual is bit for bit the two ops' (the same sums, one f32
// add); the readers within the "matmul+add_rms_norm" bound of the op sequence: the same int8
// planes up to the row's scale 1 / rms, which moves from the activations into the sums, so only
// a value on a rounding edge moves by one step. An f32 read of the normed row right after the
// fused op is an error, not garbage (it exists only as the readers' planes), and the readers
// still work after it.
TEST_P(GpuOpsFusedNorm, MatmulAddRmsNormIsTheThreeOps) {
  GPU_TRACE_SEED();
  std::mt19937 rng = test_rng();
  const int64_t n_embd = 1024, n_ff = 32 * 35;
  const float eps = 1e-5f;
  ScopedEnv fused_env("KESTREL_CUDA_MATMUL_ADD_NORM", "1");
  for (const char* swiglu : {"0", "1"}) {
    ScopedEnv swiglu_env("KESTREL_CUDA_MATMUL_SWIGLU", swiglu);
    auto fused = create_backend(GetParam(), BackendOptions{});
    ASSERT_TRUE(fused.has_value()) << fused.message();
    for (const auto& [type, n_in] :
         {std::pair{DType::Q4_0, int64_t{1120}}, std::pair{DType::Q8_0, int64_t{1120}},
          std::pair{DType::Q4_0, int64_t{11008}}}) {
      SCOPED_TRACE(std::string(type_str(type)) + " n_in=" + std::to_string(n_in) +
                   (swiglu[0] == '1' ? " matmul+swiglu" : ""));
      const Rows wo = random_rows(rng, type, n_in, n_embd);
      const Rows wg = random_rows(rng, type, n_embd, n_ff);
      const Rows wu = random_rows(rng, type, n_embd, n_ff);
      const std::vector<float> in = randn(rng, static_cast<size_t>(n_in));
      const std::vector<float> x0 = randn(rng, static_cast<size_t>(n_embd), 4.0f);
      std::vector<float> norm_w = randn(rng, static_cast<size_t>(n_embd), 0.3f);
      for (float& g : norm_w) g += 1.0f;
      const std::vector<float> dense = randn(rng, static_cast<size_t>(n_embd * 8));
      std::vector<float> xs[2], gates[2], ups[2];
      for (int f = 0; f < 2; ++f) {
        Backend& b = f ? **fused : be();
        SCOPED_TRACE(f ? "fused" : "three ops");
        auto o = b.load_weight(wo.matrix("blk.0.attn_output.weight"));
        auto g = b.load_weight(wg.matrix("blk.0.ffn_gate.weight"));
        auto u = b.load_weight(wu.matrix("blk.0.ffn_up.weight"));
        ASSERT_TRUE(o.has_value() && g.has_value() && u.has_value());
        auto nw = b.load_vector(norm_w.data(), n_embd, "ffn_norm");
        ASSERT_TRUE(nw.has_value()) << nw.message();
        DevTensor it(b, 1, n_in, in), xt(b, 1, n_embd, x0), proj(b, DType::F32, 1, n_embd, "proj"),
            h(b, DType::F32, 1, n_embd, "h"), gt(b, DType::F32, 1, n_ff, "gate"),
            ut(b, DType::F32, 1, n_ff, "up");
        // (Made before the fused op: an upload in between drops what the backend holds.)
        auto wf = b.load_weight(HostMatrix{DType::F32, n_embd, 8, dense.data(), "dense"});
        ASSERT_TRUE(wf.has_value()) << wf.message();
        DevTensor dense_out(b, DType::F32, 1, 8, "dense out");
        const Weight* readers[] = {&**g, &**u};
        const bool fuses = b.fuses_matmul_add_rms_norm(**o, 1, readers, 2);
        if (f == 1 && GetParam() == "cuda") {
          EXPECT_TRUE(fuses) << "the CUDA backend did not fuse";
        }
        Status st = f ? b.matmul_add_rms_norm(**o, *it, 1, *proj, *xt, *nw, eps, *h)
                      : b.matmul(**o, *it, 1, *proj, nullptr);
        if (st && !f) st = b.add_rms_norm(*xt, *proj, 1, *nw, eps, *h);
        ASSERT_TRUE(st.is_ok()) << st.message();
        if (f == 1 && fuses) {  // h as f32 (an F32 weight's product): refused, naming the weight
          const Status bad = b.matmul(**wf, *h, 1, *dense_out, nullptr);
          EXPECT_FALSE(bad.is_ok()) << "an f32 read of the fused op's planes-only output";
          EXPECT_NE(bad.message().find("'dense'"), std::string::npos) << bad.message();
        }
        if (swiglu[0] == '1') {
          st = b.matmul_swiglu(*h, 1, **g, **u, *gt, *ut);
        } else {
          const MatmulOut gate_up[] = {{&**g, &*gt, nullptr}, {&**u, &*ut, nullptr}};
          st = b.matmul_group(*h, 1, gate_up, 2);
        }
        ASSERT_TRUE(st.is_ok()) << st.message();
        xs[f] = fetch(b, xt);
        gates[f] = fetch(b, gt);
        ups[f] = fetch(b, ut);
      }
      EXPECT_EQ(xs[0], xs[1]) << "the residual x += proj differs";
      const Bound& bd = bound("matmul+add_rms_norm");
      EXPECT_LE(max_rel_diff(gates[1], gates[0]), bd.max) << "gate (or silu(gate) * up)";
      EXPECT_LE(max_rel_diff(ups[1], ups[0]), bd.max) << "up";
    }
  }
}

KESTREL_GPU_OPS_SUITE(GpuOpsFusedRope);

// matmul_rope_kv_store is exactly matmul_group of Q, K, V, then rope_kv_store: the same q, k, v
// and cache bytes for every cache type, head sizes 64 and 128 with GQA, with and without biases
// (Qwen2's), micro-batches of 16, 7 and 5 tokens (a partial last pair of tokens), over random older
// cache rows. Q4_0 weights of width 2048: on CUDA (sm_90a) the stream16 launch with 2 blocks a
// cluster (the NeoX layout and other plans go to the two ops, tested the same way).
TEST_P(GpuOpsFusedRope, MatmulRopeKvStoreIsTheOps) {
  GPU_TRACE_SEED();
  std::mt19937 rng = test_rng();
  ScopedEnv fused_env("KESTREL_CUDA_MATMUL_ROPE_KV", "1");
  auto fused = create_backend(GetParam(), BackendOptions{});
  ASSERT_TRUE(fused.has_value()) << fused.message();
  const int64_t n_in = 2048;
  const int shapes[][3] = {{8, 2, 128}, {8, 4, 64}};                 // heads, KV heads, head size
  const std::pair<int, int> steps[] = {{16, 0}, {7, 37}, {5, 300}};  // (tokens, p0)
  for (const auto& sh : shapes)
    for (DType ct : {DType::F16, DType::Q8_0, DType::Q4_0})
      for (const auto& [T, p0] : steps)
        for (RopeLayout layout : {RopeLayout::Normal, RopeLayout::NeoX})
          for (bool with_bias : {false, true}) {
            const int n_head = sh[0], n_kv = sh[1], hd = sh[2];
            const int q_dim = n_head * hd, kv_dim = n_kv * hd, n_ctx = p0 + T + 3;
            SCOPED_TRACE(std::to_string(n_head) + "/" + std::to_string(n_kv) + " heads of " +
                         std::to_string(hd) + ", " + type_str(ct) + " cache, " + std::to_string(T) +
                         " tokens at " + std::to_string(p0) +
                         (layout == RopeLayout::NeoX ? " neox" : " normal") +
                         (with_bias ? ", biases" : ""));
            const RopeParams pq{n_head, hd, 10000.0f, layout}, pk{n_kv, hd, 10000.0f, layout};
            const Rows wq = random_rows(rng, DType::Q4_0, n_in, q_dim);
            const Rows wk = random_rows(rng, DType::Q4_0, n_in, kv_dim);
            const Rows wv = random_rows(rng, DType::Q4_0, n_in, kv_dim);
            const std::vector<float> h = randn(rng, static_cast<size_t>(T * n_in));
            const std::vector<float> bq = randn(rng, static_cast<size_t>(q_dim));
            const std::vector<float> bk = randn(rng, static_cast<size_t>(kv_dim));
            const std::vector<float> bv = randn(rng, static_cast<size_t>(kv_dim));
            const std::vector<float> k_old = randn(rng, static_cast<size_t>(n_ctx) * kv_dim);
            const std::vector<float> v_old = randn(rng, static_cast<size_t>(n_ctx) * kv_dim);
            const std::vector<uint8_t> kq = quantize_rows(ct, k_old, n_ctx, kv_dim);
            const std::vector<uint8_t> vq = quantize_rows(ct, v_old, n_ctx, kv_dim);
            std::vector<int32_t> pos(T);
            std::iota(pos.begin(), pos.end(), p0);
            std::vector<float> outs[2][3];
            std::vector<uint8_t> caches[2][2];
            for (int f = 0; f < 2; ++f) {
              Backend& b = f ? **fused : be();
              SCOPED_TRACE(f ? "fused" : "two ops");
              auto q_w = b.load_weight(wq.matrix("blk.0.attn_q.weight"));
              auto k_w = b.load_weight(wk.matrix("blk.0.attn_k.weight"));
              auto v_w = b.load_weight(wv.matrix("blk.0.attn_v.weight"));
              ASSERT_TRUE(q_w.has_value() && k_w.has_value() && v_w.has_value());
              DevTensor q_b(b, b.load_vector(bq.data(), q_dim, "bq")),
                  k_b(b, b.load_vector(bk.data(), kv_dim, "bk")),
                  v_b(b, b.load_vector(bv.data(), kv_dim, "bv"));
              ASSERT_TRUE(q_b && k_b && v_b);
              DevTensor x(b, T, n_in, h), q(b, DType::F32, T, q_dim, "q"),
                  k(b, DType::F32, T, kv_dim, "k"), v(b, DType::F32, T, kv_dim, "v");
              DevTensor kc(b, ct, n_ctx, kv_dim, "k_cache"), vc(b, ct, n_ctx, kv_dim, "v_cache");
              ASSERT_TRUE(kc && vc);
              ASSERT_TRUE(b.upload(*kc, 0, n_ctx, kq.data()).is_ok());
              ASSERT_TRUE(b.upload(*vc, 0, n_ctx, vq.data()).is_ok());
              const MatmulOut qkv[] = {{&**q_w, &*q, with_bias ? &*q_b : nullptr},
                                       {&**k_w, &*k, with_bias ? &*k_b : nullptr},
                                       {&**v_w, &*v, with_bias ? &*v_b : nullptr}};
              if (f == 1 && GetParam() == "cuda") {
                EXPECT_TRUE(b.fuses_matmul_rope_kv_store(**q_w, T, *kc, *vc))
                    << "the CUDA backend did not take it";
              }
              Status st = f ? b.matmul_rope_kv_store(*x, T, qkv, pos.data(), pq, pk, *kc, *vc)
                            : b.matmul_group(*x, T, qkv, 3);
              if (st && !f) st = b.rope_kv_store(*q, *k, *v, T, pos.data(), pq, pk, *kc, *vc);
              ASSERT_TRUE(st.is_ok()) << st.message();
              outs[f][0] = fetch(b, q);
              outs[f][1] = fetch(b, k);
              outs[f][2] = fetch(b, v);
              caches[f][0] = fetch_bytes(b, kc);
              caches[f][1] = fetch_bytes(b, vc);
            }
            EXPECT_EQ(outs[0][0], outs[1][0]) << "q";
            EXPECT_EQ(outs[0][1], outs[1][1]) << "k";
            EXPECT_EQ(outs[0][2], outs[1][2]) << "v";
            EXPECT_EQ(caches[0][0], caches[1][0]) << "K cache";
            EXPECT_EQ(caches[0][1], caches[1][1]) << "V cache";
            if (HasFailure()) return;
          }
}

}  // namespace
}  // namespace kestrel::backend::gpu_ops_test
