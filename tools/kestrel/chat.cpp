// `kestrel chat`: a conversation with an instruct model through its chat template, one turn
// from -p or interactively from stdin. Each turn re-renders the whole conversation, reuses
// the cached positions whose tokens did not change, and evaluates only the rest.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>

#include "commands.h"
#include "generate.h"
#include "template/chat_template.h"

namespace kestrel::cli {

namespace {

Expected<std::string> template_source(const ChatOptions& o, const gguf::File& file) {
  if (!o.template_file.empty()) return read_prompt("", o.template_file);
  const gguf::Value* v = file.find("tokenizer.chat_template");
  if (!v || v->type != gguf::ValueType::STRING || v->str.empty())
    return error(
        "this model has no chat template (tokenizer.chat_template): give one with "
        "--chat-template FILE, or use `kestrel run -p` for plain text");
  return v->str;
}

struct Conversation {
  const ChatOptions& opts;
  Loaded& l;
  const ChatTemplate& tmpl;
  std::vector<ChatMessage> messages;
  std::vector<int32_t> evaluated;  // the tokens whose K/V are in the cache, in order
  runtime::Sampler sampler;

  Conversation(const ChatOptions& o, Loaded& loaded, const ChatTemplate& t)
      : opts(o), l(loaded), tmpl(t), sampler(sampler_params(o.session)) {
    clear();
  }

  void clear() {
    messages.clear();
    if (!opts.system.empty()) messages.push_back({"system", opts.system});
    evaluated.clear();
    l.session->truncate(0);
  }

  Expected<std::vector<int32_t>> render_tokens() const {
    const tok::Vocab& v = l.tokenizer->vocab();
    ChatTemplateInputs in;
    in.messages = messages;
    in.add_generation_prompt = true;
    if (v.bos != tok::kNoToken) in.bos_token = v.text[v.bos];
    if (v.eos != tok::kNoToken) in.eos_token = v.text[v.eos];
    KESTREL_ASSIGN_OR_RETURN(std::string prompt, tmpl.render(in));
    tok::EncodeOptions eo;
    // Templates that write the BOS text themselves must not get a second BOS.
    eo.add_special = in.bos_token.empty() || prompt.rfind(in.bos_token, 0) != 0;
    return l.tokenizer->encode(prompt, eo);
  }

  // One exchange: the user's text in, the answer streamed out. An error leaves the
  // conversation as it was before the turn.
  Status turn(const std::string& user_text) {
    messages.push_back({"user", user_text});
    Status st = answer();
    if (!st) messages.pop_back();
    return st;
  }

