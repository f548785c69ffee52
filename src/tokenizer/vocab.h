// The vocabulary a GGUF file carries (tokenizer.ggml.*), validated: token texts, scores and
// types, BPE merges, special token ids and the flags that steer encoding.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/status.h"
#include "format/gguf.h"

namespace kestrel::tok {

enum class VocabKind { Spm, Bpe };  // tokenizer.ggml.model "llama" / "gpt2"

// tokenizer.ggml.token_type values (SentencePiece's piece types).
enum class TokenType : int32_t {
  Undefined = 0,
  Normal = 1,
  Unknown = 2,
  Control = 3,
  UserDefined = 4,
  Unused = 5,
  Byte = 6,
};

constexpr int32_t kNoToken = -1;

struct Vocab {
  VocabKind kind = VocabKind::Bpe;
  std::string model_name;  // tokenizer.ggml.model
  std::string pre;         // tokenizer.ggml.pre ("default" when absent)
  std::vector<std::string> text;
  std::vector<float> score;
  std::vector<TokenType> type;
  std::unordered_map<std::string, int32_t> id_of;
  // BPE merges: "left right" -> rank (lower merges first).
  std::unordered_map<std::string, int32_t> merge_rank;

  int32_t bos = kNoToken, eos = kNoToken, eot = kNoToken, eom = kNoToken;
  int32_t unk = kNoToken, pad = kNoToken;
  bool add_bos = false, add_eos = false;
  bool add_space_prefix = false;           // SPM: a leading space before the text
  std::vector<int32_t> end_of_generation;  // eos, eot, eom and the known end-of-turn tokens
  int32_t byte_token[256];                 // SPM byte fallback <0xXX>, kNoToken if missing

  int32_t size() const { return static_cast<int32_t>(text.size()); }
  int32_t find(const std::string& s) const {
    auto it = id_of.find(s);
    return it == id_of.end() ? kNoToken : it->second;
  }
};

// Reads and validates the vocabulary. Errors name the key that is missing or broken.
Expected<Vocab> load_vocab(const gguf::File& file);

}  // namespace kestrel::tok
