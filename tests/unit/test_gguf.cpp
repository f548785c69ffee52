// GGUF reader tests: round trips of every metadata type and tensor layout, alignment, typed
// lookups, File::open on real files, and hostile inputs that must fail cleanly, never crash.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "format/gguf.h"
#include "format/quant/types.h"
#include "gguf_builder.h"

namespace kestrel::gguf {
namespace {

using gguf_test::Bytes;
using gguf_test::GgufBuilder;
using quant::DType;
using VT = ValueType;

constexpr const char* kOrigin = "test.gguf";

Expected<std::unique_ptr<File>> parse(const std::vector<uint8_t>& b) {
  return File::parse(b.data(), b.size(), kOrigin);
}

// The parse must fail, and the message must name the file and contain every `needles`.
void expect_error(const std::vector<uint8_t>& b, std::initializer_list<const char*> needles) {
  auto f = parse(b);
  ASSERT_FALSE(f.has_value()) << "a hostile file was accepted";
  const std::string& msg = f.message();
  EXPECT_NE(msg.find(kOrigin), std::string::npos) << msg;
  for (const char* n : needles)
    EXPECT_NE(msg.find(n), std::string::npos) << "'" << n << "' not in: " << msg;
}

std::vector<uint8_t> pattern(size_t n, uint8_t seed) {
  std::vector<uint8_t> v(n);
  for (size_t k = 0; k < n; ++k) v[k] = static_cast<uint8_t>(k * 7 + seed);
  return v;
}

// A file with every metadata type and a handful of tensors of different types and ranks.
GgufBuilder full_builder(uint32_t version) {
  GgufBuilder b;
  b.version = version;
  b.str("general.architecture", "llama")
      .u8("t.u8", 200)
      .i8("t.i8", -100)
      .u16("t.u16", 60000)
      .i16("t.i16", -30000)
      .u32("t.u32", 4000000000u)
      .i32("t.i32", -2000000000)
      .f32("t.f32", 1.5f)
      .boolean("t.bool_true", true)
      .boolean("t.bool_false", false)
      .str("t.str", "hello \xe2\x9c\x93")
      .str("t.empty_str", "")
      .u64("t.u64", 0xfedcba9876543210ull)
      .i64("t.i64", -1234567890123456789ll)
      .f64("t.f64", -2.25e300)
      .arr_str("tokenizer.ggml.tokens", {"<s>", "</s>", "", "hello", "\xe4\xb8\x96"})
      .arr<int>("t.arr_i32", VT::INT32, {1, -2, 3})
      .arr<double>("t.arr_f32", VT::FLOAT32, {0.5, -0.25})
      .arr<int>("t.arr_u8", VT::UINT8, {})
      .arr<int>("t.arr_bool", VT::BOOL, {1, 0, 1})
      .arr<double>("t.arr_f64", VT::FLOAT64, {3.0});
  // Array of two arrays: [[7, 8], [9]] as int16.
  Bytes nested;
  nested.u32(static_cast<uint32_t>(VT::ARRAY)).u64(2);
  nested.raw(GgufBuilder::array_value<int>(VT::INT16, {7, 8}));
  nested.raw(GgufBuilder::array_value<int>(VT::INT16, {9}));
  b.kv("t.nested", VT::ARRAY, nested);
  // Array of arrays of strings.
  Bytes nested_str;
  nested_str.u32(static_cast<uint32_t>(VT::ARRAY)).u64(1);
  nested_str.u32(static_cast<uint32_t>(VT::STRING)).u64(2).str("a").str("bc");
  b.kv("t.nested_str", VT::ARRAY, nested_str);

  b.tensor("token_embd.weight", {4, 3}, DType::F32, pattern(48, 1))
      .tensor("blk.0.attn_q.weight", {64, 2}, DType::Q4_0, pattern(72, 2))
      .tensor("output_norm.weight", {8}, DType::F16, pattern(16, 3))
      .tensor("blk.0.ffn.weight", {32, 2, 3}, DType::Q8_0, pattern(204, 4))
      .tensor("blk.0.k4.weight", {256, 1, 1, 2}, DType::Q4_K, pattern(288, 5))
      .tensor("bf", {3}, DType::BF16, pattern(6, 6));
  return b;
}

void check_full(const File& f, const std::vector<uint8_t>& buf, const GgufBuilder& b,
                uint32_t version) {
  EXPECT_EQ(f.version(), version);
  EXPECT_EQ(f.alignment(), 32u);
  EXPECT_EQ(f.file_size(), buf.size());
  EXPECT_EQ(f.path(), kOrigin);
  EXPECT_EQ(f.metadata().size(), 23u);
  EXPECT_EQ(f.metadata()[0].first, "general.architecture");

  auto expect_u = [&](const char* k, VT t, uint64_t v) {
    const Value* x = f.find(k);
    ASSERT_NE(x, nullptr) << k;
    EXPECT_EQ(x->type, t) << k;
    EXPECT_EQ(x->u, v) << k;
  };
  auto expect_i = [&](const char* k, VT t, int64_t v) {
    const Value* x = f.find(k);
    ASSERT_NE(x, nullptr) << k;
    EXPECT_EQ(x->type, t) << k;
    EXPECT_EQ(x->i, v) << k;
    EXPECT_EQ(x->as_int(), v) << k;
  };
  expect_u("t.u8", VT::UINT8, 200);
  expect_i("t.i8", VT::INT8, -100);
  expect_u("t.u16", VT::UINT16, 60000);
  expect_i("t.i16", VT::INT16, -30000);
  expect_u("t.u32", VT::UINT32, 4000000000u);
  expect_i("t.i32", VT::INT32, -2000000000);
  expect_u("t.u64", VT::UINT64, 0xfedcba9876543210ull);
  expect_i("t.i64", VT::INT64, -1234567890123456789ll);
  expect_u("t.bool_true", VT::BOOL, 1);
  expect_u("t.bool_false", VT::BOOL, 0);
  EXPECT_EQ(f.find("t.f32")->f, 1.5);
  EXPECT_EQ(f.find("t.f32")->type, VT::FLOAT32);
  EXPECT_EQ(f.find("t.f64")->f, -2.25e300);
  EXPECT_EQ(f.find("t.f64")->type, VT::FLOAT64);
  EXPECT_EQ(f.find("t.str")->str, "hello \xe2\x9c\x93");
  EXPECT_EQ(f.find("t.empty_str")->type, VT::STRING);
  EXPECT_EQ(f.find("t.empty_str")->str, "");
  EXPECT_EQ(f.find("missing"), nullptr);

  const Value* tokens = f.find("tokenizer.ggml.tokens");
  ASSERT_NE(tokens, nullptr);
  EXPECT_EQ(tokens->type, VT::ARRAY);
  EXPECT_EQ(tokens->elem_type, VT::STRING);
  EXPECT_EQ(tokens->array_len, 5u);
  EXPECT_EQ(tokens->strs, (std::vector<std::string>{"<s>", "</s>", "", "hello", "\xe4\xb8\x96"}));

  const Value* ai = f.find("t.arr_i32");
  ASSERT_EQ(ai->arr.size(), 3u);
  EXPECT_EQ(ai->elem_type, VT::INT32);
  EXPECT_EQ(ai->arr[1].type, VT::INT32);
  EXPECT_EQ(ai->arr[0].i, 1);
  EXPECT_EQ(ai->arr[1].i, -2);
  EXPECT_EQ(ai->arr[2].i, 3);
  const Value* af = f.find("t.arr_f32");
  ASSERT_EQ(af->arr.size(), 2u);
  EXPECT_EQ(af->arr[0].f, 0.5);
  EXPECT_EQ(af->arr[1].f, -0.25);
  EXPECT_EQ(f.find("t.arr_u8")->array_len, 0u);
  EXPECT_TRUE(f.find("t.arr_u8")->arr.empty());
  const Value* ab = f.find("t.arr_bool");
  ASSERT_EQ(ab->arr.size(), 3u);
  EXPECT_EQ(ab->arr[0].u, 1u);
  EXPECT_EQ(ab->arr[1].u, 0u);
  EXPECT_EQ(f.find("t.arr_f64")->arr.at(0).f, 3.0);

  const Value* nested = f.find("t.nested");
  ASSERT_EQ(nested->elem_type, VT::ARRAY);
  ASSERT_EQ(nested->arr.size(), 2u);
  EXPECT_EQ(nested->arr[0].type, VT::ARRAY);
  EXPECT_EQ(nested->arr[0].elem_type, VT::INT16);
  ASSERT_EQ(nested->arr[0].arr.size(), 2u);
  EXPECT_EQ(nested->arr[0].arr[1].i, 8);
  ASSERT_EQ(nested->arr[1].arr.size(), 1u);
  EXPECT_EQ(nested->arr[1].arr[0].i, 9);
  const Value* ns = f.find("t.nested_str");
  ASSERT_EQ(ns->arr.size(), 1u);
  EXPECT_EQ(ns->arr[0].strs, (std::vector<std::string>{"a", "bc"}));

  struct Want {
    const char* name;
    std::vector<int64_t> dims;
    DType type;
    uint64_t offset, n_bytes;
    uint8_t seed;
  };
  const Want want[] = {
      {"token_embd.weight", {4, 3}, DType::F32, 0, 48, 1},
      {"blk.0.attn_q.weight", {64, 2}, DType::Q4_0, 64, 72, 2},
      {"output_norm.weight", {8}, DType::F16, 160, 16, 3},
      {"blk.0.ffn.weight", {32, 2, 3}, DType::Q8_0, 192, 204, 4},
      {"blk.0.k4.weight", {256, 1, 1, 2}, DType::Q4_K, 416, 288, 5},
      {"bf", {3}, DType::BF16, 704, 6, 6},
  };
  ASSERT_EQ(f.tensors().size(), std::size(want));
  const size_t data_start = GgufBuilder::data_start(buf, b);
  EXPECT_EQ(data_start % 32, 0u);
  for (size_t k = 0; k < std::size(want); ++k) {
    const Want& w = want[k];
    const TensorInfo& t = f.tensors()[k];
    EXPECT_EQ(f.tensor(w.name), &t);
    EXPECT_EQ(t.name, w.name);
    EXPECT_EQ(t.dims, w.dims) << w.name;
    EXPECT_EQ(t.type, w.type) << w.name;
    EXPECT_EQ(t.offset, w.offset) << w.name;
    EXPECT_EQ(t.n_bytes, w.n_bytes) << w.name;
    EXPECT_EQ(t.data, buf.data() + data_start + w.offset) << w.name;
    EXPECT_EQ(0, std::memcmp(t.data, pattern(w.n_bytes, w.seed).data(), w.n_bytes)) << w.name;
  }
  const TensorInfo* q = f.tensor("blk.0.ffn.weight");
  EXPECT_EQ(q->cols(), 32);
  EXPECT_EQ(q->rows(), 6);
  EXPECT_EQ(q->n_elements(), 192);
  EXPECT_EQ(f.tensor("output_norm.weight")->rows(), 1);
  EXPECT_EQ(f.tensor("nope"), nullptr);
}

TEST(GgufRoundTrip, Version3AllTypes) {
  GgufBuilder b = full_builder(3);
  auto buf = b.build();
  auto f = parse(buf);
  ASSERT_TRUE(f) << f.message();
  check_full(**f, buf, b, 3);
}

TEST(GgufRoundTrip, Version2AllTypes) {
  GgufBuilder b = full_builder(2);
  auto buf = b.build();
  auto f = parse(buf);
  ASSERT_TRUE(f) << f.message();
  check_full(**f, buf, b, 2);
}

TEST(GgufRoundTrip, EmptyFileHeaderOnly) {
  GgufBuilder b;
  auto f = parse(b.build());
  ASSERT_TRUE(f) << f.message();
  EXPECT_TRUE((*f)->metadata().empty());
  EXPECT_TRUE((*f)->tensors().empty());
}

TEST(GgufRoundTrip, CustomAlignment) {
  for (uint32_t a : {1u, 8u, 64u, 4096u}) {
    GgufBuilder b;
    b.alignment(a).str("general.name", "x");
    b.tensor("a", {3}, DType::F32, pattern(12, 1)).tensor("b", {5}, DType::F16, pattern(10, 2));
    auto buf = b.build();
    auto f = parse(buf);
    ASSERT_TRUE(f) << f.message();
    EXPECT_EQ((*f)->alignment(), a);
    const size_t start = GgufBuilder::data_start(buf, b);
    EXPECT_EQ(start % a, 0u);
    const TensorInfo* t = (*f)->tensor("b");
    EXPECT_EQ(t->offset, (12 + a - 1) / a * a);
    EXPECT_EQ(t->data, buf.data() + start + t->offset);
    EXPECT_EQ(0, std::memcmp(t->data, pattern(10, 2).data(), 10));
  }
}

TEST(GgufRoundTrip, AlignmentWithOtherIntegerType) {
  GgufBuilder b;
  b.data_alignment = 64;
  b.u64("general.alignment", 64);
  b.tensor("a", {3}, DType::F32, pattern(12, 1)).tensor("b", {5}, DType::F32, pattern(20, 1));
  auto f = parse(b.build());
  ASSERT_TRUE(f) << f.message();
  EXPECT_EQ((*f)->alignment(), 64u);
  EXPECT_EQ((*f)->tensor("b")->offset, 64u);
}

TEST(GgufLookup, TypedGetters) {
  GgufBuilder b;
  b.u32("n", 7).i8("neg", -3).u64("big", ~0ull).f32("x", 0.25f).str("s", "abc");
  b.boolean("yes", true);
  auto fe = parse(b.build());
  ASSERT_TRUE(fe) << fe.message();
  const File& f = **fe;
  EXPECT_EQ(*f.get_int("n"), 7);
  EXPECT_EQ(*f.get_int("neg"), -3);
  EXPECT_EQ(f.get_int("n", 1), 7);
  EXPECT_EQ(f.get_int("absent", 11), 11);
  EXPECT_EQ(f.get_int("s", 12), 12);
  EXPECT_EQ(f.get_int("big", 13), 13);

  auto missing = f.get_int("absent");
  ASSERT_FALSE(missing);
  EXPECT_NE(missing.message().find("'absent'"), std::string::npos) << missing.message();
  EXPECT_NE(missing.message().find(kOrigin), std::string::npos) << missing.message();
  auto wrong = f.get_int("s");
  ASSERT_FALSE(wrong);
  EXPECT_NE(wrong.message().find("string"), std::string::npos) << wrong.message();
  EXPECT_FALSE(f.get_int("big"));

  EXPECT_EQ(f.get_float("x", 9), 0.25);
  EXPECT_EQ(f.get_float("n", 9), 7.0);
  EXPECT_EQ(f.get_float("s", 9), 9.0);
  EXPECT_EQ(*f.get_string("s"), "abc");
  EXPECT_FALSE(f.get_string("n"));
  EXPECT_FALSE(f.get_string("absent"));
  EXPECT_EQ(f.get_string("s", "d"), "abc");
  EXPECT_EQ(f.get_string("n", "d"), "d");
  EXPECT_TRUE(f.get_bool("yes", false));
  EXPECT_FALSE(f.get_bool("n", false));
  EXPECT_TRUE(f.get_bool("absent", true));

  EXPECT_TRUE(f.find("n")->is_integer());
  EXPECT_FALSE(f.find("x")->is_integer());
  EXPECT_TRUE(f.find("x")->is_number());
  EXPECT_FALSE(f.find("s")->is_number());
  EXPECT_EQ(f.find("neg")->as_double(), -3.0);
  EXPECT_STREQ(value_type_name(VT::FLOAT64), "float64");
}

// --- hostile headers and metadata -------------------------------------------------------

TEST(GgufHostile, WrongMagic) {
  GgufBuilder b;
  b.magic = 0x464c457f;  // ELF
  expect_error(b.build(), {"not a GGUF file"});
  b.magic = 0x47475546;  // byte-swapped
  expect_error(b.build(), {"big-endian"});
  expect_error({'G', 'G', 'U'}, {"too short"});
  expect_error({}, {"too short"});
}

TEST(GgufHostile, UnsupportedVersions) {
  GgufBuilder b;
  b.str("k", "v");
  b.version = 1;
  expect_error(b.build(), {"version 1"});
  b.version = 4;
  expect_error(b.build(), {"version 4"});
  b.version = 0;
  expect_error(b.build(), {"version 0"});
}

TEST(GgufHostile, HugeCounts) {
  GgufBuilder b;
  b.str("k", "v");
  b.n_kv_override = 1ull << 63;
  expect_error(b.build(), {"metadata count 9223372036854775808"});
  b.n_kv_override = ~0ull;
  expect_error(b.build(), {"metadata count"});
  b.n_kv_override.reset();
  b.n_tensors_override = 1ull << 40;
  expect_error(b.build(), {"tensor count"});
  b.n_tensors_override = 1;  // claims a tensor, has none
  expect_error(b.build(), {"tensor count 1 cannot fit"});
}

TEST(GgufHostile, HugeStringLengths) {
  GgufBuilder b;
  b.kv("k", VT::STRING, Bytes().u64(1ull << 62).raw(std::vector<uint8_t>(16, 'x')));
  expect_error(b.build(), {"'k'", "length 4611686018427387904", "truncated"});

  GgufBuilder key;  // key length huge
  key.raw_kv(Bytes().u64(~0ull).u32(0).u8(0));
  expect_error(key.build(), {"metadata entry 0 of 1", "key has length"});

  GgufBuilder name;  // tensor name length huge
  name.str("k", "v");
  name.tensor_info("t", {4}, DType::F32, 0).data().resize(16);
  auto buf = name.build();
  // Patch the tensor name length (right after the metadata) to a huge value.
  const size_t name_len_at = 24 + Bytes().str("k").u32(8).str("v").b.size();
  ASSERT_EQ(buf[name_len_at], 1);
  buf[name_len_at + 6] = 0x7f;
  expect_error(buf, {"tensor entry 0 of 1", "tensor name has length"});
}

TEST(GgufHostile, HugeArrayCounts) {
  GgufBuilder b;
  b.kv("a", VT::ARRAY, Bytes().u32(0).u64(1ull << 60).u8(1));
  expect_error(b.build(), {"'a'", "array of 1152921504606846976 uint8"});
  // Fits at one byte per element but not at eight per string.
  GgufBuilder s;
  s.kv("a", VT::ARRAY, Bytes().u32(8).u64(10).raw(std::vector<uint8_t>(20, 0)));
  expect_error(s.build(), {"array of 10 string elements"});
  GgufBuilder n;  // nested arrays: 12 bytes each at least
  n.kv("a", VT::ARRAY, Bytes().u32(9).u64(5).raw(std::vector<uint8_t>(30, 0)));
  expect_error(n.build(), {"array of 5 array elements"});
}

TEST(GgufHostile, UnknownValueTypes) {
  GgufBuilder b;
  b.kv("x", 13u, Bytes().u64(0));
  expect_error(b.build(), {"'x'", "unknown metadata value type 13"});
  GgufBuilder big;
  big.kv("x", 0xffffffffu, Bytes().u64(0));
  expect_error(big.build(), {"unknown metadata value type 4294967295"});
  GgufBuilder arr;
  arr.kv("x", VT::ARRAY, Bytes().u32(77).u64(1).u64(0));
  expect_error(arr.build(), {"'x'", "unknown element type 77"});
}

TEST(GgufHostile, ArraysNestedTooDeep) {
  Bytes inner = GgufBuilder::array_value<int>(VT::INT32, {1});
  Bytes mid;
  mid.u32(9).u64(1).raw(inner);
  Bytes outer;
  outer.u32(9).u64(1).raw(mid);
  GgufBuilder ok;
  ok.kv("x", VT::ARRAY, mid);
  EXPECT_TRUE(parse(ok.build()));
  GgufBuilder b;
  b.kv("x", VT::ARRAY, outer);
  expect_error(b.build(), {"'x'", "nested more than 2"});
}

TEST(GgufHostile, BadKeys) {
  GgufBuilder empty;
  empty.str("", "v");
  expect_error(empty.build(), {"key is empty"});
  GgufBuilder dup;
  dup.u32("general.x", 1).str("other", "o").u32("general.x", 2);
  expect_error(dup.build(), {"'general.x'", "more than once"});
  GgufBuilder control;  // unprintable bytes in a key are escaped in messages
  control.kv(std::string("a\x01\xff", 3), 13u, Bytes());
  expect_error(control.build(), {"'a\\x01\\xff'"});
}

TEST(GgufHostile, BoolOutOfRange) {
  GgufBuilder b;
  b.kv("flag", VT::BOOL, Bytes().u8(2));
  expect_error(b.build(), {"'flag'", "bool value is 2"});
  GgufBuilder a;
  a.kv("flags", VT::ARRAY, Bytes().u32(7).u64(2).u8(1).u8(255));
  expect_error(a.build(), {"'flags'", "bool value is 255"});
}

TEST(GgufHostile, BadAlignment) {
  for (uint32_t a : {0u, 3u, 48u, 0x80000001u}) {
    GgufBuilder b;
    b.u32("general.alignment", a);
    expect_error(b.build(), {"'general.alignment'", "power of two"});
  }
  GgufBuilder neg;
  neg.i32("general.alignment", -32);
  expect_error(neg.build(), {"power of two"});
  GgufBuilder str;
  str.str("general.alignment", "32");
  expect_error(str.build(), {"expected an integer"});
}

// --- hostile tensor directories ---------------------------------------------------------

// A file with one metadata entry and the tensor info given, followed by `data_bytes` of data.
std::vector<uint8_t> one_tensor(const std::vector<uint64_t>& dims, uint32_t type, uint64_t offset,
                                size_t data_bytes = 64, const char* name = "blk.0.attn_q.weight") {
  GgufBuilder b;
  b.str("general.architecture", "llama");
  b.tensor_info(name, dims, type, offset);
  b.data().resize(data_bytes);
  return b.build();
}

TEST(GgufHostile, OneTensorBaselineIsValid) {
  auto f = parse(one_tensor({4, 4}, 0, 0));
  ASSERT_TRUE(f) << f.message();
  EXPECT_EQ((*f)->tensors()[0].n_bytes, 64u);
}

TEST(GgufHostile, UnknownTensorType) {
  expect_error(one_tensor({32}, 99, 0), {"'blk.0.attn_q.weight'", "unknown tensor type id 99"});
  expect_error(one_tensor({32}, 4, 0), {"unknown tensor type id 4"});
}

TEST(GgufHostile, BadDimensionCounts) {
  expect_error(one_tensor({}, 0, 0), {"'blk.0.attn_q.weight'", "has 0 dimensions"});
  expect_error(one_tensor({1, 1, 1, 1, 1}, 0, 0), {"has 5 dimensions"});
  GgufBuilder b;         // n_dims = 2^32-1
  b.data_alignment = 1;  // no padding: the info is appended right after the metadata
  b.raw_kv(Bytes().str("k").u32(4).u32(1));
  auto buf = b.build();
  Bytes info;
  info.str("t").u32(0xffffffffu).u64(1).u32(0).u64(0);
  buf[8] = 1;
  buf.insert(buf.end(), info.b.begin(), info.b.end());
  expect_error(buf, {"'t'", "has 4294967295 dimensions"});
}

TEST(GgufHostile, ZeroDimension) {
  expect_error(one_tensor({4, 0}, 0, 0), {"'blk.0.attn_q.weight'", "dimension 1 is 0"});
  expect_error(one_tensor({0}, 0, 0), {"dimension 0 is 0"});
}

TEST(GgufHostile, ElementCountOverflow) {
  expect_error(one_tensor({1ull << 32, 1ull << 32}, 0, 0), {"overflows int64 at dimension 1"});
  expect_error(one_tensor({1ull << 63}, 0, 0), {"overflows int64 at dimension 0"});
  expect_error(one_tensor({~0ull, 1}, 0, 0), {"overflows int64"});
  expect_error(one_tensor({2, 1ull << 20, 1ull << 20, 1ull << 22}, 0, 0),
               {"overflows int64 at dimension 3"});
  // 2^61 elements fit in int64 but 2^63 bytes of f32 do not.
  expect_error(one_tensor({1ull << 31, 1ull << 30}, 0, 0), {"byte size", "overflows"});
  // Huge but representable: must be rejected as outside the file, not allocated.
  expect_error(one_tensor({1ull << 30, 1ull << 20}, 0, 0), {"lies outside the file"});
}

TEST(GgufHostile, RowNotMultipleOfBlock) {
  expect_error(one_tensor({33, 2}, static_cast<uint32_t>(DType::Q4_0), 0),
               {"row length 33", "q4_0 block size 32"});
  expect_error(one_tensor({128}, static_cast<uint32_t>(DType::Q6_K), 0), {"q6_K block size 256"});
}

TEST(GgufHostile, DataOutsideFile) {
  expect_error(one_tensor({4, 4}, 0, 0, 63),
               {"'blk.0.attn_q.weight'", "data [offset", "64 bytes] lies outside the file",
                "truncated or corrupt"});
  expect_error(one_tensor({4}, 0, 1ull << 20), {"lies outside the file"});
  expect_error(one_tensor({4}, 0, ~0ull & ~31ull), {"lies outside the file"});
  expect_error(one_tensor({4}, 0, 32, 40), {"lies outside the file"});
  EXPECT_TRUE(parse(one_tensor({4}, 0, 32, 48)));
}

TEST(GgufHostile, MisalignedOffset) {
  expect_error(one_tensor({4}, 0, 8),
               {"'blk.0.attn_q.weight'", "data offset 8", "not a multiple of the alignment 32"});
  GgufBuilder b;
  b.alignment(64);
  b.tensor_info("t", {4}, DType::F32, 32);
  b.data().resize(128);
  expect_error(b.build(), {"not a multiple of the alignment 64"});
}

TEST(GgufHostile, DuplicateAndEmptyTensorNames) {
  GgufBuilder b;
  b.tensor("w", {4}, DType::F32, pattern(16, 0)).tensor("w", {4}, DType::F32, pattern(16, 0));
  expect_error(b.build(), {"'w'", "more than once"});
  expect_error(one_tensor({4}, 0, 0, 64, ""), {"tensor name is empty"});
}

// --- truncation and random corruption ---------------------------------------------------

TEST(GgufHostile, EveryTruncationFails) {
  GgufBuilder b = full_builder(3);
  const auto buf = b.build();
  ASSERT_TRUE(parse(buf));
  for (size_t n = 0; n < buf.size(); ++n) {
    // A fresh exact-size copy, so reading past the end is caught by sanitizers.
    std::vector<uint8_t> prefix(buf.begin(), buf.begin() + static_cast<ptrdiff_t>(n));
    auto f = File::parse(prefix.data(), prefix.size(), kOrigin);
    ASSERT_FALSE(f) << "prefix of " << n << " bytes accepted";
    ASSERT_NE(f.message().find(kOrigin), std::string::npos) << f.message();
  }
}

// Any successfully parsed file must have all tensor data inside the buffer.
void check_consistent(const File& f, const std::vector<uint8_t>& buf) {
  uint64_t sum = 0;
  for (const TensorInfo& t : f.tensors()) {
    ASSERT_GE(t.data, buf.data());
    ASSERT_LE(t.n_bytes, buf.size());
    ASSERT_LE(t.data + t.n_bytes, buf.data() + buf.size());
    ASSERT_EQ(static_cast<uint64_t>(t.n_elements()) % static_cast<uint64_t>(t.cols()), 0u);
    for (uint64_t k = 0; k < t.n_bytes; ++k) sum += t.data[k];
    EXPECT_EQ(f.tensor(t.name), &t);
  }
  for (const auto& [key, v] : f.metadata()) {
    EXPECT_FALSE(key.empty());
    EXPECT_EQ(f.find(key), &v);
  }
  (void)sum;
}

TEST(GgufHostile, RandomByteFlipsNeverCrash) {
  GgufBuilder b = full_builder(3);
  const auto valid = b.build();
  const size_t header = GgufBuilder::data_start(valid, b);
  std::mt19937_64 rng(0x6b657374);  // fixed seed: failures are reproducible
  int accepted = 0;
  for (int iter = 0; iter < 4000; ++iter) {
    std::vector<uint8_t> buf = valid;
    const int flips = 1 + static_cast<int>(rng() % 6);
    for (int k = 0; k < flips; ++k) {
      // Mostly hit the header and directory, where the parser's decisions are made.
      const size_t span = (rng() % 8 == 0) ? buf.size() : header;
      const size_t at = rng() % span;
      switch (rng() % 4) {
        case 0:
          buf[at] ^= static_cast<uint8_t>(1u << (rng() % 8));
          break;
        case 1:
          buf[at] = static_cast<uint8_t>(rng());
          break;
        case 2:
          buf[at] = 0xff;
          break;
        default:
          buf[at] = 0;
          break;
      }
    }
    if (rng() % 5 == 0) buf.resize(rng() % (buf.size() + 1));
    auto f = File::parse(buf.data(), buf.size(), kOrigin);
    if (f) {
      ++accepted;
      check_consistent(**f, buf);
    } else {
      ASSERT_NE(f.message().find(kOrigin), std::string::npos) << f.message();
    }
  }
  // Flips in string contents and tensor data leave valid files; most others must not.
  EXPECT_GT(accepted, 0);
  EXPECT_LT(accepted, 4000);
}

// --- File::open -------------------------------------------------------------------------

class GgufOpen : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("kestrel_gguf_test_" + std::to_string(::getpid()));
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  std::string write(const char* name, const std::vector<uint8_t>& bytes) {
    const std::string path = (dir_ / name).string();
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()),
              static_cast<std::streamsize>(bytes.size()));
    return path;
  }
  std::filesystem::path dir_;
};