  Status answer() {
    KESTREL_ASSIGN_OR_RETURN(std::vector<int32_t> tokens, render_tokens());
    if (tokens.empty()) return error("the chat template rendered an empty prompt");
    if (opts.verbose_prompt) {
      std::string ids;
      for (int32_t id : tokens) ids += (ids.empty() ? "" : ", ") + std::to_string(id);
      std::fprintf(stderr, "prompt ids: [%s]\n", ids.c_str());
    }
    size_t keep = 0;
    while (keep < evaluated.size() && keep < tokens.size() && evaluated[keep] == tokens[keep])
      ++keep;
    if (keep == tokens.size()) --keep;  // re-evaluate one token to get fresh logits
    const int n_ctx = l.session->params().n_ctx;
    if (static_cast<int>(tokens.size()) + 1 > n_ctx)
      return error(
          "the conversation needs %zu positions but the context holds %d: type /clear "
          "to start over, or restart with a larger -c",
          tokens.size() + 1, n_ctx);
    l.session->truncate(static_cast<int>(keep));
    evaluated.resize(keep);
    const std::vector<int32_t> fresh(tokens.begin() + static_cast<long>(keep), tokens.end());
    l.session->reset_chunk_stats();  // the report covers this turn
    if (l.profile) {
      l.profile->reset();
      l.session->set_profiler(l.profile.get());
    }
    KESTREL_TRY(l.session->prefill(fresh, nullptr));
    evaluated = tokens;
    const int room = n_ctx - l.session->n_past();
    KESTREL_ASSIGN_OR_RETURN(
        Generation gen, generate(*l.session, l.tokenizer.get(), sampler, l.model->config().n_vocab,
                                 -1, std::min(opts.session.n_predict, room),
                                 opts.session.ignore_eos, /*print_ids=*/false, stdout));
    std::printf("\n");
    std::fflush(stdout);
    if (gen.context_full || (!gen.ended && opts.session.n_predict > room))
      std::fprintf(stderr, "[the context of %d positions is full: /clear starts over]\n", n_ctx);
    evaluated.insert(evaluated.end(), gen.ids.begin(), gen.ids.begin() + gen.decode_steps);
    std::vector<int32_t> answer_ids = gen.ids;
    if (gen.ended) answer_ids.pop_back();  // the end-of-turn token is the template's business
    tok::Detokenizer d(*l.tokenizer, /*at_text_start=*/false);
    std::string text;
    for (int32_t id : answer_ids) text += d.push(id);
    messages.push_back({"assistant", text + d.flush()});
    const SessionOptions& so = opts.session;
    if (so.report || !so.report_json.empty() || so.profile || !so.history.empty())
      KESTREL_TRY(finish_report(opts.session, l, static_cast<int>(fresh.size()), gen));
    return Status::ok();
  }
};

int interactive(Conversation& c) {
  const bool tty = isatty(STDIN_FILENO);
  if (tty)
    std::fprintf(stderr, "Chatting with %s. /clear starts over, /exit (or Ctrl-D) ends.\n",
                 c.opts.session.model.c_str());
  std::string line;
  while (true) {
    if (tty) std::fprintf(stderr, "> ");
    if (!std::getline(std::cin, line)) break;
    if (line == "/exit" || line == "/quit") break;
    if (line == "/clear") {
      c.clear();
      std::fprintf(stderr, "[conversation cleared]\n");
      continue;
    }
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    Status st = c.turn(line);
    if (!st) std::fprintf(stderr, "kestrel: %s\n", st.message().c_str());  // and go on
  }
  return 0;
}

}  // namespace

void add_chat_command(CLI::App& app, ChatOptions& o) {
  CLI::App* c = app.add_subcommand("chat", "Chat with an instruct model through its template");
  add_session_options(c, o.session, 512);
  c->add_option("-p,--prompt", o.prompt, "one user turn: answer it and exit");
  c->add_option("-f,--file", o.file, "one user turn read from a file: answer it and exit");
  c->add_option("--system", o.system, "system message");
  c->add_flag("--verbose-prompt", o.verbose_prompt, "print each turn's prompt token ids");
  c->add_option("--chat-template", o.template_file,
                "Jinja chat template file (default: the model's tokenizer.chat_template)");
}

int chat_command(ChatOptions& o) {
  Status settings = apply_settings_file(o.session);
  if (!settings) return fail(settings.message());
  const auto t_load = std::chrono::steady_clock::now();
  Loaded l;
  auto model = load_model(o.session);
  if (!model) return fail(model.message());
  l.model = std::move(*model);
  auto tokenizer = tok::Tokenizer::load(l.model->file());
  if (!tokenizer) return fail(tokenizer.message());
  l.tokenizer = std::move(*tokenizer);
  auto source = template_source(o, l.model->file());
  if (!source) return fail(source.message());
  auto tmpl = ChatTemplate::parse(*source);
  if (!tmpl) return fail("the chat template cannot be parsed: " + tmpl.message());
  const int n_ctx_train = l.model->config().n_ctx_train;
  const int n_ctx = o.session.n_ctx > 0 ? o.session.n_ctx : std::min(n_ctx_train, 4096);
  SessionOptions so = o.session;
  so.n_ctx = n_ctx;
  Status st = create_session(so, 1, &l);
  if (!st) return fail(st.message());
  l.load_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t_load).count();
  // The first turn's prompt length is not known yet: warm up the micro-batch size a long one
  // uses, so that the first reply does not pay the GPU's first-pass costs.
  st = warm_up(so, so.n_ubatch, &l);
  if (!st) return fail(st.message());
  Conversation c(o, l, *tmpl);
  if (o.prompt.empty() && o.file.empty()) return interactive(c);
  auto text = read_prompt(o.prompt, o.file);
  if (!text) return fail(text.message());
  st = c.turn(*text);
  if (!st) return fail(st.message());
  return 0;
}

}  // namespace kestrel::cli
