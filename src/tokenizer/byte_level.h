// GPT-2's byte-level alphabet: every byte maps to one printable code point, so byte strings
// can be BPE-merged as text. Printable Latin-1 bytes map to themselves; the other 68 bytes
// map to U+0100 upward in byte order.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace kestrel::tok {

// UTF-8 of the code point byte `b` maps to.
const std::string& byte_to_unicode(uint8_t b);
// Appends `text` in the byte-level alphabet to `out`.
void bytes_to_byte_level(std::string_view text, std::string& out);
// Back to bytes; characters outside the alphabet keep their own UTF-8 bytes.
void byte_level_to_bytes(std::string_view text, std::string& out);

}  // namespace kestrel::tok