TEST_F(GgufOpen, ValidFile) {
  GgufBuilder b = full_builder(3);
  const auto buf = b.build();
  const std::string path = write("model.gguf", buf);
  auto f = File::open(path);
  ASSERT_TRUE(f) << f.message();
  EXPECT_EQ((*f)->path(), path);
  EXPECT_EQ((*f)->file_size(), buf.size());
  EXPECT_EQ((*f)->get_string("general.architecture", ""), "llama");
  const TensorInfo* t = (*f)->tensor("blk.0.ffn.weight");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(0, std::memcmp(t->data, pattern(204, 4).data(), 204));
}

TEST_F(GgufOpen, MissingFile) {
  const std::string path = (dir_ / "does_not_exist.gguf").string();
  auto f = File::open(path);
  ASSERT_FALSE(f);
  EXPECT_NE(f.message().find(path), std::string::npos) << f.message();
  EXPECT_NE(f.message().find("No such file"), std::string::npos) << f.message();
}

TEST_F(GgufOpen, EmptyFile) {
  const std::string path = write("empty.gguf", {});
  auto f = File::open(path);
  ASSERT_FALSE(f);
  EXPECT_NE(f.message().find(path), std::string::npos) << f.message();
  EXPECT_NE(f.message().find("empty"), std::string::npos) << f.message();
}

