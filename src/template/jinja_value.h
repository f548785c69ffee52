// Values of the Jinja engine and the Python semantics they follow: str(), repr(), ==, <,
// truthiness and json.dumps, so that templates print exactly what Python's jinja2 prints.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/utf8.h"

namespace kestrel::jinja {

// A position in the template source, 1-based.
struct Pos {
  int line = 0;
  int col = 0;
};

// Raised inside the engine and caught at the API boundary (jinja.cpp), where it becomes a Status.
struct Error {
  std::string message;
  Pos pos;
};
[[noreturn]] void fail(Pos pos, std::string message);

struct Value;
struct List;
struct Dict;
struct Function;

enum class Kind { Undefined, None, Bool, Int, Float, String, List, Dict, Function };

struct Value {
  Kind kind = Kind::Undefined;
  bool b = false;
  int64_t i = 0;
  double f = 0.0;
  std::string s;  // the text of a String; for an Undefined, the message of the error it raises
  bool markup = false;  // a String that is markupsafe.Markup (from |safe or |escape)
  std::shared_ptr<List> list;
  std::shared_ptr<Dict> dict;
  std::shared_ptr<Function> fn;

  bool is_undefined() const { return kind == Kind::Undefined; }
  bool is_none() const { return kind == Kind::None; }
  bool is_string() const { return kind == Kind::String; }
  bool is_list() const { return kind == Kind::List; }
  bool is_dict() const { return kind == Kind::Dict; }
  bool is_int() const { return kind == Kind::Int || kind == Kind::Bool; }  // Python: bool is an int
  bool is_number() const { return is_int() || kind == Kind::Float; }
  bool is_namespace() const;
  bool is_tuple() const;
  double as_double() const { return kind == Kind::Float ? f : static_cast<double>(as_int()); }
  int64_t as_int() const { return kind == Kind::Bool ? (b ? 1 : 0) : i; }
};

struct List {
  std::vector<Value> items;
  bool tuple = false;
  // The lazy result of select/reject/map/unique: iterable, but with no len(), no index and no
  // JSON form, and always true, as in jinja2.
  bool generator = false;
};

// An insertion-ordered mapping (Python dict); also a jinja2 namespace() or loop object.
struct Dict {
  enum class Type { Dict, Namespace, Loop };
  std::vector<std::pair<Value, Value>> items;
  Type type = Type::Dict;
  const Value* find(const Value& key) const;
  const Value* find(std::string_view key) const;
  void set(Value key, Value value);
};

struct CallArgs {
  std::vector<Value> args;
  std::vector<std::pair<std::string, Value>> kwargs;
  Pos pos;
};

struct Function {
  std::string name;
  std::function<Value(CallArgs&)> call;
};

Value make_undefined(std::string message);
Value make_none();
Value make_bool(bool b);
Value make_int(int64_t i);
Value make_float(double f);
Value make_str(std::string s);
Value make_markup(std::string s);
Value make_generator(std::vector<Value> items);
std::string html_escape(const std::string& s);
Value make_list(std::vector<Value> items, bool tuple = false);
Value make_dict(Dict::Type type = Dict::Type::Dict);
Value make_fn(std::string name, std::function<Value(CallArgs&)> call);

// Python semantics.
bool truthy(const Value& v);
std::string to_str(const Value& v);     // str(v); an Undefined prints as ""
std::string repr(const Value& v);       // repr(v)
std::string type_name(const Value& v);  // type(v).__name__
bool equals(const Value& a, const Value& b);
int compare(const Value& a, const Value& b, Pos pos);  // <0, 0, >0; fails on unorderable types
std::string format_float(double f);                    // repr(float)

struct JsonOptions {
  std::string indent;  // newline + this per level when `pretty`
  bool pretty = false;
  std::string item_sep = ", ";
  std::string key_sep = ": ";
  bool ensure_ascii = false;
  bool sort_keys = false;
};
std::string to_json(const Value& v, const JsonOptions& options, Pos pos);
Value from_json(const nlohmann::ordered_json& j);

// UTF-8: strings index and count by code point, as Python's str does.
std::vector<size_t> utf8_starts(std::string_view s);  // byte offset of every code point
size_t utf8_length(std::string_view s);
// Decodes the code point at s[i] and advances i; invalid bytes decode as themselves.
uint32_t utf8_next(std::string_view s, size_t& i);
using kestrel::utf8_append;  // core/utf8.h

}  // namespace kestrel::jinja
