// The Jinja interpreter: evaluates a parsed template against a context, with jinja2's scoping
// (a for loop body and a macro body are their own scope) and limits that stop hostile
// templates (deep recursion, huge loops, huge output) with an error instead of a crash.
#pragma once

#include <string>
#include <unordered_map>
#include <vector>

#include "template/jinja_ast.h"
#include "template/jinja_value.h"

namespace kestrel::jinja {

struct Limits {
  size_t max_output_bytes = 64u << 20;    // also bounds every string built on the way
  int max_call_depth = 100;               // nested macro calls
  int64_t max_loop_iterations = 1000000;  // all loop iterations of one render together
  int64_t max_range = 1000000;            // elements of one range(...)
};

class Interpreter {
 public:
  Interpreter(const Limits& limits, const nlohmann::ordered_json& context);
  std::string render(const Body& body);

  Value eval(const Expr& e);
  const Limits& limits() const { return limits_; }
  void check_size(size_t bytes, Pos pos) const;
  void count_iterations(int64_t n, Pos pos);

 private:
  struct Scope {
    std::unordered_map<std::string, Value> vars;
    Scope* parent = nullptr;
  };
  enum class Flow { Normal, Break, Continue };

  Flow exec(const Body& body, std::string& out);
  Flow exec_node(const Node& n, std::string& out);
  Flow exec_for(const Node& n, std::string& out);
  void exec_set(const Node& n, Value value);
  void define_macro(const Node& n);
  Value call_macro(const Node& n, CallArgs& args);
  Value lookup(const std::string& name) const;
  Value eval_call(const Expr& e);
  Value eval_filter(const Expr& e, const Value* input);
  Value eval_compare(const Expr& e);
  CallArgs eval_args(const Expr& e, size_t first);
  std::string render_block(const Body& body, Pos pos);

  Limits limits_;
  Scope root_;
  Scope* scope_ = &root_;
  int call_depth_ = 0;
  int64_t iterations_ = 0;
};

// Arguments of builtin calls: positional `index` or keyword `name`, else null.
const Value* find_arg(const CallArgs& a, size_t index, const char* name);
Value arg_or(const CallArgs& a, size_t index, const char* name, Value fallback);

// Python operators (jinja_ops.cpp).
Value binary_op(const std::string& op, const Value& a, const Value& b, Interpreter& in, Pos pos);
Value percent_format(const std::string& fmt, const Value& args, Pos pos);
std::vector<Value> iterate(const Value& v, Pos pos);
Value get_attr(const Value& obj, const std::string& name, Pos pos);
Value get_item(const Value& obj, const Value& key, Pos pos);
Value slice(const Value& obj, const Value& start, const Value& stop, const Value& step, Pos pos);
bool contains(const Value& container, const Value& item, Pos pos);
Value make_globals_dict(const Limits& limits);

// Filters and tests (jinja_filters.cpp).
Value apply_filter(Interpreter& in, const std::string& name, Value input, CallArgs& args);
bool apply_test(Interpreter& in, const std::string& name, const Value& v, CallArgs& args);

}  // namespace kestrel::jinja

namespace kestrel::jinja {

// Python str methods shared by methods and filters (jinja_methods.cpp).
std::string py_strip(const std::string& s, const Value* chars, bool left, bool right);
std::string py_upper(std::string s);
std::string py_lower(std::string s);
std::string py_replace(const std::string& s, const std::string& old, const std::string& repl,
                       int64_t count);
std::vector<std::string> py_splitlines(const std::string& s);
bool is_dict_method(const std::string& name);
Value call_method(const Value& self, const std::string& name, CallArgs& args);

}  // namespace kestrel::jinja
