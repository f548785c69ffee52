#include "template/jinja_value.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>

namespace kestrel::jinja {

void fail(Pos pos, std::string message) {
  throw Error{std::move(message), pos};
}

bool Value::is_namespace() const {
  return kind == Kind::Dict && dict->type == Dict::Type::Namespace;
}
bool Value::is_tuple() const {
  return kind == Kind::List && list->tuple;
}

const Value* Dict::find(const Value& key) const {
  for (const auto& [k, v] : items)
    if (equals(k, key)) return &v;
  return nullptr;
}

const Value* Dict::find(std::string_view key) const {
  for (const auto& [k, v] : items)
    if (k.kind == Kind::String && k.s == key) return &v;
  return nullptr;
}

void Dict::set(Value key, Value value) {
  for (auto& [k, v] : items) {
    if (equals(k, key)) {
      v = std::move(value);
      return;
    }
  }
  items.emplace_back(std::move(key), std::move(value));
}

Value make_undefined(std::string message) {
  Value v;
  v.s = std::move(message);
  return v;
}
Value make_none() {
  Value v;
  v.kind = Kind::None;
  return v;
}
Value make_bool(bool b) {
  Value v;
  v.kind = Kind::Bool;
  v.b = b;
  return v;
}
Value make_int(int64_t i) {
  Value v;
  v.kind = Kind::Int;
  v.i = i;
  return v;
}
Value make_float(double f) {
  Value v;
  v.kind = Kind::Float;
  v.f = f;
  return v;
}
Value make_str(std::string s) {
  Value v;
  v.kind = Kind::String;
  v.s = std::move(s);
  return v;
}
Value make_markup(std::string s) {
  Value v = make_str(std::move(s));
  v.markup = true;
  return v;
}
Value make_generator(std::vector<Value> items) {
  Value v = make_list(std::move(items));
  v.list->generator = true;
  return v;
}
std::string html_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '\'':
        out += "&#39;";
        break;
      case '"':
        out += "&#34;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

Value make_list(std::vector<Value> items, bool tuple) {
  Value v;
  v.kind = Kind::List;
  v.list = std::make_shared<List>();
  v.list->items = std::move(items);
  v.list->tuple = tuple;
  return v;
}
Value make_dict(Dict::Type type) {
  Value v;
  v.kind = Kind::Dict;
  v.dict = std::make_shared<Dict>();
  v.dict->type = type;
  return v;
}
Value make_fn(std::string name, std::function<Value(CallArgs&)> call) {
  Value v;
  v.kind = Kind::Function;
  v.fn = std::make_shared<Function>(Function{std::move(name), std::move(call)});
  return v;
}

bool truthy(const Value& v) {
  switch (v.kind) {
    case Kind::Undefined:
    case Kind::None:
      return false;
    case Kind::Bool:
      return v.b;
    case Kind::Int:
      return v.i != 0;
    case Kind::Float:
      return v.f != 0.0;
    case Kind::String:
      return !v.s.empty();
    case Kind::List:
      return v.list->generator || !v.list->items.empty();
    case Kind::Dict:
      return v.dict->type != Dict::Type::Dict || !v.dict->items.empty();
    case Kind::Function:
      return true;
  }
  return false;
}

// Python's repr(float): the shortest round-trip digits, fixed notation for exponents in
// [-4, 16), scientific otherwise, and always a decimal point or exponent.
std::string format_float(double f) {
  if (std::isnan(f)) return "nan";
  if (std::isinf(f)) return f > 0 ? "inf" : "-inf";
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), f, std::chars_format::scientific);
  std::string sci(buf, res.ptr);
  std::string sign;
  if (sci[0] == '-') {
    sign = "-";
    sci.erase(0, 1);
  }
  size_t e = sci.find('e');
  int exp10 = std::stoi(sci.substr(e + 1));
  std::string digits = sci.substr(0, e);
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  std::string out;
  if (exp10 >= -4 && exp10 < 16) {
    if (exp10 < 0) {
      out = "0." + std::string(-exp10 - 1, '0') + digits;
    } else if (static_cast<int>(digits.size()) <= exp10 + 1) {
      out = digits + std::string(exp10 + 1 - digits.size(), '0') + ".0";
    } else {
      out = digits.substr(0, exp10 + 1) + "." + digits.substr(exp10 + 1);
    }
  } else {
    out = digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char ebuf[16];
    std::snprintf(ebuf, sizeof(ebuf), "e%c%02d", exp10 < 0 ? '-' : '+', std::abs(exp10));
    out += ebuf;
  }
  return sign + out;
}

