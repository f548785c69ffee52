// GPU backend conformance, matmul: load_weight + matmul for every weight type the CPU backend
// multiplies, token counts from decode (1) to large prefill micro-batches (512) on either side
// of the kernel switches a GPU backend makes by T, output widths that are not multiples of
// common tile sizes, with and without bias, weights with outlier rows, activations with
// outliers, a 4096 x 4096 weight, shape errors and the profiled path. The reference is
// the weight decoded by quant::dequantize_row, multiplied in double on the host.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "gpu_ops_common.h"

namespace kestrel::backend::gpu_ops_test {
namespace {

// 1-3: decode; 5: the first of the tensor-core kernels (CUDA's fragments, OpenCL's on NVIDIA);
// 8 and 9: either side of a small-batch kernel switch (the CUDA backend's is 8); 16, 17, 33: tile
// edges; 64 .. 512: the GEMM paths.
const std::vector<int> kTokenCounts = {1, 2, 3, 5, 8, 9, 16, 17, 33, 64, 100, 256, 512};
constexpr int kMaxTokens = 512;

bool is_kquant(DType t) {
  return quant::type_info(t)->block_elems == quant::kSuperBlock;
}

// A weight matrix in GGUF rows of `type`, kept alive on the host, and the same rows decoded.
struct HostWeight {
  DType type;
  int64_t n_in, n_out;
  std::vector<uint8_t> data;
  std::vector<float> deq;  // [n_out][n_in], quant::dequantize_row of data
  HostMatrix matrix(const char* name = "w") const {
    return HostMatrix{type, n_in, n_out, data.data(), name};
  }
};

// N(0, 0.5^2) weights with outlier rows: every 16th row from row 3 is 16x larger, and every
// 16th row from row 11 has one +-40 spike per 256 elements, which stretches its block's scale.
HostWeight random_weight(std::mt19937& rng, DType type, int64_t n_in, int64_t n_out) {
  std::vector<float> w = randn(rng, static_cast<size_t>(n_in * n_out), 0.5f);
  std::uniform_int_distribution<int64_t> where(0, 255);
  for (int64_t r = 0; r < n_out; ++r) {
    float* row = w.data() + r * n_in;
    if (r % 16 == 3) {
      for (int64_t i = 0; i < n_in; ++i) row[i] *= 16.0f;
    } else if (r % 16 == 11) {
      for (int64_t c0 = 0; c0 < n_in; c0 += 256) {
        const int64_t i = c0 + where(rng) % std::min<int64_t>(256, n_in - c0);
        row[i] = std::copysign(40.0f, row[i]);
      }
    }
  }
  HostWeight hw{type, n_in, n_out, quantize_rows(type, w, n_out, n_in), {}};
  hw.deq = dequantize_rows(type, hw.data.data(), n_out, n_in);
  return hw;
}

// ref[t][r] = sum_i deq[r][i] * x[t][i] in double, for t < n_tokens (no bias).
std::vector<double> matmul_reference(const HostWeight& w, const std::vector<float>& x,
                                     int n_tokens) {
  std::vector<double> ref(static_cast<size_t>(n_tokens * w.n_out));
  constexpr int64_t kRows = 16, kToks = 64;  // tiles that keep W rows and x rows in cache
  const int64_t n_rb = (w.n_out + kRows - 1) / kRows, n_tb = (n_tokens + kToks - 1) / kToks;
  host_parallel_for(n_rb * n_tb, [&](int64_t task) {
    const int64_t r0 = task / n_tb * kRows, t0 = task % n_tb * kToks;
    for (int64_t t = t0; t < std::min<int64_t>(n_tokens, t0 + kToks); ++t)
      for (int64_t r = r0; r < std::min(w.n_out, r0 + kRows); ++r)
        ref[t * w.n_out + r] = dot_double(w.deq.data() + r * w.n_in, x.data() + t * w.n_in, w.n_in);
  });
  return ref;
}

// Runs out = x W^T (+ bias) on the first n_tokens rows of x into a poisoned `out` and checks
// rows [0, n_tokens) against ref (+ bias) and that rows [n_tokens, out.rows) kept the poison.
void run_and_check(Backend& be, const Weight& w, const DevTensor& x, int n_tokens, DevTensor& out,
                   const std::vector<double>& ref, const DevTensor* bias,
                   const std::vector<float>* bias_host, const std::string& bound_name,
                   const std::string& log_key, const std::string& what) {
  SCOPED_TRACE(what);
  const int64_t n_out = w.n_out;
  fill_poison(be, out);
  const Status s = be.matmul(w, *x, n_tokens, *out, bias ? &**bias : nullptr);
  ASSERT_TRUE(s.is_ok()) << s.message();
  const std::vector<float> got = fetch(be, out);
  std::vector<double> want(ref.begin(), ref.begin() + n_tokens * n_out);
  if (bias_host)
    for (int t = 0; t < n_tokens; ++t)
      for (int64_t r = 0; r < n_out; ++r) want[t * n_out + r] += (*bias_host)[r];
  check_err(compare_rows(got.data(), out->cols, want.data(), n_tokens, n_out), bound_name, log_key,
            what);
  EXPECT_EQ(count_unpoisoned(got, out->cols, n_tokens, out->rows), 0)
      << "matmul wrote output rows past n_tokens = " << n_tokens;
}

std::string shape_str(DType type, int64_t n_in, int64_t n_out, int T, bool bias) {
  return type_str(type) + " n_in=" + std::to_string(n_in) + " n_out=" + std::to_string(n_out) +
         " T=" + std::to_string(T) + (bias ? " +bias" : "");
}

KESTREL_GPU_OPS_SUITE(GpuOpsMatmul);
KESTREL_GPU_OPS_SUITE(GpuOpsMatmulLarge);
KESTREL_GPU_OPS_SUITE(GpuOpsMatmulOutliers);

// Widths n_in of one to 40 blocks (3 blocks: a tail for kernels that step 64 or 128 columns),
// n_out not a multiple of 16/64/128 tiles, every token count, each with and without bias.
void check_shapes(Backend& be, const std::string& backend, DType type) {
  std::mt19937 rng = test_rng();
  const std::vector<int64_t> n_ins =
      is_kquant(type) ? std::vector<int64_t>{256, 1280} : std::vector<int64_t>{96, 1024};
  for (int64_t n_in : n_ins) {
    const std::vector<float> x = randn(rng, static_cast<size_t>(kMaxTokens * n_in));
    DevTensor xt(be, kMaxTokens, n_in, x);
    for (int64_t n_out : {37, 96, 200, 1000}) {
      const HostWeight hw = random_weight(rng, type, n_in, n_out);
      const std::vector<double> ref = matmul_reference(hw, x, kMaxTokens);
      const std::vector<float> bias = randn(rng, static_cast<size_t>(n_out), 5.0f);
      auto w = be.load_weight(hw.matrix());
      ASSERT_TRUE(w.has_value()) << type_str(type) << ": " << w.message();
      EXPECT_EQ((*w)->n_in, n_in);
      EXPECT_EQ((*w)->n_out, n_out);
      EXPECT_EQ((*w)->type, type);
      DevTensor bt(be, be.load_vector(bias.data(), n_out, "bias"));
      DevTensor out(be, DType::F32, kMaxTokens + 3, n_out, "out");
      for (int T : kTokenCounts) {
        for (bool with_bias : {false, true}) {
          run_and_check(be, **w, xt, T, out, ref, with_bias ? &bt : nullptr,
                        with_bias ? &bias : nullptr, matmul_bound_name(type),
                        backend + " matmul/" + type_str(type) + "/T=" + std::to_string(T),
                        shape_str(type, n_in, n_out, T, with_bias));
          if (::testing::Test::HasFatalFailure()) return;
        }
      }
    }
  }
}

// The first `width` columns of the first `rows` rows of x (rows of n floats).
std::vector<float> x_of_width(const std::vector<float>& x, int64_t n, int64_t width, int rows) {
  std::vector<float> out;
  out.reserve(static_cast<size_t>(rows * width));
  for (int64_t r = 0; r < rows; ++r)
    out.insert(out.end(), x.begin() + r * n, x.begin() + r * n + width);
  return out;
}

// n_in 4096, n_out 4096 (a 7B-class projection) at T 1, 16 (+ bias) and 512; x has exactly
// 512 rows.
void check_large(Backend& be, const std::string& backend, DType type) {
  std::mt19937 rng = test_rng();
  const int64_t n = 4096;
  const std::vector<float> x = randn(rng, static_cast<size_t>(kMaxTokens * n));
  const HostWeight hw = random_weight(rng, type, n, n);
  const std::vector<double> ref = matmul_reference(hw, x, kMaxTokens);
  const std::vector<float> bias = randn(rng, static_cast<size_t>(n), 5.0f);
  auto w = be.load_weight(hw.matrix("blk.0.ffn_up.weight"));
  ASSERT_TRUE(w.has_value()) << type_str(type) << ": " << w.message();
  DevTensor xt(be, kMaxTokens, n, x);
  DevTensor bt(be, be.load_vector(bias.data(), n, "bias"));
  DevTensor out(be, DType::F32, kMaxTokens, n, "out");
  for (int T : {1, 16, 512}) {
    const bool with_bias = T == 16;
    run_and_check(be, **w, xt, T, out, ref, with_bias ? &bt : nullptr, with_bias ? &bias : nullptr,
                  matmul_bound_name(type),
                  backend + " matmul-4096/" + type_str(type) + "/T=" + std::to_string(T),
                  shape_str(type, n, n, T, with_bias));
    if (::testing::Test::HasFatalFailure()) return;
  }
  // More rows than 64 x 132 (an H100's SMs): the persistent micro-batch kernels give a block
  // several row groups, the later ones over activations it holds already.
  constexpr int kTallTokens = 16;
  const int64_t n_in = 512, n_out = 64 * 132 * 2 + 37;
  const std::vector<float> x_tall = x_of_width(x, n, n_in, kTallTokens);
  const HostWeight tall = random_weight(rng, type, n_in, n_out);
  const std::vector<double> tall_ref = matmul_reference(tall, x_tall, kTallTokens);
  auto wt = be.load_weight(tall.matrix());
  ASSERT_TRUE(wt.has_value()) << type_str(type) << ": " << wt.message();
  DevTensor xs(be, kTallTokens, n_in, x_tall);
  DevTensor tall_out(be, DType::F32, kTallTokens, n_out, "out");
  for (int T : {5, 16}) {
    run_and_check(be, **wt, xs, T, tall_out, tall_ref, nullptr, nullptr, matmul_bound_name(type),
                  backend + " matmul-tall/" + type_str(type) + "/T=" + std::to_string(T),
                  shape_str(type, n_in, n_out, T, false));
    if (::testing::Test::HasFatalFailure()) return;
  }
  // Rows of 11008 (a 7B ffn_down) in more 8-row tiles than an H100 has SMs, the last one short:
  // CUDA's decode weight stream (matvec_stream.cu) gives each warp a K slice of every row there,
  // and its pipelined K-split (matvec_pipe_kernel) a thread three K-blocks a row, the last
  // 4-row group one row.
  constexpr int kLongTokens = 3;
  const int64_t long_in = 11008, long_out = 8 * 132 + 61;
  const std::vector<float> x_long = randn(rng, static_cast<size_t>(kLongTokens * long_in));
  const HostWeight lw = random_weight(rng, type, long_in, long_out);
  const std::vector<double> long_ref = matmul_reference(lw, x_long, kLongTokens);
  const std::vector<float> long_bias = randn(rng, static_cast<size_t>(long_out), 5.0f);
  auto wl = be.load_weight(lw.matrix("blk.0.ffn_down.weight"));
  ASSERT_TRUE(wl.has_value()) << type_str(type) << ": " << wl.message();
  DevTensor xl(be, kLongTokens, long_in, x_long);
  DevTensor lb(be, be.load_vector(long_bias.data(), long_out, "bias"));
  DevTensor long_o(be, DType::F32, kLongTokens, long_out, "out");
  for (int T : {1, 3}) {
    const bool with_bias = T == 1;
    run_and_check(be, **wl, xl, T, long_o, long_ref, with_bias ? &lb : nullptr,
                  with_bias ? &long_bias : nullptr, matmul_bound_name(type),
                  backend + " matmul-long/" + type_str(type) + "/T=" + std::to_string(T),
                  shape_str(type, long_in, long_out, T, with_bias));
    if (::testing::Test::HasFatalFailure()) return;
  }
}

// Activation rows with 1000x outliers: row t % 3 == 0 has one, t % 3 == 1 one in every
// 32-element block, t % 3 == 2 none (plain rows in the same batch must be unaffected). With
// the 16x weight rows, outputs reach ~1e5: past f16's 65504.
void check_activation_outliers(Backend& be, const std::string& backend, DType type) {
  std::mt19937 rng = test_rng();
  const int64_t n_in = 2048, n_out = 200;
  constexpr int kTokens = 100;
  const HostWeight hw = random_weight(rng, type, n_in, n_out);
  std::vector<float> x = randn(rng, static_cast<size_t>(kTokens * n_in));
  std::uniform_int_distribution<int64_t> where(0, n_in - 1);
  for (int t = 0; t < kTokens; ++t) {
    float* row = x.data() + t * n_in;
    if (t % 3 == 0) {
      const int64_t i = where(rng);
      row[i] = std::copysign(1000.0f, row[i]);
    } else if (t % 3 == 1) {
      for (int64_t b = 0; b < n_in / 32; ++b) {
        const int64_t i = b * 32 + (b * 7 + t) % 32;
        row[i] = std::copysign(1000.0f, row[i]);
      }
    }
  }
  const std::vector<double> ref = matmul_reference(hw, x, kTokens);
  auto w = be.load_weight(hw.matrix());
  ASSERT_TRUE(w.has_value()) << w.message();
  DevTensor xt(be, kTokens, n_in, x);
  DevTensor out(be, DType::F32, kTokens, n_out, "out");
  for (int T : {1, 3, 9, 64, 100}) {
    run_and_check(be, **w, xt, T, out, ref, nullptr, nullptr, "matmul/outliers",
                  backend + " matmul-outliers/" + type_str(type) + "/T=" + std::to_string(T),
                  "activation outliers " + shape_str(type, n_in, n_out, T, false));
    if (::testing::Test::HasFatalFailure()) return;
  }
}

#define KESTREL_MATMUL_TESTS(Type)                            \
  TEST_P(GpuOpsMatmul, Type) {                                \
    GPU_TRACE_SEED();                                         \
    check_shapes(be(), GetParam(), DType::Type);              \
  }                                                           \
  TEST_P(GpuOpsMatmulLarge, Type) {                           \
    GPU_TRACE_SEED();                                         \
    check_large(be(), GetParam(), DType::Type);               \
  }                                                           \
  TEST_P(GpuOpsMatmulOutliers, Type) {                        \
    GPU_TRACE_SEED();                                         \
    check_activation_outliers(be(), GetParam(), DType::Type); \
  }

KESTREL_MATMUL_TESTS(F32)
KESTREL_MATMUL_TESTS(F16)
KESTREL_MATMUL_TESTS(BF16)
KESTREL_MATMUL_TESTS(Q4_0)
KESTREL_MATMUL_TESTS(Q4_1)
KESTREL_MATMUL_TESTS(Q8_0)
KESTREL_MATMUL_TESTS(Q5_0)
KESTREL_MATMUL_TESTS(Q5_1)
KESTREL_MATMUL_TESTS(Q4_K)
KESTREL_MATMUL_TESTS(Q5_K)
KESTREL_MATMUL_TESTS(Q6_K)

// The OpenCL tiled kernel loads Q4_0 / Q8_0 steps ahead of their products by default;
// KESTREL_CL_TILED_PREFETCH=0 keeps the plain loop. Both forms must give the reference's results.
TEST_P(GpuOpsMatmulOutliers, TiledWithoutPrefetch) {
  GPU_TRACE_SEED();
  ScopedEnv env("KESTREL_CL_TILED_PREFETCH", "0");
  auto plain = create_backend(GetParam(), BackendOptions{});
  ASSERT_TRUE(plain.has_value()) << plain.message();
  for (DType type : {DType::Q4_0, DType::Q8_0}) {
    check_activation_outliers(**plain, GetParam() + " (no prefetch)", type);
    if (::testing::Test::HasFatalFailure()) return;
  }
}

// OpenCL runs mid-sized micro-batches (9-32 tokens, and the tails of larger ones) on the tiled
// template's 16-token instance; KESTREL_CL_MID_KERNEL=mid keeps them on matmul_mid. Every shape
// and token count on matmul_mid, for the repacked types and a generic one.
TEST_P(GpuOpsMatmul, MidBatchesOnMatmulMid) {
  GPU_TRACE_SEED();
  if (GetParam().rfind("opencl", 0) != 0) GTEST_SKIP() << "an OpenCL kernel switch";
  ScopedEnv env("KESTREL_CL_MID_KERNEL", "mid");
  auto mid = create_backend(GetParam(), BackendOptions{});
  ASSERT_TRUE(mid.has_value()) << mid.message();
  for (DType type : {DType::Q4_0, DType::Q8_0, DType::Q4_K}) {
    check_shapes(**mid, GetParam() + " (matmul_mid)", type);
    if (::testing::Test::HasFatalFailure()) return;
  }
  check_activation_outliers(**mid, GetParam() + " (matmul_mid)", DType::Q4_0);
}

// OpenCL devices with cl_khr_fp16 run the Q4_0 / Q8_0 micro-batch matmuls in half arithmetic
// (the suites above test it there, e.g. on Intel's CPU runtime); the device name says so, and
// KESTREL_CL_HALF=0 keeps them in f32, which must then pass the same checks.
TEST_P(GpuOpsMatmul, HalfArithmeticWhereTheDeviceHasFp16) {
  GPU_TRACE_SEED();
  if (GetParam().rfind("opencl", 0) != 0) GTEST_SKIP() << "an OpenCL kernel switch";
  const std::string name = be().device_name();
  const bool fp16 = name.find(", fp16") != std::string::npos;
  const char* env = std::getenv("KESTREL_CL_HALF");
  if (!env || std::string(env) != "0") {
    EXPECT_EQ(name.find("half matmuls") != std::string::npos, fp16) << name;
  }
  if (!fp16) GTEST_SKIP() << "no cl_khr_fp16 on " << name << ": the f32 kernels are the only ones";
  ScopedEnv off("KESTREL_CL_HALF", "0");
  auto f32 = create_backend(GetParam(), BackendOptions{});
  ASSERT_TRUE(f32.has_value()) << f32.message();
  EXPECT_EQ((*f32)->device_name().find("half matmuls"), std::string::npos) << (*f32)->device_name();
  for (DType type : {DType::Q4_0, DType::Q8_0}) {
    check_shapes(**f32, GetParam() + " (f32 on an fp16 device)", type);
    if (::testing::Test::HasFatalFailure()) return;
  }
}

// The tensor-core template of NVIDIA devices (kernels/matmul_nv_mma.cl): on NVIDIA's driver it
// is the default (this test then checks the portable kernels it replaces there); elsewhere it
// runs with its mma emulated through local memory, which checks everything but the instruction
// (fragment layouts, tiles, tails, split-K, the f16 activations' scaling).
TEST_P(GpuOpsMatmul, TensorCoreTemplateRealOrEmulated) {
  GPU_TRACE_SEED();
  if (GetParam().rfind("opencl", 0) != 0) GTEST_SKIP() << "an OpenCL kernel switch";
  const bool real = be().device_name().find("tensor-core matmuls") != std::string::npos;
  {
    // The template with matmul_reduce's sums (NVIDIA's defaults are the fragment kernel and
    // in-kernel sums: the loop below).
    ScopedEnv env("KESTREL_CL_NV_MMA", real ? "0" : "emulate");
    ScopedEnv frag_env("KESTREL_CL_NV_FRAG", "0");
    ScopedEnv reduce_env("KESTREL_CL_NV_REDUCE", "launch");
    auto other = create_backend(GetParam(), BackendOptions{});
    ASSERT_TRUE(other.has_value()) << other.message();
    const std::string name = (*other)->device_name();
    EXPECT_EQ(name.find("mma.sync") != std::string::npos, !real) << name;
    for (DType type : {DType::Q4_0, DType::Q8_0}) {
      check_shapes(**other, GetParam() + (real ? " (portable kernels)" : " (mma emulated)"), type);
      if (::testing::Test::HasFatalFailure()) return;
    }
  }
  // The split-K sums by each tile's last work-group (KESTREL_CL_NV_REDUCE=kernel, the default),
  // with the split target raised so that the shapes have several; then the same with the
  // 16-token register-fragment kernel (KESTREL_CL_NV_FRAG=1, the default), with matmul_reduce's
  // sums and in-kernel ones.
  ScopedEnv mode("KESTREL_CL_NV_MMA", real ? "1" : "emulate");
  ScopedEnv splits("KESTREL_CL_MID_GROUPS_PER_CU", "16");
  for (const char* frag : {"0", "1"})
    for (const char* reduce : {"kernel", "launch"}) {
      if (std::string(frag) == "0" && std::string(reduce) == "launch") continue;  // above
      ScopedEnv frag_env("KESTREL_CL_NV_FRAG", frag);
      ScopedEnv reduce_env("KESTREL_CL_NV_REDUCE", reduce);
      auto other = create_backend(GetParam(), BackendOptions{});
      ASSERT_TRUE(other.has_value()) << other.message();
      const std::string name = (*other)->device_name();
      EXPECT_NE(name.find("mma.sync"), std::string::npos) << name;
      EXPECT_EQ(name.find("fragments") != std::string::npos, std::string(frag) == "1") << name;
      for (DType type : {DType::Q4_0, DType::Q8_0}) {
        check_shapes(**other,
                     GetParam() + " (NV_FRAG=" + frag + ", split-K sums by " + reduce + ")", type);
        if (::testing::Test::HasFatalFailure()) return;
      }
    }
}

// The 16-token register-fragment kernels (KESTREL_CL_NV_FRAG=1, kernels/matmul_nv_frag.cl) round
// as the template does and feed the same fragments in the same order: the two give the same
// products bit for bit (real mma on NVIDIA, emulated elsewhere), with and without split-K.
TEST_P(GpuOpsMatmul, FragmentKernelIsTheTemplateBitForBit) {
  GPU_TRACE_SEED();
  if (GetParam().rfind("opencl", 0) != 0) GTEST_SKIP() << "an OpenCL kernel switch";
  const bool real = be().device_name().find("tensor-core matmuls") != std::string::npos;
  ScopedEnv mode("KESTREL_CL_NV_MMA", real ? "1" : "emulate");
  std::mt19937 rng = test_rng();
  const int64_t n_in = 1024, n_out = 200;   // a partial 128-row tile
  for (const char* groups : {"1", "16"}) {  // split-K target: few splits, then several
    ScopedEnv split_env("KESTREL_CL_MID_GROUPS_PER_CU", groups);
    for (DType type : {DType::Q4_0, DType::Q8_0}) {
      const std::vector<uint8_t> rows =
          quantize_rows(type, randn(rng, static_cast<size_t>(n_in * n_out), 0.5f), n_out, n_in);
      const std::vector<float> x = randn(rng, static_cast<size_t>(16 * n_in));
      std::vector<float> outs[2];
      for (int frag = 0; frag < 2; ++frag) {
        ScopedEnv frag_env("KESTREL_CL_NV_FRAG", frag ? "1" : "0");
        auto other = create_backend(GetParam(), BackendOptions{});
        ASSERT_TRUE(other.has_value()) << other.message();
        Backend& be2 = **other;
        auto w = be2.load_weight(HostMatrix{type, n_in, n_out, rows.data(), "w"});
        ASSERT_TRUE(w.has_value()) << w.message();
        DevTensor xt(be2, 16, n_in, x), out(be2, DType::F32, 16, n_out, "out");
        for (int T : {9, 16}) {
          ASSERT_TRUE(be2.matmul(**w, *xt, T, *out, nullptr).is_ok());
          const std::vector<float> got = fetch(be2, out);
          outs[frag].insert(outs[frag].end(), got.begin(), got.begin() + T * n_out);
        }
      }
      EXPECT_EQ(outs[0], outs[1]) << type_str(type) << ", split target " << groups;
    }
  }
}

// SwiGLU and the down projection as one op (Backend::swiglu_matmul; CUDA fuses decode's with
// KESTREL_CUDA_FUSED_SWIGLU=1, the stream kernel quantizing silu(gate) * up itself, where the
// stream is on: KESTREL_CUDA_MATVEC_STREAM=1, as gpu-check's stage gpu-tests-fused-swiglu sets
// it; else the two ops): the result of
// the two ops bit for bit (the same int8 planes, the same kernel), and the double reference within
// the matmul bound. Rows of 11008 (a 7B ffn down), a short last 8-row tile.
TEST_P(GpuOpsMatmulLarge, SwigluMatmulIsTheTwoOps) {
  GPU_TRACE_SEED();
  std::mt19937 rng = test_rng();
  const int64_t n_in = 11008, n_out = 8 * 132 + 61;
  ScopedEnv fused_env("KESTREL_CUDA_FUSED_SWIGLU", "1");
  auto fused = create_backend(GetParam(), BackendOptions{});
  ASSERT_TRUE(fused.has_value()) << fused.message();
  for (DType type : {DType::Q4_0, DType::Q8_0}) {
    SCOPED_TRACE(type_str(type));
    const HostWeight hw = random_weight(rng, type, n_in, n_out);
    const std::vector<float> gate = randn(rng, static_cast<size_t>(n_in), 2.0f);
    const std::vector<float> up = randn(rng, static_cast<size_t>(n_in));
    std::vector<float> h(static_cast<size_t>(n_in));
    for (int64_t i = 0; i < n_in; ++i) {
      const double g = gate[i];
      h[i] = static_cast<float>(g / (1.0 + std::exp(-g)) * up[i]);
    }
    const std::vector<double> ref = matmul_reference(hw, h, 1);
    std::vector<float> outs[2];
    for (int f = 0; f < 2; ++f) {
      Backend& b = f ? **fused : be();
      SCOPED_TRACE(f ? "fused" : "two ops");
      auto w = b.load_weight(hw.matrix("blk.0.ffn_down.weight"));
      ASSERT_TRUE(w.has_value()) << w.message();
      DevTensor g(b, 1, n_in, gate), u(b, 1, n_in, up), out(b, DType::F32, 1, n_out, "out");
      const Status st = f ? b.swiglu_matmul(*g, *u, 1, **w, *out)
                          : (b.swiglu(*g, *u, 1, *g).is_ok() ? b.matmul(**w, *g, 1, *out, nullptr)
                                                             : Status(error("swiglu failed")));
      ASSERT_TRUE(st.is_ok()) << st.message();
      outs[f] = fetch(b, out);
      check_err(compare_rows(outs[f].data(), n_out, ref.data(), 1, n_out), matmul_bound_name(type),
                GetParam() + " swiglu+matmul/" + type_str(type) + (f ? "/fused" : "/two-ops"),
                shape_str(type, n_in, n_out, 1, false));
    }
    EXPECT_EQ(outs[0], outs[1]) << "the fused op differs from swiglu then matmul";
  }
}

// The feed-forward's gate and up with SwiGLU as one op (Backend::matmul_swiglu; CUDA fuses
// decode's with KESTREL_CUDA_MATMUL_SWIGLU=1: SwiGLU in the gate/up matvec's epilogue, which
// also writes the down projection's int8 planes): gate, up and the down projection that reads
// gate afterwards are matmul_group then swiglu's bit for bit (the two ops are held to the
// references by the suites above). 35 blocks of 32 rows, rows of 1024 and 1120 (a 7B's
// shapes in miniature).
TEST_P(GpuOpsMatmulLarge, MatmulSwigluIsTheTwoOps) {
  GPU_TRACE_SEED();
  std::mt19937 rng = test_rng();
  const int64_t n_embd = 1024, n_ff = 32 * 35, n_down = 8 * 132 + 61;
  ScopedEnv fused_env("KESTREL_CUDA_MATMUL_SWIGLU", "1");
  auto fused = create_backend(GetParam(), BackendOptions{});
  ASSERT_TRUE(fused.has_value()) << fused.message();
  for (DType type : {DType::Q4_0, DType::Q8_0}) {
    SCOPED_TRACE(type_str(type));
    const HostWeight hg = random_weight(rng, type, n_embd, n_ff);
    const HostWeight hu = random_weight(rng, type, n_embd, n_ff);
    const HostWeight hd = random_weight(rng, type, n_ff, n_down);
    const std::vector<float> x = randn(rng, static_cast<size_t>(n_embd));
    std::vector<float> gates[2], ups[2], outs[2];
    for (int f = 0; f < 2; ++f) {
      Backend& b = f ? **fused : be();
      SCOPED_TRACE(f ? "fused" : "two ops");
      auto wg = b.load_weight(hg.matrix("blk.0.ffn_gate.weight"));
      auto wu = b.load_weight(hu.matrix("blk.0.ffn_up.weight"));
      auto wd = b.load_weight(hd.matrix("blk.0.ffn_down.weight"));
      ASSERT_TRUE(wg.has_value() && wu.has_value() && wd.has_value());
      DevTensor xt(b, 1, n_embd, x), g(b, DType::F32, 1, n_ff, "gate"),
          u(b, DType::F32, 1, n_ff, "up"), out(b, DType::F32, 1, n_down, "out");
      Status st = Status::ok();
      if (f) {
        st = b.matmul_swiglu(*xt, 1, **wg, **wu, *g, *u);
      } else {
        const MatmulOut gate_up[] = {{&**wg, &*g, nullptr}, {&**wu, &*u, nullptr}};
        st = b.matmul_group(*xt, 1, gate_up, 2);
        if (st) st = b.swiglu(*g, *u, 1, *g);
      }
      ASSERT_TRUE(st.is_ok()) << st.message();
      st = b.matmul(**wd, *g, 1, *out, nullptr);
      ASSERT_TRUE(st.is_ok()) << st.message();
      gates[f] = fetch(b, g);
      ups[f] = fetch(b, u);
      outs[f] = fetch(b, out);
    }
    EXPECT_EQ(gates[0], gates[1]) << "silu(gate) * up differs";
    EXPECT_EQ(ups[0], ups[1]) << "up differs";
    EXPECT_EQ(outs[0], outs[1]) << "the down projection of it differs";
  }
}

// ---- shape errors and the profiled path --------------------------------------------------------

KESTREL_GPU_OPS_SUITE(GpuOpsMatmulBadInput);

// The interface reports a shape mismatch as a Status: the backend must say so (naming the
// weight) instead of reading or writing out of bounds, and keep working afterwards.
TEST_P(GpuOpsMatmulBadInput, ShapeMismatchIsAnErrorNamingTheWeight) {
  GPU_TRACE_SEED();
  std::mt19937 rng = test_rng();
  for (DType type : {DType::F32, DType::Q4_0, DType::Q4_K}) {
    SCOPED_TRACE(type_str(type));
    const int64_t n_in = is_kquant(type) ? 256 : 64, n_out = 37;
    const HostWeight hw = random_weight(rng, type, n_in, n_out);
    auto w = be().load_weight(hw.matrix());
    ASSERT_TRUE(w.has_value()) << w.message();
    DevTensor x_narrow(be(), 4, n_in / 2, randn(rng, static_cast<size_t>(4 * n_in / 2)));
    DevTensor x_wide(be(), 4, n_in * 2, randn(rng, static_cast<size_t>(4 * n_in * 2)));
    const std::vector<float> x = randn(rng, static_cast<size_t>(4 * n_in));
    DevTensor x_ok(be(), 4, n_in, x);
    DevTensor out_ok(be(), DType::F32, 4, n_out);
    DevTensor out_narrow(be(), DType::F32, 4, n_out - 1);
    DevTensor out_short(be(), DType::F32, 2, n_out);
    EXPECT_FALSE(be().matmul(**w, *x_narrow, 4, *out_ok, nullptr).is_ok()) << "x narrower";
    EXPECT_FALSE(be().matmul(**w, *x_wide, 4, *out_ok, nullptr).is_ok()) << "x wider";
    EXPECT_FALSE(be().matmul(**w, *x_ok, 4, *out_narrow, nullptr).is_ok()) << "out narrower";
    EXPECT_FALSE(be().matmul(**w, *x_ok, 4, *out_short, nullptr).is_ok()) << "out has 2 rows";
    EXPECT_FALSE(be().matmul(**w, *x_ok, 5, *out_ok, nullptr).is_ok()) << "x has 4 rows";
    const Status s = be().matmul(**w, *x_narrow, 4, *out_ok, nullptr);
    EXPECT_NE(s.message().find("'w'"), std::string::npos)
        << "does not name weight 'w': " << s.message();
    // and it still works
    const std::vector<double> ref = matmul_reference(hw, x, 4);
    run_and_check(be(), **w, x_ok, 4, out_ok, ref, nullptr, nullptr, matmul_bound_name(type),
                  GetParam() + " matmul-after-error/" + type_str(type), "after the errors");
  }
}

// profile_op adds the op's time under its kind (after synchronize(): a backend may read device
// timers late) and changes no result: the profiled product equals the unprofiled one bit for
// bit (the same kernels on the same inputs). An op that fails inside profile_op fails it.
TEST_P(GpuOpsMatmulBadInput, ProfiledMatmulAddsItsTimeAndGivesTheSameResult) {
  GPU_TRACE_SEED();
  std::mt19937 rng = test_rng();
  for (int T : {1, 100}) {
    SCOPED_TRACE("T=" + std::to_string(T));
    const int64_t n_in = 1024, n_out = 200;
    const HostWeight hw = random_weight(rng, DType::Q4_0, n_in, n_out);
    const std::vector<float> x = randn(rng, static_cast<size_t>(T * n_in));
    auto w = be().load_weight(hw.matrix());
    ASSERT_TRUE(w.has_value()) << w.message();
    DevTensor xt(be(), T, n_in, x);
    DevTensor plain(be(), DType::F32, T, n_out), profiled(be(), DType::F32, T, n_out);
    fill_poison(be(), plain);
    fill_poison(be(), profiled);
    ASSERT_TRUE(be().matmul(**w, *xt, T, *plain, nullptr).is_ok());
    OpProfiler prof;
    for (int i = 0; i < 2; ++i) {
      const Status s = be().profile_op(
          "matmul q4_0", prof, [&] { return be().matmul(**w, *xt, T, *profiled, nullptr); });
      ASSERT_TRUE(s.is_ok()) << s.message();
    }
    const std::vector<float> a = fetch(be(), plain), b = fetch(be(), profiled);
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0)
        << "profiled matmul differs from the unprofiled one";
    const std::vector<double> ref = matmul_reference(hw, x, T);
    check_err(compare_rows(b.data(), n_out, ref.data(), T, n_out), "matmul/quant",
              GetParam() + " matmul-profiled/q4_0", "profiled");
    const std::vector<OpTime> times = prof.sorted();
    ASSERT_EQ(times.size(), 1u);
    EXPECT_EQ(times[0].kind, "matmul q4_0");
    EXPECT_EQ(times[0].calls, 2);
    EXPECT_TRUE(std::isfinite(times[0].ms) && times[0].ms >= 0) << times[0].ms;
    // a failing op fails profile_op, and is still counted or not, but never crashes
    DevTensor x_bad(be(), T, n_in / 2, randn(rng, static_cast<size_t>(T * n_in / 2)));
    const Status bad = be().profile_op(
        "matmul q4_0", prof, [&] { return be().matmul(**w, *x_bad, T, *profiled, nullptr); });
    EXPECT_FALSE(bad.is_ok());
    EXPECT_TRUE(be().synchronize().is_ok());
  }
}

}  // namespace
}  // namespace kestrel::backend::gpu_ops_test
