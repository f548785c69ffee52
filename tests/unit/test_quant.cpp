// Tests of the fp16/bf16 conversions and the scalar reference block formats (quant.h).
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "format/quant/fp16.h"
#include "format/quant/quant.h"
#include "format/quant/types.h"
#include "test_seed.h"

namespace kestrel::quant {
namespace {

// A fresh seed per run (override with KESTREL_TEST_SEED to reproduce); every test using it
// records it with SCOPED_TRACE so a failure names the seed.
using kestrel::testing::test_seed;
#define TRACE_SEED() SCOPED_TRACE("KESTREL_TEST_SEED=" + std::to_string(test_seed()))

bool same_float(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return fp32_to_bits(a) == fp32_to_bits(b);
}

// ---- fp16 ---------------------------------------------------------------------------------

#if defined(__FLT16_MANT_DIG__)
#define KESTREL_HAVE_FLOAT16 1
float half_bits_to_float_compiler(uint16_t h) {
  _Float16 v;
  std::memcpy(&v, &h, 2);
  return static_cast<float>(v);
}
uint16_t float_to_half_bits_compiler(float f) {
  const _Float16 v = static_cast<_Float16>(f);
  uint16_t h;
  std::memcpy(&h, &v, 2);
  return h;
}
#endif

TEST(QuantFp16, HalfToFloatExhaustiveMatchesCompiler) {
#ifndef KESTREL_HAVE_FLOAT16
  GTEST_SKIP() << "compiler has no _Float16";
#else
  int mismatches = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const float ours = fp16_to_fp32(static_cast<uint16_t>(h));
    const float ref = half_bits_to_float_compiler(static_cast<uint16_t>(h));
    if (!same_float(ours, ref) && ++mismatches < 10) {
      ADD_FAILURE() << "half 0x" << std::hex << h << ": ours " << ours << " compiler " << ref;
    }
  }
  EXPECT_EQ(mismatches, 0);
#endif
}

TEST(QuantFp16, ExhaustiveRoundTripAndCompilerAgreement) {
  int mismatches = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint16_t hb = static_cast<uint16_t>(h);
    const float f = fp16_to_fp32(hb);
    const uint16_t back = fp32_to_fp16(f);
    const bool is_nan = ((hb & 0x7c00) == 0x7c00) && (hb & 0x3ff);
    bool ok;
    if (is_nan) {
      ok = std::isnan(f) && ((back & 0x7c00) == 0x7c00) && (back & 0x3ff) &&
           ((back & 0x8000) == (hb & 0x8000));
    } else {
      ok = back == hb;  // every half is exactly representable: the round trip is exact
    }
#ifdef KESTREL_HAVE_FLOAT16
    if (!is_nan) ok = ok && float_to_half_bits_compiler(f) == back;
#endif
    if (!ok && ++mismatches < 10) {
      ADD_FAILURE() << "half 0x" << std::hex << h << " -> " << f << " -> 0x" << back;
    }
  }
  EXPECT_EQ(mismatches, 0);
}

TEST(QuantFp16, KnownValues) {
  EXPECT_EQ(fp16_to_fp32(0x3c00), 1.0f);
  EXPECT_EQ(fp16_to_fp32(0xc000), -2.0f);
  EXPECT_EQ(fp16_to_fp32(0x7bff), 65504.0f);
  EXPECT_EQ(fp16_to_fp32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(fp16_to_fp32(0x0400), std::ldexp(1.0f, -14));
  EXPECT_TRUE(std::isinf(fp16_to_fp32(0xfc00)) && fp16_to_fp32(0xfc00) < 0);
  EXPECT_EQ(fp32_to_fp16(1.0f), 0x3c00);
  EXPECT_EQ(fp32_to_fp16(65504.0f), 0x7bff);
  EXPECT_EQ(fp32_to_fp16(65520.0f), 0x7c00);  // halfway to 2^16 rounds to even: infinity
  EXPECT_EQ(fp32_to_fp16(65519.99f), 0x7bff);
  EXPECT_EQ(fp32_to_fp16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);      // tie -> even
  EXPECT_EQ(fp32_to_fp16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);  // tie -> even (up)
  EXPECT_EQ(fp32_to_fp16(std::ldexp(1.0f, -25)), 0x0000);             // half the smallest subnormal
  EXPECT_EQ(fp32_to_fp16(std::ldexp(1.5f, -25)), 0x0001);
  EXPECT_EQ(fp32_to_fp16(-0.0f), 0x8000);
  EXPECT_EQ(fp32_to_fp16(1e-10f), 0x0000);
}

TEST(QuantFp16, FloatToHalfRoundingMatchesCompiler) {
#ifndef KESTREL_HAVE_FLOAT16
  GTEST_SKIP() << "compiler has no _Float16";
#else
  TRACE_SEED();
  std::mt19937_64 rng(test_seed());
  int mismatches = 0;
  auto check = [&](float f) {
    if (std::isnan(f)) return;
    const uint16_t ours = fp32_to_fp16(f);
    const uint16_t ref = float_to_half_bits_compiler(f);
    if (ours != ref && ++mismatches < 10) {
      ADD_FAILURE() << "float 0x" << std::hex << fp32_to_bits(f) << " (" << f << "): ours 0x"
                    << ours << " compiler 0x" << ref;
    }
  };
  // Uniformly random bit patterns (mostly far outside the half range), then patterns whose
  // exponent lies in and around the half range (normals, subnormals, overflow).
  for (int i = 0; i < 1000000; ++i) check(fp32_from_bits(static_cast<uint32_t>(rng())));
  std::uniform_int_distribution<uint32_t> exp_dist(127 - 27, 127 + 17);
  for (int i = 0; i < 2000000; ++i) {
    const uint32_t bits = static_cast<uint32_t>(rng());
    check(fp32_from_bits((bits & 0x807fffffu) | (exp_dist(rng) << 23)));
  }
  // Every exact midpoint between adjacent halves, and its float neighbours.
  for (uint32_t h = 0; h < 0x7c00; ++h) {
    const double lo = fp16_to_fp32(static_cast<uint16_t>(h));
    const double hi = h + 1 == 0x7c00 ? 65536.0 : fp16_to_fp32(static_cast<uint16_t>(h + 1));
    const float mid = static_cast<float>((lo + hi) / 2);  // exact: 12 significant bits
    for (float f : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e30f)}) {
      check(f);
      check(-f);
    }
  }
  EXPECT_EQ(mismatches, 0);
