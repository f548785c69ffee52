// The Jinja lexer: template text and tags into tokens, applying whitespace control ("-", "+")
// and jinja2's trim_blocks / lstrip_blocks exactly as Hugging Face's environment sets them.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "template/jinja_value.h"

namespace kestrel::jinja {

enum class Tok { Text, VarBegin, VarEnd, BlockBegin, BlockEnd, Name, String, Int, Float, Op, Eof };

struct Token {
  Tok type = Tok::Eof;
  std::string text;  // Text data, a name, a decoded string literal or an operator
  int64_t int_value = 0;
  double float_value = 0.0;
  Pos pos;
};

struct LexOptions {
  bool trim_blocks = true;
  bool lstrip_blocks = true;
};

// Throws Error on malformed input (caught by the caller at the API boundary).
std::vector<Token> tokenize(std::string_view source, const LexOptions& options);

}  // namespace kestrel::jinja
