#include "template/jinja_parser.h"

#include <algorithm>
#include <initializer_list>

namespace kestrel::jinja {
namespace {

// Nesting limit for expressions and blocks: hostile templates must not exhaust the stack.
constexpr int kMaxParseDepth = 200;

ExprPtr make_expr(Expr::Kind kind, Pos pos) {
  auto e = std::make_unique<Expr>();
  e->kind = kind;
  e->pos = pos;
  return e;
}

ExprPtr make_binary(Expr::Kind kind, Pos pos, std::string op, ExprPtr a, ExprPtr b) {
  auto e = make_expr(kind, pos);
  e->name = std::move(op);
  e->args.push_back(std::move(a));
  e->args.push_back(std::move(b));
  return e;
}

class Parser {
 public:
  explicit Parser(std::vector<Token> tokens) : t_(std::move(tokens)) {}

  Body parse_all() { return subparse({}); }

 private:
  struct DepthGuard {
    explicit DepthGuard(Parser& p) : p_(p) {
      if (++p_.depth_ > kMaxParseDepth)
        fail(p_.cur().pos, "template nested too deeply (more than 200 levels)");
    }
    ~DepthGuard() { --p_.depth_; }
    Parser& p_;
  };

  const Token& cur() const { return t_[i_]; }
  const Token& peek(size_t k = 1) const { return t_[std::min(i_ + k, t_.size() - 1)]; }
  const Token& advance() { return t_[i_ < t_.size() - 1 ? i_++ : i_]; }
  bool is_op(const char* op) const { return cur().type == Tok::Op && cur().text == op; }
  bool is_name(const char* n) const { return cur().type == Tok::Name && cur().text == n; }
  bool skip_op(const char* op) { return is_op(op) ? (advance(), true) : false; }
  bool skip_name(const char* n) { return is_name(n) ? (advance(), true) : false; }

  static std::string describe(const Token& t) {
    switch (t.type) {
      case Tok::Eof:
        return "end of template";
      case Tok::VarEnd:
        return "end of print statement '}}'";
      case Tok::BlockEnd:
        return "end of statement block '%}'";
      case Tok::Text:
        return "template text";
      case Tok::String:
        return "string literal";
      default:
        return "'" + t.text + "'";
    }
  }

  [[noreturn]] void unexpected(const std::string& wanted) const {
    fail(cur().pos, "expected " + wanted + ", got " + describe(cur()));
  }
  void expect_op(const char* op) {
    if (!skip_op(op)) unexpected(std::string("'") + op + "'");
  }
  std::string expect_name() {
    if (cur().type != Tok::Name) unexpected("a name");
    return advance().text;
  }
  void expect_block_end() {
    if (cur().type != Tok::BlockEnd) unexpected("end of statement block '%}'");
    advance();
  }

  // Statements until a {% tag %} named in `ends`; leaves that tag's "{%" as the current token.
  Body subparse(std::initializer_list<const char*> ends) {
    Body body;
    for (;;) {
      const Token& t = cur();
      if (t.type == Tok::Eof) {
        if (ends.size() == 0) return body;
        std::string names;
        for (const char* e : ends)
          names += std::string(names.empty() ? "" : " or ") + "'" + e + "'";
        fail(t.pos, "unexpected end of template: looking for " + names);
      }
      if (t.type == Tok::Text) {
        auto n = std::make_unique<Node>();
        n->kind = Node::Kind::Text;
        n->pos = t.pos;
        n->text = t.text;
        body.push_back(std::move(n));
        advance();
      } else if (t.type == Tok::VarBegin) {
        auto n = std::make_unique<Node>();
        n->kind = Node::Kind::Output;
        n->pos = advance().pos;
        n->expr = parse_tuple(true);
        if (cur().type != Tok::VarEnd) unexpected("end of print statement '}}'");
        advance();
        body.push_back(std::move(n));
      } else if (t.type == Tok::BlockBegin) {
        const Token& name = peek();
        if (name.type == Tok::Name)
          for (const char* e : ends)
            if (name.text == e) return body;
        body.push_back(parse_statement());
      } else {
        unexpected("template text or a tag");
      }
    }
  }

  // Consumes "{% name %}" for the closing tag that subparse stopped at.
  void end_tag(const char* name) {
    advance();
    if (expect_name() != name) fail(t_[i_ - 1].pos, std::string("expected '") + name + "'");
    expect_block_end();
  }

