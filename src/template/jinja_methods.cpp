// Python str / dict / list methods, str.format, printf-style "%", and the globals that
// Hugging Face's environment provides (range, namespace, dict, raise_exception, strftime_now).
#include <algorithm>
#include <cstdio>
#include <ctime>

#include "template/jinja_eval.h"

namespace kestrel::jinja {
namespace {

bool py_isspace(uint32_t c) {
  return c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F) || c == 0x85 ||
         c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
         c == 0x202F || c == 0x205F || c == 0x3000;
}

std::vector<uint32_t> code_points(std::string_view s) {
  std::vector<uint32_t> out;
  for (size_t i = 0; i < s.size();) out.push_back(utf8_next(s, i));
  return out;
}

bool is_upper(char c) {
  return c >= 'A' && c <= 'Z';
}
bool is_lower(char c) {
  return c >= 'a' && c <= 'z';
}
bool is_alpha(char c) {
  return is_upper(c) || is_lower(c);
}
bool is_digit(char c) {
  return c >= '0' && c <= '9';
}

// Simple case mapping for ASCII, Latin-1, Latin Extended-A, Greek and Cyrillic (the scripts
// seen in chat templates); other code points are left as they are.
uint32_t case_map(uint32_t c, bool upper) {
  if (upper) {
    if ((c >= 'a' && c <= 'z') || (c >= 0xE0 && c <= 0xFE && c != 0xF7) ||
        (c >= 0x3B1 && c <= 0x3C9 && c != 0x3C2) || (c >= 0x430 && c <= 0x44F))
      return c - 32;
    if (c >= 0x450 && c <= 0x45F) return c - 80;
    if (c == 0x3C2) return 0x3A3;
    if (c == 0xFF) return 0x178;
  } else {
    if ((c >= 'A' && c <= 'Z') || (c >= 0xC0 && c <= 0xDE && c != 0xD7) ||
        (c >= 0x391 && c <= 0x3A9 && c != 0x3A2) || (c >= 0x410 && c <= 0x42F))
      return c + 32;
    if (c >= 0x400 && c <= 0x40F) return c + 80;
    if (c == 0x178) return 0xFF;
  }
  bool in_a = (c >= 0x100 && c <= 0x137) || (c >= 0x14A && c <= 0x177);
  bool in_b = (c >= 0x139 && c <= 0x148) || (c >= 0x179 && c <= 0x17E);
  if (in_a || in_b) {
    bool is_up = (c % 2 == 0) == in_a;
    if (upper && !is_up) return c - 1;
    if (!upper && is_up) return c + 1;
  }
  return c;
}

bool is_cased(uint32_t c) {
  return case_map(c, true) != c || case_map(c, false) != c;
}

// Maps each code point: `upper_at(index, cp, previous_was_cased)` says which case it takes.
template <typename Rule>
std::string map_case(const std::string& s, Rule upper_at) {
  std::string out;
  bool prev_cased = false;
  size_t index = 0;
  for (size_t i = 0; i < s.size(); ++index) {
    size_t start = i;
    uint32_t c = utf8_next(s, i);
    bool upper = upper_at(index, prev_cased);
    uint32_t m = case_map(c, upper);
    if (upper && c == 0xDF)  // ß
      out += "SS";
    else if (m == c)
      out.append(s, start, i - start);
    else
      utf8_append(out, m);
    prev_cased = is_cased(c);
  }
  return out;
}

char to_upper(char c) {
  return is_lower(c) ? static_cast<char>(c - 32) : c;
}
char to_lower(char c) {
  return is_upper(c) ? static_cast<char>(c + 32) : c;
}

std::string py_title(const std::string& s) {
  return map_case(s, [](size_t, bool prev_cased) { return !prev_cased; });
}

std::string py_capitalize(const std::string& s) {
  return map_case(s, [](size_t index, bool) { return index == 0; });
}

std::vector<Value> py_split(const std::string& s, const Value* sep, int64_t maxsplit, Pos pos) {
  std::vector<Value> parts;
  if (!sep || sep->is_none()) {
    std::vector<uint32_t> cps = code_points(s);
    std::vector<size_t> starts = utf8_starts(s);
    size_t k = 0, n = cps.size();
    while (k < n) {
      while (k < n && py_isspace(cps[k])) ++k;
      if (k == n) break;
      size_t b = k;
      if (maxsplit >= 0 && static_cast<int64_t>(parts.size()) == maxsplit) {
        size_t e = n;
        while (e > b && py_isspace(cps[e - 1])) --e;
        parts.push_back(make_str(s.substr(starts[b], (e < n ? starts[e] : s.size()) - starts[b])));
        break;
      }
      while (k < n && !py_isspace(cps[k])) ++k;
      parts.push_back(make_str(s.substr(starts[b], (k < n ? starts[k] : s.size()) - starts[b])));
    }
    return parts;
  }
  if (!sep->is_string()) fail(pos, "must be str or None, not " + type_name(*sep));
  if (sep->s.empty()) fail(pos, "empty separator");
  size_t from = 0;
  for (;;) {
    size_t at = s.find(sep->s, from);
    if (at == std::string::npos ||
        (maxsplit >= 0 && static_cast<int64_t>(parts.size()) == maxsplit))
      break;
    parts.push_back(make_str(s.substr(from, at - from)));
    from = at + sep->s.size();
  }
  parts.push_back(make_str(s.substr(from)));
  return parts;
}

bool affix_match(const std::string& s, const Value& affix, bool prefix, Pos pos) {
  if (affix.is_list()) {
    for (const auto& a : affix.list->items)
      if (affix_match(s, a, prefix, pos)) return true;
    return false;
  }
  if (!affix.is_string()) fail(pos, "startswith/endswith argument must be str or a tuple of str");
  const std::string& a = affix.s;
  if (a.size() > s.size()) return false;
  return prefix ? s.compare(0, a.size(), a) == 0 : s.compare(s.size() - a.size(), a.size(), a) == 0;
}

// Applies a str.format() spec: [[fill]align][sign][0][width][,][.precision][type].
std::string format_spec(const Value& v, const std::string& spec, Pos pos) {
  if (spec.empty()) return to_str(v);
  size_t i = 0;
  char fill = ' ', align = 0;
  auto is_align = [](char c) { return c == '<' || c == '>' || c == '^' || c == '='; };
  if (spec.size() >= 2 && is_align(spec[1]))
    fill = spec[0], align = spec[1], i = 2;
  else if (is_align(spec[0]))
    align = spec[0], i = 1;
  std::string sign;
  if (i < spec.size() && (spec[i] == '+' || spec[i] == '-' || spec[i] == ' ')) sign = spec[i++];
  if (i < spec.size() && spec[i] == '0') {
    if (!align) fill = '0', align = '=';
    ++i;
  }
  size_t width = 0;
  while (i < spec.size() && is_digit(spec[i]))
    width = width * 10 + static_cast<size_t>(spec[i++] - '0');
  int precision = -1;
  if (i < spec.size() && spec[i] == '.') {
    precision = 0;
    while (++i < spec.size() && is_digit(spec[i])) precision = precision * 10 + (spec[i] - '0');
  }
  char type = i < spec.size() ? spec[i] : 0;
  std::string body;
  if (v.is_number() && (type == 'f' || type == 'F' || type == 'e' || type == 'g' || type == '%' ||
                        (type == 0 && precision >= 0))) {
    char fmt[32], buf[512];
    double d = v.as_double() * (type == '%' ? 100.0 : 1.0);
    std::snprintf(fmt, sizeof(fmt), "%%%s.%d%c", sign.c_str(), precision < 0 ? 6 : precision,
                  type == 0     ? 'g'
                  : type == '%' ? 'f'
                                : type);
    std::snprintf(buf, sizeof(buf), fmt, d);
    body = std::string(buf) + (type == '%' ? "%" : "");
  } else if (v.is_number() && (type == 'd' || type == 0)) {
    body = (sign == "+" && v.as_double() >= 0 ? "+" : "") +
           to_str(v.kind == Kind::Bool ? make_int(v.as_int()) : v);
  } else if (type == 's' || type == 0) {
    body = to_str(v);
    if (precision >= 0) {
      std::vector<size_t> starts = utf8_starts(body);
      if (static_cast<size_t>(precision) < starts.size())
        body.resize(starts[static_cast<size_t>(precision)]);
    }
  } else {
    fail(pos, "unsupported format spec '" + spec + "' for " + type_name(v));
  }
  size_t len = utf8_length(body);
  if (len >= width) return body;
  size_t pad = width - len;
  if (!align) align = v.is_number() ? '>' : '<';
  std::string fill_s(1, fill);
  auto fills = [&](size_t n) {
    std::string f;
    for (size_t k = 0; k < n; ++k) f += fill_s;
    return f;
  };
  if (align == '<') return body + fills(pad);
  if (align == '^') return fills(pad / 2) + body + fills(pad - pad / 2);
  if (align == '=' && !body.empty() && (body[0] == '-' || body[0] == '+'))
    return body.substr(0, 1) + fills(pad) + body.substr(1);
  return fills(pad) + body;
}

std::string str_format(const std::string& fmt, CallArgs& a) {
  std::string out;
  size_t auto_index = 0;
  for (size_t i = 0; i < fmt.size(); ++i) {
    char c = fmt[i];
    if (c == '}') {
      if (i + 1 < fmt.size() && fmt[i + 1] == '}')
        ++i;
      else
        fail(a.pos, "Single '}' encountered in format string");
      out += '}';
      continue;
    }
    if (c != '{') {
      out += c;
      continue;
    }
    if (i + 1 < fmt.size() && fmt[i + 1] == '{') {
      out += '{';
      ++i;
      continue;
    }
    size_t close = fmt.find('}', i);
    if (close == std::string::npos) fail(a.pos, "Single '{' encountered in format string");
    std::string field = fmt.substr(i + 1, close - i - 1);
    i = close;
    std::string spec, conv;
    if (size_t colon = field.find(':'); colon != std::string::npos)
      spec = field.substr(colon + 1), field.resize(colon);
    if (size_t bang = field.find('!'); bang != std::string::npos)
      conv = field.substr(bang + 1), field.resize(bang);
    const Value* v = nullptr;
    if (field.empty()) {
      v = auto_index < a.args.size() ? &a.args[auto_index++] : nullptr;
    } else if (std::all_of(field.begin(), field.end(), is_digit)) {
      size_t k = std::stoul(field);
      v = k < a.args.size() ? &a.args[k] : nullptr;
    } else {
      for (const auto& [key, val] : a.kwargs)
        if (key == field) v = &val;
    }
    if (!v) fail(a.pos, "format(): no argument for replacement field '{" + field + "}'");
    Value shown = conv == "r" ? make_str(repr(*v)) : *v;
    out += format_spec(shown, spec, a.pos);
  }
  return out;
}

}  // namespace