#endif
}

// ---- bf16 ---------------------------------------------------------------------------------

// Independent bf16 rounding reference: pick the nearer of the two bf16 neighbours in double,
// ties to the even one; the neighbour past the largest finite bf16 is 2^128 (-> infinity).
uint16_t bf16_reference(float f) {
  const uint32_t x = fp32_to_bits(f);
  const uint16_t lo = static_cast<uint16_t>(x >> 16);
  if ((x & 0xffff) == 0) return lo;
  const uint16_t hi = static_cast<uint16_t>(lo + 1);
  const double ax = std::fabs(static_cast<double>(f));
  const double alo = std::fabs(static_cast<double>(bf16_to_fp32(lo)));
  const double ahi =
      (hi & 0x7fff) == 0x7f80 ? std::ldexp(1.0, 128) : std::fabs(double{bf16_to_fp32(hi)});
  const double dlo = ax - alo;
  const double dhi = ahi - ax;
  if (dlo < dhi) return lo;
  if (dhi < dlo) return hi;
  return (lo & 1) ? hi : lo;
}

TEST(QuantBf16, ExhaustiveRoundTrip) {
  int mismatches = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint16_t hb = static_cast<uint16_t>(h);
    const float f = bf16_to_fp32(hb);
    EXPECT_EQ(fp32_to_bits(f), h << 16);
    const uint16_t back = fp32_to_bf16(f);
    const bool is_nan = ((hb & 0x7f80) == 0x7f80) && (hb & 0x7f);
    const bool ok = is_nan ? std::isnan(bf16_to_fp32(back)) : back == hb;
    if (!ok && ++mismatches < 10) ADD_FAILURE() << "bf16 0x" << std::hex << h << " -> 0x" << back;
  }
  EXPECT_EQ(mismatches, 0);
}

TEST(QuantBf16, RoundingMatchesReference) {
  TRACE_SEED();
  std::mt19937_64 rng(test_seed() + 1);
  int mismatches = 0;
  auto check = [&](float f) {
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(bf16_to_fp32(fp32_to_bf16(f))));
      return;
    }
    const uint16_t ours = fp32_to_bf16(f);
    const uint16_t ref = bf16_reference(f);
    if (ours != ref && ++mismatches < 10) {
      ADD_FAILURE() << "float 0x" << std::hex << fp32_to_bits(f) << ": ours 0x" << ours
                    << " reference 0x" << ref;
    }
  };
  for (int i = 0; i < 2000000; ++i) check(fp32_from_bits(static_cast<uint32_t>(rng())));
  // Exact ties (low half 0x8000) and their neighbours, around random and edge bf16 values.
  for (int i = 0; i < 200000; ++i) {
    const uint32_t top = static_cast<uint32_t>(rng()) & 0xffff0000u;
    for (uint32_t low : {0x7fffu, 0x8000u, 0x8001u}) check(fp32_from_bits(top | low));
  }
  for (uint32_t top : {0x7f7f0000u, 0xff7f0000u, 0x7f7e0000u, 0x00000000u, 0x80000000u}) {
    for (uint32_t low : {0x7fffu, 0x8000u, 0x8001u, 0xffffu}) check(fp32_from_bits(top | low));
  }
  EXPECT_EQ(fp32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(fp32_to_bf16(fp32_from_bits(0x3f808000u)), 0x3f80);  // tie -> even (down)
  EXPECT_EQ(fp32_to_bf16(fp32_from_bits(0x3f818000u)), 0x3f82);  // tie -> even (up)
  EXPECT_EQ(fp32_to_bf16(fp32_from_bits(0x7f7fffffu)), 0x7f80);  // FLT_MAX -> infinity
  EXPECT_EQ(mismatches, 0);
}

