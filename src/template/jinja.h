// A Jinja2 template engine that renders Hugging Face chat templates exactly as Python's jinja2
// does under apply_chat_template's settings: ImmutableSandboxedEnvironment(trim_blocks=True,
// lstrip_blocks=True) with the loopcontrols extension, the globals raise_exception and
// strftime_now and HF's tojson filter.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "core/status.h"
#include "template/jinja_eval.h"

namespace kestrel::jinja {

class Template {
 public:
  // Syntax errors (and unknown filters or tests, as jinja2 reports them) are found here.
  static Expected<Template> parse(std::string_view source);
  // Runtime errors (undefined values used, type errors, raise_exception, limits) are found here.
  Expected<std::string> render(const nlohmann::ordered_json& context,
                               const Limits& limits = Limits()) const;

 private:
  std::shared_ptr<const Body> body_;
};

// Parses and renders in one call; `context` must be a JSON object of the template's variables.
Expected<std::string> render(std::string_view source, const nlohmann::ordered_json& context,
                             const Limits& limits = Limits());
Expected<std::string> render(std::string_view source, const nlohmann::json& context,
                             const Limits& limits = Limits());

}  // namespace kestrel::jinja
