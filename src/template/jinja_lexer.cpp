#include "template/jinja_lexer.h"

#include <algorithm>
#include <cstring>

namespace kestrel::jinja {
namespace {

bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}
bool is_digit(char c) {
  return c >= '0' && c <= '9';
}
bool is_name_start(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}
bool is_name_char(char c) {
  return is_name_start(c) || is_digit(c);
}

// jinja2 splits the source on \r\n, \r and \n, joins with \n and drops one trailing newline
// (keep_trailing_newline=False).
std::string normalize_newlines(std::string_view src) {
  std::string out;
  out.reserve(src.size());
  for (size_t i = 0; i < src.size(); ++i) {
    if (src[i] == '\r') {
      out += '\n';
      if (i + 1 < src.size() && src[i + 1] == '\n') ++i;
    } else {
      out += src[i];
    }
  }
  if (!out.empty() && out.back() == '\n') out.pop_back();
  return out;
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

class Lexer {
 public:
  Lexer(std::string_view source, const LexOptions& options)
      : src_(normalize_newlines(source)), opt_(options) {
    line_starts_.push_back(0);
    for (size_t i = 0; i < src_.size(); ++i)
      if (src_[i] == '\n') line_starts_.push_back(i + 1);
  }

  std::vector<Token> run() {
    while (p_ < src_.size()) {
      size_t start = find_tag(p_);
      if (start == std::string::npos) {
        emit_text(src_.substr(p_), p_);
        p_ = src_.size();
        break;
      }
      char kind = src_[start + 1];
      char mod = modifier_at(start + 2);
      size_t raw_end = kind == '%' ? raw_begin_end(start) : std::string::npos;
      std::string text = src_.substr(p_, start - p_);
      emit_text(strip_left(std::move(text), mod, kind != '{'), p_);
      if (kind == '#') {
        lex_comment(start, mod);
      } else if (raw_end != std::string::npos) {
        lex_raw(start, raw_end);
      } else {
        lex_tag(start, kind, mod);
      }
    }
    tokens_.push_back(Token{Tok::Eof, "", 0, 0.0, pos_at(src_.size())});
    return std::move(tokens_);
  }

 private:
  Pos pos_at(size_t offset) const {
    auto it = std::upper_bound(line_starts_.begin(), line_starts_.end(), offset);
    size_t line = static_cast<size_t>(it - line_starts_.begin());
    return Pos{static_cast<int>(line), static_cast<int>(offset - line_starts_[line - 1] + 1)};
  }

  char modifier_at(size_t i) const {
    return i < src_.size() && (src_[i] == '-' || src_[i] == '+') ? src_[i] : 0;
  }

  size_t find_tag(size_t from) const {
    for (size_t i = from; i + 1 < src_.size(); ++i)
      if (src_[i] == '{' && (src_[i + 1] == '{' || src_[i + 1] == '%' || src_[i + 1] == '#'))
        return i;
    return std::string::npos;
  }

  void emit_text(std::string text, size_t offset) {
    if (!text.empty()) tokens_.push_back(Token{Tok::Text, std::move(text), 0, 0.0, pos_at(offset)});
  }

  // "-" strips all whitespace before a tag; lstrip_blocks strips spaces and tabs between the
  // start of a line and a block or comment tag (not a "{{" and not with "+").
  std::string strip_left(std::string text, char mod, bool block_or_comment) const {
    if (mod == '-') {
      size_t n = text.size();
      while (n > 0 && is_space(text[n - 1])) --n;
      text.resize(n);
    } else if (mod != '+' && opt_.lstrip_blocks && block_or_comment) {
      size_t nl = text.rfind('\n');
      size_t l_pos = nl == std::string::npos ? 0 : nl + 1;
      if ((l_pos > 0 || line_starting_) && l_pos < text.size() &&
          std::all_of(text.begin() + l_pos, text.end(), is_space))
        text.resize(l_pos);
    }
    return text;
  }

  // After a closing tag: "-" eats all following whitespace, trim_blocks one newline.
  void after_close(size_t end, char mod, bool trims) {
    p_ = end;
    if (mod == '-') {
      while (p_ < src_.size() && is_space(src_[p_])) ++p_;
    } else if (mod != '+' && trims && opt_.trim_blocks && p_ < src_.size() && src_[p_] == '\n') {
      ++p_;
    }
    line_starting_ = p_ > 0 && src_[p_ - 1] == '\n';
  }

  void lex_comment(size_t start, char mod) {
    size_t end = src_.find("#}", start + 2 + (mod ? 1 : 0));
    if (end == std::string::npos) fail(pos_at(start), "missing end of comment tag '#}'");
    char close_mod = modifier_at(end - 1);
    after_close(end + 2, close_mod, true);
  }

  // Matches "{%[-+]? raw [-]?%}" at `start`; returns the offset just past it, or npos.
  size_t raw_begin_end(size_t start) const {
    size_t i = start + 2;
    if (modifier_at(i)) ++i;
    while (i < src_.size() && is_space(src_[i])) ++i;
    if (src_.compare(i, 3, "raw") != 0 || (i + 3 < src_.size() && is_name_char(src_[i + 3])))
      return std::string::npos;
    i += 3;
    while (i < src_.size() && is_space(src_[i])) ++i;
    if (src_.compare(i, 3, "-%}") == 0) return i + 3;
    if (src_.compare(i, 2, "%}") == 0) return i + 2;
    return std::string::npos;
  }

  void lex_raw(size_t start, size_t begin_end) {
    after_close(begin_end, src_[begin_end - 3] == '-' ? '-' : '+', false);
    for (size_t q = src_.find("{%", p_); q != std::string::npos; q = src_.find("{%", q + 2)) {
      size_t i = q + 2;
      char mod = modifier_at(i);
      if (mod) ++i;
      while (i < src_.size() && is_space(src_[i])) ++i;
      if (src_.compare(i, 6, "endraw") != 0) continue;
      i += 6;
      while (i < src_.size() && is_space(src_[i])) ++i;
      char close_mod = modifier_at(i);
      if (src_.compare(i + (close_mod ? 1 : 0), 2, "%}") != 0) continue;
      emit_text(strip_left(src_.substr(p_, q - p_), mod, true), p_);
      after_close(i + (close_mod ? 3 : 2), close_mod, true);
      return;
    }
    fail(pos_at(start), "missing '{% endraw %}' for this '{% raw %}'");
  }

  void lex_tag(size_t start, char kind, char mod) {
    tokens_.push_back(
        Token{kind == '{' ? Tok::VarBegin : Tok::BlockBegin, "", 0, 0.0, pos_at(start)});
    size_t i = start + 2 + (mod ? 1 : 0);
    int depth = 0;
    const char* close = kind == '{' ? "}}" : "%}";
    for (;;) {
      while (i < src_.size() && is_space(src_[i])) ++i;
      if (i >= src_.size())
        fail(pos_at(start),
             std::string("unexpected end of template: this tag has no closing '") + close + "'");
      if (depth == 0) {
        char close_mod = (src_[i] == '-' || (src_[i] == '+' && kind == '%')) ? src_[i] : 0;
        if (src_.compare(i + (close_mod ? 1 : 0), 2, close) == 0) {
          tokens_.push_back(
              Token{kind == '{' ? Tok::VarEnd : Tok::BlockEnd, "", 0, 0.0, pos_at(i)});
          after_close(i + (close_mod ? 3 : 2), close_mod, kind == '%');
          return;
        }
      }
      i = lex_token(i, depth);
    }
  }

  size_t lex_token(size_t i, int& depth) {
    Pos pos = pos_at(i);
    char c = src_[i];
    if (is_digit(c)) return lex_number(i, pos);
    if (is_name_start(c)) {
      size_t j = i;
      while (j < src_.size() && is_name_char(src_[j])) ++j;
      tokens_.push_back(Token{Tok::Name, src_.substr(i, j - i), 0, 0.0, pos});
      return j;
    }
    if (c == '"' || c == '\'') return lex_string(i, pos);
    static const char* const two[] = {"//", "**", "==", "!=", ">=", "<="};
    for (const char* op : two) {
      if (src_.compare(i, 2, op) == 0) {
        tokens_.push_back(Token{Tok::Op, op, 0, 0.0, pos});
        return i + 2;
      }
    }
    if (std::strchr("+-/*%~[](){}><=.:|,;", c) == nullptr)
      fail(pos, std::string("unexpected character '") + c + "' in tag");
    if (c == '(' || c == '[' || c == '{') ++depth;
    if ((c == ')' || c == ']' || c == '}') && depth > 0) --depth;
    tokens_.push_back(Token{Tok::Op, std::string(1, c), 0, 0.0, pos});
    return i + 1;
  }

  size_t scan_digits(size_t j) const {
    while (j < src_.size() &&
           (is_digit(src_[j]) || (src_[j] == '_' && j + 1 < src_.size() && is_digit(src_[j + 1]))))
      ++j;
    return j;
  }

  size_t lex_number(size_t i, Pos pos) {
    size_t j = scan_digits(i);
    bool after_dot =
        !tokens_.empty() && tokens_.back().type == Tok::Op && tokens_.back().text == ".";
    bool is_float = false;
    if (!after_dot && j + 1 < src_.size() && src_[j] == '.' && is_digit(src_[j + 1])) {
      j = scan_digits(j + 1);
      is_float = true;
    }
    if (!after_dot && j < src_.size() && (src_[j] == 'e' || src_[j] == 'E')) {
      size_t k = j + 1;
      if (k < src_.size() && (src_[k] == '+' || src_[k] == '-')) ++k;
      if (k < src_.size() && is_digit(src_[k])) {
        j = scan_digits(k);
        is_float = true;
      }
    }
    std::string text = src_.substr(i, j - i);
    text.erase(std::remove(text.begin(), text.end(), '_'), text.end());
    Token t{is_float ? Tok::Float : Tok::Int, text, 0, 0.0, pos};
    try {
      if (is_float)
        t.float_value = std::stod(text);
      else
        t.int_value = std::stoll(text);
    } catch (...) {
      fail(pos, "number literal out of range: " + text);
    }
    tokens_.push_back(std::move(t));
    return j;
  }

  // Python's unicode-escape decoding of a string literal.
  size_t lex_string(size_t i, Pos pos) {
    char quote = src_[i];
    std::string out;
    size_t j = i + 1;
    for (;; ++j) {
      if (j >= src_.size()) fail(pos, "unterminated string literal");
      char c = src_[j];
      if (c == quote) break;
      if (c != '\\' || j + 1 >= src_.size()) {
        out += c;
        continue;
      }
      char e = src_[++j];
      switch (e) {
        case 'n':
          out += '\n';
          break;
        case 't':
          out += '\t';
          break;
        case 'r':
          out += '\r';
          break;
        case 'a':
          out += '\a';
          break;
        case 'b':
          out += '\b';
          break;
        case 'f':
          out += '\f';
          break;
        case 'v':
          out += '\v';
          break;
        case '\\':
          out += '\\';
          break;
        case '\'':
          out += '\'';
          break;
        case '"':
          out += '"';
          break;
        case '\n':
          break;
        case 'x':
        case 'u':
        case 'U':
          j = decode_hex_escape(j, e == 'x' ? 2 : e == 'u' ? 4 : 8, out, pos);
          break;
        default:
          if (e >= '0' && e <= '7') {
            uint32_t cp = 0;
            int n = 0;
            while (n < 3 && j < src_.size() && src_[j] >= '0' && src_[j] <= '7')
              cp = cp * 8 + (src_[j++] - '0'), ++n;
            --j;
            utf8_append(out, cp);
          } else {
            out += '\\';
            out += e;
          }
      }
    }
    tokens_.push_back(Token{Tok::String, std::move(out), 0, 0.0, pos});
    return j + 1;
  }

  size_t decode_hex_escape(size_t j, int digits, std::string& out, Pos pos) {
    uint32_t cp = 0;
    for (int k = 1; k <= digits; ++k) {
      int h = j + k < src_.size() ? hex_value(src_[j + k]) : -1;
      if (h < 0) fail(pos, "truncated \\" + std::string(1, src_[j]) + " escape in string literal");
      cp = cp * 16 + static_cast<uint32_t>(h);
    }
    if (cp > 0x10FFFF) fail(pos, "illegal Unicode character in string literal");
    utf8_append(out, cp);
    return j + digits;
  }

  std::string src_;
  LexOptions opt_;
  size_t p_ = 0;
  bool line_starting_ = true;
  std::vector<size_t> line_starts_;
  std::vector<Token> tokens_;
};

}  // namespace

std::vector<Token> tokenize(std::string_view source, const LexOptions& options) {
  return Lexer(source, options).run();
}

}  // namespace kestrel::jinja
