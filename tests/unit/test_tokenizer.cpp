// Tokenizer unit tests on small vocabularies built in memory: the merge rules, special and
// added tokens, byte fallback, BOS/EOS, UTF-8 validation and streamed decoding. Conformance
// with real vocabularies is tests/tokenizer/test_tokenizer.py.
#include <gtest/gtest.h>

#include <random>

#include "test_seed.h"
#include "tokenizer/byte_level.h"
#include "tokenizer/tokenizer.h"
#include "core/utf8.h"
#include "unit/gguf_builder.h"

namespace kestrel::tok {
namespace {

using gguf::ValueType;
using gguf_test::GgufBuilder;

struct Loaded {
  std::vector<uint8_t> bytes;
  std::unique_ptr<gguf::File> file;
  std::unique_ptr<Tokenizer> tok;
};

Loaded load(const GgufBuilder& b) {
  Loaded l;
  l.bytes = b.build();
  auto f = gguf::File::parse(l.bytes.data(), l.bytes.size());
  EXPECT_TRUE(f) << f.message();
  l.file = std::move(*f);
  auto t = Tokenizer::load(*l.file);
  EXPECT_TRUE(t) << t.message();
  if (t) l.tok = std::move(*t);
  return l;
}

// Byte-level BPE: every byte is a token (ids 0..255 in byte order), then merges, then
// specials: "ab", "abc", "Ġa", "Ġab" (Ġ is the byte-level space), "<|end|>" (control) and
// "<added>" (user-defined).
GgufBuilder bpe_vocab() {
  std::vector<std::string> tokens;
  for (int b = 0; b < 256; ++b) tokens.push_back(byte_to_unicode(static_cast<uint8_t>(b)));
  const std::string sp = byte_to_unicode(' ');
  for (const std::string& t :
       std::vector<std::string>{"ab", "abc", sp + "a", sp + "ab", "<|end|>", "<added>"})
    tokens.push_back(t);
  std::vector<int32_t> types(tokens.size(), 1);
  types[260] = 3;
  types[261] = 4;
  GgufBuilder g;
  g.str("tokenizer.ggml.model", "gpt2").str("tokenizer.ggml.pre", "default");
  g.arr_str("tokenizer.ggml.tokens", tokens);
  g.arr("tokenizer.ggml.token_type", ValueType::INT32, types);
  g.arr_str("tokenizer.ggml.merges", {sp + " a", "a b", "ab c", sp + "a b"});
  g.u32("tokenizer.ggml.eos_token_id", 260);
  return g;
}

TEST(Tokenizer, BpeMergesByRank) {
  Loaded l = load(bpe_vocab());
  ASSERT_TRUE(l.tok);
  auto ids = l.tok->encode("abc ab abd", {});
  ASSERT_TRUE(ids) << ids.message();
  // Ranks: "Ġ a" 0, "a b" 1, "ab c" 2, "Ġa b" 3. "abc" -> ab + c -> abc; " ab" -> Ġa + b
  // -> Ġab (Ġ a outranks a b); " abd" -> Ġab, d.
  EXPECT_EQ(*ids, (std::vector<int32_t>{257, 259, 259, 'd'}));
  EXPECT_EQ(l.tok->decode(*ids), "abc ab abd");
  // The lowest rank wins wherever it is: in "bab" the pair "a b" merges, not "b a".
  EXPECT_EQ(*l.tok->encode("bab", {false, false}), (std::vector<int32_t>{'b', 256}));
}

TEST(Tokenizer, SpecialAndAddedTokens) {
  Loaded l = load(bpe_vocab());
  ASSERT_TRUE(l.tok);
  EncodeOptions parse{false, true}, plain{false, false};
  EXPECT_EQ(*l.tok->encode("a<|end|>b", parse), (std::vector<int32_t>{'a', 260, 'b'}));
  // Control tokens as text when not parsing specials; added tokens always match.
  auto as_text = *l.tok->encode("<|end|>", plain);
  EXPECT_GT(as_text.size(), 1u);
  EXPECT_EQ(*l.tok->encode("x<added>", plain), (std::vector<int32_t>{'x', 261}));
  EXPECT_TRUE(l.tok->is_end_of_generation(260));
  EXPECT_EQ(l.tok->token_bytes(260, false), "");
  EXPECT_EQ(l.tok->token_bytes(260, true), "<|end|>");
}

TEST(Tokenizer, InvalidUtf8IsAnError) {
  Loaded l = load(bpe_vocab());
  ASSERT_TRUE(l.tok);
  for (std::string bad : {std::string("a\xC3"), std::string("\x80"), std::string("\xED\xA0\x80"),
                          std::string("\xF4\x90\x80\x80"), std::string("\xC0\xAF")}) {
    auto r = l.tok->encode(bad);
    ASSERT_FALSE(r);
    EXPECT_NE(r.message().find("not valid UTF-8"), std::string::npos) << r.message();
  }
}

// Random valid UTF-8 (all planes, whitespace, specials) round-trips through the byte-level
// vocabulary; random bytes either encode (when valid) or fail cleanly.
TEST(Tokenizer, BpeRandomRoundTrip) {
  Loaded l = load(bpe_vocab());
  ASSERT_TRUE(l.tok);
  std::mt19937 rng(static_cast<uint32_t>(testing::test_seed()));
  for (int iter = 0; iter < 300; ++iter) {
    std::string text;
    const int n = static_cast<int>(rng() % 40);
    for (int i = 0; i < n; ++i) {
      uint32_t cp = rng() % 4 == 0 ? static_cast<uint32_t>(" \n\tab"[rng() % 5]) : rng() % 0x10FFFF;
      if (cp >= 0xD800 && cp <= 0xDFFF) cp = 'x';
      utf8_append(text, cp);
    }
    auto ids = l.tok->encode(text, {false, false});
    ASSERT_TRUE(ids) << ids.message();
    EXPECT_EQ(l.tok->decode(*ids), text);
    std::string bytes(static_cast<size_t>(rng() % 16), '\0');
    for (char& c : bytes) c = static_cast<char>(rng());
    auto r = l.tok->encode(bytes);
    EXPECT_EQ(static_cast<bool>(r), utf8_invalid_offset(bytes) == std::string::npos);
  }
}

// SentencePiece: <unk>, <s>, </s>, byte tokens, then pieces with scores.
GgufBuilder spm_vocab(bool add_bos) {
  std::vector<std::string> tokens{"<unk>", "<s>", "</s>"};
  std::vector<int32_t> types{2, 3, 3};
  std::vector<float> scores{0, 0, 0};
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    tokens.push_back(name);
    types.push_back(6);
    scores.push_back(0);
  }
  const std::string sp = "\xE2\x96\x81";
  const std::vector<std::pair<std::string, float>> pieces{
      {sp, -1}, {"a", -2}, {"b", -3}, {sp + "a", -4}, {"ab", -5}, {sp + "ab", -6}, {"ba", -0.5}};
  for (const auto& [p, s] : pieces) {
    tokens.push_back(p);
    types.push_back(1);
    scores.push_back(s);
  }
  GgufBuilder g;
  g.str("tokenizer.ggml.model", "llama");
  g.arr_str("tokenizer.ggml.tokens", tokens);
  g.arr("tokenizer.ggml.token_type", ValueType::INT32, types);
  g.arr("tokenizer.ggml.scores", ValueType::FLOAT32, scores);
  g.u32("tokenizer.ggml.bos_token_id", 1).u32("tokenizer.ggml.eos_token_id", 2);
  g.boolean("tokenizer.ggml.add_bos_token", add_bos);
  return g;
}

TEST(Tokenizer, SpmScoresByteFallbackAndBos) {
  Loaded l = load(spm_vocab(true));
  ASSERT_TRUE(l.tok);
  const int32_t kSpace = 259, kA = 260, kB = 261, kSpA = 262, kSpAb = 264, kBa = 265;
  // "ab" -> "▁ab": ▁a (score -4) merges before ab (-5), then ▁a+b -> ▁ab.
  EXPECT_EQ(*l.tok->encode("ab"), (std::vector<int32_t>{1, kSpAb}));
  // "bab": "ba" has the best score and merges first; "▁" stays alone.
  EXPECT_EQ(*l.tok->encode("bab", {false, true}), (std::vector<int32_t>{kSpace, kBa, kB}));
  // é is not a piece: its two UTF-8 bytes as byte tokens.
  EXPECT_EQ(*l.tok->encode("aé", {false, true}), (std::vector<int32_t>{kSpA, 3 + 0xC3, 3 + 0xA9}));
  // The leading space the encoder added is dropped when decoding a text's start.
  EXPECT_EQ(l.tok->decode(*l.tok->encode("a b é")), "a b é");
  (void)kA;
}

TEST(Tokenizer, StreamingNeverSplitsACharacter) {
  Loaded l = load(spm_vocab(false));
  ASSERT_TRUE(l.tok);
  auto ids = l.tok->encode("a😀b", {false, true});
  ASSERT_TRUE(ids);
  Detokenizer d(*l.tok, /*at_text_start=*/true);
  std::string out;
  std::vector<std::string> pieces;
  for (int32_t id : *ids) pieces.push_back(d.push(id));
  for (const std::string& p : pieces) {
    EXPECT_EQ(utf8_invalid_offset(p), std::string::npos);
    out += p;
  }
  EXPECT_EQ(out + d.flush(), "a😀b");
}

TEST(Tokenizer, BrokenVocabularies) {
  {
    GgufBuilder g = bpe_vocab();
    g.u32("tokenizer.ggml.bos_token_id", 100000);
    auto bytes = g.build();
    auto f = gguf::File::parse(bytes.data(), bytes.size());
    ASSERT_TRUE(f);
    auto t = Tokenizer::load(**f);
    ASSERT_FALSE(t);
    EXPECT_NE(t.message().find("outside the vocabulary"), std::string::npos);
  }
  {
    GgufBuilder g;
    g.str("tokenizer.ggml.model", "gpt2").arr_str("tokenizer.ggml.tokens", {"a", "b"});
    auto bytes = g.build();
    auto f = gguf::File::parse(bytes.data(), bytes.size());
    ASSERT_TRUE(f);
    auto t = Tokenizer::load(**f);
    ASSERT_FALSE(t);
    EXPECT_NE(t.message().find("merges is missing"), std::string::npos);
  }
}

TEST(Utf8, CompletePrefix) {
  EXPECT_EQ(utf8_complete_prefix("abc"), 3u);
  EXPECT_EQ(utf8_complete_prefix("a\xF0\x9F\x98"), 1u);  // 😀 missing its last byte
  EXPECT_EQ(utf8_complete_prefix("a\xF0\x9F\x98\x80"), 5u);
  EXPECT_EQ(utf8_complete_prefix("\xC3"), 0u);
  EXPECT_EQ(utf8_complete_prefix("\x80\x80\x80\x80"), 4u);  // stray bytes never complete
}

}  // namespace
}  // namespace kestrel::tok