std::vector<size_t> utf8_starts(std::string_view s) {
  std::vector<size_t> starts;
  starts.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i)
    if ((static_cast<unsigned char>(s[i]) & 0xC0) != 0x80) starts.push_back(i);
  return starts;
}

size_t utf8_length(std::string_view s) {
  size_t n = 0;
  for (char c : s) n += (static_cast<unsigned char>(c) & 0xC0) != 0x80;
  return n;
}

// Decodes the code point at s[i] and advances i; invalid bytes decode as themselves.
uint32_t utf8_next(std::string_view s, size_t& i) {
  auto c = static_cast<unsigned char>(s[i++]);
  int extra = c >= 0xF0 ? 3 : c >= 0xE0 ? 2 : c >= 0xC0 ? 1 : 0;
  uint32_t cp = extra == 3 ? c & 0x07 : extra == 2 ? c & 0x0F : extra == 1 ? c & 0x1F : c;
  for (int k = 0; k < extra && i < s.size(); ++k) {
    auto cc = static_cast<unsigned char>(s[i]);
    if ((cc & 0xC0) != 0x80) break;
    cp = (cp << 6) | (cc & 0x3F);
    ++i;
  }
  return cp;
}

namespace {

// Code points that Python's str.isprintable() rejects beyond the ASCII controls (the common
// Separator and Format ones); repr() escapes them.
bool python_unprintable(uint32_t cp) {
  return cp < 0x20 || (cp >= 0x7F && cp <= 0xA0) || cp == 0xAD || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200F) || (cp >= 0x2028 && cp <= 0x202F) ||
         (cp >= 0x205F && cp <= 0x2064) || cp == 0x3000 || cp == 0xFEFF;
}

std::string repr_string(std::string_view s) {
  bool has_single = s.find('\'') != std::string_view::npos;
  bool has_double = s.find('"') != std::string_view::npos;
  char quote = has_single && !has_double ? '"' : '\'';
  std::string out(1, quote);
  for (size_t i = 0; i < s.size();) {
    size_t start = i;
    uint32_t cp = utf8_next(s, i);
    char buf[16];
    if (cp == '\\') {
      out += "\\\\";
    } else if (cp == static_cast<uint32_t>(quote)) {
      out += '\\';
      out += quote;
    } else if (cp == '\n') {
      out += "\\n";
    } else if (cp == '\r') {
      out += "\\r";
    } else if (cp == '\t') {
      out += "\\t";
    } else if (python_unprintable(cp)) {
      std::snprintf(buf, sizeof(buf), cp <= 0xFF ? "\\x%02x" : "\\u%04x", cp);
      out += buf;
    } else {
      out.append(s.substr(start, i - start));
    }
  }
  out += quote;
  return out;
}

std::string repr_items(const Value& v) {
  std::string out;
  if (v.kind == Kind::List) {
    for (size_t k = 0; k < v.list->items.size(); ++k) {
      if (k) out += ", ";
      out += repr(v.list->items[k]);
    }
    return out;
  }
  bool first = true;
  for (const auto& [key, val] : v.dict->items) {
    if (!first) out += ", ";
    first = false;
    out += repr(key) + ": " + repr(val);
  }
  return out;
}

}  // namespace

std::string repr(const Value& v) {
  switch (v.kind) {
    case Kind::String:
      return repr_string(v.s);
    case Kind::List:
      if (v.list->generator) return "<generator object>";
      if (v.list->tuple) return "(" + repr_items(v) + (v.list->items.size() == 1 ? ",)" : ")");
      return "[" + repr_items(v) + "]";
    case Kind::Dict:
      if (v.dict->type == Dict::Type::Namespace) return "<Namespace {" + repr_items(v) + "}>";
      if (v.dict->type == Dict::Type::Loop) return "<LoopContext>";
      return "{" + repr_items(v) + "}";
    default:
      return to_str(v);
  }
}

