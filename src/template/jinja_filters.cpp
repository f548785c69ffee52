// jinja2's builtin filters and tests, plus Hugging Face's tojson.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <map>

#include "template/jinja_eval.h"
#include "template/jinja_parser.h"

namespace kestrel::jinja {
namespace {

using FilterFn = Value (*)(Interpreter&, Value&, CallArgs&);

// jinja2's make_attrgetter: "a.b.0" looks up item by item; digits become integers.
Value attr_path(const Value& v, const std::string& path, Pos pos) {
  Value cur = v;
  size_t from = 0;
  for (;;) {
    size_t dot = path.find('.', from);
    std::string part = path.substr(from, dot == std::string::npos ? std::string::npos : dot - from);
    bool digits = !part.empty() && std::all_of(part.begin(), part.end(),
                                               [](char c) { return c >= '0' && c <= '9'; });
    cur = get_item(cur, digits ? make_int(std::stoll(part)) : make_str(part), pos);
    if (dot == std::string::npos) return cur;
    from = dot + 1;
  }
}

Value lower_if_str(const Value& v, bool case_sensitive) {
  return v.is_string() && !case_sensitive ? make_str(py_lower(v.s)) : v;
}

// The key of each item for sort / unique / min / max (attribute, case folding).
Value sort_key(const Value& item, const Value* attribute, bool case_sensitive, Pos pos) {
  Value k = attribute && !attribute->is_none() ? attr_path(item, to_str(*attribute), pos) : item;
  return lower_if_str(k, case_sensitive);
}

std::string text_of(const Value& v) {
  return to_str(v);
}

size_t length_of(const Value& v, Pos pos) {
  switch (v.kind) {
    case Kind::Undefined:
      return 0;
    case Kind::String:
      return utf8_length(v.s);
    case Kind::List:
      if (v.list->generator) break;
      return v.list->items.size();
    case Kind::Dict:
      return v.dict->items.size();
    default:
      break;
  }
  fail(pos, "object of type '" + type_name(v) + "' has no len()");
}

Value f_length(Interpreter&, Value& v, CallArgs& a) {
  return make_int(static_cast<int64_t>(length_of(v, a.pos)));
}
// String filters keep Markup as Markup (soft_str), which matters for a later "+".
Value like(const Value& v, std::string s) {
  return v.markup ? make_markup(std::move(s)) : make_str(std::move(s));
}
Value f_trim(Interpreter&, Value& v, CallArgs& a) {
  return like(v, py_strip(text_of(v), find_arg(a, 0, "chars"), true, true));
}
Value f_upper(Interpreter&, Value& v, CallArgs&) {
  return like(v, py_upper(text_of(v)));
}
Value f_lower(Interpreter&, Value& v, CallArgs&) {
  return like(v, py_lower(text_of(v)));
}
Value f_string(Interpreter&, Value& v, CallArgs&) {
  return like(v, text_of(v));
}
Value f_safe(Interpreter&, Value& v, CallArgs&) {
  return make_markup(text_of(v));
}

Value f_capitalize(Interpreter&, Value& v, CallArgs& a) {
  return call_method(make_str(text_of(v)), "capitalize", a);
}

// jinja2's title: capitalize every word that follows a space, dash or opening bracket.
Value f_title(Interpreter&, Value& v, CallArgs& a) {
  std::string s = text_of(v), out, word;
  CallArgs none;
  none.pos = a.pos;
  auto flush = [&]() {
    if (!word.empty()) out += call_method(make_str(word), "capitalize", none).s;
    word.clear();
  };
  for (char c : s) {
    bool sep = c == '-' || c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' ||
               c == '\v' || c == '(' || c == '{' || c == '[' || c == '<';
    if (sep)
      flush(), out += c;
    else
      word += c;
  }
  flush();
  return make_str(out);
}

Value f_default(Interpreter&, Value& v, CallArgs& a) {
  bool boolean = truthy(arg_or(a, 1, "boolean", make_bool(false)));
  if (v.is_undefined() || (boolean && !truthy(v)))
    return arg_or(a, 0, "default_value", make_str(""));
  return v;
}

Value f_first(Interpreter&, Value& v, CallArgs& a) {
  std::vector<Value> items = iterate(v, a.pos);
  return items.empty() ? make_undefined("No first item, sequence was empty.") : items.front();
}

Value f_last(Interpreter&, Value& v, CallArgs& a) {
  if (v.is_list() && v.list->generator) fail(a.pos, "'generator' object is not reversible");
  std::vector<Value> items = iterate(v, a.pos);
  return items.empty() ? make_undefined("No last item, sequence was empty.") : items.back();
}

Value f_join(Interpreter& in, Value& v, CallArgs& a) {
  std::string sep = text_of(arg_or(a, 0, "d", make_str("")));
  const Value* attribute = find_arg(a, 1, "attribute");
  std::string out;
  std::vector<Value> items = iterate(v, a.pos);
  for (size_t k = 0; k < items.size(); ++k) {
    if (k) out += sep;
    out += text_of(attribute ? attr_path(items[k], to_str(*attribute), a.pos) : items[k]);
    in.check_size(out.size(), a.pos);
  }
  return make_str(out);
}

Value f_replace(Interpreter& in, Value& v, CallArgs& a) {
  std::string out = py_replace(text_of(v), text_of(arg_or(a, 0, "old", make_str(""))),
                               text_of(arg_or(a, 1, "new", make_str(""))),
                               arg_or(a, 2, "count", make_int(-1)).as_int());
  in.check_size(out.size(), a.pos);
  return make_str(out);
}

Value f_int(Interpreter&, Value& v, CallArgs& a) {
  Value def = arg_or(a, 0, "default", make_int(0));
  if (v.is_int()) return make_int(v.as_int());
  if (v.kind == Kind::Float)
    return std::isfinite(v.f) && std::fabs(v.f) < 9.2e18 ? make_int(static_cast<int64_t>(v.f))
                                                         : def;
  if (!v.is_string()) return def;
  std::string s = py_strip(v.s, nullptr, true, true);
  s.erase(std::remove(s.begin(), s.end(), '_'), s.end());
  int base = static_cast<int>(arg_or(a, 1, "base", make_int(10)).as_int());
  char* end = nullptr;
  errno = 0;
  long long n = s.empty() ? 0 : std::strtoll(s.c_str(), &end, base);
  if (!s.empty() && *end == '\0' && errno == 0) return make_int(n);
  double d = s.empty() ? 0 : std::strtod(s.c_str(), &end);
  if (!s.empty() && *end == '\0' && std::isfinite(d) && std::fabs(d) < 9.2e18)
    return make_int(static_cast<int64_t>(d));
  return def;
}

Value f_float(Interpreter&, Value& v, CallArgs& a) {
  Value def = arg_or(a, 0, "default", make_float(0.0));
  if (v.is_number()) return make_float(v.as_double());
  if (!v.is_string()) return def;
  std::string s = py_strip(v.s, nullptr, true, true);
  char* end = nullptr;
  double d = s.empty() ? 0 : std::strtod(s.c_str(), &end);
  return !s.empty() && *end == '\0' ? make_float(d) : def;
}

Value f_abs(Interpreter&, Value& v, CallArgs& a) {
  if (v.kind == Kind::Float) return make_float(std::fabs(v.f));
  if (v.is_int()) return make_int(v.as_int() < 0 ? -v.as_int() : v.as_int());
  fail(a.pos, "bad operand type for abs(): '" + type_name(v) + "'");
}

Value f_round(Interpreter&, Value& v, CallArgs& a) {
  int64_t precision = arg_or(a, 0, "precision", make_int(0)).as_int();
  std::string method = text_of(arg_or(a, 1, "method", make_str("common")));
  if (!v.is_number()) fail(a.pos, "round() needs a number, not " + type_name(v));
  if (method == "common") {
    if (v.is_int()) return make_int(v.as_int());
    char buf[512];
    std::snprintf(buf, sizeof(buf), "%.*f",
                  static_cast<int>(std::clamp<int64_t>(precision, 0, 300)), v.f);
    return make_float(std::strtod(buf, nullptr));
  }
  double scale = std::pow(10.0, static_cast<double>(precision));
  double x = v.as_double() * scale;
  if (method == "ceil") return make_float(std::ceil(x) / scale);
  if (method == "floor") return make_float(std::floor(x) / scale);
  fail(a.pos, "method must be common, ceil or floor");
}

Value f_list(Interpreter&, Value& v, CallArgs& a) {
  return make_list(iterate(v, a.pos));
}

Value f_items(Interpreter&, Value& v, CallArgs& a) {
  if (v.is_undefined()) return make_list({});
  if (!v.is_dict()) fail(a.pos, "Can only get item pairs from a mapping.");
  std::vector<Value> out;
  for (const auto& [k, x] : v.dict->items) out.push_back(make_list({k, x}, true));
  return make_list(std::move(out));
}

Value f_dictsort(Interpreter&, Value& v, CallArgs& a) {
  if (!v.is_dict()) fail(a.pos, "dictsort needs a mapping, not " + type_name(v));
  bool cs = truthy(arg_or(a, 0, "case_sensitive", make_bool(false)));
  bool by_value = text_of(arg_or(a, 1, "by", make_str("key"))) == "value";
  bool reverse = truthy(arg_or(a, 2, "reverse", make_bool(false)));
  std::vector<std::pair<Value, Value>> items = v.dict->items;
  std::stable_sort(items.begin(), items.end(), [&](const auto& x, const auto& y) {
    const Value& kx = by_value ? x.second : x.first;
    const Value& ky = by_value ? y.second : y.first;
    int c = compare(lower_if_str(kx, cs), lower_if_str(ky, cs), a.pos);
    return reverse ? c > 0 : c < 0;
  });
  std::vector<Value> out;
  for (auto& [k, x] : items) out.push_back(make_list({k, x}, true));
  return make_list(std::move(out));
}

Value f_sort(Interpreter&, Value& v, CallArgs& a) {
  bool reverse = truthy(arg_or(a, 0, "reverse", make_bool(false)));
  bool cs = truthy(arg_or(a, 1, "case_sensitive", make_bool(false)));
  const Value* attribute = find_arg(a, 2, "attribute");
  std::vector<Value> items = iterate(v, a.pos);
  std::stable_sort(items.begin(), items.end(), [&](const Value& x, const Value& y) {
    int c = compare(sort_key(x, attribute, cs, a.pos), sort_key(y, attribute, cs, a.pos), a.pos);
    return reverse ? c > 0 : c < 0;
  });
  return make_list(std::move(items));
}

Value f_unique(Interpreter&, Value& v, CallArgs& a) {
  bool cs = truthy(arg_or(a, 0, "case_sensitive", make_bool(false)));
  const Value* attribute = find_arg(a, 1, "attribute");
  std::vector<Value> out, seen;
  for (const Value& item : iterate(v, a.pos)) {
    Value key = sort_key(item, attribute, cs, a.pos);
    if (std::any_of(seen.begin(), seen.end(), [&](const Value& s) { return equals(s, key); }))
      continue;
    seen.push_back(key);
    out.push_back(item);
  }
  return make_generator(std::move(out));
}

Value min_max(Value& v, CallArgs& a, bool want_max) {
  bool cs = truthy(arg_or(a, 0, "case_sensitive", make_bool(false)));
  const Value* attribute = find_arg(a, 1, "attribute");
  std::vector<Value> items = iterate(v, a.pos);
  if (items.empty()) return make_undefined("No aggregated item, sequence was empty.");
  size_t best = 0;
  for (size_t k = 1; k < items.size(); ++k) {
    int c = compare(sort_key(items[k], attribute, cs, a.pos),
                    sort_key(items[best], attribute, cs, a.pos), a.pos);
    if (want_max ? c > 0 : c < 0) best = k;
  }
  return items[best];
}
Value f_min(Interpreter&, Value& v, CallArgs& a) {
  return min_max(v, a, false);
}
Value f_max(Interpreter&, Value& v, CallArgs& a) {
  return min_max(v, a, true);
}

Value f_sum(Interpreter& in, Value& v, CallArgs& a) {
  const Value* attribute = find_arg(a, 0, "attribute");
  Value total = arg_or(a, 1, "start", make_int(0));
  for (const Value& item : iterate(v, a.pos))
    total = binary_op("+", total, attribute ? attr_path(item, to_str(*attribute), a.pos) : item, in,
                      a.pos);
  return total;
}

Value f_reverse(Interpreter&, Value& v, CallArgs& a) {
  std::vector<Value> items = iterate(v, a.pos);
  std::reverse(items.begin(), items.end());
  if (!v.is_string()) return make_list(std::move(items));
  std::string s;
  for (const auto& c : items) s += c.s;
  return make_str(s);
}

Value f_escape(Interpreter&, Value& v, CallArgs&) {
  return v.markup ? v : make_markup(html_escape(text_of(v)));
}
Value f_forceescape(Interpreter&, Value& v, CallArgs&) {
  return make_markup(html_escape(text_of(v)));
}

Value f_indent(Interpreter&, Value& v, CallArgs& a) {
  Value width = arg_or(a, 0, "width", make_int(4));
  bool first = truthy(arg_or(a, 1, "first", make_bool(false)));
  bool blank = truthy(arg_or(a, 2, "blank", make_bool(false)));
  std::string pad =
      width.is_string()
          ? width.s
          : std::string(static_cast<size_t>(std::max<int64_t>(width.as_int(), 0)), ' ');
  std::vector<std::string> lines = py_splitlines(text_of(v) + "\n");
  std::string out;
  for (size_t k = 0; k < lines.size(); ++k) {
    if (k) out += "\n";
    bool indent = k == 0 ? first : (blank || !lines[k].empty());
    out += (indent ? pad : "") + lines[k];
  }
  return make_str(out);
}

// Hugging Face's tojson: json.dumps(x, ensure_ascii=False, indent=indent, separators=...,
// sort_keys=False).
Value f_tojson(Interpreter& in, Value& v, CallArgs& a) {
  JsonOptions o;
  o.ensure_ascii = truthy(arg_or(a, 0, "ensure_ascii", make_bool(false)));
  Value indent = arg_or(a, 1, "indent", make_none());
  Value separators = arg_or(a, 2, "separators", make_none());
  o.sort_keys = truthy(arg_or(a, 3, "sort_keys", make_bool(false)));
  if (!indent.is_none() && !indent.is_undefined()) {
    o.pretty = true;
    o.indent = indent.is_string()
                   ? indent.s
                   : std::string(static_cast<size_t>(std::max<int64_t>(indent.as_int(), 0)), ' ');
    o.item_sep = ",";
  }
  if (separators.is_list() && separators.list->items.size() == 2) {
    o.item_sep = text_of(separators.list->items[0]);
    o.key_sep = text_of(separators.list->items[1]);
  }
  std::string out = to_json(v, o, a.pos);
  in.check_size(out.size(), a.pos);
  return make_str(out);
}

Value f_attr(Interpreter&, Value& v, CallArgs& a) {
  return get_attr(v, text_of(arg_or(a, 0, "name", make_str(""))), a.pos);
}

Value f_format(Interpreter&, Value& v, CallArgs& a) {
  if (!a.kwargs.empty()) {
    Value d = make_dict();
    for (const auto& [k, x] : a.kwargs) d.dict->set(make_str(k), x);
    return percent_format(text_of(v), d, a.pos);
  }
  return percent_format(text_of(v), make_list(a.args, true), a.pos);
}

Value f_wordcount(Interpreter&, Value& v, CallArgs& a) {
  CallArgs none;
  none.pos = a.pos;
  return make_int(
      static_cast<int64_t>(call_method(make_str(text_of(v)), "split", none).list->items.size()));
}

// select / reject / selectattr / rejectattr share one body.
Value select_items(Interpreter& in, Value& v, CallArgs& a, bool by_attr, bool keep) {
  std::vector<Value> out;
  size_t first = by_attr ? 1 : 0;
  std::string attribute = by_attr ? text_of(arg_or(a, 0, "attr", make_str(""))) : "";
  std::string test = a.args.size() > first ? text_of(a.args[first]) : "";
  if (!test.empty() && !has_test(test)) fail(a.pos, "no test named '" + test + "'");
  CallArgs test_args;
  test_args.pos = a.pos;
  for (size_t k = first + 1; k < a.args.size(); ++k) test_args.args.push_back(a.args[k]);
  if (!truthy(v)) return make_generator({});
  for (const Value& item : iterate(v, a.pos)) {
    Value x = by_attr ? attr_path(item, attribute, a.pos) : item;
    bool ok = test.empty() ? truthy(x) : apply_test(in, test, x, test_args);
    if (ok == keep) out.push_back(item);
  }
  return make_generator(std::move(out));
}
Value f_select(Interpreter& in, Value& v, CallArgs& a) {
  return select_items(in, v, a, false, true);
}
Value f_reject(Interpreter& in, Value& v, CallArgs& a) {
  return select_items(in, v, a, false, false);
}
Value f_selectattr(Interpreter& in, Value& v, CallArgs& a) {
  return select_items(in, v, a, true, true);
}
Value f_rejectattr(Interpreter& in, Value& v, CallArgs& a) {
  return select_items(in, v, a, true, false);
}

Value f_map(Interpreter& in, Value& v, CallArgs& a) {
  std::vector<Value> out;
  if (!truthy(v)) return make_generator({});
  const Value* attribute = nullptr;
  for (const auto& [k, x] : a.kwargs)
    if (k == "attribute") attribute = &x;
  if (attribute) {
    Value def = arg_or(CallArgs{{}, a.kwargs, a.pos}, 99, "default", Value());
    for (const Value& item : iterate(v, a.pos)) {
      Value x = attr_path(item, to_str(*attribute), a.pos);
      out.push_back(x.is_undefined() && !def.is_undefined() ? def : x);
    }
    return make_generator(std::move(out));
  }
  if (a.args.empty()) return make_generator(iterate(v, a.pos));
  std::string filter = text_of(a.args[0]);
  if (!has_filter(filter)) fail(a.pos, "no filter named '" + filter + "'");
  CallArgs rest{{a.args.begin() + 1, a.args.end()}, a.kwargs, a.pos};
  for (Value item : iterate(v, a.pos)) {
    CallArgs args = rest;
    out.push_back(apply_filter(in, filter, item, args));
  }
  return make_generator(std::move(out));
}

const std::map<std::string, FilterFn, std::less<>>& filters() {
  static const std::map<std::string, FilterFn, std::less<>> table = {
      {"abs", f_abs},
      {"attr", f_attr},
      {"capitalize", f_capitalize},
      {"count", f_length},
      {"d", f_default},
      {"default", f_default},
      {"dictsort", f_dictsort},
      {"e", f_escape},
      {"escape", f_escape},
      {"first", f_first},
      {"float", f_float},
      {"format", f_format},
      {"indent", f_indent},
      {"int", f_int},
      {"items", f_items},
      {"join", f_join},
      {"last", f_last},
      {"length", f_length},
      {"list", f_list},
      {"lower", f_lower},
      {"map", f_map},
      {"max", f_max},
      {"min", f_min},
      {"reject", f_reject},
      {"rejectattr", f_rejectattr},
      {"replace", f_replace},
      {"reverse", f_reverse},
      {"round", f_round},
      {"safe", f_safe},
      {"select", f_select},
      {"selectattr", f_selectattr},
      {"sort", f_sort},
      {"string", f_string},
      {"sum", f_sum},
      {"title", f_title},
      {"tojson", f_tojson},
      {"trim", f_trim},
      {"unique", f_unique},
      {"upper", f_upper},
      {"wordcount", f_wordcount},
      {"forceescape", f_forceescape},
  };
  return table;
}

bool test_value(Interpreter& in, const std::string& name, const Value& v, CallArgs& a) {
  const Value* other = find_arg(a, 0, "other");
  auto need_other = [&]() -> const Value& {
    if (!other) fail(a.pos, "test '" + name + "' needs an argument");
    return *other;
  };
  if (name == "defined") return !v.is_undefined();
  if (name == "undefined") return v.is_undefined();
  if (name == "none") return v.is_none();
  if (name == "string") return v.is_string();
  if (name == "number") return v.is_number();
  if (name == "integer") return v.kind == Kind::Int;
  if (name == "float") return v.kind == Kind::Float;
  if (name == "boolean") return v.kind == Kind::Bool;
  if (name == "true") return v.kind == Kind::Bool && v.b;
  if (name == "false") return v.kind == Kind::Bool && !v.b;
  if (name == "mapping") return v.is_dict() && v.dict->type == Dict::Type::Dict;
  if (name == "iterable")
    return v.is_undefined() || v.is_string() || v.is_list() ||
           (v.is_dict() && v.dict->type == Dict::Type::Dict);
  if (name == "sequence")
    return v.is_undefined() || v.is_string() || (v.is_list() && !v.list->generator) ||
           (v.is_dict() && v.dict->type == Dict::Type::Dict);
  if (name == "callable") return v.kind == Kind::Function;
  if (name == "lower") return v.is_string() && py_lower(v.s) == v.s;
  if (name == "upper") return v.is_string() && py_upper(v.s) == v.s;
  if (name == "escaped") return v.is_string() && v.markup;
  if (name == "odd" || name == "even") {
    if (!v.is_int()) fail(a.pos, "test '" + name + "' needs an integer, not " + type_name(v));
    return (v.as_int() % 2 != 0) == (name == "odd");
  }
  if (name == "divisibleby") {
    const Value& n = need_other();
    if (!v.is_int() || !n.is_int() || n.as_int() == 0)
      fail(a.pos, "divisibleby needs non-zero integers");
    return v.as_int() % n.as_int() == 0;
  }
  if (name == "eq" || name == "equalto" || name == "==") return equals(v, need_other());
  if (name == "ne" || name == "!=") return !equals(v, need_other());
  if (name == "sameas")
    return equals(v, need_other()) && v.kind == need_other().kind && v.list == other->list &&
           v.dict == other->dict;
  if (name == "in") return contains(need_other(), v, a.pos);
  if (name == "filter") return v.is_string() && has_filter(v.s);
  if (name == "test") return v.is_string() && has_test(v.s);
  int c = compare(v, need_other(), a.pos);
  if (name == "lt" || name == "lessthan" || name == "<") return c < 0;
  if (name == "le" || name == "<=") return c <= 0;
  if (name == "gt" || name == "greaterthan" || name == ">") return c > 0;
  if (name == "ge" || name == ">=") return c >= 0;
  (void)in;
  fail(a.pos, "no test named '" + name + "'");
}

}  // namespace

bool has_filter(std::string_view name) {
  return filters().count(name) > 0;
}

bool has_test(std::string_view name) {
  static const char* const names[] = {
      "defined",     "undefined", "none",     "string",  "number",   "integer",     "float",
      "boolean",     "true",      "false",    "mapping", "iterable", "sequence",    "callable",
      "lower",       "upper",     "escaped",  "odd",     "even",     "divisibleby", "eq",
      "equalto",     "==",        "ne",       "!=",      "sameas",   "in",          "filter",
      "test",        "lt",        "lessthan", "<",       "le",       "<=",          "gt",
      "greaterthan", ">",         "ge",       ">="};
  for (const char* n : names)
    if (name == n) return true;
  return false;
}

Value apply_filter(Interpreter& in, const std::string& name, Value input, CallArgs& args) {
  auto it = filters().find(name);
  if (it == filters().end()) fail(args.pos, "no filter named '" + name + "'");
  return it->second(in, input, args);
}

bool apply_test(Interpreter& in, const std::string& name, const Value& v, CallArgs& args) {
  return test_value(in, name, v, args);
}

}  // namespace kestrel::jinja