TEST_F(GgufOpen, Directory) {
  auto f = File::open(dir_.string());
  ASSERT_FALSE(f);
  EXPECT_NE(f.message().find(dir_.string()), std::string::npos) << f.message();
  EXPECT_NE(f.message().find("directory"), std::string::npos) << f.message();
}

TEST_F(GgufOpen, CorruptFileNamesPath) {
  GgufBuilder b = full_builder(3);
  auto buf = b.build();
  buf.resize(buf.size() - 1);
  const std::string path = write("cut.gguf", buf);
  auto f = File::open(path);
  ASSERT_FALSE(f);
  EXPECT_NE(f.message().find(path), std::string::npos) << f.message();
  EXPECT_NE(f.message().find("'bf'"), std::string::npos) << f.message();
}

// --- quant type table -------------------------------------------------------------------

TEST(GgufQuantTypes, Table) {
  struct Row {
    uint32_t id;
    const char* name;
    int64_t elems, bytes;
    bool supported;
  };
  const Row rows[] = {
      {0, "f32", 1, 4, true},       {1, "f16", 1, 2, true},        {30, "bf16", 1, 2, true},
      {2, "q4_0", 32, 18, true},    {3, "q4_1", 32, 20, true},     {6, "q5_0", 32, 22, true},
      {7, "q5_1", 32, 24, true},    {8, "q8_0", 32, 34, true},     {9, "q8_1", 32, 36, false},
      {10, "q2_K", 256, 84, false}, {11, "q3_K", 256, 110, false}, {12, "q4_K", 256, 144, true},
      {13, "q5_K", 256, 176, true}, {14, "q6_K", 256, 210, true},  {15, "q8_K", 256, 292, false},
  };
  for (const Row& r : rows) {
    const quant::TypeInfo* t = quant::type_info(r.id);
    ASSERT_NE(t, nullptr) << r.id;
    EXPECT_EQ(static_cast<uint32_t>(t->type), r.id);
    EXPECT_STREQ(t->name, r.name);
    EXPECT_STREQ(quant::type_name(t->type), r.name);
    EXPECT_EQ(t->block_elems, r.elems) << r.name;
    EXPECT_EQ(t->block_bytes, r.bytes) << r.name;
    EXPECT_EQ(t->supported, r.supported) << r.name;
    DType parsed = DType::F32;
    EXPECT_TRUE(quant::parse_type(r.name, &parsed)) << r.name;
    EXPECT_EQ(parsed, t->type);
  }
  for (uint32_t id : {4u, 5u, 16u, 29u, 31u, 1000u, 0xffffffffu}) {
    EXPECT_EQ(quant::type_info(id), nullptr) << id;
  }
  EXPECT_STREQ(quant::type_name(static_cast<DType>(77)), "unknown");
}