std::string to_str(const Value& v) {
  switch (v.kind) {
    case Kind::Undefined:
      return "";
    case Kind::None:
      return "None";
    case Kind::Bool:
      return v.b ? "True" : "False";
    case Kind::Int:
      return std::to_string(v.i);
    case Kind::Float:
      return format_float(v.f);
    case Kind::String:
      return v.s;
    case Kind::Function:
      return "<function " + v.fn->name + ">";
    default:
      return repr(v);
  }
}

std::string type_name(const Value& v) {
  switch (v.kind) {
    case Kind::Undefined:
      return "Undefined";
    case Kind::None:
      return "NoneType";
    case Kind::Bool:
      return "bool";
    case Kind::Int:
      return "int";
    case Kind::Float:
      return "float";
    case Kind::String:
      return v.markup ? "Markup" : "str";
    case Kind::List:
      return v.list->generator ? "generator" : v.list->tuple ? "tuple" : "list";
    case Kind::Dict:
      return v.dict->type == Dict::Type::Dict        ? "dict"
             : v.dict->type == Dict::Type::Namespace ? "Namespace"
                                                     : "LoopContext";
    case Kind::Function:
      return "function";
  }
  return "object";
}

bool equals(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) {
    if (a.kind == Kind::Float || b.kind == Kind::Float) return a.as_double() == b.as_double();
    return a.as_int() == b.as_int();
  }
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case Kind::Undefined:
    case Kind::None:
      return true;
    case Kind::String:
      return a.s == b.s;
    case Kind::List: {
      const auto &x = a.list->items, &y = b.list->items;
      if (a.list->generator || b.list->generator) return a.list == b.list;
      if (a.list->tuple != b.list->tuple || x.size() != y.size()) return false;
      for (size_t k = 0; k < x.size(); ++k)
        if (!equals(x[k], y[k])) return false;
      return true;
    }
    case Kind::Dict: {
      if (a.dict->type != Dict::Type::Dict || b.dict->type != Dict::Type::Dict)
        return a.dict == b.dict;
      if (a.dict->items.size() != b.dict->items.size()) return false;
      for (const auto& [k, v] : a.dict->items) {
        const Value* other = b.dict->find(k);
        if (!other || !equals(v, *other)) return false;
      }
      return true;
    }
    case Kind::Function:
      return a.fn == b.fn;
    default:
      return false;
  }
}

int compare(const Value& a, const Value& b, Pos pos) {
  if (a.is_number() && b.is_number()) {
    if (a.kind == Kind::Float || b.kind == Kind::Float) {
      double x = a.as_double(), y = b.as_double();
      return x < y ? -1 : x > y ? 1 : 0;
    }
    return a.as_int() < b.as_int() ? -1 : a.as_int() > b.as_int() ? 1 : 0;
  }
  if (a.is_undefined() || b.is_undefined()) fail(pos, a.is_undefined() ? a.s : b.s);
  if (a.kind == Kind::String && b.kind == Kind::String)
    return a.s.compare(b.s) < 0 ? -1 : a.s == b.s ? 0 : 1;
  if (a.kind == Kind::List && b.kind == Kind::List && a.list->tuple == b.list->tuple) {
    const auto &x = a.list->items, &y = b.list->items;
    for (size_t k = 0; k < x.size() && k < y.size(); ++k) {
      if (equals(x[k], y[k])) continue;
      return compare(x[k], y[k], pos);
    }
    return x.size() < y.size() ? -1 : x.size() > y.size() ? 1 : 0;
  }
  fail(pos,
       "'<' not supported between instances of '" + type_name(a) + "' and '" + type_name(b) + "'");
}

namespace {

void json_string(std::string& out, std::string_view s, bool ensure_ascii) {
  out += '"';
  char buf[16];
  for (size_t i = 0; i < s.size();) {
    size_t start = i;
    uint32_t cp = utf8_next(s, i);
    switch (cp) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      default:
        if (cp < 0x20 || (ensure_ascii && cp > 0x7E && cp < 0x10000)) {
          std::snprintf(buf, sizeof(buf), "\\u%04x", cp);
          out += buf;
        } else if (ensure_ascii && cp >= 0x10000) {
          uint32_t u = cp - 0x10000;
          std::snprintf(buf, sizeof(buf), "\\u%04x\\u%04x", 0xD800 + (u >> 10),
                        0xDC00 + (u & 0x3FF));
          out += buf;
        } else {
          out.append(s.substr(start, i - start));
        }
    }
  }
  out += '"';
}