  NodePtr new_node(Node::Kind kind, Pos pos) {
    auto n = std::make_unique<Node>();
    n->kind = kind;
    n->pos = pos;
    return n;
  }

  NodePtr parse_statement() {
    DepthGuard guard(*this);
    advance();  // {%
    Pos pos = cur().pos;
    if (cur().type != Tok::Name) unexpected("a statement name");
    std::string kw = advance().text;
    if (kw == "if") return parse_if(pos);
    if (kw == "for") return parse_for(pos);
    if (kw == "set") return parse_set(pos);
    if (kw == "macro") return parse_macro(pos);
    if (kw == "filter") return parse_filter_block(pos);
    if (kw == "break" || kw == "continue") {
      if (loop_depth_ == 0) fail(pos, "'" + kw + "' outside of a loop");
      expect_block_end();
      return new_node(kw == "break" ? Node::Kind::Break : Node::Kind::Continue, pos);
    }
    if (kw == "generation") {
      auto n = new_node(Node::Kind::Scope, pos);
      expect_block_end();
      n->body = subparse({"endgeneration"});
      end_tag("endgeneration");
      return n;
    }
    static const char* const unsupported[] = {"extends",    "include", "import", "from",
                                              "block",      "call",    "with",   "do",
                                              "autoescape", "trans"};
    for (const char* u : unsupported)
      if (kw == u) fail(pos, "the '" + kw + "' tag is not supported");
    fail(pos, "unknown tag '" + kw + "'");
  }

  NodePtr parse_if(Pos pos) {
    auto n = new_node(Node::Kind::If, pos);
    n->expr = parse_expression(false);
    expect_block_end();
    n->body = subparse({"elif", "else", "endif"});
    advance();  // {%
    Pos branch_pos = cur().pos;
    std::string kw = expect_name();
    if (kw == "elif") {
      n->else_body.push_back(parse_if(branch_pos));
    } else if (kw == "else") {
      expect_block_end();
      n->else_body = subparse({"endif"});
      end_tag("endif");
    } else {
      expect_block_end();
    }
    return n;
  }

  std::vector<std::string> parse_targets() {
    std::vector<std::string> names;
    bool paren = skip_op("(");
    do {
      if (paren && is_op(")")) break;
      names.push_back(expect_name());
    } while (skip_op(","));
    if (paren) expect_op(")");
    return names;
  }

  NodePtr parse_for(Pos pos) {
    auto n = new_node(Node::Kind::For, pos);
    n->targets = parse_targets();
    if (!skip_name("in")) unexpected("'in'");
    n->expr = parse_tuple(false);
    if (skip_name("if")) n->cond = parse_expression(true);
    if (is_name("recursive")) fail(cur().pos, "recursive for loops are not supported");
    expect_block_end();
    ++loop_depth_;
    n->body = subparse({"endfor", "else"});
    --loop_depth_;
    if (peek().text == "else") {
      advance();
      advance();
      expect_block_end();
      n->else_body = subparse({"endfor"});
    }
    end_tag("endfor");
    return n;
  }

  NodePtr parse_set(Pos pos) {
    auto n = new_node(Node::Kind::Set, pos);
    if (cur().type == Tok::Name && peek().type == Tok::Op && peek().text == ".") {
      n->targets.push_back(advance().text);
      advance();
      n->attr = expect_name();
    } else {
      n->targets = parse_targets();
    }
    if (skip_op("=")) {
      n->expr = parse_tuple(true);
      expect_block_end();
      return n;
    }
    if (!n->attr.empty() || n->targets.size() != 1) unexpected("'='");
    n->kind = Node::Kind::SetBlock;
    if (is_op("|")) n->expr = parse_filter_chain(nullptr);
    expect_block_end();
    n->body = subparse({"endset"});
    end_tag("endset");
    return n;
  }

  NodePtr parse_macro(Pos pos) {
    auto n = new_node(Node::Kind::Macro, pos);
    n->text = expect_name();
    expect_op("(");
    while (!is_op(")")) {
      if (!n->params.empty()) expect_op(",");
      if (is_op(")")) break;
      std::string param = expect_name();
      ExprPtr def = skip_op("=") ? parse_expression(true) : nullptr;
      n->params.emplace_back(std::move(param), std::move(def));
    }
    advance();
    expect_block_end();
    int saved_loop_depth = loop_depth_;
    loop_depth_ = 0;
    n->body = subparse({"endmacro"});
    loop_depth_ = saved_loop_depth;
    end_tag("endmacro");
    return n;
  }