std::string py_strip(const std::string& s, const Value* chars, bool left, bool right) {
  std::vector<uint32_t> set;
  bool whitespace = !chars || chars->is_none() || chars->is_undefined();
  if (!whitespace) set = code_points(chars->s);
  auto strip_it = [&](uint32_t c) {
    return whitespace ? py_isspace(c) : std::find(set.begin(), set.end(), c) != set.end();
  };
  std::vector<uint32_t> cps = code_points(s);
  std::vector<size_t> starts = utf8_starts(s);
  size_t b = 0, e = cps.size();
  if (left)
    while (b < e && strip_it(cps[b])) ++b;
  if (right)
    while (e > b && strip_it(cps[e - 1])) --e;
  if (b == e) return "";
  size_t from = starts[b], to = e < cps.size() ? starts[e] : s.size();
  return s.substr(from, to - from);
}

std::string py_upper(std::string s) {
  return map_case(s, [](size_t, bool) { return true; });
}

std::string py_lower(std::string s) {
  return map_case(s, [](size_t, bool) { return false; });
}

std::string py_replace(const std::string& s, const std::string& old, const std::string& repl,
                       int64_t count) {
  std::string out;
  if (old.empty()) {
    std::vector<size_t> starts = utf8_starts(s);
    int64_t done = 0;
    for (size_t k = 0; k <= starts.size(); ++k) {
      if (count < 0 || done < count) out += repl, ++done;
      if (k < starts.size()) {
        size_t to = k + 1 < starts.size() ? starts[k + 1] : s.size();
        out.append(s, starts[k], to - starts[k]);
      }
    }
    return out;
  }
  size_t from = 0;
  for (int64_t done = 0; count < 0 || done < count; ++done) {
    size_t at = s.find(old, from);
    if (at == std::string::npos) break;
    out.append(s, from, at - from);
    out += repl;
    from = at + old.size();
  }
  out.append(s, from, std::string::npos);
  return out;
}