std::string json_key(const Value& k, Pos pos) {
  switch (k.kind) {
    case Kind::String:
      return k.s;
    case Kind::Bool:
      return k.b ? "true" : "false";
    case Kind::None:
      return "null";
    case Kind::Int:
    case Kind::Float:
      return to_str(k);
    default:
      fail(pos, "keys must be str, int, float, bool or None, not " + type_name(k));
  }
}

void json_value(std::string& out, const Value& v, const JsonOptions& o, int depth, Pos pos) {
  if (depth > 256) fail(pos, "tojson: value nested too deeply (or recursive)");
  auto newline = [&](int level) {
    if (!o.pretty) return;
    out += '\n';
    for (int k = 0; k < level; ++k) out += o.indent;
  };
  switch (v.kind) {
    case Kind::None:
      out += "null";
      return;
    case Kind::Bool:
      out += v.b ? "true" : "false";
      return;
    case Kind::Int:
      out += std::to_string(v.i);
      return;
    case Kind::Float:
      out += std::isnan(v.f)   ? "NaN"
             : std::isinf(v.f) ? (v.f > 0 ? "Infinity" : "-Infinity")
                               : format_float(v.f);
      return;
    case Kind::String:
      json_string(out, v.s, o.ensure_ascii);
      return;
    case Kind::List: {
      if (v.list->generator) break;
      if (v.list->items.empty()) {
        out += "[]";
        return;
      }
      out += '[';
      for (size_t k = 0; k < v.list->items.size(); ++k) {
        if (k) out += o.item_sep;
        newline(depth + 1);
        json_value(out, v.list->items[k], o, depth + 1, pos);
      }
      newline(depth);
      out += ']';
      return;
    }
    case Kind::Dict: {
      if (v.dict->type != Dict::Type::Dict) break;
      if (v.dict->items.empty()) {
        out += "{}";
        return;
      }
      std::vector<std::pair<std::string, const Value*>> items;
      for (const auto& [key, val] : v.dict->items) items.emplace_back(json_key(key, pos), &val);
      if (o.sort_keys)
        std::stable_sort(items.begin(), items.end(),
                         [](const auto& x, const auto& y) { return x.first < y.first; });
      out += '{';
      for (size_t k = 0; k < items.size(); ++k) {
        if (k) out += o.item_sep;
        newline(depth + 1);
        json_string(out, items[k].first, o.ensure_ascii);
        out += o.key_sep;
        json_value(out, *items[k].second, o, depth + 1, pos);
      }
      newline(depth);
      out += '}';
      return;
    }
    default:
      break;
  }
  fail(pos, "Object of type " + type_name(v) + " is not JSON serializable");
}

}  // namespace

std::string to_json(const Value& v, const JsonOptions& options, Pos pos) {
  std::string out;
  json_value(out, v, options, 0, pos);
  return out;
}

Value from_json(const nlohmann::ordered_json& j) {
  switch (j.type()) {
    case nlohmann::ordered_json::value_t::null:
      return make_none();
    case nlohmann::ordered_json::value_t::boolean:
      return make_bool(j.get<bool>());
    case nlohmann::ordered_json::value_t::number_integer:
      return make_int(j.get<int64_t>());
    case nlohmann::ordered_json::value_t::number_unsigned: {
      auto u = j.get<uint64_t>();
      if (u > static_cast<uint64_t>(INT64_MAX)) return make_float(static_cast<double>(u));
      return make_int(static_cast<int64_t>(u));
    }
    case nlohmann::ordered_json::value_t::number_float:
      return make_float(j.get<double>());
    case nlohmann::ordered_json::value_t::string:
      return make_str(j.get<std::string>());
    case nlohmann::ordered_json::value_t::array: {
      std::vector<Value> items;
      for (const auto& e : j) items.push_back(from_json(e));
      return make_list(std::move(items));
    }
    case nlohmann::ordered_json::value_t::object: {
      Value d = make_dict();
      for (const auto& [k, e] : j.items()) d.dict->items.emplace_back(make_str(k), from_json(e));
      return d;
    }
    default:
      return make_none();
  }
}

}  // namespace kestrel::jinja
