// GPU backend conformance, part 1: which backends run, memory (alloc, upload/download of whole
// and partial rows, free, absurd sizes), embed from a host table of every type, rms_norm, rope
// (both layouts, large and shuffled positions), swiglu (in place, as the model calls it), add,
// get_rows, and the report. Matmul is test_gpu_ops_matmul.cpp; kv_store and attention are
// test_gpu_ops_attn.cpp. The bounds and helpers are in gpu_ops_common.h.
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "gpu_ops_common.h"

namespace kestrel::backend::gpu_ops_test {
namespace {

// ---- setup ----------------------------------------------------------------------------------

// The visible skip when nothing can run; with a backend, names the devices under test.
TEST(GpuOpsSetup, BackendsUnderTest) {
  const GpuBackendList& list = gpu_backend_list();
  if (list.names.empty()) {
    if (!list.requested.empty())
      FAIL() << "KESTREL_GPU_BACKEND=" << list.requested << " cannot run: " << list.why_none;
    GTEST_SKIP() << "no usable GPU backend in this build/machine (" << list.why_none << ")";
  }
  for (const std::string& name : list.names) {
    auto be = create_backend(name, BackendOptions{});
    ASSERT_TRUE(be.has_value()) << name << ": " << be.message();
    EXPECT_EQ(std::string((*be)->name()), name);
    std::printf("[ GpuOps ] %s: %s, %.1f GiB free; KESTREL_TEST_SEED=%llu\n", name.c_str(),
                (*be)->device_name().c_str(),
                static_cast<double>((*be)->available_memory()) / (1 << 30),
                static_cast<unsigned long long>(test_seed()));
  }
}

// ---- memory ---------------------------------------------------------------------------------

KESTREL_GPU_OPS_SUITE(GpuOpsMemory);

// Whole and partial rows (row0 > 0) of every tensor type round-trip byte for byte; rows not
// uploaded keep their bytes; copies outside the tensor are errors.
TEST_P(GpuOpsMemory, UploadDownloadRoundTripWholeAndPartialRows) {
  GPU_TRACE_SEED();
  std::mt19937 rng = test_rng();
  std::uniform_int_distribution<int> byte(0, 255);
  for (DType type : {DType::F32, DType::F16, DType::Q8_0, DType::Q4_0}) {
    SCOPED_TRACE(type_str(type));
    const int64_t rows = 37, cols = 160;
    DevTensor t(be(), type, rows, cols, "roundtrip");
    ASSERT_TRUE(t);
    EXPECT_EQ(t->type, type);
    EXPECT_EQ(t->rows, rows);
    EXPECT_EQ(t->cols, cols);
    EXPECT_EQ(t->bytes, static_cast<size_t>(rows * quant::row_bytes(type, cols)));
    EXPECT_EQ(t->owner, &be());
    std::vector<uint8_t> host(t->bytes);
    for (auto& b : host) b = static_cast<uint8_t>(byte(rng));
    ASSERT_TRUE(be().upload(*t, 0, rows, host.data()).is_ok());
    EXPECT_EQ(fetch_bytes(be(), t), host);
    // rows [5, 12) replaced; download [3, 15) and [36, 37)
    const size_t rb = t->row_bytes();
    std::vector<uint8_t> part(7 * rb);
    for (auto& b : part) b = static_cast<uint8_t>(byte(rng));
    ASSERT_TRUE(be().upload(*t, 5, 7, part.data()).is_ok());
    std::copy(part.begin(), part.end(), host.begin() + 5 * rb);
    ASSERT_TRUE(be().synchronize().is_ok());
    std::vector<uint8_t> window(12 * rb), last(rb);
    ASSERT_TRUE(be().download(*t, 3, 12, window.data()).is_ok());
    EXPECT_TRUE(std::equal(window.begin(), window.end(), host.begin() + 3 * rb));
    ASSERT_TRUE(be().download(*t, rows - 1, 1, last.data()).is_ok());
    EXPECT_TRUE(std::equal(last.begin(), last.end(), host.begin() + (rows - 1) * rb));
    EXPECT_EQ(fetch_bytes(be(), t), host) << "rows outside [5, 12) changed";
    // outside the tensor
    EXPECT_FALSE(be().upload(*t, rows - 2, 3, part.data()).is_ok());
    EXPECT_FALSE(be().download(*t, -1, 2, window.data()).is_ok());
    EXPECT_FALSE(be().download(*t, 30, 8, window.data()).is_ok());
    EXPECT_EQ(fetch_bytes(be(), t), host) << "a refused upload changed the tensor";
  }
}

// upload() may be asynchronous on the device side, but the host buffer is the caller's again
// when it returns (the forward pass and these tests reuse it at once).
TEST_P(GpuOpsMemory, UploadHasReadTheHostBufferWhenItReturns) {
  GPU_TRACE_SEED();
  std::mt19937 rng = test_rng();
  const int64_t rows = 64, cols = 4096;
  std::vector<float> host = randn(rng, static_cast<size_t>(rows * cols));
  const std::vector<float> want = host;
  DevTensor t(be(), DType::F32, rows, cols);
  ASSERT_TRUE(be().upload(*t, 0, rows, host.data()).is_ok());
  std::fill(host.begin(), host.end(), -1.0f);
  EXPECT_EQ(fetch(be(), t), want);
}

// download() right after ops, without synchronize(), returns their results: the forward pass
// moves activations between devices that way (Forward::move_residual).
TEST_P(GpuOpsMemory, DownloadSeesEarlierOpsWithoutSynchronize) {
  GPU_TRACE_SEED();
  std::mt19937 rng = test_rng();
  const int64_t T = 64, n = 4096;
  const std::vector<float> x = randn(rng, static_cast<size_t>(T * n));
  const std::vector<float> y = randn(rng, static_cast<size_t>(T * n));
  DevTensor xt(be(), T, n, x), yt(be(), T, n, y);
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(be().add(*xt, *yt, static_cast<int>(T)).is_ok());
  std::vector<float> got(static_cast<size_t>(T * n));
  ASSERT_TRUE(be().download(*xt, 0, T, got.data()).is_ok());
  // three f32 additions in order: the same bits on any IEEE device
  std::vector<float> want(got.size());
  for (size_t i = 0; i < want.size(); ++i) want[i] = ((x[i] + y[i]) + y[i]) + y[i];
  EXPECT_EQ(got, want) << "download did not wait for the adds";
}

// free() releases the memory (available_memory comes back, up to one cached block) and empties
// the tensor.
TEST_P(GpuOpsMemory, FreeReleasesTheMemory) {
  constexpr int64_t kMiB = 1 << 20;
  const int64_t before = be().available_memory();
  for (int i = 0; i < 40; ++i) {
    auto t = be().alloc(DType::F32, 256, kMiB, "churn");  // 256 rows of 4 MiB: 1 GiB
    ASSERT_TRUE(t.has_value()) << "alloc " << i << ": " << t.message();
    be().free(*t);
    EXPECT_EQ(t->data, nullptr) << "free() left the pointer in the tensor";
  }
  ASSERT_TRUE(be().synchronize().is_ok());
  const int64_t after = be().available_memory();
  if (before >= 0 && after >= 0) {
    EXPECT_GE(after, before - 2048 * kMiB)
        << "40 GiB allocated and freed, but " << (before - after) / kMiB << " MiB went missing";
  }
}

// An allocation the device cannot hold is an error naming the size or the memory, never a
// crash or a partial allocation; the backend keeps working.
TEST_P(GpuOpsMemory, AbsurdAllocationIsAnErrorThatNamesTheSize) {
  GPU_TRACE_SEED();
  struct Case {
    int64_t rows, cols;
    const char* what;
  };
  const Case cases[] = {
      {250'000'000'000LL, 1024, "1e15 bytes"},  // 4 bytes * 2.5e11 * 1024 = 1e15
      {1LL << 40, 1LL << 30, "2^72 bytes"},     // rows * row bytes overflows int64
      {8'000'000'000LL, 32, "272 GB of q8_0"},  // more than an H100 or H200 has
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    const DType type = c.cols == 32 ? DType::Q8_0 : DType::F32;
    auto t = be().alloc(type, c.rows, c.cols, "absurd");
    if (t.has_value()) {
      ADD_FAILURE() << "alloc of " << c.what << " succeeded (" << t->bytes << " bytes)";
      be().free(*t);
      continue;
    }
    std::string msg = t.message();
    std::transform(msg.begin(), msg.end(), msg.begin(),
                   [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
    bool names_it = false;
    for (const char* word :
         {"memory", "byte", "kib", "mib", "gib", "tib", "pib", "eib", "gb", "tb"})
      names_it = names_it || msg.find(word) != std::string::npos;
    EXPECT_TRUE(names_it) << "message names neither the size nor memory: " << t.message();
  }
  EXPECT_FALSE(be().alloc(DType::F32, -4, 16, "negative").has_value());
  // still usable
  std::mt19937 rng = test_rng();
  const std::vector<float> v = randn(rng, 8 * 16);
  DevTensor ok(be(), 8, 16, v);
  EXPECT_EQ(fetch(be(), ok), v);
}

// ---- embed ----------------------------------------------------------------------------------

KESTREL_GPU_OPS_SUITE(GpuOpsEmbed);

const DType kTableTypes[] = {DType::F32,  DType::F16,  DType::BF16, DType::Q4_0,
                             DType::Q4_1, DType::Q8_0, DType::Q5_0, DType::Q5_1,
                             DType::Q4_K, DType::Q5_K, DType::Q6_K};

// Every table stays alive (at its own address) to the end of the test: a GPU backend may
// upload a table once and key it by its host pointer.
TEST_P(GpuOpsEmbed, RowsEqualDequantizeRowForEveryType) {
  GPU_TRACE_SEED();
  std::mt19937 rng = test_rng();
  std::vector<std::vector<uint8_t>> tables;
  for (DType type : kTableTypes) {
    const bool k = quant::type_info(type)->block_elems == quant::kSuperBlock;
    const int64_t dim = k ? 768 : 576, vocab = 300;
    const std::vector<float> table_f = randn(rng, static_cast<size_t>(vocab * dim));
    tables.push_back(quantize_rows(type, table_f, vocab, dim));
    const HostMatrix host{type, dim, vocab, tables.back().data(), "token_embd.weight"};
    const std::vector<float> deq = dequantize_rows(type, tables.back().data(), vocab, dim);
    std::uniform_int_distribution<int32_t> id(0, static_cast<int32_t>(vocab - 1));
    for (int T : {1, 37}) {
      SCOPED_TRACE(type_str(type) + " T=" + std::to_string(T));
      std::vector<int32_t> tokens(static_cast<size_t>(T));
      for (auto& t : tokens) t = id(rng);
      if (T > 3) {
        tokens[0] = 0;                                // first row
        tokens[1] = static_cast<int32_t>(vocab - 1);  // last row
        tokens[2] = tokens[3];                        // a repeated id
      }
      std::vector<double> ref(static_cast<size_t>(T * dim));
      for (int t = 0; t < T; ++t)
        std::copy_n(deq.begin() + tokens[t] * dim, dim, ref.begin() + t * dim);
      DevTensor out(be(), DType::F32, T + 2, dim);
      fill_poison(be(), out);
      const Status s = be().embed(host, tokens.data(), T, *out);
      ASSERT_TRUE(s.is_ok()) << s.message();
      const std::vector<float> got = fetch(be(), out);
      check_err(compare_rows(got.data(), dim, ref.data(), T, dim), "embed",
                key("embed/" + type_str(type)), "embed");
      EXPECT_EQ(count_unpoisoned(got, dim, T, T + 2), 0) << "embed wrote rows past T";
    }
  }
}

TEST_P(GpuOpsEmbed, OutOfRangeTokenIsAnErrorNamingTheId) {
  GPU_TRACE_SEED();
  std::mt19937 rng = test_rng();
  const int64_t vocab = 50, dim = 64;
  const std::vector<uint8_t> table =
      quantize_rows(DType::Q8_0, randn(rng, static_cast<size_t>(vocab * dim)), vocab, dim);
  const HostMatrix host{DType::Q8_0, dim, vocab, table.data(), "token_embd.weight"};
  DevTensor out(be(), DType::F32, 3, dim);
  for (int32_t bad : {50, 51, 1000000, -1}) {
    const std::vector<int32_t> tokens = {3, bad, 7};
    const Status s = be().embed(host, tokens.data(), 3, *out);
    EXPECT_FALSE(s.is_ok()) << "token id " << bad;
    EXPECT_NE(s.message().find(std::to_string(bad)), std::string::npos)
        << "message does not name id " << bad << ": " << s.message();
  }
  EXPECT_TRUE(be().synchronize().is_ok());
}

// ---- rms_norm, rope, swiglu, add, get_rows --------------------------------------------------

KESTREL_GPU_OPS_SUITE(GpuOpsElementwise);

// The double-precision RMS norm of the first T rows of x[.][dim] with weight w.
std::vector<double> rms_norm_ref(const std::vector<float>& x, int T, int64_t dim,
                                 const std::vector<float>& w, float eps) {
  std::vector<double> ref(static_cast<size_t>(T * dim));
  for (int t = 0; t < T; ++t) {
    double ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += static_cast<double>(x[t * dim + i]) * x[t * dim + i];
    const double inv = 1.0 / std::sqrt(ss / static_cast<double>(dim) + eps);
    for (int64_t i = 0; i < dim; ++i) ref[t * dim + i] = x[t * dim + i] * inv * w[i];
  }
  return ref;
}

TEST_P(GpuOpsElementwise, RmsNormMatchesReference) {
  GPU_TRACE_SEED();
  std::mt19937 rng = test_rng();
  // per-token scales: at 0.01 (mean(x^2) = 1e-4), eps = 1e-5 moves the result by ~5%
  const float scales[] = {1.0f, 0.01f, 100.0f, 0.003f, 1.0f, 7.0f, 0.5f};
  for (int64_t dim : {576, 1000, 4096, 8192}) {
    for (float eps : {1e-5f, 1e-6f}) {
      for (int T : {1, 7, 100}) {
        SCOPED_TRACE("dim=" + std::to_string(dim) + " eps=" + std::to_string(eps) +
                     " T=" + std::to_string(T));
        std::vector<float> x = randn(rng, static_cast<size_t>(T * dim));
        for (int t = 0; t < T; ++t)
          for (int64_t i = 0; i < dim; ++i) x[t * dim + i] *= scales[t % 7];
        const std::vector<float> w = randn(rng, static_cast<size_t>(dim), 1.0f, 1.0f);
        const std::vector<double> ref = rms_norm_ref(x, T, dim, w, eps);
        DevTensor xt(be(), T, dim, x);
        DevTensor wt(be(), be().load_vector(w.data(), dim, "attn_norm"));
        DevTensor out(be(), DType::F32, T + 1, dim);
        fill_poison(be(), out);
        ASSERT_TRUE(be().rms_norm(*xt, T, *wt, eps, *out).is_ok());
        const std::vector<float> got = fetch(be(), out);
        check_err(compare_rows(got.data(), dim, ref.data(), T, dim), "rms_norm",
                  key("rms_norm/f32"), "rms_norm");
        EXPECT_EQ(count_unpoisoned(got, dim, T, T + 1), 0) << "wrote rows past T";
        EXPECT_EQ(fetch(be(), xt), x) << "rms_norm changed its input";
      }
    }
  }
}

// rope_qk (Q and K in one call, as the forward pass runs them) is exactly rope of Q and rope
// of K; the rope test below checks rope itself against the reference.
TEST_P(GpuOpsElementwise, RopeQkIsTwoRopes) {
  GPU_TRACE_SEED();
  std::mt19937 rng = test_rng();
  const int T = 19;
  std::vector<int32_t> pos(T);
  for (int t = 0; t < T; ++t) pos[t] = static_cast<int32_t>(rng() % 5000);
  for (RopeLayout layout : {RopeLayout::Normal, RopeLayout::NeoX}) {
    for (int n_kv : {2, 8}) {
      const int n_head = 8, hd = 64;
      SCOPED_TRACE("n_kv=" + std::to_string(n_kv));
      const RopeParams pq{n_head, hd, 10000.0f, layout}, pk{n_kv, hd, 10000.0f, layout};
      const std::vector<float> q = randn(rng, static_cast<size_t>(T * n_head * hd));
      const std::vector<float> k = randn(rng, static_cast<size_t>(T * n_kv * hd));
      DevTensor q1(be(), T, n_head * hd, q), k1(be(), T, n_kv * hd, k);
      DevTensor q2(be(), T, n_head * hd, q), k2(be(), T, n_kv * hd, k);
      ASSERT_TRUE(be().rope_qk(*q1, *k1, T, pos.data(), pq, pk).is_ok());
      ASSERT_TRUE(be().rope(*q2, T, pos.data(), pq).is_ok());
      ASSERT_TRUE(be().rope(*k2, T, pos.data(), pk).is_ok());
      EXPECT_EQ(fetch(be(), q1), fetch(be(), q2)) << "q";
      EXPECT_EQ(fetch(be(), k1), fetch(be(), k2)) << "k";
      EXPECT_NE(fetch(be(), k1), k) << "k was not rotated";
    }
  }
}

TEST_P(GpuOpsElementwise, RopeBothLayoutsShuffledAndLargePositions) {
  GPU_TRACE_SEED();
  std::mt19937 rng = test_rng();
  // 40 distinct positions in [0, 4100), shuffled, with 0, 1, 4000 and 4095 among them
  std::vector<int32_t> pool(4100);
  std::iota(pool.begin(), pool.end(), 0);
  std::shuffle(pool.begin(), pool.end(), rng);
  std::vector<int32_t> positions = {0, 1, 4000, 4095, 17, 255};
  for (int32_t p : pool)
    if (positions.size() < 40 &&
        std::find(positions.begin(), positions.end(), p) == positions.end())
      positions.push_back(p);
  std::shuffle(positions.begin(), positions.end(), rng);
  const int T = static_cast<int>(positions.size());
  for (RopeLayout layout : {RopeLayout::Normal, RopeLayout::NeoX}) {
    const std::string lname = layout == RopeLayout::Normal ? "normal" : "neox";
    for (int head_dim : {64, 128}) {
      for (float base : {10000.0f, 500000.0f}) {
        for (int n_heads : {9, 3}) {  // q and k of SmolLM2-like layers
          SCOPED_TRACE(lname + " head_dim=" + std::to_string(head_dim) +
                       " base=" + std::to_string(base) + " n_heads=" + std::to_string(n_heads));
          const int64_t width = static_cast<int64_t>(n_heads) * head_dim;
          const std::vector<float> x = randn(rng, static_cast<size_t>((T + 2) * width));
          std::vector<double> ref(x.begin(), x.begin() + T * width);
          const int half = head_dim / 2;
          for (int t = 0; t < T; ++t)
            for (int h = 0; h < n_heads; ++h)
              for (int i = 0; i < half; ++i) {
                const double theta =
                    positions[t] * std::pow(static_cast<double>(base), -2.0 * i / head_dim);
                const int64_t b0 = t * width + static_cast<int64_t>(h) * head_dim;
                const int64_t i0 = b0 + (layout == RopeLayout::Normal ? 2 * i : i);
                const int64_t i1 = b0 + (layout == RopeLayout::Normal ? 2 * i + 1 : i + half);
                const double a = x[i0], b = x[i1];
                ref[i0] = a * std::cos(theta) - b * std::sin(theta);
                ref[i1] = a * std::sin(theta) + b * std::cos(theta);
              }
          DevTensor xt(be(), T + 2, width, x);  // two rows past T that must not move
          const RopeParams p{n_heads, head_dim, base, layout};
          ASSERT_TRUE(be().rope(*xt, T, positions.data(), p).is_ok());
          const std::vector<float> got = fetch(be(), xt);
          for (int t = 0; t < T; ++t) {
            const bool large = positions[t] >= 256;
            check_err(
                compare_rows(got.data() + t * width, width, ref.data() + t * width, 1, width),
                large ? "rope/large-pos" : "rope/small-pos",
                key("rope-" + lname + (large ? "/pos<4100" : "/pos<256")),
                "token " + std::to_string(t) + " at position " + std::to_string(positions[t]));
          }
          EXPECT_TRUE(std::equal(got.begin() + T * width, got.end(), x.begin() + T * width))
              << "rope changed rows past T";
        }
      }
    }
  }
}

TEST_P(GpuOpsElementwise, SwigluInPlaceAndIntoAnotherTensor) {
  GPU_TRACE_SEED();
  std::mt19937 rng = test_rng();
  for (int64_t dim : {1536, 1000}) {
    for (int T : {1, 7, 64}) {
      // gate with sd 4 reaches the saturated ends of silu
      const std::vector<float> gate = randn(rng, static_cast<size_t>((T + 1) * dim), 4.0f);
      const std::vector<float> up = randn(rng, static_cast<size_t>((T + 1) * dim));
      std::vector<double> ref(static_cast<size_t>(T * dim));
      for (size_t i = 0; i < ref.size(); ++i)
        ref[i] = gate[i] / (1.0 + std::exp(-static_cast<double>(gate[i]))) * up[i];
      for (bool in_place : {true, false}) {
        SCOPED_TRACE("dim=" + std::to_string(dim) + " T=" + std::to_string(T) +
                     (in_place ? " in place (out = gate)" : " into out"));
        DevTensor gt(be(), T + 1, dim, gate), ut(be(), T + 1, dim, up);
        DevTensor out(be(), DType::F32, T + 1, dim);
        fill_poison(be(), out);
        DevTensor& dst = in_place ? gt : out;
        ASSERT_TRUE(be().swiglu(*gt, *ut, T, *dst).is_ok());
        const std::vector<float> got = fetch(be(), dst);
        check_err(compare_rows(got.data(), dim, ref.data(), T, dim), "swiglu", key("swiglu/f32"),
                  "swiglu");
        if (in_place) {
          EXPECT_TRUE(std::equal(got.begin() + T * dim, got.end(), gate.begin() + T * dim))
              << "swiglu changed gate rows past T";
        } else {
          EXPECT_EQ(count_unpoisoned(got, dim, T, T + 1), 0) << "wrote rows past T";
          EXPECT_EQ(fetch(be(), gt), gate) << "swiglu changed gate";
        }
        EXPECT_EQ(fetch(be(), ut), up) << "swiglu changed up";
      }
    }
  }
}

TEST_P(GpuOpsElementwise, AddMatchesReference) {
  GPU_TRACE_SEED();
  std::mt19937 rng = test_rng();
  for (int64_t dim : {576, 1000}) {
    for (int T : {1, 7, 64}) {
      SCOPED_TRACE("dim=" + std::to_string(dim) + " T=" + std::to_string(T));
      const std::vector<float> x = randn(rng, static_cast<size_t>((T + 1) * dim));
      const std::vector<float> y = randn(rng, static_cast<size_t>((T + 1) * dim), 3.0f);
      std::vector<double> ref(static_cast<size_t>(T * dim));
      for (size_t i = 0; i < ref.size(); ++i) ref[i] = static_cast<double>(x[i]) + y[i];
      DevTensor xt(be(), T + 1, dim, x), yt(be(), T + 1, dim, y);
      ASSERT_TRUE(be().add(*xt, *yt, T).is_ok());
      const std::vector<float> got = fetch(be(), xt);
      check_err(compare_rows(got.data(), dim, ref.data(), T, dim), "add", key("add/f32"), "add");
      EXPECT_TRUE(std::equal(got.begin() + T * dim, got.end(), x.begin() + T * dim))
          << "add changed rows past T";
      EXPECT_EQ(fetch(be(), yt), y) << "add changed y";
    }
  }
}

// The residual add and the next norm in one op: x must hold exactly x + y (f32) afterwards,
// rows past T untouched, and out the norm of the new x. Widths on each side of the CUDA kernel's
// per-thread vector counts (1, 2, 5 float4 per thread at 1024 threads) and of its int8 fusion
// (multiples of 32 or not).
TEST_P(GpuOpsElementwise, AddRmsNormMatchesReference) {
  GPU_TRACE_SEED();
  std::mt19937 rng = test_rng();
  const float eps = 1e-5f;
  for (int64_t dim : {576, 1000, 4096, 8192, 20000}) {
    for (int T : {1, 7, 33}) {
      if (dim > 4096 && T > 7) continue;
      SCOPED_TRACE("dim=" + std::to_string(dim) + " T=" + std::to_string(T));
      const std::vector<float> x = randn(rng, static_cast<size_t>((T + 1) * dim));
      const std::vector<float> y = randn(rng, static_cast<size_t>((T + 1) * dim), 0.5f);
      const std::vector<float> w = randn(rng, static_cast<size_t>(dim), 1.0f, 1.0f);
      std::vector<float> sum(x);
      for (size_t i = 0; i < static_cast<size_t>(T * dim); ++i) sum[i] = x[i] + y[i];
      const std::vector<double> ref = rms_norm_ref(sum, T, dim, w, eps);
      DevTensor xt(be(), T + 1, dim, x), yt(be(), T + 1, dim, y);
      DevTensor wt(be(), be().load_vector(w.data(), dim, "ffn_norm"));
      DevTensor out(be(), DType::F32, T + 1, dim);
      fill_poison(be(), out);
      ASSERT_TRUE(be().add_rms_norm(*xt, *yt, T, *wt, eps, *out).is_ok());
      const std::vector<float> got = fetch(be(), out);
      check_err(compare_rows(got.data(), dim, ref.data(), T, dim), "rms_norm",
                key("add_rms_norm/f32"), "add_rms_norm");
      EXPECT_EQ(count_unpoisoned(got, dim, T, T + 1), 0) << "wrote rows past T";
      EXPECT_EQ(fetch(be(), xt), sum) << "x is not x + y (rows < T) and x (rows past T)";
      EXPECT_EQ(fetch(be(), yt), y) << "add_rms_norm changed y";
    }
  }
}

TEST_P(GpuOpsElementwise, GetRowsCopiesTheChosenRows) {
  GPU_TRACE_SEED();
  std::mt19937 rng = test_rng();
  const int64_t n_src = 50, dim = 576;
  const std::vector<float> x = randn(rng, static_cast<size_t>(n_src * dim));
  DevTensor xt(be(), n_src, dim, x);
  std::uniform_int_distribution<int32_t> pick(0, static_cast<int32_t>(n_src - 1));
  for (int n_rows : {1, 20}) {
    SCOPED_TRACE("n_rows=" + std::to_string(n_rows));
    std::vector<int32_t> rows(static_cast<size_t>(n_rows));
    for (auto& r : rows) r = pick(rng);
    if (n_rows > 3) {
      rows[0] = static_cast<int32_t>(n_src - 1);
      rows[1] = 0;
      rows[2] = rows[3];  // a repeat
    }
    std::vector<double> ref(static_cast<size_t>(n_rows * dim));
    for (int i = 0; i < n_rows; ++i)
      for (int64_t c = 0; c < dim; ++c) ref[i * dim + c] = x[rows[i] * dim + c];
    DevTensor out(be(), DType::F32, n_rows + 2, dim);
    fill_poison(be(), out);
    ASSERT_TRUE(be().get_rows(*xt, rows.data(), n_rows, *out).is_ok());
    const std::vector<float> got = fetch(be(), out);
    check_err(compare_rows(got.data(), dim, ref.data(), n_rows, dim), "get_rows",
              key("get_rows/f32"), "get_rows");
    EXPECT_EQ(count_unpoisoned(got, dim, n_rows, n_rows + 2), 0) << "wrote rows past n_rows";
  }
  DevTensor out(be(), DType::F32, 2, dim);
  for (int32_t bad : {static_cast<int32_t>(n_src), -1}) {
    const int32_t rows[] = {2, bad};
    EXPECT_FALSE(be().get_rows(*xt, rows, 2, *out).is_ok()) << "row " << bad;
  }
  EXPECT_TRUE(be().synchronize().is_ok());
}

// ---- recorded passes ------------------------------------------------------------------------

KESTREL_GPU_OPS_SUITE(GpuOpsRecorded);

// A recorded pass (run_recorded; CUDA graphs, OpenCL recordings) replays its ops with the inputs
// of each call: here one host array of row indices, rewritten between two get_rows of the body,
// with the same or other contents at each call, so that a backend that copies an input once per
// pass when it repeats (CUDA, unless KESTREL_CUDA_GRAPH_UPLOAD_ONCE=0) meets every case: repeats at
// the capture and not later, the reverse, and repeats with new values.
TEST_P(GpuOpsRecorded, InputsOfEveryReplayAreRead) {
  GPU_TRACE_SEED();
  std::mt19937 rng = test_rng();
  const int64_t n_src = 40, dim = 256;
  const int n_rows = 3;
  for (const char* once : {"0", "1"}) {
    SCOPED_TRACE(std::string("KESTREL_CUDA_GRAPH_UPLOAD_ONCE=") + once);
    ScopedEnv env("KESTREL_CUDA_GRAPH_UPLOAD_ONCE", once);
    ScopedEnv record("KESTREL_CL_RECORD", "1");  // (OpenCL records where the driver can)
    auto made = create_backend(GetParam(), BackendOptions{});
    ASSERT_TRUE(made.has_value()) << made.message();
    Backend& b = **made;
    const std::vector<float> x = randn(rng, static_cast<size_t>(n_src * dim));
    DevTensor xt(b, n_src, dim, x), out1(b, DType::F32, n_rows, dim, "out1"),
        out2(b, DType::F32, n_rows, dim, "out2");
    std::uniform_int_distribution<int32_t> pick(0, static_cast<int32_t>(n_src - 1));
    // Per call of a key: whether the second get_rows sees the first's indices again.
    const std::vector<bool> patterns[] = {{false, false, false, true, true, false},
                                          {true, true, true, false, true, true},
                                          {true, true, true, true, true, true}};
    for (size_t k = 0; k < std::size(patterns); ++k) {
      for (size_t call = 0; call < patterns[k].size(); ++call) {
        SCOPED_TRACE("key " + std::to_string(k) + ", call " + std::to_string(call));
        std::vector<int32_t> first(n_rows), rows(n_rows);
        for (auto& r : first) r = pick(rng);
        std::vector<int32_t> second = first;
        if (!patterns[k][call]) {
          for (auto& r : second) r = pick(rng);
          second[0] = (first[0] + 1) % n_src;  // not equal by chance
        }
        // (No inputs named: `rows` changes inside the body, so replays stage through it.)
        const Status st = b.run_recorded(0x5eed00 + k, nullptr, 0, [&]() -> Status {
          rows = first;
          KESTREL_TRY(b.get_rows(*xt, rows.data(), n_rows, *out1));
          rows = second;
          return b.get_rows(*xt, rows.data(), n_rows, *out2);
        });
        ASSERT_TRUE(st.is_ok()) << st.message();
        const std::vector<float> got1 = fetch(b, out1), got2 = fetch(b, out2);
        for (int i = 0; i < n_rows; ++i) {
          EXPECT_TRUE(std::equal(got1.begin() + i * dim, got1.begin() + (i + 1) * dim,
                                 x.begin() + first[i] * dim))
              << "first get_rows, row " << i;
          EXPECT_TRUE(std::equal(got2.begin() + i * dim, got2.begin() + (i + 1) * dim,
                                 x.begin() + second[i] * dim))
              << "second get_rows, row " << i;
        }
        if (HasFailure()) return;
      }
    }
  }
}

// The same with the inputs named (as the forward pass names its token ids, positions and rows):
// a backend may refill a replay's slots from them without walking the body (CUDA with
// KESTREL_CUDA_GRAPH_DIRECT_STAGE=1; OpenCL's recordings unless KESTREL_CL_RECORD_DIRECT=0). Each
// call's arrays are new allocations, so a refill from the capture's pointers would read freed
// memory or stale rows; one array is uploaded twice in a row (a slot reused) and one in part (an
// offset into an input).
TEST_P(GpuOpsRecorded, NamedInputsOfEveryReplayAreRead) {
  GPU_TRACE_SEED();
  std::mt19937 rng = test_rng();
  const int64_t n_src = 40, dim = 128;
  const int n_rows = 4;
  for (const char* direct : {"0", "1"}) {
    SCOPED_TRACE(std::string("direct staging ") + direct);
    ScopedEnv env("KESTREL_CUDA_GRAPH_DIRECT_STAGE", direct);
    ScopedEnv env_cl("KESTREL_CL_RECORD_DIRECT", direct);
    ScopedEnv record("KESTREL_CL_RECORD", "1");
    auto made = create_backend(GetParam(), BackendOptions{});
    ASSERT_TRUE(made.has_value()) << made.message();
    Backend& b = **made;
    const std::vector<float> x = randn(rng, static_cast<size_t>(n_src * dim));
    DevTensor xt(b, n_src, dim, x);
    DevTensor outs[] = {{b, DType::F32, n_rows, dim, "out1"},
                        {b, DType::F32, n_rows, dim, "out2"},
                        {b, DType::F32, n_rows - 1, dim, "out3"}};
    std::uniform_int_distribution<int32_t> pick(0, static_cast<int32_t>(n_src - 1));
    for (int call = 0; call < 6; ++call) {
      SCOPED_TRACE("call " + std::to_string(call));
      auto first = std::make_unique<std::vector<int32_t>>(n_rows);
      auto second = std::make_unique<std::vector<int32_t>>(n_rows);
      for (auto& r : *first) r = pick(rng);
      for (auto& r : *second) r = pick(rng);
      const RecordInput inputs[] = {{first->data(), n_rows}, {second->data(), n_rows}};
      const Status st = b.run_recorded(0x5eed10, inputs, 2, [&]() -> Status {
        KESTREL_TRY(b.get_rows(*xt, first->data(), n_rows, *outs[0]));
        KESTREL_TRY(b.get_rows(*xt, first->data(), n_rows, *outs[1]));
        return b.get_rows(*xt, second->data() + 1, n_rows - 1, *outs[2]);
      });
      ASSERT_TRUE(st.is_ok()) << st.message();
      const std::vector<int32_t>* want[] = {first.get(), first.get(), second.get()};
      for (int o = 0; o < 3; ++o) {
        const std::vector<float> got = fetch(b, outs[o]);
        const int skip = o == 2 ? 1 : 0;
        for (int i = 0; i + skip < n_rows; ++i)
          EXPECT_TRUE(std::equal(got.begin() + i * dim, got.begin() + (i + 1) * dim,
                                 x.begin() + (*want[o])[i + skip] * dim))
              << "get_rows " << o << ", row " << i;
      }
      if (HasFailure()) return;
    }
  }
}

// ---- report ---------------------------------------------------------------------------------

// Prints the largest error per backend / op / type against its bound at the end (opt-in).
class GpuErrorReport : public ::testing::Environment {
 public:
  void TearDown() override {
    if (!std::getenv("KESTREL_OPS_REPORT") || gpu_error_log().empty()) return;
    std::printf("[ GpuOps ] largest error per backend op/type (KESTREL_TEST_SEED=%llu):\n",
                static_cast<unsigned long long>(test_seed()));
    std::printf("  %-44s %10s %10s  %10s %10s  %s\n", "op", "l2", "bound", "max/rms", "bound",
                "use");
    for (const auto& [k, e] : gpu_error_log()) {
      const double use =
          std::max(e.bound.l2 > 0 ? e.l2 / e.bound.l2 : (e.l2 > 0 ? INFINITY : 0),
                   e.bound.max > 0 ? e.max / e.bound.max : (e.max > 0 ? INFINITY : 0));
      std::printf("  %-44s %10.3e %10.1e  %10.3e %10.1e  %3.0f%%\n", k.c_str(), e.l2, e.bound.l2,
                  e.max, e.bound.max, 100.0 * use);
    }
    for (const auto& [k, note] : gpu_note_log())
      std::printf("  %-44s %s\n", k.c_str(), note.c_str());
  }
};
[[maybe_unused]] ::testing::Environment* const kGpuErrorReport =
    ::testing::AddGlobalTestEnvironment(new GpuErrorReport);

}  // namespace
}  // namespace kestrel::backend::gpu_ops_test
