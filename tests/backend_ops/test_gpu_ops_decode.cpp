// A backend that runs a decode step of a whole layer as one op (Backend::decode_layer; the CUDA
// backend's persistent kernel) must compute what the forward pass's op sequence (the base class's
// decode_layer) computes on the same backend: the residual after the layer and the cache row it
// stores, for every weight type
// it fuses, every cache type, both RoPE layouts, GQA, and with and without the previous layer's
// pending residual add. The op sequence is itself checked op by op against the references
// (the other GPU op suites), so this suite compares the two paths with a tight bound.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#include "gpu_ops_common.h"

namespace kestrel::backend::gpu_ops_test {
namespace {

KESTREL_GPU_OPS_SUITE(GpuOpsDecodeLayer);

struct LayerShape {
  int n_head, n_head_kv, head_dim;
  int64_t n_embd, n_ff;
};

// The tensors of one copy of the layer's state: the residual, the pending projection, the
// caches and the op path's scratch.
struct LayerState {
  LayerState(Backend& be, const LayerShape& s, DType cache_type, int n_ctx)
      : x(be, DType::F32, 1, s.n_embd),
        proj(be, DType::F32, 1, s.n_embd),
        h(be, DType::F32, 1, s.n_embd),
        q(be, DType::F32, 1, int64_t{s.n_head} * s.head_dim),
        k(be, DType::F32, 1, int64_t{s.n_head_kv} * s.head_dim),
        v(be, DType::F32, 1, int64_t{s.n_head_kv} * s.head_dim),
        att(be, DType::F32, 1, int64_t{s.n_head} * s.head_dim),
        gate(be, DType::F32, 1, s.n_ff),
        up(be, DType::F32, 1, s.n_ff),
        kc(be, cache_type, n_ctx, int64_t{s.n_head_kv} * s.head_dim, "KV cache k"),
        vc(be, cache_type, n_ctx, int64_t{s.n_head_kv} * s.head_dim, "KV cache v") {}
  DevTensor x, proj, h, q, k, v, att, gate, up, kc, vc;
};

struct LayerWeights {
  std::vector<std::vector<uint8_t>> rows;  // GGUF rows (a backend may keep pointing at them)
  std::unique_ptr<Weight> wq, wk, wv, wo, wg, wu, wd;
};

std::unique_ptr<Weight> random_weight(Backend& be, std::mt19937& rng, LayerWeights& lw, DType type,
                                      int64_t n_in, int64_t n_out, const char* name) {
  const std::vector<float> w =
      randn(rng, static_cast<size_t>(n_in * n_out), 1.0f / std::sqrt(n_in));
  lw.rows.push_back(quantize_rows(type, w, n_out, n_in));
  auto r = be.load_weight(HostMatrix{type, n_in, n_out, lw.rows.back().data(), name});
  EXPECT_TRUE(r.has_value()) << r.message();
  return r.has_value() ? std::move(*r) : nullptr;
}

// Cache rows as floats through the reference dequantizer.
std::vector<float> cache_floats(Backend& be, const DevTensor& c) {
  const std::vector<uint8_t> bytes = fetch_bytes(be, c);
  return dequantize_rows(c->type, bytes.data(), c->rows, c->cols);
}

// mixed: V and the down projection in Q8_0 beside the other weights' type (as some GGUF files
// mix them), and Q, K, V biases (Qwen2-style).
void check_layer(Backend& be, const std::string& backend, const LayerShape& s, DType wtype,
                 DType ctype, RopeLayout layout, bool pending_add, int pos, bool mixed = false) {
  const std::string what = backend + " decode_layer/" + type_str(wtype) + "/cache " +
                           type_str(ctype) + (layout == RopeLayout::NeoX ? "/neox" : "/normal") +
                           "/D=" + std::to_string(s.head_dim) +
                           (pending_add ? "/pending add" : "") + "/pos " + std::to_string(pos) +
                           (mixed ? "/q8_0 V and down, QKV biases" : "");
  SCOPED_TRACE(what);
  std::mt19937 rng = test_rng();
  const int n_ctx = pos + 9;
  const int64_t E = s.n_embd, F = s.n_ff, q_dim = int64_t{s.n_head} * s.head_dim,
                kv_dim = int64_t{s.n_head_kv} * s.head_dim;
  LayerWeights lw;
  lw.wq = random_weight(be, rng, lw, wtype, E, q_dim, "wq");
  lw.wk = random_weight(be, rng, lw, wtype, E, kv_dim, "wk");
  lw.wv = random_weight(be, rng, lw, mixed ? DType::Q8_0 : wtype, E, kv_dim, "wv");
  lw.wo = random_weight(be, rng, lw, wtype, q_dim, E, "wo");
  lw.wg = random_weight(be, rng, lw, wtype, E, F, "w_gate");
  lw.wu = random_weight(be, rng, lw, wtype, E, F, "w_up");
  lw.wd = random_weight(be, rng, lw, mixed ? DType::Q8_0 : wtype, F, E, "w_down");
  ASSERT_TRUE(lw.wq && lw.wk && lw.wv && lw.wo && lw.wg && lw.wu && lw.wd);
  const std::vector<float> bq_h = randn(rng, q_dim, 0.3f), bk_h = randn(rng, kv_dim, 0.3f),
                           bv_h = randn(rng, kv_dim, 0.3f);
  DevTensor bq(be, be.load_vector(bq_h.data(), q_dim, "bq"));
  DevTensor bk(be, be.load_vector(bk_h.data(), kv_dim, "bk"));
  DevTensor bv(be, be.load_vector(bv_h.data(), kv_dim, "bv"));
  const std::vector<float> attn_norm_h = randn(rng, E, 0.2f, 1.0f),
                           ffn_norm_h = randn(rng, E, 0.2f, 1.0f);
  DevTensor attn_norm(be, be.load_vector(attn_norm_h.data(), E, "attn_norm"));
  DevTensor ffn_norm(be, be.load_vector(ffn_norm_h.data(), E, "ffn_norm"));
  const std::vector<float> x0 = randn(rng, E), proj0 = randn(rng, E, 0.5f);
  // Earlier rows of the cache (every row, so that a read past pos would show), as the store
  // would have written them.
  const std::vector<uint8_t> k_rows =
      quantize_rows(ctype, randn(rng, n_ctx * kv_dim), n_ctx, kv_dim);
  const std::vector<uint8_t> v_rows =
      quantize_rows(ctype, randn(rng, n_ctx * kv_dim), n_ctx, kv_dim);

  LayerState fused(be, s, ctype, n_ctx), ops(be, s, ctype, n_ctx);
  for (LayerState* st : {&fused, &ops}) {
    ASSERT_TRUE(be.upload(*st->x, 0, 1, x0.data()).is_ok());
    ASSERT_TRUE(be.upload(*st->proj, 0, 1, proj0.data()).is_ok());
    ASSERT_TRUE(be.upload(*st->kc, 0, n_ctx, k_rows.data()).is_ok());
    ASSERT_TRUE(be.upload(*st->vc, 0, n_ctx, v_rows.data()).is_ok());
  }
  const RopeParams rq{s.n_head, s.head_dim, 10000.0f, layout};
  const RopeParams rk{s.n_head_kv, s.head_dim, 10000.0f, layout};
  const AttentionParams attn{s.n_head, s.n_head_kv, s.head_dim,
                             1.0f / std::sqrt(static_cast<float>(s.head_dim))};
  const auto layer = [&](LayerState& st) {
    return DecodeLayer{.x = &*st.x,
                       .proj = &*st.proj,
                       .pending_add = pending_add,
                       .attn_norm = &*attn_norm,
                       .ffn_norm = &*ffn_norm,
                       .rms_eps = 1e-5f,
                       .wq = lw.wq.get(),
                       .wk = lw.wk.get(),
                       .wv = lw.wv.get(),
                       .wo = lw.wo.get(),
                       .w_gate = lw.wg.get(),
                       .w_up = lw.wu.get(),
                       .w_down = lw.wd.get(),
                       .bq = mixed ? &*bq : nullptr,
                       .bk = mixed ? &*bk : nullptr,
                       .bv = mixed ? &*bv : nullptr,
                       .rope_q = rq,
                       .rope_k = rk,
                       .attn = attn,
                       .k_cache = &*st.kc,
                       .v_cache = &*st.vc,
                       .pos = pos,
                       .h = &*st.h,
                       .q = &*st.q,
                       .k = &*st.k,
                       .v = &*st.v,
                       .att = &*st.att,
                       .gate = &*st.gate,
                       .up = &*st.up};
  };
  const DecodeLayer df = layer(fused), dops = layer(ops);
  const bool fuses = be.fuses_decode_layer(df);
  const char* opt_in = std::getenv("KESTREL_CUDA_FUSED_DECODE");
  if (backend == "cuda" && opt_in && std::string(opt_in) == "1") {
    EXPECT_TRUE(fuses) << "KESTREL_CUDA_FUSED_DECODE=1: the CUDA backend should take this layer";
  }
  if (!fuses)
    GTEST_SKIP() << backend << " does not run this layer as one op (CUDA: opt-in, "
                 << "KESTREL_CUDA_FUSED_DECODE=1)";
  Status st = be.decode_layer(df);
  ASSERT_TRUE(st.is_ok()) << st.message();
  st = be.Backend::decode_layer(dops);  // the op sequence, op by op
  ASSERT_TRUE(st.is_ok()) << st.message();

  // The intermediates that both paths leave in the same scratch, in phase order, so that a
  // failure says where the fused layer went wrong: v (the QKV product; q and k are rotated in
  // place by the op path only), the attention output, silu(gate) * up, then the residual.
  const std::string log_key = backend + " decode_layer/" + type_str(wtype) + "/" + type_str(ctype);
  for (const auto& [name, a, b] :
       {std::tuple<const char*, const DevTensor*, const DevTensor*>{"v", &fused.v, &ops.v},
        {"attention output", &fused.att, &ops.att},
        {"silu(gate) * up", &fused.gate, &ops.gate},
        {"x (the layer's output)", &fused.x, &ops.x}}) {
    const std::vector<float> got = fetch(be, *a), want = fetch(be, *b);
    const std::vector<double> ref(want.begin(), want.end());
    check_err(compare_rows(got.data(), (*a)->cols, ref.data(), 1, (*a)->cols), "decode_layer",
              log_key, what + ": " + name);
  }

  // The cache: row pos within a step of the op path's, every other row untouched.
  for (int side = 0; side < 2; ++side) {
    SCOPED_TRACE(side == 0 ? "K cache" : "V cache");
    const DevTensor& cf = side == 0 ? fused.kc : fused.vc;
    const DevTensor& co = side == 0 ? ops.kc : ops.vc;
    const std::vector<uint8_t>& before = side == 0 ? k_rows : v_rows;
    const std::vector<uint8_t> bytes = fetch_bytes(be, cf);
    const size_t rb = static_cast<size_t>(quant::row_bytes(ctype, kv_dim));
    for (int r = 0; r < n_ctx; ++r) {
      if (r == pos) continue;
      EXPECT_TRUE(
          std::equal(bytes.begin() + r * rb, bytes.begin() + (r + 1) * rb, before.begin() + r * rb))
          << "row " << r << " changed";
    }
    const std::vector<float> a = cache_floats(be, cf), b = cache_floats(be, co);
    double worst = 0, amax = 0;
    for (int64_t c = 0; c < kv_dim; ++c) {
      worst = std::max(worst,
                       static_cast<double>(std::fabs(a[pos * kv_dim + c] - b[pos * kv_dim + c])));
      amax = std::max(amax, static_cast<double>(std::fabs(b[pos * kv_dim + c])));
    }
    // One q4_0 step (max / 8 of a block) where a rounding went the other way; f16 and q8_0 rows
    // agree far closer unless a value moved.
    const double step = ctype == DType::Q4_0   ? amax / 8
                        : ctype == DType::Q8_0 ? amax / 127
                                               : amax / 1024;
    EXPECT_LE(worst, step * 1.01 + 1e-6) << "row " << pos;
  }
}

TEST_P(GpuOpsDecodeLayer, MatchesTheOpSequence) {
  GPU_TRACE_SEED();
  // GQA with head size 64 (SmolLM-like groups), and 128 without groups (llama2-like).
  const LayerShape gqa{8, 2, 64, 512, 1376}, mha{4, 4, 128, 512, 1408};
  for (DType w : {DType::Q4_0, DType::Q8_0})
    for (DType c : {DType::F16, DType::Q8_0, DType::Q4_0})
      for (RopeLayout l : {RopeLayout::Normal, RopeLayout::NeoX}) {
        check_layer(be(), GetParam(), gqa, w, c, l, /*pending_add=*/true, 37);
        if (HasFatalFailure() || IsSkipped()) return;
      }
  check_layer(be(), GetParam(), mha, DType::Q4_0, DType::Q4_0, RopeLayout::Normal, false, 0);
  check_layer(be(), GetParam(), mha, DType::Q4_0, DType::F16, RopeLayout::NeoX, true, 300);
  check_layer(be(), GetParam(), mha, DType::Q8_0, DType::Q8_0, RopeLayout::Normal, false, 1000);
  check_layer(be(), GetParam(), gqa, DType::Q4_0, DType::Q8_0, RopeLayout::NeoX, true, 37,
              /*mixed=*/true);
}

}  // namespace
}  // namespace kestrel::backend::gpu_ops_test
