#include "tokenizer/byte_level.h"

#include <array>

#include "core/utf8.h"

namespace kestrel::tok {

namespace {

bool maps_to_itself(int b) {
  return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
}

struct Tables {
  std::array<std::string, 256> to_unicode;
  std::array<int16_t, 512> to_byte;  // code point -> byte, -1 if not in the alphabet
  Tables() {
    to_byte.fill(-1);
    int next = 256;
    for (int b = 0; b < 256; ++b) {
      const int cp = maps_to_itself(b) ? b : next++;
      utf8_append(to_unicode[b], static_cast<uint32_t>(cp));
      to_byte[cp] = static_cast<int16_t>(b);
    }
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}

}  // namespace

const std::string& byte_to_unicode(uint8_t b) {
  return tables().to_unicode[b];
}

void bytes_to_byte_level(std::string_view text, std::string& out) {
  const Tables& t = tables();
  for (char c : text) out += t.to_unicode[static_cast<uint8_t>(c)];
}

void byte_level_to_bytes(std::string_view text, std::string& out) {
  const Tables& t = tables();
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t start = pos;
    const int32_t cp = utf8_next(text, &pos);
    if (cp >= 0 && cp < 512 && t.to_byte[cp] >= 0)
      out += static_cast<char>(t.to_byte[cp]);
    else
      out.append(text.substr(start, pos - start));
  }
}

}  // namespace kestrel::tok