std::vector<std::string> py_splitlines(const std::string& s) {
  std::vector<std::string> lines;
  std::string cur;
  for (size_t i = 0; i < s.size();) {
    size_t start = i;
    uint32_t c = utf8_next(s, i);
    bool brk = c == '\n' || c == '\r' || c == 0x0B || c == 0x0C || (c >= 0x1C && c <= 0x1E) ||
               c == 0x85 || c == 0x2028 || c == 0x2029;
    if (!brk) {
      cur.append(s, start, i - start);
      continue;
    }
    if (c == '\r' && i < s.size() && s[i] == '\n') ++i;
    lines.push_back(std::move(cur));
    cur.clear();
  }
  if (!cur.empty()) lines.push_back(std::move(cur));
  return lines;
}

bool is_dict_method(const std::string& n) {
  return n == "items" || n == "keys" || n == "values" || n == "get" || n == "copy";
}

namespace {

Value string_method(const std::string& s, const std::string& name, CallArgs& a) {
  const Value* a0 = find_arg(a, 0, "");
  auto need_str = [&](const Value* v) -> const std::string& {
    if (!v || !v->is_string()) fail(a.pos, "str." + name + "() needs a string argument");
    return v->s;
  };
  if (name == "strip" || name == "lstrip" || name == "rstrip")
    return make_str(py_strip(s, a0, name != "rstrip", name != "lstrip"));
  if (name == "split" || name == "rsplit") {
    Value maxsplit = arg_or(a, 1, "maxsplit", make_int(-1));
    const Value* sep = find_arg(a, 0, "sep");
    if (name == "rsplit" && maxsplit.as_int() >= 0)
      fail(a.pos, "rsplit with maxsplit is not supported");
    return make_list(py_split(s, sep, maxsplit.as_int(), a.pos));
  }
  if (name == "startswith" || name == "endswith") {
    if (!a0) fail(a.pos, name + "() takes at least 1 argument");
    return make_bool(affix_match(s, *a0, name == "startswith", a.pos));
  }
  if (name == "replace")
    return make_str(py_replace(s, need_str(a0), need_str(find_arg(a, 1, "")),
                               arg_or(a, 2, "count", make_int(-1)).as_int()));
  if (name == "upper") return make_str(py_upper(s));
  if (name == "lower" || name == "casefold") return make_str(py_lower(s));
  if (name == "title") return make_str(py_title(s));
  if (name == "capitalize") return make_str(py_capitalize(s));
  if (name == "swapcase") {
    std::string r = s;
    for (char& c : r) c = is_upper(c) ? to_lower(c) : to_upper(c);
    return make_str(r);
  }
  if (name == "find" || name == "rfind" || name == "index" || name == "rindex") {
    const std::string& sub = need_str(a0);
    size_t at = name[0] == 'r' ? s.rfind(sub) : s.find(sub);
    if (at == std::string::npos) {
      if (name.find("index") != std::string::npos) fail(a.pos, "substring not found");
      return make_int(-1);
    }
    return make_int(static_cast<int64_t>(utf8_length(std::string_view(s).substr(0, at))));
  }
  if (name == "count") {
    const std::string& sub = need_str(a0);
    if (sub.empty()) return make_int(static_cast<int64_t>(utf8_length(s) + 1));
    int64_t n = 0;
    for (size_t at = s.find(sub); at != std::string::npos; at = s.find(sub, at + sub.size())) ++n;
    return make_int(n);
  }
  if (name == "join") {
    std::string out;
    std::vector<Value> items = iterate(a0 ? *a0 : Value(), a.pos);
    for (size_t k = 0; k < items.size(); ++k) {
      if (!items[k].is_string())
        fail(a.pos, "sequence item " + std::to_string(k) + ": expected str instance, " +
                        type_name(items[k]) + " found");
      out += (k ? s : "") + items[k].s;
    }
    return make_str(out);
  }
  if (name == "format") return make_str(str_format(s, a));
  if (name == "splitlines") {
    std::vector<Value> lines;
    for (auto& l : py_splitlines(s)) lines.push_back(make_str(std::move(l)));
    return make_list(std::move(lines));
  }
  if (name == "removeprefix" || name == "removesuffix") {
    const std::string& affix = need_str(a0);
    bool prefix = name == "removeprefix";
    if (!affix_match(s, make_str(affix), prefix, a.pos)) return make_str(s);
    return make_str(prefix ? s.substr(affix.size()) : s.substr(0, s.size() - affix.size()));
  }
  if (name == "partition" || name == "rpartition") {
    const std::string& sep = need_str(a0);
    size_t at = name == "partition" ? s.find(sep) : s.rfind(sep);
    if (at == std::string::npos)
      return name == "partition" ? make_list({make_str(s), make_str(""), make_str("")}, true)
                                 : make_list({make_str(""), make_str(""), make_str(s)}, true);
    return make_list(
        {make_str(s.substr(0, at)), make_str(sep), make_str(s.substr(at + sep.size()))}, true);
  }
  if (name == "center" || name == "ljust" || name == "rjust" || name == "zfill") {
    int64_t width = arg_or(a, 0, "width", make_int(0)).as_int();
    std::string spec = name == "zfill" ? "0" : arg_or(a, 1, "fillchar", make_str(" ")).s;
    spec += name == "center" ? "^" : name == "ljust" ? "<" : name == "rjust" ? ">" : "=";
    return make_str(
        format_spec(make_str(s), spec + std::to_string(std::max<int64_t>(width, 0)), a.pos));
  }
  // is* predicates (ASCII classes).
  if (s.empty()) return make_bool(false);
  bool all = true, any_cased = false;
  for (char c : s) {
    if (name == "isdigit" || name == "isnumeric" || name == "isdecimal")
      all &= is_digit(c);
    else if (name == "isalpha")
      all &= is_alpha(c);
    else if (name == "isalnum")
      all &= is_alpha(c) || is_digit(c);
    else if (name == "isspace")
      all &= py_isspace(static_cast<unsigned char>(c));
    else if (name == "isupper")
      all &= !is_lower(c), any_cased |= is_upper(c);
    else if (name == "islower")
      all &= !is_upper(c), any_cased |= is_lower(c);
  }
  if (name == "isupper" || name == "islower") return make_bool(all && any_cased);
  return make_bool(all);
}

Value dict_method(const Value& d, const std::string& name, CallArgs& a) {
  if (name == "get") {
    const Value* key = find_arg(a, 0, "key");
    if (!key) fail(a.pos, "get expected at least 1 argument, got 0");
    const Value* v = d.dict->find(*key);
    return v ? *v : arg_or(a, 1, "default", make_none());
  }
  if (name == "copy") {
    Value c = make_dict();
    c.dict->items = d.dict->items;
    return c;
  }
  std::vector<Value> out;
  for (const auto& [k, v] : d.dict->items) {
    if (name == "keys")
      out.push_back(k);
    else if (name == "values")
      out.push_back(v);
    else
      out.push_back(make_list({k, v}, true));
  }
  return make_list(std::move(out));
}

}  // namespace