// ---- block layouts and hand-built blocks --------------------------------------------------

TEST(QuantBlocks, LayoutMatchesGgml) {
  EXPECT_EQ(sizeof(BlockQ4_0), 18u);
  EXPECT_EQ(sizeof(BlockQ4_1), 20u);
  EXPECT_EQ(sizeof(BlockQ8_0), 34u);
  EXPECT_EQ(offsetof(BlockQ4_0, qs), 2u);
  EXPECT_EQ(offsetof(BlockQ4_1, m), 2u);
  EXPECT_EQ(offsetof(BlockQ4_1, qs), 4u);
  EXPECT_EQ(offsetof(BlockQ8_0, qs), 2u);
  EXPECT_EQ(kBlock, 32);
  EXPECT_EQ(sizeof(BlockQ5_0), 22u);
  EXPECT_EQ(sizeof(BlockQ5_1), 24u);
  EXPECT_EQ(sizeof(BlockQ4_K), 144u);
  EXPECT_EQ(sizeof(BlockQ5_K), 176u);
  EXPECT_EQ(sizeof(BlockQ6_K), 210u);
  EXPECT_EQ(offsetof(BlockQ5_0, qh), 2u);
  EXPECT_EQ(offsetof(BlockQ5_0, qs), 6u);
  EXPECT_EQ(offsetof(BlockQ5_1, qh), 4u);
  EXPECT_EQ(offsetof(BlockQ5_1, qs), 8u);
  EXPECT_EQ(offsetof(BlockQ4_K, scales), 4u);
  EXPECT_EQ(offsetof(BlockQ4_K, qs), 16u);
  EXPECT_EQ(offsetof(BlockQ5_K, qh), 16u);
  EXPECT_EQ(offsetof(BlockQ5_K, qs), 48u);
  EXPECT_EQ(offsetof(BlockQ6_K, qh), 128u);
  EXPECT_EQ(offsetof(BlockQ6_K, scales), 192u);
  EXPECT_EQ(offsetof(BlockQ6_K, d), 208u);
  // type ids and sizes as ggml numbers them
  const struct {
    DType t;
    uint32_t id;
    int64_t elems, bytes;
  } ids[] = {{DType::Q5_0, 6, 32, 22},
             {DType::Q5_1, 7, 32, 24},
             {DType::Q4_K, 12, 256, 144},
             {DType::Q5_K, 13, 256, 176},
             {DType::Q6_K, 14, 256, 210}};
  for (const auto& c : ids) {
    const TypeInfo* info = type_info(c.id);
    ASSERT_NE(info, nullptr);
    EXPECT_EQ(info->type, c.t);
    EXPECT_EQ(info->block_elems, c.elems);
    EXPECT_EQ(info->block_bytes, c.bytes);
    EXPECT_TRUE(info->supported);
  }
}

TEST(QuantBlocks, SupportedAndKvTypes) {
  for (DType t : {DType::F32, DType::F16, DType::BF16, DType::Q4_0, DType::Q4_1, DType::Q8_0,
                  DType::Q5_0, DType::Q5_1, DType::Q4_K, DType::Q5_K, DType::Q6_K}) {
    EXPECT_TRUE(is_supported(t)) << static_cast<int>(t);
  }
  for (DType t : {DType::Q8_1, DType::Q2_K, DType::Q3_K, DType::Q8_K}) {
    EXPECT_FALSE(is_supported(t)) << static_cast<int>(t);
  }
  EXPECT_TRUE(is_kv_type(DType::F16));
  EXPECT_TRUE(is_kv_type(DType::Q8_0));
  EXPECT_TRUE(is_kv_type(DType::Q4_0));
  EXPECT_FALSE(is_kv_type(DType::F32));
  EXPECT_FALSE(is_kv_type(DType::BF16));
  EXPECT_FALSE(is_kv_type(DType::Q4_1));
}