TEST(GgufQuantTypes, RowBytesAndParse) {
  EXPECT_EQ(quant::row_bytes(DType::F32, 10), 40);
  EXPECT_EQ(quant::row_bytes(DType::Q4_0, 64), 36);
  EXPECT_EQ(quant::row_bytes(DType::Q4_0, 33), -1);
  EXPECT_EQ(quant::row_bytes(DType::Q6_K, 512), 420);
  EXPECT_EQ(quant::row_bytes(DType::Q4_K, 0), 0);
  EXPECT_EQ(quant::row_bytes(DType::F32, -4), -1);
  EXPECT_EQ(quant::row_bytes(DType::F32, INT64_MAX / 2), -1);  // overflow
  DType t = DType::F32;
  EXPECT_TRUE(quant::parse_type("Q4_K", &t));
  EXPECT_EQ(t, DType::Q4_K);
  EXPECT_TRUE(quant::parse_type("BF16", &t));
  EXPECT_EQ(t, DType::BF16);
  EXPECT_FALSE(quant::parse_type("q4", &t));
  EXPECT_FALSE(quant::parse_type("q4_0x", &t));
  EXPECT_FALSE(quant::parse_type("", &t));
  EXPECT_FALSE(quant::parse_type(nullptr, &t));
}

}  // namespace
}  // namespace kestrel::gguf
