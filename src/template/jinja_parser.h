// The Jinja parser: tokens into a syntax tree, with jinja2's grammar and operator precedence.
#pragma once

#include <string_view>
#include <vector>

#include "template/jinja_ast.h"
#include "template/jinja_lexer.h"

namespace kestrel::jinja {

// Throws Error on a syntax error (caught by the caller at the API boundary).
Body parse_tokens(std::vector<Token> tokens);

// Known filters and tests: jinja2 rejects unknown ones when the template is compiled.
bool has_filter(std::string_view name);
bool has_test(std::string_view name);

}  // namespace kestrel::jinja