// Two blocks as raw little-endian bytes, as they would sit in a GGUF file.
TEST(QuantBlocks, Q4_0HandBuiltDequantizesExactly) {
  std::vector<uint8_t> raw;
  const uint16_t d[2] = {0x3800 /* 0.5 */, 0xc400 /* -4 */};
  for (int b = 0; b < 2; ++b) {
    raw.push_back(static_cast<uint8_t>(d[b] & 0xff));
    raw.push_back(static_cast<uint8_t>(d[b] >> 8));
    for (int j = 0; j < 16; ++j) raw.push_back(static_cast<uint8_t>(j | ((15 - j) << 4)));
  }
  ASSERT_EQ(raw.size(), 2 * sizeof(BlockQ4_0));
  std::vector<float> out(64);
  dequantize_row(DType::Q4_0, raw.data(), out.data(), 64);
  const float scale[2] = {0.5f, -4.0f};
  for (int b = 0; b < 2; ++b) {
    for (int j = 0; j < 16; ++j) {
      EXPECT_EQ(out[b * 32 + j], (j - 8) * scale[b]) << b << " " << j;
      EXPECT_EQ(out[b * 32 + 16 + j], (15 - j - 8) * scale[b]) << b << " " << j;
    }
  }
}

TEST(QuantBlocks, Q4_1HandBuiltDequantizesExactly) {
  std::vector<uint8_t> raw = {0x00, 0x34 /* d = 0.25 */, 0x00, 0xbe /* m = -1.5 */};
  for (int j = 0; j < 16; ++j) raw.push_back(static_cast<uint8_t>((15 - j) | (j << 4)));
  ASSERT_EQ(raw.size(), sizeof(BlockQ4_1));
  std::vector<float> out(32);
  dequantize_row(DType::Q4_1, raw.data(), out.data(), 32);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(out[j], (15 - j) * 0.25f - 1.5f) << j;
    EXPECT_EQ(out[16 + j], j * 0.25f - 1.5f) << j;
  }
}

TEST(QuantBlocks, Q8_0HandBuiltDequantizesExactly) {
  std::vector<uint8_t> raw = {0x00, 0x30 /* d = 0.125 */};
  const int8_t q[32] = {-128, -127, -64, -1, 0,  1,  2,  3,  5,   7,  11, 13, 17, 19,  23,  29,
                        31,   37,   41,  43, 47, 53, 59, 61, 127, -2, -3, -5, -7, -11, -13, 100};
  for (int8_t v : q) raw.push_back(static_cast<uint8_t>(v));
  ASSERT_EQ(raw.size(), sizeof(BlockQ8_0));
  std::vector<float> out(32);
  dequantize_row(DType::Q8_0, raw.data(), out.data(), 32);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(out[j], q[j] * 0.125f) << j;
}

// Blocks whose scales are exact in fp16, so every code is known (round half away from zero).
TEST(QuantBlocks, QuantizeGivesKnownCodes) {
  std::vector<float> x(32, 0.0f);
  x[0] = -8.0f;  // m: d = 1
  x[1] = -2.5f;  // -> -3 (half away from zero), code 5
  x[2] = 2.5f;   // -> 3, code 11
  x[3] = 7.6f;   // -> 8, clamped to 7, code 15
  x[17] = 0.49f;
  x[31] = -7.5f;  // -> -8, code 0
  std::vector<uint8_t> q(sizeof(BlockQ4_0));
  quantize_row(DType::Q4_0, x.data(), q.data(), 32);
  BlockQ4_0 b4;
  std::memcpy(&b4, q.data(), sizeof b4);
  EXPECT_EQ(b4.d, 0x3c00);        // 1.0
  EXPECT_EQ(b4.qs[0], 0x80 | 0);  // elem 0 code 0, elem 16 code 8
  EXPECT_EQ(b4.qs[1], 0x85);      // elem 1 code 5, elem 17 code 8
  EXPECT_EQ(b4.qs[2], 0x8b);      // elem 2 code 11
  EXPECT_EQ(b4.qs[3], 0x8f);      // elem 3 code 15
  EXPECT_EQ(b4.qs[15], 0x08);     // elem 15 code 8, elem 31 code 0

  std::vector<float> y(32);
  for (int j = 0; j < 32; ++j) y[j] = static_cast<float>(j % 16) - 1.0f;  // -1 .. 14
  y[5] = 3.5f;  // (3.5 - -1) / 1 = 4.5 -> 5
  std::vector<uint8_t> q1(sizeof(BlockQ4_1));
  quantize_row(DType::Q4_1, y.data(), q1.data(), 32);
  BlockQ4_1 b1;
  std::memcpy(&b1, q1.data(), sizeof b1);
  EXPECT_EQ(fp16_to_fp32(b1.d), 1.0f);
  EXPECT_EQ(fp16_to_fp32(b1.m), -1.0f);
  for (int j = 0; j < 16; ++j) EXPECT_EQ(b1.qs[j], j | (j << 4)) << j;

  std::vector<float> z(32, 0.0f);
  z[0] = 127.0f;  // d = 1
  z[1] = -63.5f;  // -> -64
  z[2] = 0.5f;    // -> 1
  z[3] = -0.49f;  // -> 0
  std::vector<uint8_t> q8(sizeof(BlockQ8_0));
  quantize_row(DType::Q8_0, z.data(), q8.data(), 32);
  BlockQ8_0 b8;
  std::memcpy(&b8, q8.data(), sizeof b8);
  EXPECT_EQ(b8.d, 0x3c00);
  EXPECT_EQ(b8.qs[0], 127);
  EXPECT_EQ(b8.qs[1], -64);
  EXPECT_EQ(b8.qs[2], 1);
  EXPECT_EQ(b8.qs[3], 0);
}

