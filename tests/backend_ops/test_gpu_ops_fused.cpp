// Conformance of decode's fused projection, residual add and norm (Backend::matmul_add_rms_norm;
// CUDA runs it as one matvec launch with KESTREL_CUDA_MATMUL_ADD_NORM=1): the residual and the
// products of the matmuls that read the normed output afterwards, against the three ops on the
// same backend (which the other suites hold to the double references).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
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

}  // namespace
}  // namespace kestrel::backend::gpu_ops_test