  NodePtr parse_filter_block(Pos pos) {
    auto n = new_node(Node::Kind::FilterBlock, pos);
    n->expr = parse_filter_chain(nullptr, true);
    expect_block_end();
    n->body = subparse({"endfilter"});
    end_tag("endfilter");
    return n;
  }

  // ---- expressions, from the loosest binding to the tightest ----

  ExprPtr parse_tuple(bool with_cond) {
    Pos pos = cur().pos;
    ExprPtr first = parse_expression(with_cond);
    if (!is_op(",")) return first;
    auto tuple = make_expr(Expr::Kind::Tuple, pos);
    tuple->args.push_back(std::move(first));
    while (skip_op(",")) {
      if (cur().type == Tok::VarEnd || cur().type == Tok::BlockEnd || is_op(")") || is_name("if"))
        break;
      tuple->args.push_back(parse_expression(with_cond));
    }
    return tuple;
  }

  ExprPtr parse_expression(bool with_cond) {
    if (!with_cond) return parse_or();
    ExprPtr expr = parse_or();
    while (is_name("if")) {
      Pos pos = advance().pos;
      auto cond = make_expr(Expr::Kind::Cond, pos);
      cond->args.push_back(std::move(expr));
      cond->args.push_back(parse_or());
      cond->args.push_back(skip_name("else") ? parse_expression(true) : nullptr);
      expr = std::move(cond);
    }
    return expr;
  }

  ExprPtr parse_or() {
    ExprPtr left = parse_and();
    while (is_name("or")) {
      Pos pos = advance().pos;
      left = make_binary(Expr::Kind::Or, pos, "or", std::move(left), parse_and());
    }
    return left;
  }

  ExprPtr parse_and() {
    ExprPtr left = parse_not();
    while (is_name("and")) {
      Pos pos = advance().pos;
      left = make_binary(Expr::Kind::And, pos, "and", std::move(left), parse_not());
    }
    return left;
  }

  ExprPtr parse_not() {
    DepthGuard guard(*this);
    if (is_name("not")) {
      auto e = make_expr(Expr::Kind::Not, advance().pos);
      e->args.push_back(parse_not());
      return e;
    }
    return parse_compare();
  }

  ExprPtr parse_compare() {
    Pos pos = cur().pos;
    ExprPtr first = parse_math1();
    std::vector<std::string> ops;
    std::vector<ExprPtr> operands;
    for (;;) {
      if (cur().type == Tok::Op &&
          (is_op("==") || is_op("!=") || is_op("<") || is_op("<=") || is_op(">") || is_op(">="))) {
        ops.push_back(advance().text);
      } else if (skip_name("in")) {
        ops.push_back("in");
      } else if (is_name("not") && peek().type == Tok::Name && peek().text == "in") {
        advance();
        advance();
        ops.push_back("notin");
      } else {
        break;
      }
      operands.push_back(parse_math1());
    }
    if (ops.empty()) return first;
    auto e = make_expr(Expr::Kind::Compare, pos);
    e->args.push_back(std::move(first));
    for (auto& o : operands) e->args.push_back(std::move(o));
    e->ops = std::move(ops);
    return e;
  }

  ExprPtr parse_math1() {
    ExprPtr left = parse_concat();
    while (is_op("+") || is_op("-")) {
      const Token& op = advance();
      left = make_binary(Expr::Kind::Binary, op.pos, op.text, std::move(left), parse_concat());
    }
    return left;
  }

  ExprPtr parse_concat() {
    ExprPtr left = parse_math2();
    while (is_op("~")) {
      Pos pos = advance().pos;
      left = make_binary(Expr::Kind::Binary, pos, "~", std::move(left), parse_math2());
    }
    return left;
  }

  ExprPtr parse_math2() {
    ExprPtr left = parse_pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      const Token& op = advance();
      left = make_binary(Expr::Kind::Binary, op.pos, op.text, std::move(left), parse_pow());
    }
    return left;
  }