TEST(QuantBlocks, FloatRowsHandBuilt) {
  const uint16_t h[4] = {0x3c00, 0xc000, 0x7bff, 0x0001};
  const float h_expect[4] = {1.0f, -2.0f, 65504.0f, std::ldexp(1.0f, -24)};
  const uint16_t b[4] = {0x3f80, 0x4049, 0xc2f7, 0x0000};
  const float b_expect[4] = {1.0f, 3.140625f, -123.5f, 0.0f};
  float out[4];
  dequantize_row(DType::F16, h, out, 4);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(out[i], h_expect[i]);
  dequantize_row(DType::BF16, b, out, 4);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(out[i], b_expect[i]);
  const float f[4] = {1.5f, -0.0f, 1e-30f, 3e38f};
  dequantize_row(DType::F32, f, out, 4);
  for (int i = 0; i < 4; ++i) EXPECT_TRUE(same_float(out[i], f[i]));
}

// ---- quantize -> dequantize ---------------------------------------------------------------

std::vector<uint8_t> quantize(DType t, const std::vector<float>& x) {
  const int64_t bytes = row_bytes(t, static_cast<int64_t>(x.size()));
  EXPECT_GT(bytes, 0);
  std::vector<uint8_t> q(static_cast<size_t>(bytes > 0 ? bytes : 0));
  quantize_row(t, x.data(), q.data(), static_cast<int64_t>(x.size()));
  return q;
}

std::vector<float> dequantize(DType t, const std::vector<uint8_t>& q, size_t n) {
  std::vector<float> y(n);
  dequantize_row(t, q.data(), y.data(), static_cast<int64_t>(n));
  return y;
}

// n normal samples of standard deviation `scale` around `offset`, never all zero.
std::vector<float> normal_row(std::mt19937_64& rng, size_t n, float scale, float offset = 0.0f) {
  std::normal_distribution<float> dist(offset, scale);
  std::vector<float> x(n);
  for (float& v : x) v = dist(rng);
  x[0] = x[0] == 0.0f ? scale : x[0];
  return x;
}

constexpr float kScales[] = {1e-2f, 1.0f, 1e2f};
constexpr double kHalfUlp = 1.0 / 2048;  // fp16 relative rounding bound (normal range)

// The most fp32_to_fp16 can move v: half an ulp, at least half the smallest subnormal.
double fp16_err(double v) {
  return std::fabs(v) * kHalfUlp + std::ldexp(1.0, -25);
}

TEST(QuantQ8_0, PerBlockErrorAtMostHalfStep) {
  TRACE_SEED();
  std::mt19937_64 rng(test_seed() + 2);
  for (float scale : kScales) {
    const size_t n = 32 * 512;
    std::vector<float> x = normal_row(rng, n, scale);
    x[77] = 9 * scale;  // an outlier block
    const std::vector<uint8_t> q = quantize(DType::Q8_0, x);
    const std::vector<float> y = dequantize(DType::Q8_0, q, n);
    const auto* blocks = reinterpret_cast<const BlockQ8_0*>(q.data());
    for (size_t b = 0; b < n / 32; ++b) {
      double amax = 0;
      for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(double{x[b * 32 + j]}));
      const double d = fp16_to_fp32(blocks[b].d);
      ASSERT_GT(d, 0.0);
      EXPECT_NEAR(d, amax / 127, fp16_err(amax / 127));
      const double bound = d / 2 + amax * 1e-6;
      for (int j = 0; j < 32; ++j) {
        ASSERT_LE(std::fabs(double{x[b * 32 + j]} - y[b * 32 + j]), bound)
            << "scale " << scale << " block " << b << " elem " << j << " d " << d;
        ASSERT_GE(blocks[b].qs[j], -127);
      }
    }
  }
}

