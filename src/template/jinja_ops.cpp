// Python operators, iteration, attribute and item access, slicing.
#include <algorithm>
#include <cmath>

#include "template/jinja_eval.h"

namespace kestrel::jinja {
namespace {

[[noreturn]] void unsupported(const std::string& op, const Value& a, const Value& b, Pos pos) {
  if (a.is_undefined()) fail(pos, a.s);
  if (b.is_undefined()) fail(pos, b.s);
  if (op == "+" && a.is_string())
    fail(pos, "can only concatenate str (not \"" + type_name(b) + "\") to str");
  fail(pos, "unsupported operand type(s) for " + op + ": '" + type_name(a) + "' and '" +
                type_name(b) + "'");
}

int64_t checked(bool overflow, int64_t v, Pos pos) {
  if (overflow) fail(pos, "integer overflow (values beyond 64 bits are not supported)");
  return v;
}

Value int_op(const std::string& op, int64_t x, int64_t y, Pos pos) {
  int64_t r = 0;
  bool overflow = false;
  if (op == "+") overflow = __builtin_add_overflow(x, y, &r);
  if (op == "-") overflow = __builtin_sub_overflow(x, y, &r);
  if (op == "*") overflow = __builtin_mul_overflow(x, y, &r);
  if (op == "+" || op == "-" || op == "*") return make_int(checked(overflow, r, pos));
  if (op == "/") {
    if (y == 0) fail(pos, "division by zero");
    return make_float(static_cast<double>(x) / static_cast<double>(y));
  }
  if (op == "//" || op == "%") {
    if (y == 0) fail(pos, "integer division or modulo by zero");
    if (x == INT64_MIN && y == -1) fail(pos, "integer overflow");
    int64_t q = x / y, m = x % y;
    if (m != 0 && ((m < 0) != (y < 0))) --q, m += y;
    return make_int(op == "//" ? q : m);
  }
  // **
  if (y < 0) return make_float(std::pow(static_cast<double>(x), static_cast<double>(y)));
  int64_t result = 1, base = x;
  bool overflow_pow = false;
  for (int64_t e = y; e > 0;) {
    if (e & 1) overflow_pow |= __builtin_mul_overflow(result, base, &result);
    e >>= 1;
    if (e) overflow_pow |= __builtin_mul_overflow(base, base, &base);
  }
  checked(overflow_pow, result, pos);
  return make_int(result);
}

Value float_op(const std::string& op, double x, double y, Pos pos) {
  if (op == "+") return make_float(x + y);
  if (op == "-") return make_float(x - y);
  if (op == "*") return make_float(x * y);
  if (op == "**") return make_float(std::pow(x, y));
  if (y == 0.0) fail(pos, "float division by zero");
  if (op == "/") return make_float(x / y);
  // Python's float_floor_div / float_rem.
  double mod = std::fmod(x, y);
  double div = (x - mod) / y;
  if (mod != 0.0 && ((y < 0) != (mod < 0))) {
    mod += y;
    div -= 1.0;
  }
  if (op == "%") return make_float(mod);
  double floor_div = std::floor(div);
  if (div - floor_div > 0.5) floor_div += 1.0;
  return make_float(floor_div);
}

Value repeat(const Value& seq, int64_t n, Interpreter& in, Pos pos) {
  if (n < 0) n = 0;
  if (seq.is_string()) {
    in.check_size(seq.s.size() * static_cast<size_t>(n), pos);
    std::string out;
    for (int64_t k = 0; k < n; ++k) out += seq.s;
    return make_str(std::move(out));
  }
  in.check_size(seq.list->items.size() * static_cast<size_t>(n), pos);
  std::vector<Value> items;
  for (int64_t k = 0; k < n; ++k)
    items.insert(items.end(), seq.list->items.begin(), seq.list->items.end());
  return make_list(std::move(items), seq.list->tuple);
}

}  // namespace

Value binary_op(const std::string& op, const Value& a, const Value& b, Interpreter& in, Pos pos) {
  if (op == "~") {
    std::string s = to_str(a);
    s += to_str(b);
    in.check_size(s.size(), pos);
    return make_str(std::move(s));
  }
  if (a.is_number() && b.is_number()) {
    if (a.kind == Kind::Float || b.kind == Kind::Float || (op == "**" && b.as_int() < 0))
      return float_op(op, a.as_double(), b.as_double(), pos);
    return int_op(op, a.as_int(), b.as_int(), pos);
  }
  if (op == "+" && a.is_string() && b.is_string()) {
    // Markup + str escapes the str (markupsafe); the result is Markup.
    bool markup = a.markup || b.markup;
    std::string s = markup && !a.markup ? html_escape(a.s) : a.s;
    s += markup && !b.markup ? html_escape(b.s) : b.s;
    in.check_size(s.size(), pos);
    return markup ? make_markup(std::move(s)) : make_str(std::move(s));
  }
  if (op == "+" && a.is_list() && b.is_list() && a.list->tuple == b.list->tuple &&
      !a.list->generator && !b.list->generator) {
    std::vector<Value> items = a.list->items;
    items.insert(items.end(), b.list->items.begin(), b.list->items.end());
    return make_list(std::move(items), a.list->tuple);
  }
  if (op == "*" && (a.is_string() || a.is_list()) && b.is_int())
    return repeat(a, b.as_int(), in, pos);
  if (op == "*" && (b.is_string() || b.is_list()) && a.is_int())
    return repeat(b, a.as_int(), in, pos);
  if (op == "%" && a.is_string()) return percent_format(a.s, b, pos);
  unsupported(op, a, b, pos);
}

std::vector<Value> iterate(const Value& v, Pos pos) {
  switch (v.kind) {
    case Kind::Undefined:
      return {};
    case Kind::List:
      return v.list->items;
    case Kind::Dict: {
      if (v.dict->type != Dict::Type::Dict) break;
      std::vector<Value> keys;
      for (const auto& kv : v.dict->items) keys.push_back(kv.first);
      return keys;
    }
    case Kind::String: {
      std::vector<Value> chars;
      std::vector<size_t> starts = utf8_starts(v.s);
      for (size_t k = 0; k < starts.size(); ++k) {
        size_t end = k + 1 < starts.size() ? starts[k + 1] : v.s.size();
        chars.push_back(make_str(v.s.substr(starts[k], end - starts[k])));
      }
      return chars;
    }
    default:
      break;
  }
  fail(pos, "'" + type_name(v) + "' object is not iterable");
}

bool contains(const Value& container, const Value& item, Pos pos) {
  switch (container.kind) {
    case Kind::Undefined:
      return false;
    case Kind::String:
      if (!item.is_string())
        fail(pos, "'in <string>' requires string as left operand, not " + type_name(item));
      return container.s.find(item.s) != std::string::npos;
    case Kind::List:
      for (const auto& v : container.list->items)
        if (equals(v, item)) return true;
      return false;
    case Kind::Dict:
      return container.dict->find(item) != nullptr;
    default:
      fail(pos, "argument of type '" + type_name(container) + "' is not iterable");
  }
}

namespace {

bool is_str_method(const std::string& n) {
  static const char* const names[] = {
      "strip",     "lstrip",       "rstrip",       "split",     "rsplit",     "startswith",
      "endswith",  "replace",      "upper",        "lower",     "title",      "capitalize",
      "find",      "rfind",        "index",        "rindex",    "count",      "join",
      "format",    "splitlines",   "isdigit",      "isalpha",   "isalnum",    "isspace",
      "isupper",   "islower",      "swapcase",     "center",    "ljust",      "rjust",
      "zfill",     "removeprefix", "removesuffix", "partition", "rpartition", "casefold",
      "isnumeric", "isdecimal"};
  for (const char* m : names)
    if (n == m) return true;
  return false;
}

// ImmutableSandboxedEnvironment refuses the methods that modify lists and dicts.
bool is_unsafe_method(const Value& obj, const std::string& n) {
  static const char* const list_m[] = {"append", "clear", "pop",    "reverse",
                                       "insert", "sort",  "extend", "remove"};
  static const char* const dict_m[] = {"clear", "pop", "popitem", "setdefault", "update"};
  if (obj.is_list()) {
    for (const char* m : list_m)
      if (n == m) return true;
  } else if (obj.is_dict()) {
    for (const char* m : dict_m)
      if (n == m) return true;
  }
  return false;
}

Value bound_method(const Value& obj, const std::string& name) {
  return make_fn(name, [obj, name](CallArgs& a) { return call_method(obj, name, a); });
}

std::string object_name(const Value& v) {
  if (v.is_none()) return "None";
  std::string name = "'";
  name += type_name(v);
  name += " object'";
  return name;
}

}  // namespace

Value get_attr(const Value& obj, const std::string& name, Pos pos) {
  if (obj.is_undefined()) fail(pos, obj.s);
  if (is_unsafe_method(obj, name))
    return make_undefined("access to attribute '" + name + "' of '" + type_name(obj) +
                          "' object is unsafe.");
  if (obj.is_dict()) {
    if (obj.dict->type == Dict::Type::Dict && is_dict_method(name)) return bound_method(obj, name);
    if (const Value* v = obj.dict->find(std::string_view(name))) return *v;
  } else if (obj.is_string() && is_str_method(name)) {
    return bound_method(obj, name);
  } else if (obj.is_list() && (name == "index" || name == "count")) {
    return bound_method(obj, name);
  }
  return make_undefined(object_name(obj) + " has no attribute '" + name + "'");
}

Value get_item(const Value& obj, const Value& key, Pos pos) {
  if (obj.is_undefined()) fail(pos, obj.s);
  if (obj.is_dict()) {
    if (const Value* v = obj.dict->find(key)) return *v;
  } else if ((obj.is_string() || (obj.is_list() && !obj.list->generator)) && key.is_int()) {
    int64_t n = obj.is_list() ? static_cast<int64_t>(obj.list->items.size())
                              : static_cast<int64_t>(utf8_length(obj.s));
    int64_t i = key.as_int() < 0 ? key.as_int() + n : key.as_int();
    if (i >= 0 && i < n) {
      if (obj.is_list()) return obj.list->items[static_cast<size_t>(i)];
      return slice(obj, make_int(i), make_int(i + 1), Value(), pos);
    }
    return make_undefined(object_name(obj) + " has no element " + to_str(key));
  }
  if (key.is_string()) return get_attr(obj, key.s, pos);
  return make_undefined(object_name(obj) + " has no element " + repr(key));
}

Value slice(const Value& obj, const Value& start, const Value& stop, const Value& step, Pos pos) {
  if (obj.is_undefined()) fail(pos, obj.s);
  if ((!obj.is_list() && !obj.is_string()) || (obj.is_list() && obj.list->generator))
    fail(pos, "'" + type_name(obj) + "' object is not subscriptable");
  auto as_index = [&](const Value& v, const char* what) -> const Value* {
    if (v.is_undefined() || v.is_none()) return nullptr;
    if (!v.is_int()) fail(pos, std::string("slice ") + what + " must be an integer or None");
    return &v;
  };
  const Value* st = as_index(step, "step");
  int64_t s = st ? st->as_int() : 1;
  if (s == 0) fail(pos, "slice step cannot be zero");
  std::vector<size_t> starts;
  if (obj.is_string()) starts = utf8_starts(obj.s);
  int64_t n = obj.is_list() ? static_cast<int64_t>(obj.list->items.size())
                            : static_cast<int64_t>(starts.size());
  auto adjust = [&](const Value* v, int64_t def) {
    if (!v) return def;
    int64_t i = v->as_int();
    if (i < 0) i += n;
    if (s > 0) return std::clamp<int64_t>(i, 0, n);
    return std::clamp<int64_t>(i, -1, n - 1);
  };
  int64_t b = adjust(as_index(start, "start"), s > 0 ? 0 : n - 1);
  int64_t e = adjust(as_index(stop, "stop"), s > 0 ? n : -1);
  std::vector<Value> items;
  std::string text;
  for (int64_t i = b; s > 0 ? i < e : i > e; i += s) {
    if (obj.is_list()) {
      items.push_back(obj.list->items[static_cast<size_t>(i)]);
    } else {
      size_t from = starts[static_cast<size_t>(i)];
      size_t to = i + 1 < n ? starts[static_cast<size_t>(i + 1)] : obj.s.size();
      text.append(obj.s, from, to - from);
    }
  }
  if (obj.is_string()) return make_str(std::move(text));
  return make_list(std::move(items), obj.list->tuple);
}

}  // namespace kestrel::jinja