Value call_method(const Value& self, const std::string& name, CallArgs& a) {
  if (self.is_string()) return string_method(self.s, name, a);
  if (self.is_dict()) return dict_method(self, name, a);
  const Value* x = find_arg(a, 0, "value");
  if (!x) fail(a.pos, "list." + name + "() takes exactly one argument");
  int64_t n = 0;
  for (size_t k = 0; k < self.list->items.size(); ++k) {
    if (!equals(self.list->items[k], *x)) continue;
    if (name == "index") return make_int(static_cast<int64_t>(k));
    ++n;
  }
  if (name == "index") fail(a.pos, repr(*x) + " is not in list");
  return make_int(n);
}

Value percent_format(const std::string& fmt, const Value& args, Pos pos) {
  std::vector<Value> values = args.is_tuple() ? args.list->items : std::vector<Value>{args};
  size_t next = 0;
  std::string out;
  for (size_t i = 0; i < fmt.size(); ++i) {
    if (fmt[i] != '%') {
      out += fmt[i];
      continue;
    }
    if (++i >= fmt.size()) fail(pos, "incomplete format");
    const Value* v = nullptr;
    if (fmt[i] == '(') {
      size_t close = fmt.find(')', i);
      if (close == std::string::npos || !args.is_dict()) fail(pos, "format requires a mapping");
      v = args.dict->find(std::string_view(fmt).substr(i + 1, close - i - 1));
      if (!v) fail(pos, "format key " + fmt.substr(i + 1, close - i - 1) + " missing");
      i = close + 1;
    }
    size_t spec_start = i;
    while (i < fmt.size() &&
           std::string_view("-+ #0123456789.").find(fmt[i]) != std::string_view::npos)
      ++i;
    if (i >= fmt.size()) fail(pos, "incomplete format");
    std::string flags = fmt.substr(spec_start, i - spec_start);
    char conv = fmt[i];
    if (conv == '%') {
      out += '%';
      continue;
    }
    if (!v) {
      if (next >= values.size()) fail(pos, "not enough arguments for format string");
      v = &values[next++];
    }
    char buf[512];
    std::string spec = "%" + flags;
    if (conv == 's' || conv == 'r' || conv == 'a') {
      std::string text = conv == 's' ? to_str(*v) : repr(*v);
      bool left = flags.find('-') != std::string::npos;
      size_t width = 0;
      for (char c : flags.substr(0, flags.find('.')))
        if (is_digit(c)) width = width * 10 + static_cast<size_t>(c - '0');
      size_t len = utf8_length(text);
      std::string pad(len < width ? width - len : 0, ' ');
      out += left ? text + pad : pad + text;
    } else if (std::string_view("diuxXoc").find(conv) != std::string_view::npos) {
      if (!v->is_number())
        fail(pos,
             std::string("%") + conv + " format: a real number is required, not " + type_name(*v));
      long long n = v->kind == Kind::Float ? static_cast<long long>(v->f) : v->as_int();
      if (conv == 'c')
        out += static_cast<char>(n);
      else
        std::snprintf(buf, sizeof(buf),
                      (spec + "ll" + (conv == 'i' || conv == 'u' ? 'd' : conv)).c_str(), n),
            out += buf;
    } else if (std::string_view("eEfFgG").find(conv) != std::string_view::npos) {
      if (!v->is_number()) fail(pos, std::string("must be real number, not ") + type_name(*v));
      std::snprintf(buf, sizeof(buf), (spec + conv).c_str(), v->as_double());
      out += buf;
    } else {
      fail(pos, std::string("unsupported format character '") + conv + "'");
    }
  }
  if (next < values.size() && !args.is_dict())
    fail(pos, "not all arguments converted during string formatting");
  return make_str(std::move(out));
}