TEST(QuantQ4_0, PerBlockErrorAtMostHalfStepInRange) {
  TRACE_SEED();
  std::mt19937_64 rng(test_seed() + 3);
  for (float scale : kScales) {
    const size_t n = 32 * 512;
    std::vector<float> x = normal_row(rng, n, scale);
    x[40] = -7 * scale;    // a negative outlier: d > 0 for that block
    x[41] = 6.9f * scale;  // ... with a value of the opposite sign near the clamped end
    const std::vector<uint8_t> q = quantize(DType::Q4_0, x);
    const std::vector<float> y = dequantize(DType::Q4_0, q, n);
    const auto* blocks = reinterpret_cast<const BlockQ4_0*>(q.data());
    for (size_t b = 0; b < n / 32; ++b) {
      double m = 0;
      for (int j = 0; j < 32; ++j) {
        if (std::fabs(x[b * 32 + j]) > std::fabs(m)) m = x[b * 32 + j];
      }
      const double d = fp16_to_fp32(blocks[b].d);
      EXPECT_NEAR(d, m / -8, fp16_err(m / 8));
      const double ad = std::fabs(d);
      const double tiny = std::fabs(m) * 1e-6;
      for (int j = 0; j < 32; ++j) {
        const double xv = x[b * 32 + j];
        const double err = std::fabs(xv - y[b * 32 + j]);
        // The codes reach -8d .. 7d: values within [-8.5d, 7.5d] round to the nearest code;
        // values of the sign opposite to m beyond 7.5|d| are clamped to 7d, an error of at
        // most |m| - 7|d| (about |d|).
        const double t = xv / d;
        const double bound = (t >= -8.5 && t <= 7.5) ? ad / 2 + tiny : std::fabs(m) - 7 * ad + tiny;
        ASSERT_LE(err, bound) << "scale " << scale << " block " << b << " elem " << j;
        if (xv == m) {
          ASSERT_LE(err, 8 * fp16_err(m / 8) + tiny);  // m itself is code 0
        }
      }
    }
  }
}

TEST(QuantQ4_1, PerBlockErrorAtMostHalfStep) {
  TRACE_SEED();
  std::mt19937_64 rng(test_seed() + 4);
  for (float scale : kScales) {
    for (float offset : {0.0f, 3.0f * scale, -20.0f * scale}) {
      const size_t n = 32 * 256;
      const std::vector<float> x = normal_row(rng, n, scale, offset);
      const std::vector<uint8_t> q = quantize(DType::Q4_1, x);
      const std::vector<float> y = dequantize(DType::Q4_1, q, n);
      const auto* blocks = reinterpret_cast<const BlockQ4_1*>(q.data());
      for (size_t b = 0; b < n / 32; ++b) {
        double lo = x[b * 32], hi = x[b * 32];
        for (int j = 0; j < 32; ++j) {
          lo = std::min(lo, double{x[b * 32 + j]});
          hi = std::max(hi, double{x[b * 32 + j]});
        }
        const double d = fp16_to_fp32(blocks[b].d);
        const double m = fp16_to_fp32(blocks[b].m);
        EXPECT_NEAR(d, (hi - lo) / 15, fp16_err((hi - lo) / 15));
        EXPECT_NEAR(m, lo, fp16_err(lo));
        // Half a step, plus what rounding d and m to fp16 can add at the clamped ends.
        const double bound =
            d / 2 + 15 * fp16_err(d) + fp16_err(lo) + std::max(std::fabs(lo), std::fabs(hi)) * 1e-6;
        for (int j = 0; j < 32; ++j) {
          ASSERT_LE(std::fabs(double{x[b * 32 + j]} - y[b * 32 + j]), bound)
              << "scale " << scale << " offset " << offset << " block " << b << " elem " << j;
        }
      }
    }
  }
}

double relative_l2(const std::vector<float>& x, const std::vector<float>& y) {
  double num = 0, den = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    num += (double{x[i]} - y[i]) * (double{x[i]} - y[i]);
    den += double{x[i]} * x[i];
  }
  return std::sqrt(num / den);
}

