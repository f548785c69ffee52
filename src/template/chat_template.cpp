#include "template/chat_template.h"

namespace kestrel {

Expected<ChatTemplate> ChatTemplate::parse(std::string_view source) {
  auto t = jinja::Template::parse(source);
  if (!t) return t.status();
  return ChatTemplate(std::move(t).value());
}

Expected<std::string> ChatTemplate::render(const ChatTemplateInputs& in) const {
  nlohmann::ordered_json messages = nlohmann::ordered_json::array();
  for (const auto& m : in.messages) messages.push_back({{"role", m.role}, {"content", m.content}});
  nlohmann::ordered_json context = {
      {"messages", std::move(messages)},
      {"tools", nullptr},
      {"documents", nullptr},
      {"add_generation_prompt", in.add_generation_prompt},
      {"bos_token", in.bos_token},
      {"eos_token", in.eos_token},
  };
  return template_.render(context);
}

}  // namespace kestrel
