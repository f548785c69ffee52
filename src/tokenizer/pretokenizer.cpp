#include "tokenizer/pretokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <cstdlib>

namespace kestrel::tok {

namespace {

// The expressions below are the ones in the models' tokenizer.json files; PCRE2 runs them
// unchanged (Unicode properties, case-insensitive groups and look-ahead included).
const char* const kGpt2 =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
const char* const kLlama3 =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
const char* const kQwen2 =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

}  // namespace

Expected<PreTokenizerSpec> pre_tokenizer_spec(const std::string& pre) {
  PreTokenizerSpec s;
  if (pre == "default" || pre == "gpt-2" || pre == "gpt2" || pre == "phi-2" || pre == "mpt" ||
      pre == "olmo" || pre == "jais") {
    s.regexes = {kGpt2};
  } else if (pre == "llama3" || pre == "llama-v3" || pre == "llama-bpe" || pre == "dbrx" ||
             pre == "smaug-bpe" || pre == "falcon3" || pre == "pixtral") {
    s.regexes = {kLlama3};
    s.ignore_merges = pre == "llama3" || pre == "llama-v3" || pre == "llama-bpe";
    s.add_bos = s.ignore_merges || pre == "falcon3" || pre == "pixtral";
  } else if (pre == "qwen2" || pre == "deepseek-r1-qwen" || pre == "stablelm2" || pre == "megrez") {
    s.regexes = {kQwen2};
    s.nfc = pre == "qwen2" || pre == "deepseek-r1-qwen";
  } else if (pre == "smollm" || pre == "starcoder" || pre == "refact" || pre == "command-r" ||
             pre == "codeshell" || pre == "exaone" || pre == "minerva") {
    // Every digit on its own, then GPT-2's expression.
    s.regexes = {R"(\p{N})", kGpt2};
  } else if (pre == "falcon") {
    s.regexes = {R"([\p{P}\$\+<=>\^~\|`]+)", kGpt2, "[0-9][0-9][0-9]"};
  } else if (pre == "deepseek-coder") {
    s.regexes = {"[\r\n]", R"(\s?\p{L}+)", R"(\s?\p{P}+)", "[一-龥ࠀ-一가-퟿]+", R"(\p{N})"};
  } else {
    return error(
        "tokenizer.ggml.pre '%s' is not supported (supported: default/gpt-2, "
        "llama3/llama-bpe, qwen2, smollm/starcoder/refact/command-r, falcon, "
        "deepseek-coder)",
        pre.c_str());
  }
  return s;
}

std::string nfc_normalize(std::string_view text) {
  // utf8proc allocates the result; on failure (not expected for valid UTF-8) keep the text.
  utf8proc_uint8_t* out = nullptr;
  const utf8proc_ssize_t n =
      utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(text.data()),
                   static_cast<utf8proc_ssize_t>(text.size()), &out,
                   static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
  if (n < 0) return std::string(text);
  std::string result(reinterpret_cast<const char*>(out), static_cast<size_t>(n));
  std::free(out);
  return result;
}

struct PreTokenizer::Impl {
  std::vector<pcre2_code*> codes;
  ~Impl() {
    for (pcre2_code* c : codes) pcre2_code_free(c);
  }
};

PreTokenizer::PreTokenizer() : impl_(std::make_unique<Impl>()) {}
PreTokenizer::PreTokenizer(PreTokenizer&&) noexcept = default;
PreTokenizer& PreTokenizer::operator=(PreTokenizer&&) noexcept = default;
PreTokenizer::~PreTokenizer() = default;

Expected<PreTokenizer> PreTokenizer::create(const std::vector<std::string>& regexes) {
  PreTokenizer p;
  for (const std::string& re : regexes) {
    int err = 0;
    PCRE2_SIZE err_offset = 0;
    pcre2_code* code =
        pcre2_compile(reinterpret_cast<PCRE2_SPTR>(re.data()), re.size(),
                      PCRE2_UTF | PCRE2_UCP | PCRE2_NO_UTF_CHECK, &err, &err_offset, nullptr);
    if (!code) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      return error("pre-tokenizer expression does not compile at offset %zu: %s",
                   static_cast<size_t>(err_offset), reinterpret_cast<const char*>(msg));
    }
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // optional: falls back to the interpreter
    p.impl_->codes.push_back(code);
  }
  return p;
}

std::vector<std::string_view> PreTokenizer::split(std::string_view text) const {
  if (text.empty()) return {};
  std::vector<std::string_view> pieces{text};
  // Match data per call keeps split() safe to call from several threads.
  std::unique_ptr<pcre2_match_data, void (*)(pcre2_match_data*)> match(
      pcre2_match_data_create(4, nullptr), pcre2_match_data_free);
  if (!match) return pieces;
  for (pcre2_code* code : impl_->codes) {
    std::vector<std::string_view> next;
    for (std::string_view piece : pieces) {
      const auto* subject = reinterpret_cast<PCRE2_SPTR>(piece.data());
      size_t pos = 0, gap_start = 0;
      while (pos < piece.size()) {
        const int rc =
            pcre2_match(code, subject, piece.size(), pos, PCRE2_NO_UTF_CHECK, match.get(), nullptr);
        if (rc < 0) break;  // no further match (or a resource limit): the rest is one gap
        const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(match.get());
        const size_t b = ov[0], e = ov[1];
        if (e == b) {  // an empty match splits nothing; step over one character
          pos = b + 1;
          while (pos < piece.size() && (static_cast<uint8_t>(piece[pos]) & 0xC0) == 0x80) ++pos;
          continue;
        }
        if (b > gap_start) next.push_back(piece.substr(gap_start, b - gap_start));
        next.push_back(piece.substr(b, e - b));
        pos = gap_start = e;
      }
      if (gap_start < piece.size()) next.push_back(piece.substr(gap_start));
    }
    pieces = std::move(next);
  }
  return pieces;
}

}  // namespace kestrel::tok
