// The API boundary: the engine's internal Error exceptions stop here and become a Status.
#include "template/jinja.h"

#include "template/jinja_lexer.h"
#include "template/jinja_parser.h"

namespace kestrel::jinja {
namespace {

Status to_status(const char* stage, const Error& e) {
  return kestrel::error("chat template %s error at %d:%d: %s", stage, e.pos.line, e.pos.col,
                        e.message.c_str());
}

}  // namespace

Expected<Template> Template::parse(std::string_view source) {
  try {
    Template t;
    t.body_ = std::make_shared<const Body>(parse_tokens(tokenize(source, LexOptions())));
    return t;
  } catch (const Error& e) {
    return to_status("syntax", e);
  } catch (const std::exception& e) {
    return kestrel::error("chat template syntax error: %s", e.what());
  }
}

Expected<std::string> Template::render(const nlohmann::ordered_json& context,
                                       const Limits& limits) const {
  if (!context.is_object()) return kestrel::error("chat template context must be a JSON object");
  try {
    Interpreter interpreter(limits, context);
    return interpreter.render(*body_);
  } catch (const Error& e) {
    return to_status("render", e);
  } catch (const std::exception& e) {  // std::bad_alloc and the like
    return kestrel::error("chat template render error: %s", e.what());
  }
}

Expected<std::string> render(std::string_view source, const nlohmann::ordered_json& context,
                             const Limits& limits) {
  auto t = Template::parse(source);
  if (!t) return t.status();
  return t->render(context, limits);
}

Expected<std::string> render(std::string_view source, const nlohmann::json& context,
                             const Limits& limits) {
  return render(source, nlohmann::ordered_json::parse(context.dump()), limits);
}

}  // namespace kestrel::jinja
