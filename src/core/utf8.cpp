#include "core/utf8.h"

namespace kestrel {

int32_t utf8_next(std::string_view s, size_t* pos) {
  const auto byte = [&](size_t i) { return static_cast<uint8_t>(s[i]); };
  const size_t p = *pos;
  const uint8_t b0 = byte(p);
  const size_t n = utf8_seq_len(b0);
  if (n == 1) {
    *pos = p + 1;
    return b0 < 0x80 ? b0 : -1;
  }
  if (p + n > s.size()) {
    *pos = p + 1;
    return -1;
  }
  uint32_t cp = b0 & (0x7F >> n);
  for (size_t i = 1; i < n; ++i) {
    const uint8_t b = byte(p + i);
    if ((b & 0xC0) != 0x80) {
      *pos = p + 1;
      return -1;
    }
    cp = (cp << 6) | (b & 0x3F);
  }
  static const uint32_t kMin[5] = {0, 0, 0x80, 0x800, 0x10000};
  if (cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
    *pos = p + 1;
    return -1;
  }
  *pos = p + n;
  return static_cast<int32_t>(cp);
}

size_t utf8_invalid_offset(std::string_view s) {
  size_t pos = 0;
  while (pos < s.size()) {
    const size_t start = pos;
    if (utf8_next(s, &pos) < 0) return start;
  }
  return std::string_view::npos;
}

void utf8_append(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

size_t utf8_complete_prefix(std::string_view s) {
  // Only the last (up to) 3 bytes can belong to an unfinished sequence.
  const size_t n = s.size();
  for (size_t back = 1; back <= 3 && back <= n; ++back) {
    const uint8_t b = static_cast<uint8_t>(s[n - back]);
    if ((b & 0xC0) == 0x80) continue;  // continuation byte: keep looking for the lead
    const size_t need = utf8_seq_len(b);
    return need > back ? n - back : n;
  }
  return n;
}

}  // namespace kestrel