  ExprPtr parse_pow() {
    ExprPtr left = parse_unary(true);
    while (is_op("**")) {
      Pos pos = advance().pos;
      left = make_binary(Expr::Kind::Binary, pos, "**", std::move(left), parse_unary(true));
    }
    return left;
  }

  ExprPtr parse_unary(bool with_filter) {
    DepthGuard guard(*this);
    ExprPtr node;
    if (is_op("-") || is_op("+")) {
      const Token& op = advance();
      node = make_expr(op.text == "-" ? Expr::Kind::Neg : Expr::Kind::Plus, op.pos);
      node->args.push_back(parse_unary(false));
    } else {
      node = parse_primary();
    }
    node = parse_postfix(std::move(node));
    return with_filter ? parse_filter_expr(std::move(node)) : std::move(node);
  }

  ExprPtr parse_primary() {
    DepthGuard guard(*this);
    const Token& t = cur();
    Pos pos = t.pos;
    if (t.type == Tok::Name) {
      advance();
      auto e = make_expr(Expr::Kind::Literal, pos);
      if (t.text == "true" || t.text == "True")
        e->literal = make_bool(true);
      else if (t.text == "false" || t.text == "False")
        e->literal = make_bool(false);
      else if (t.text == "none" || t.text == "None")
        e->literal = make_none();
      else
        e->kind = Expr::Kind::Name, e->name = t.text;
      return e;
    }
    if (t.type == Tok::String) {
      std::string s;
      while (cur().type == Tok::String) s += advance().text;
      auto e = make_expr(Expr::Kind::Literal, pos);
      e->literal = make_str(std::move(s));
      return e;
    }
    if (t.type == Tok::Int || t.type == Tok::Float) {
      auto e = make_expr(Expr::Kind::Literal, pos);
      e->literal = t.type == Tok::Int ? make_int(t.int_value) : make_float(t.float_value);
      advance();
      return e;
    }
    if (skip_op("(")) {
      if (skip_op(")")) return make_expr(Expr::Kind::Tuple, pos);
      ExprPtr inner = parse_tuple(true);
      expect_op(")");
      return inner;
    }
    if (skip_op("[")) return parse_sequence(Expr::Kind::List, pos, "]");
    if (skip_op("{")) return parse_sequence(Expr::Kind::Dict, pos, "}");
    unexpected("an expression");
  }

  ExprPtr parse_sequence(Expr::Kind kind, Pos pos, const char* close) {
    auto e = make_expr(kind, pos);
    while (!is_op(close)) {
      if (!e->args.empty()) expect_op(",");
      if (is_op(close)) break;
      e->args.push_back(parse_expression(true));
      if (kind == Expr::Kind::Dict) {
        expect_op(":");
        e->args.push_back(parse_expression(true));
      }
    }
    advance();
    return e;
  }

  ExprPtr parse_postfix(ExprPtr node) {
    for (;;) {
      Pos pos = cur().pos;
      if (skip_op(".")) {
        if (cur().type == Tok::Name) {
          auto e = make_expr(Expr::Kind::GetAttr, pos);
          e->name = advance().text;
          e->args.push_back(std::move(node));
          node = std::move(e);
        } else if (cur().type == Tok::Int) {
          auto key = make_expr(Expr::Kind::Literal, cur().pos);
          key->literal = make_int(advance().int_value);
          node = make_binary(Expr::Kind::GetItem, pos, "", std::move(node), std::move(key));
        } else {
          unexpected("an attribute name");
        }
      } else if (skip_op("[")) {
        node = parse_subscript(std::move(node), pos);
      } else if (is_op("(")) {
        node = parse_call(std::move(node));
      } else {
        return node;
      }
    }
  }

  ExprPtr parse_subscript(ExprPtr node, Pos pos) {
    ExprPtr parts[3];
    bool slice = false;
    if (!is_op(":")) parts[0] = parse_expression(true);
    if (skip_op(":")) {
      slice = true;
      if (!is_op("]") && !is_op(":")) parts[1] = parse_expression(true);
      if (skip_op(":") && !is_op("]")) parts[2] = parse_expression(true);
    }
    expect_op("]");
    if (!slice)
      return make_binary(Expr::Kind::GetItem, pos, "", std::move(node), std::move(parts[0]));
    auto e = make_expr(Expr::Kind::Slice, pos);
    e->args.push_back(std::move(node));
    for (auto& p : parts) e->args.push_back(std::move(p));
    return e;
  }

