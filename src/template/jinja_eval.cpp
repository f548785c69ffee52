#include "template/jinja_eval.h"

namespace kestrel::jinja {

const Value* find_arg(const CallArgs& a, size_t index, const char* name) {
  if (index < a.args.size()) return &a.args[index];
  for (const auto& [k, v] : a.kwargs)
    if (k == name) return &v;
  return nullptr;
}

Value arg_or(const CallArgs& a, size_t index, const char* name, Value fallback) {
  const Value* v = find_arg(a, index, name);
  return v ? *v : std::move(fallback);
}

Interpreter::Interpreter(const Limits& limits, const nlohmann::ordered_json& context)
    : limits_(limits) {
  Value globals = make_globals_dict(limits_);
  for (auto& [k, v] : globals.dict->items) root_.vars[k.s] = v;
  if (context.is_object())
    for (const auto& [k, v] : context.items()) root_.vars[k] = from_json(v);
}

std::string Interpreter::render(const Body& body) {
  std::string out;
  exec(body, out);
  return out;
}

void Interpreter::check_size(size_t bytes, Pos pos) const {
  if (bytes > limits_.max_output_bytes)
    fail(pos, "output or string larger than the limit of " +
                  std::to_string(limits_.max_output_bytes) + " bytes");
}

void Interpreter::count_iterations(int64_t n, Pos pos) {
  iterations_ += n;
  if (iterations_ > limits_.max_loop_iterations)
    fail(pos, "more than " + std::to_string(limits_.max_loop_iterations) +
                  " loop iterations in one render");
}

Value Interpreter::lookup(const std::string& name) const {
  for (const Scope* s = scope_; s; s = s->parent) {
    auto it = s->vars.find(name);
    if (it != s->vars.end()) return it->second;
  }
  return make_undefined("'" + name + "' is undefined");
}

Interpreter::Flow Interpreter::exec(const Body& body, std::string& out) {
  for (const auto& n : body) {
    Flow f = exec_node(*n, out);
    if (f != Flow::Normal) return f;
  }
  return Flow::Normal;
}

std::string Interpreter::render_block(const Body& body, Pos pos) {
  std::string out;
  if (exec(body, out) != Flow::Normal) fail(pos, "'break' or 'continue' escaped its block");
  return out;
}

Interpreter::Flow Interpreter::exec_node(const Node& n, std::string& out) {
  switch (n.kind) {
    case Node::Kind::Text:
      out += n.text;
      break;
    case Node::Kind::Output:
      out += to_str(eval(*n.expr));
      break;
    case Node::Kind::If:
      return exec(truthy(eval(*n.expr)) ? n.body : n.else_body, out);
    case Node::Kind::For:
      return exec_for(n, out);
    case Node::Kind::Set:
      exec_set(n, eval(*n.expr));
      break;
    case Node::Kind::SetBlock: {
      Value text = make_str(render_block(n.body, n.pos));
      exec_set(n, n.expr ? eval_filter(*n.expr, &text) : text);
      break;
    }
    case Node::Kind::Macro:
      define_macro(n);
      break;
    case Node::Kind::FilterBlock: {
      Value text = make_str(render_block(n.body, n.pos));
      out += to_str(eval_filter(*n.expr, &text));
      break;
    }
    case Node::Kind::Break:
      return Flow::Break;
    case Node::Kind::Continue:
      return Flow::Continue;
    case Node::Kind::Scope:
      return exec(n.body, out);
  }
  check_size(out.size(), n.pos);
  return Flow::Normal;
}

namespace {

// Binds `targets` to `value`, unpacking it when there are several names.
void bind_targets(std::unordered_map<std::string, Value>& vars,
                  const std::vector<std::string>& targets, const Value& value, Pos pos) {
  if (targets.size() == 1) {
    vars[targets[0]] = value;
    return;
  }
  std::vector<Value> parts = iterate(value, pos);
  if (parts.size() != targets.size())
    fail(pos, (parts.size() > targets.size() ? "too many" : "not enough") +
                  std::string(" values to unpack (expected ") + std::to_string(targets.size()) +
                  ", got " + std::to_string(parts.size()) + ")");
  for (size_t k = 0; k < parts.size(); ++k) vars[targets[k]] = parts[k];
}

Value make_loop(const std::vector<Value>& items, size_t k) {
  Value loop = make_dict(Dict::Type::Loop);
  auto n = static_cast<int64_t>(items.size());
  auto i = static_cast<int64_t>(k);
  auto set = [&](const char* key, Value v) {
    loop.dict->items.emplace_back(make_str(key), std::move(v));
  };
  set("index", make_int(i + 1));
  set("index0", make_int(i));
  set("revindex", make_int(n - i));
  set("revindex0", make_int(n - i - 1));
  set("first", make_bool(i == 0));
  set("last", make_bool(i == n - 1));
  set("length", make_int(n));
  set("depth", make_int(1));
  set("depth0", make_int(0));
  set("previtem", i > 0 ? items[k - 1] : make_undefined("there is no previous item"));
  set("nextitem", i + 1 < n ? items[k + 1] : make_undefined("there is no next item"));
  set("cycle", make_fn("cycle", [i](CallArgs& a) {
        if (a.args.empty()) fail(a.pos, "no items for cycling given");
        return a.args[static_cast<size_t>(i) % a.args.size()];
      }));
  return loop;
}

}  // namespace

Interpreter::Flow Interpreter::exec_for(const Node& n, std::string& out) {
  std::vector<Value> items = iterate(eval(*n.expr), n.pos);
  if (n.cond) {
    std::vector<Value> kept;
    for (const Value& item : items) {
      Scope s{{}, scope_};
      bind_targets(s.vars, n.targets, item, n.pos);
      Scope* saved = scope_;
      scope_ = &s;
      bool keep = truthy(eval(*n.cond));
      scope_ = saved;
      if (keep) kept.push_back(item);
    }
    items = std::move(kept);
  }
  if (items.empty()) return exec(n.else_body, out);
  count_iterations(static_cast<int64_t>(items.size()), n.pos);
  Scope* saved = scope_;
  for (size_t k = 0; k < items.size(); ++k) {
    Scope s{{}, saved};
    s.vars["loop"] = make_loop(items, k);
    bind_targets(s.vars, n.targets, items[k], n.pos);
    scope_ = &s;
    Flow f = Flow::Normal;
    try {
      f = exec(n.body, out);
    } catch (...) {
      scope_ = saved;
      throw;
    }
    scope_ = saved;
    if (f == Flow::Break) break;
  }
  return Flow::Normal;
}

void Interpreter::exec_set(const Node& n, Value value) {
  if (n.attr.empty()) {
    bind_targets(scope_->vars, n.targets, value, n.pos);
    return;
  }
  Value ns = lookup(n.targets[0]);
  if (!ns.is_namespace())
    fail(n.pos,
         "cannot assign attribute '" + n.attr + "' on non-namespace object '" + n.targets[0] + "'");
  ns.dict->set(make_str(n.attr), std::move(value));
}

void Interpreter::define_macro(const Node& n) {
  const Node* node = &n;
  scope_->vars[n.text] =
      make_fn(n.text, [this, node](CallArgs& a) { return call_macro(*node, a); });
}

Value Interpreter::call_macro(const Node& n, CallArgs& a) {
  if (a.args.size() > n.params.size())
    fail(a.pos, "macro '" + n.text + "' takes not more than " + std::to_string(n.params.size()) +
                    " argument(s)");
  if (call_depth_ >= limits_.max_call_depth)
    fail(a.pos, "macro calls nested deeper than " + std::to_string(limits_.max_call_depth) +
                    " (runaway recursion?)");
  Scope s{{}, &root_};
  for (size_t k = 0; k < a.args.size(); ++k) s.vars[n.params[k].first] = a.args[k];
  for (const auto& [key, v] : a.kwargs) {
    bool known = false;
    for (const auto& p : n.params) known |= p.first == key;
    if (!known) fail(a.pos, "macro '" + n.text + "' takes no keyword argument '" + key + "'");
    s.vars[key] = v;
  }
  Scope* saved = scope_;
  scope_ = &s;
  ++call_depth_;
  std::string out;
  try {
    for (const auto& [param, def] : n.params) {
      if (s.vars.count(param)) continue;
      s.vars[param] =
          def ? eval(*def) : make_undefined("parameter '" + param + "' was not provided");
    }
    exec(n.body, out);
  } catch (...) {
    scope_ = saved;
    --call_depth_;
    throw;
  }
  scope_ = saved;
  --call_depth_;
  return make_str(std::move(out));
}

CallArgs Interpreter::eval_args(const Expr& e, size_t first) {
  CallArgs a;
  a.pos = e.pos;
  for (size_t k = first; k < e.args.size(); ++k) a.args.push_back(eval(*e.args[k]));
  for (const auto& [key, v] : e.kwargs) a.kwargs.emplace_back(key, eval(*v));
  return a;
}

Value Interpreter::eval_call(const Expr& e) {
  Value callee = eval(*e.args[0]);
  if (callee.is_undefined()) fail(e.pos, callee.s);
  if (callee.kind != Kind::Function)
    fail(e.pos, "'" + type_name(callee) + "' object is not callable");
  CallArgs a = eval_args(e, 1);
  return callee.fn->call(a);
}

Value Interpreter::eval_filter(const Expr& e, const Value* input) {
  Value subject =
      e.args[0] ? (e.args[0]->kind == Expr::Kind::Filter && input ? eval_filter(*e.args[0], input)
                                                                  : eval(*e.args[0]))
                : *input;
  CallArgs a = eval_args(e, 1);
  return apply_filter(*this, e.name, std::move(subject), a);
}

Value Interpreter::eval_compare(const Expr& e) {
  Value left = eval(*e.args[0]);
  for (size_t k = 0; k < e.ops.size(); ++k) {
    Value right = eval(*e.args[k + 1]);
    const std::string& op = e.ops[k];
    bool ok;
    if (op == "==")
      ok = equals(left, right);
    else if (op == "!=")
      ok = !equals(left, right);
    else if (op == "in")
      ok = contains(right, left, e.pos);
    else if (op == "notin")
      ok = !contains(right, left, e.pos);
    else {
      int c = compare(left, right, e.pos);
      ok = op == "<" ? c < 0 : op == "<=" ? c <= 0 : op == ">" ? c > 0 : c >= 0;
    }
    if (!ok) return make_bool(false);
    left = std::move(right);
  }
  return make_bool(true);
}

Value Interpreter::eval(const Expr& e) {
  switch (e.kind) {
    case Expr::Kind::Literal:
      return e.literal;
    case Expr::Kind::Name:
      return lookup(e.name);
    case Expr::Kind::GetAttr:
      return get_attr(eval(*e.args[0]), e.name, e.pos);
    case Expr::Kind::GetItem:
      return get_item(eval(*e.args[0]), eval(*e.args[1]), e.pos);
    case Expr::Kind::Slice: {
      Value parts[3];
      for (int k = 0; k < 3; ++k)
        if (e.args[k + 1]) parts[k] = eval(*e.args[k + 1]);
      return slice(eval(*e.args[0]), parts[0], parts[1], parts[2], e.pos);
    }
    case Expr::Kind::Call:
      return eval_call(e);
    case Expr::Kind::Filter:
      return eval_filter(e, nullptr);
    case Expr::Kind::Test: {
      Value v = eval(*e.args[0]);
      CallArgs a = eval_args(e, 1);
      return make_bool(apply_test(*this, e.name, v, a) != e.negated);
    }
    case Expr::Kind::Not:
      return make_bool(!truthy(eval(*e.args[0])));
    case Expr::Kind::Neg:
      return binary_op("-", make_int(0), eval(*e.args[0]), *this, e.pos);
    case Expr::Kind::Plus:
      return binary_op("+", make_int(0), eval(*e.args[0]), *this, e.pos);
    case Expr::Kind::Binary:
      return binary_op(e.name, eval(*e.args[0]), eval(*e.args[1]), *this, e.pos);
    case Expr::Kind::Compare:
      return eval_compare(e);
    case Expr::Kind::And: {
      Value left = eval(*e.args[0]);
      return truthy(left) ? eval(*e.args[1]) : left;
    }
    case Expr::Kind::Or: {
      Value left = eval(*e.args[0]);
      return truthy(left) ? left : eval(*e.args[1]);
    }
    case Expr::Kind::Cond:
      if (truthy(eval(*e.args[1]))) return eval(*e.args[0]);
      return e.args[2] ? eval(*e.args[2])
                       : make_undefined("the condition was false and there is no else");
    case Expr::Kind::List:
    case Expr::Kind::Tuple: {
      std::vector<Value> items;
      for (const auto& a : e.args) items.push_back(eval(*a));
      return make_list(std::move(items), e.kind == Expr::Kind::Tuple);
    }
    case Expr::Kind::Dict: {
      Value d = make_dict();
      for (size_t k = 0; k + 1 < e.args.size(); k += 2)
        d.dict->set(eval(*e.args[k]), eval(*e.args[k + 1]));
      return d;
    }
  }
  fail(e.pos, "internal error: unknown expression");
}

}  // namespace kestrel::jinja