// Relative L2 error of a long row of N(0, scale^2) samples. The bounds are derived, not fitted:
//   Q4_0: step |d| = max|x|/8 with E max|x| of 32 normals ~ 2.4 sigma, so the rms error is
//         about E[d^2/12]^0.5 ~ 0.086 (measured 0.086); bound 0.09.
//   Q4_1: step (max - min)/15 ~ 4.1 sigma / 15, rms ~ 0.079 (measured 0.078); bound 0.085.
//   Q8_0: step max|x|/127, rms ~ 0.0055 (measured 0.0054); bound 0.006.
//   (Over 4096 blocks the measured values vary by well under 1%; a wrong scale, clamp or
//   nibble order overshoots these bounds by far.)
//   F16 : 11-bit significand, rms relative ~ 2^-11 / sqrt(3) * 0.72 ~ 2.4e-4; bound 4e-4.
//   BF16: 8-bit significand,  rms relative ~ 2^-8 / sqrt(3) * 0.72 ~ 1.6e-3; bound 2.5e-3
//         (truncating instead of rounding would roughly double it and fail).
//   Q5_0: step max|x|/16 ~ 0.15 sigma, rms ~ 0.043 (measured 0.043); bound 0.045.
//   Q5_1: step (max - min)/31 ~ 0.13 sigma, rms ~ 0.038 (measured 0.038); bound 0.04.
//   Q4_K: per-32 affine steps as Q4_1 but with 6-bit scale/min codes and the min clamped to
//         <= 0, improved by the +-1 code search: measured 0.072; bound 0.08.
//   Q5_K: the same with 31 steps: measured 0.035; bound 0.04.
//   Q6_K: step max|x|/32 over 16 elements (E max ~ 1.77 sigma), rms ~ 0.016, plus the int8
//         sub-scale rounding: measured 0.018; bound 0.02.
TEST(QuantRow, RelativeL2ErrorBounds) {
  TRACE_SEED();
  std::mt19937_64 rng(test_seed() + 5);
  struct Case {
    DType t;
    double bound;
  };
  const Case cases[] = {{DType::Q4_0, 0.09},  {DType::Q4_1, 0.085},  {DType::Q8_0, 0.006},
                        {DType::F16, 4e-4},   {DType::BF16, 2.5e-3}, {DType::F32, 0.0},
                        {DType::Q5_0, 0.045}, {DType::Q5_1, 0.04},   {DType::Q4_K, 0.08},
                        {DType::Q5_K, 0.04},  {DType::Q6_K, 0.02}};
  for (const Case& c : cases) {
    for (float scale : kScales) {
      const size_t n = 256 * 512;
      const std::vector<float> x = normal_row(rng, n, scale);
      const std::vector<float> y = dequantize(c.t, quantize(c.t, x), n);
      const double err = relative_l2(x, y);
      EXPECT_LE(err, c.bound) << type_name(c.t) << " scale " << scale;
      if (c.t != DType::F32) {
        EXPECT_GT(err, c.bound / 10) << type_name(c.t) << " (suspiciously exact)";
      }
      std::printf("[          ] %-5s scale %-6g relative L2 error %.3g (bound %.3g)\n",
                  type_name(c.t), scale, err, c.bound);
    }
  }
}

TEST(QuantRow, ZeroSuperblocksAreExactAndFinite) {
  for (DType t : {DType::Q5_0, DType::Q5_1, DType::Q4_K, DType::Q5_K, DType::Q6_K}) {
    std::vector<float> x(512, 0.0f);
    for (int j = 256; j < 512; ++j) x[j] = -0.0f;
    const std::vector<float> y = dequantize(t, quantize(t, x), x.size());
    for (size_t i = 0; i < x.size(); ++i) EXPECT_EQ(y[i], 0.0f) << type_name(t) << " " << i;
  }
}

TEST(QuantRow, ZeroAndConstantBlocksAreExactAndFinite) {
  for (DType t : {DType::F32, DType::F16, DType::BF16, DType::Q4_0, DType::Q4_1, DType::Q8_0}) {
    std::vector<float> x(96, 0.0f);
    for (int j = 32; j < 64; ++j) x[j] = 3.96875f;  // constant 127/32: d and m exact in fp16
    for (int j = 64; j < 96; ++j) x[j] = -0.0f;     // negative zeros
    const std::vector<float> y = dequantize(t, quantize(t, x), x.size());
    for (size_t i = 0; i < x.size(); ++i) {
      ASSERT_FALSE(std::isnan(y[i])) << type_name(t) << " " << i;
      EXPECT_EQ(y[i], x[i]) << type_name(t) << " " << i;
    }
  }
  // A zero block of Q4_0 stores all codes 8 (value 0), of Q4_1 all codes 0 with m = 0.
  const std::vector<uint8_t> q4 = quantize(DType::Q4_0, std::vector<float>(32, 0.0f));
  for (int j = 0; j < 16; ++j) EXPECT_EQ(q4[2 + j], 0x88);
}

TEST(QuantRow, DotRowMatchesDotOfDequantizedRow) {
  TRACE_SEED();
  std::mt19937_64 rng(test_seed() + 6);
  for (DType t : {DType::F32, DType::F16, DType::BF16, DType::Q4_0, DType::Q4_1, DType::Q8_0,
                  DType::Q5_0, DType::Q5_1, DType::Q4_K, DType::Q5_K, DType::Q6_K}) {
    const size_t n = 256 * 38;
    const std::vector<float> w = normal_row(rng, n, 0.7f, 0.1f);
    const std::vector<float> x = normal_row(rng, n, 1.3f);
    const std::vector<uint8_t> q = quantize(t, w);
    const std::vector<float> y = dequantize(t, q, n);
    double ref = 0, mag = 0;
    for (size_t i = 0; i < n; ++i) {
      ref += double{y[i]} * double{x[i]};
      mag += std::fabs(double{y[i]} * double{x[i]});
    }
    const double got = dot_row(t, q.data(), x.data(), static_cast<int64_t>(n));
    EXPECT_NEAR(got, ref, mag * 1e-13) << type_name(t);
    // And it is close to the unquantized dot product (sanity, loose).
    double exact = 0;
    for (size_t i = 0; i < n; ++i) exact += double{w[i]} * double{x[i]};
    EXPECT_NEAR(got, exact, mag * 0.1) << type_name(t);
  }
}

