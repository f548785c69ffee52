// Chat templates: renders a conversation into a prompt with the model's
// tokenizer.chat_template, as Hugging Face's apply_chat_template does.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"
#include "template/jinja.h"

namespace kestrel {

struct ChatMessage {
  std::string role;
  std::string content;
};

struct ChatTemplateInputs {
  std::vector<ChatMessage> messages;
  bool add_generation_prompt = true;
  std::string bos_token, eos_token;  // strings of the model's BOS/EOS tokens
};

class ChatTemplate {
 public:
  static Expected<ChatTemplate> parse(std::string_view source);  // syntax errors here
  // Runtime errors here. Variables: messages, add_generation_prompt, bos_token, eos_token, and
  // tools = documents = None, as apply_chat_template passes them.
  Expected<std::string> render(const ChatTemplateInputs& in) const;

 private:
  explicit ChatTemplate(jinja::Template t) : template_(std::move(t)) {}
  jinja::Template template_;
};

}  // namespace kestrel
