// Text <-> token ids for the vocabulary in a GGUF file: SentencePiece-style ("llama": scores,
// byte fallback) and byte-level BPE ("gpt2": merges after the model's pre-tokenizer), with
// special and added tokens, BOS/EOS as the model asks, and decoding that can be streamed
// without cutting a multi-byte character in two.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"
#include "format/gguf.h"
#include "tokenizer/pretokenizer.h"
#include "tokenizer/vocab.h"

namespace kestrel::tok {

struct EncodeOptions {
  bool add_special = true;    // BOS/EOS where the vocabulary asks for them
  bool parse_special = true;  // "<|im_start|>" in the text becomes its control token
};

class Tokenizer {
 public:
  static Expected<std::unique_ptr<Tokenizer>> load(const gguf::File& file);

  // Errors: the text is not valid UTF-8 (the message gives the byte offset).
  Expected<std::vector<int32_t>> encode(std::string_view text,
                                        const EncodeOptions& opts = {}) const;

  // The bytes token `id` stands for. Control tokens are empty unless `render_special`.
  std::string token_bytes(int32_t id, bool render_special = false) const;
  // Whole text of a sequence that starts a text (SentencePiece's leading space is removed).
  std::string decode(const std::vector<int32_t>& ids, bool render_special = false) const;

  const Vocab& vocab() const { return vocab_; }
  int32_t n_vocab() const { return vocab_.size(); }
  const std::string& token_text(int32_t id) const { return vocab_.text[id]; }
  bool is_end_of_generation(int32_t id) const;
  // True when decoding a text's first token drops one leading space (SentencePiece).
  bool strips_leading_space() const {
    return vocab_.kind == VocabKind::Spm && vocab_.add_space_prefix;
  }

 private:
  Tokenizer() = default;
  struct Fragment {
    std::string_view text;  // raw text, or empty when `token` is set
    int32_t token = kNoToken;
  };
  std::vector<Fragment> partition_special(std::string_view text, bool parse_special) const;
  void encode_spm(std::string_view text, std::vector<int32_t>& out) const;
  void encode_bpe_word(std::string_view word, std::vector<int32_t>& out) const;

  Vocab vocab_;
  std::unique_ptr<PreTokenizer> pre_;  // BPE only
  bool ignore_merges_ = false;
  bool nfc_ = false;
  // Special and added tokens that are matched in raw text, by first byte, longest first.
  std::vector<int32_t> special_by_byte_[256];
};

// Streams text out of generated ids: each push returns only complete UTF-8 characters and
// keeps an unfinished one for the next call.
class Detokenizer {
 public:
  // `at_text_start`: the first token begins the text (drop SentencePiece's leading space).
  Detokenizer(const Tokenizer& tok, bool at_text_start, bool render_special = false)
      : tok_(tok),
        strip_space_(at_text_start && tok.strips_leading_space()),
        render_special_(render_special) {}
  std::string push(int32_t id);
  std::string flush();  // whatever is left, even if incomplete

 private:
  const Tokenizer& tok_;
  bool strip_space_;
  bool render_special_;
  std::string pending_;
};

}  // namespace kestrel::tok