  // Parses "(args, kw=value)" into e->args (after any already there) and e->kwargs.
  void parse_call_args(Expr& e) {
    expect_op("(");
    bool first = true;
    while (!is_op(")")) {
      if (!first) expect_op(",");
      first = false;
      if (is_op(")")) break;
      if (is_op("*") || is_op("**"))
        fail(cur().pos, "*args and **kwargs in calls are not supported");
      if (cur().type == Tok::Name && peek().type == Tok::Op && peek().text == "=") {
        std::string key = advance().text;
        advance();
        e.kwargs.emplace_back(std::move(key), parse_expression(true));
      } else {
        if (!e.kwargs.empty()) fail(cur().pos, "positional argument follows keyword argument");
        e.args.push_back(parse_expression(true));
      }
    }
    advance();
  }

  ExprPtr parse_call(ExprPtr callee) {
    auto e = make_expr(Expr::Kind::Call, cur().pos);
    e->args.push_back(std::move(callee));
    parse_call_args(*e);
    return e;
  }

  ExprPtr parse_filter_expr(ExprPtr node) {
    for (;;) {
      if (is_op("|"))
        node = parse_filter_chain(std::move(node));
      else if (is_name("is"))
        node = parse_test(std::move(node));
      else if (is_op("("))
        node = parse_call(std::move(node));
      else
        return node;
    }
  }

  ExprPtr parse_filter_chain(ExprPtr node, bool start_inline = false) {
    while (is_op("|") || start_inline) {
      if (!start_inline) advance();
      start_inline = false;
      Pos pos = cur().pos;
      std::string name = expect_name();
      auto e = make_expr(Expr::Kind::Filter, pos);
      e->name = name;
      e->args.push_back(std::move(node));
      if (is_op("(")) parse_call_args(*e);
      node = std::move(e);
    }
    return node;
  }

  ExprPtr parse_test(ExprPtr node) {
    advance();  // is
    auto e = make_expr(Expr::Kind::Test, cur().pos);
    e->negated = skip_name("not");
    e->name = expect_name();
    e->args.push_back(std::move(node));
    const Token& t = cur();
    bool arg_start = t.type == Tok::Name || t.type == Tok::String || t.type == Tok::Int ||
                     t.type == Tok::Float || is_op("[") || is_op("{");
    if (is_op("(")) {
      parse_call_args(*e);
    } else if (arg_start && !is_name("else") && !is_name("or") && !is_name("and")) {
      if (is_name("is")) fail(t.pos, "tests cannot be chained with 'is'");
      e->args.push_back(parse_postfix(parse_primary()));
    }
    return e;
  }

  std::vector<Token> t_;
  size_t i_ = 0;
  int depth_ = 0;
  int loop_depth_ = 0;
};

// jinja2 rejects an unknown filter or test when it compiles the template, except inside an
// if statement or a conditional expression (a "soft frame"), where it fails only if evaluated.
void check_names(const Expr* e, bool soft) {
  if (!e) return;
  if (e->kind == Expr::Kind::Cond) soft = true;
  if (!soft && e->kind == Expr::Kind::Filter && !has_filter(e->name))
    fail(e->pos, "no filter named '" + e->name + "'");
  if (!soft && e->kind == Expr::Kind::Test && !has_test(e->name))
    fail(e->pos, "no test named '" + e->name + "'");
  for (const auto& a : e->args) check_names(a.get(), soft);
  for (const auto& kv : e->kwargs) check_names(kv.second.get(), soft);
}

void check_names(const Body& body, bool soft) {
  for (const auto& n : body) {
    bool in_if = soft || n->kind == Node::Kind::If;
    check_names(n->expr.get(), in_if);
    check_names(n->cond.get(), false);
    for (const auto& p : n->params) check_names(p.second.get(), false);
    check_names(n->body, in_if && n->kind == Node::Kind::If);
    check_names(n->else_body, in_if && n->kind == Node::Kind::If);
  }
}

}  // namespace

Body parse_tokens(std::vector<Token> tokens) {
  Body body = Parser(std::move(tokens)).parse_all();
  check_names(body, false);
  return body;
}

}  // namespace kestrel::jinja
