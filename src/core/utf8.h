// UTF-8 helpers: decoding code points, validating untrusted text, and
// finding where a byte stream can be cut without splitting a character (streamed output).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace kestrel {

// Length of the UTF-8 sequence that starts with byte `b` (1 for bytes that cannot start one).
inline size_t utf8_seq_len(uint8_t b) {
  if (b < 0x80) return 1;
  if ((b & 0xE0) == 0xC0) return 2;
  if ((b & 0xF0) == 0xE0) return 3;
  if ((b & 0xF8) == 0xF0) return 4;
  return 1;
}

// Decodes the code point at s[*pos] and advances *pos. Returns -1 (advancing one byte) on a
// malformed, overlong or surrogate sequence.
int32_t utf8_next(std::string_view s, size_t* pos);

// Offset of the first byte that is not part of valid UTF-8, or npos when the text is valid.
size_t utf8_invalid_offset(std::string_view s);

void utf8_append(std::string& out, uint32_t cp);

// Splits `s` into its characters (each one UTF-8 sequence; a malformed byte is its own piece).
template <typename F>
void for_each_char(std::string_view s, F&& f) {
  size_t pos = 0;
  while (pos < s.size()) {
    size_t start = pos;
    utf8_next(s, &pos);
    f(s.substr(start, pos - start));
  }
}

// Length of the longest prefix of `s` that does not end inside an incomplete UTF-8 sequence
// (a complete but malformed sequence counts as complete: it will never become valid).
size_t utf8_complete_prefix(std::string_view s);

}  // namespace kestrel
