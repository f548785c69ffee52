// Pre-tokenization of byte-level BPE vocabularies: the text is cut into words by the model's
// regular expressions before merges run, exactly as the Hugging Face pre-tokenizer named by
// tokenizer.ggml.pre does. Expressions are applied one after another; each one splits every
// current piece into its matches and the gaps between them ("isolated" splitting).
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"

namespace kestrel::tok {

struct PreTokenizerSpec {
  std::vector<std::string> regexes;
  bool ignore_merges = false;  // a word that is itself a token skips the merges (Llama 3)
  bool add_bos = false;        // BOS when the GGUF does not say (Llama 3 always wants it)
  bool nfc = false;            // Unicode NFC before splitting (Qwen2's normalizer)
};

// Unicode normalization form C of valid UTF-8 text.
std::string nfc_normalize(std::string_view text);

// The spec for a tokenizer.ggml.pre name; an error lists the supported names.
Expected<PreTokenizerSpec> pre_tokenizer_spec(const std::string& pre);

class PreTokenizer {
 public:
  static Expected<PreTokenizer> create(const std::vector<std::string>& regexes);
  PreTokenizer(PreTokenizer&&) noexcept;
  PreTokenizer& operator=(PreTokenizer&&) noexcept;
  ~PreTokenizer();

  // `text` must be valid UTF-8. Pieces are views into `text`, in order, covering all of it.
  std::vector<std::string_view> split(std::string_view text) const;

 private:
  PreTokenizer();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace kestrel::tok
