// The syntax tree of a parsed template: expressions (Expr) and statements (Node).
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "template/jinja_value.h"

namespace kestrel::jinja {

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

struct Expr {
  enum class Kind {
    Literal,  // literal
    Name,     // name
    GetAttr,  // args[0].name
    GetItem,  // args[0][args[1]]
    Slice,    // args[0][args[1]:args[2]:args[3]], absent parts null
    Call,     // args[0](args[1..], kwargs)
    Filter,   // args[0] | name(args[1..], kwargs); args[0] null in a filter block
    Test,     // args[0] is [not] name(args[1..], kwargs)
    Not,
    Neg,
    Plus,
    Binary,   // args[0] op args[1]: + - * / // % ** ~
    Compare,  // args[0] ops[0] args[1] ops[1] args[2] ...: == != < <= > >= in notin
    And,
    Or,
    Cond,  // args[0] if args[1] else args[2] (args[2] may be null)
    List,
    Tuple,
    Dict,  // args = key0, value0, key1, value1, ...
  };
  Kind kind = Kind::Literal;
  Pos pos;
  std::string name;
  Value literal;
  std::vector<ExprPtr> args;
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
  std::vector<std::string> ops;
  bool negated = false;
};

struct Node;
using NodePtr = std::unique_ptr<Node>;
using Body = std::vector<NodePtr>;

struct Node {
  enum class Kind {
    Text,         // text
    Output,       // {{ expr }}
    If,           // if expr: body else else_body (an elif is an If inside else_body)
    For,          // for targets in expr [if cond]: body else else_body
    Set,          // set targets = expr, or set targets[0].attr = expr
    SetBlock,     // set targets[0] [| filter expr] %}body{% endset
    Macro,        // macro text(params): body
    FilterBlock,  // filter expr %}body{% endfilter
    Break,
    Continue,
    Scope,  // a plain block (generation): body
  };
  Kind kind = Kind::Text;
  Pos pos;
  std::string text;
  std::string attr;
  ExprPtr expr;
  ExprPtr cond;
  std::vector<std::string> targets;
  Body body;
  Body else_body;
  std::vector<std::pair<std::string, ExprPtr>> params;
};

}  // namespace kestrel::jinja