Value make_globals_dict(const Limits& limits) {
  Value g = make_dict();
  int64_t max_range = limits.max_range;
  g.dict->set(
      make_str("range"), make_fn("range", [max_range](CallArgs& a) {
        for (const auto& v : a.args)
          if (!v.is_int()) fail(a.pos, "range() arguments must be integers, not " + type_name(v));
        if (a.args.empty() || a.args.size() > 3) fail(a.pos, "range expected 1 to 3 arguments");
        int64_t start = a.args.size() == 1 ? 0 : a.args[0].as_int();
        int64_t stop = a.args.size() == 1 ? a.args[0].as_int() : a.args[1].as_int();
        int64_t step = a.args.size() == 3 ? a.args[2].as_int() : 1;
        if (step == 0) fail(a.pos, "range() arg 3 must not be zero");
        std::vector<Value> items;
        for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
          if (static_cast<int64_t>(items.size()) >= max_range)
            fail(a.pos, "range() larger than the limit of " + std::to_string(max_range) + " items");
          items.push_back(make_int(i));
        }
        return make_list(std::move(items));
      }));
  auto make_mapping = [](Dict::Type type) {
    return [type](CallArgs& a) {
      Value d = make_dict(type);
      for (const auto& v : a.args) {
        if (!v.is_dict()) fail(a.pos, "namespace()/dict() positional argument must be a mapping");
        for (const auto& [k, x] : v.dict->items) d.dict->set(k, x);
      }
      for (const auto& [k, v] : a.kwargs) d.dict->set(make_str(k), v);
      return d;
    };
  };
  g.dict->set(make_str("namespace"), make_fn("namespace", make_mapping(Dict::Type::Namespace)));
  g.dict->set(make_str("dict"), make_fn("dict", make_mapping(Dict::Type::Dict)));
  g.dict->set(make_str("raise_exception"), make_fn("raise_exception", [](CallArgs& a) -> Value {
                fail(a.pos, "template raised an exception: " +
                                (a.args.empty() ? std::string() : to_str(a.args[0])));
              }));
  g.dict->set(make_str("strftime_now"), make_fn("strftime_now", [](CallArgs& a) {
                std::string fmt = a.args.empty() ? "" : to_str(a.args[0]);
                std::time_t now = std::time(nullptr);
                std::tm tm{};
                localtime_r(&now, &tm);
                char buf[512];
                size_t n = fmt.empty() ? 0 : std::strftime(buf, sizeof(buf), fmt.c_str(), &tm);
                return make_str(std::string(buf, n));
              }));
  return g;
}

}  // namespace kestrel::jinja