// ---- bit layouts against gguf-py ----------------------------------------------------------

// Random blocks of t (random bytes, with every fp16 field replaced by a random finite half of
// moderate size), dequantized by Kestrel and by gguf-py's numpy dequantizer
// (tests/unit/gguf_dequant.py), which is an independent implementation of the ggml layouts.
// Both compute the same float32 operations in the same order, so they must agree bit for bit.
TEST(QuantGgufPy, DequantizeMatchesGgufPy) {
#if !defined(KESTREL_PYTHON) || !defined(KESTREL_SOURCE_DIR)
  GTEST_SKIP() << "built without a Python interpreter";
#else
  TRACE_SEED();
  std::mt19937_64 rng(test_seed() + 7);
  struct Case {
    DType t;
    const char* name;
    std::vector<int> half_offsets;  // byte offsets of the fp16 fields in a block
  };
  const Case cases[] = {{DType::Q5_0, "Q5_0", {0}},
                        {DType::Q5_1, "Q5_1", {0, 2}},
                        {DType::Q4_K, "Q4_K", {0, 2}},
                        {DType::Q5_K, "Q5_K", {0, 2}},
                        {DType::Q6_K, "Q6_K", {208}}};
  const std::string dir = ::testing::TempDir();
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const TypeInfo* info = type_info(c.t);
    const int64_t n_blocks = 64;
    const int64_t n = n_blocks * info->block_elems;
    std::vector<uint8_t> raw(static_cast<size_t>(n_blocks * info->block_bytes));
    for (auto& v : raw) v = static_cast<uint8_t>(rng());
    std::uniform_real_distribution<float> mag(-6.0f, 2.0f);
    for (int64_t b = 0; b < n_blocks; ++b) {
      for (int off : c.half_offsets) {
        const float v = std::ldexp(1.0f + static_cast<float>(rng() % 1000) / 1000.0f,
                                   static_cast<int>(mag(rng))) *
                        ((rng() & 1) ? -1.0f : 1.0f);
        const uint16_t h = fp32_to_fp16(v);
        std::memcpy(&raw[b * info->block_bytes + off], &h, 2);
      }
    }
    const std::string in = dir + "kestrel_gguf_in_" + c.name + ".bin";
    const std::string out = dir + "kestrel_gguf_out_" + c.name + ".bin";
    FILE* f = std::fopen(in.c_str(), "wb");
    ASSERT_NE(f, nullptr);
    ASSERT_EQ(std::fwrite(raw.data(), 1, raw.size(), f), raw.size());
    std::fclose(f);
    const std::string cmd = std::string("\"") + KESTREL_PYTHON + "\" \"" + KESTREL_SOURCE_DIR +
                            "/tests/unit/gguf_dequant.py\" " + c.name + " \"" + in + "\" \"" + out +
                            "\"";
    const int rc = std::system(cmd.c_str());
    if (rc != 0 && WIFEXITED(rc) && WEXITSTATUS(rc) == 3) GTEST_SKIP() << "gguf-py not installed";
    ASSERT_EQ(rc, 0) << cmd;
    std::vector<float> ref(static_cast<size_t>(n));
    f = std::fopen(out.c_str(), "rb");
    ASSERT_NE(f, nullptr);
    ASSERT_EQ(std::fread(ref.data(), 4, ref.size(), f), ref.size());
    std::fclose(f);
    std::remove(in.c_str());
    std::remove(out.c_str());
    std::vector<float> ours(static_cast<size_t>(n));
    dequantize_row(c.t, raw.data(), ours.data(), n);
    int mismatches = 0;
    for (int64_t i = 0; i < n; ++i) {
      // equal as values (gguf-py may produce -0 where Kestrel adds a +0 min)
      if (!(ours[i] == ref[i]) && ++mismatches < 10)
        ADD_FAILURE() << "element " << i << " (block " << i / info->block_elems << "): ours "
                      << ours[i] << " gguf-py " << ref[i];
    }
    EXPECT_EQ(mismatches, 0);
    // dot_row agrees with the dequantized row
    const std::vector<float> x = normal_row(rng, static_cast<size_t>(n), 1.0f);
    double want = 0, mag_sum = 0;
    for (int64_t i = 0; i < n; ++i) {
      want += double{ref[i]} * x[i];
      mag_sum += std::fabs(double{ref[i]} * x[i]);
    }
    EXPECT_NEAR(dot_row(c.t, raw.data(), x.data(), n), want, mag_sum * 1e-13);
  }
#endif
}

}  // namespace
}  // namespace kestrel::quant
