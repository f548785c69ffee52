// `kestrel run`: evaluate a prompt (text or token ids) in chunks, generate, and report where
// the time went.
#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "commands.h"
#include "generate.h"
#include "runtime/settings.h"

namespace kestrel::cli {

int fail(const std::string& message) {
  std::fprintf(stderr, "kestrel: error: %s\n", message.c_str());
  return 1;
}

namespace {

Expected<std::vector<int32_t>> parse_token_list(const std::string& s) {
  std::vector<int32_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    const size_t b = item.find_first_not_of(" \t");
    const size_t e = item.find_last_not_of(" \t");
    if (b == std::string::npos) return error("--tokens: empty item in '%s'", s.c_str());
    item = item.substr(b, e - b + 1);
    char* end = nullptr;
    const long long v = std::strtoll(item.c_str(), &end, 10);
    if (*end != '\0' || v < 0 || v > INT32_MAX)
      return error("--tokens: '%s' is not a token id (a non-negative integer)", item.c_str());
    out.push_back(static_cast<int32_t>(v));
  }
  if (out.empty()) return error("--tokens is empty: give ids like --tokens 1,2,3");
  return out;
}

// The prompt as ids: --tokens as given, or the text of -p / -f through the model's tokenizer
// (BOS as the model asks, special-token text parsed, as llama.cpp does).
// `text` receives the prompt text (empty for --tokens), echoed before the generated text.
Expected<std::vector<int32_t>> prompt_tokens(const RunOptions& o, const tok::Tokenizer* tok,
                                             std::string* text) {
  const int given = !o.tokens.empty() + !o.prompt.empty() + !o.file.empty();
  if (given != 1) return error("give the prompt with exactly one of -p TEXT, -f FILE or --tokens");
  if (!o.tokens.empty()) return parse_token_list(o.tokens);
  KESTREL_ASSIGN_OR_RETURN(*text, read_prompt(o.prompt, o.file));
  if (!tok) return error("this model has no vocabulary: give the prompt as --tokens");
  KESTREL_ASSIGN_OR_RETURN(std::vector<int32_t> ids, tok->encode(*text));
  if (ids.empty()) return error("the prompt is empty: give some text");
  return ids;
}

}  // namespace

void add_run_command(CLI::App& app, RunOptions& o) {
  CLI::App* run = app.add_subcommand("run", "Evaluate a prompt and generate tokens");
  add_session_options(run, o.session, 32);
  run->add_option("-p,--prompt", o.prompt, "prompt text");
  run->add_option("-f,--file", o.file, "file holding the prompt text");
  run->add_option("--tokens", o.tokens, "prompt as token ids, e.g. 1,2,3");
  run->add_option("--dump-logits", o.dump_logits,
                  "write float32 logits of every prompt position, [n_prompt][n_vocab]");
  run->add_option("--dump-last-logits", o.dump_last_logits,
                  "write float32 logits of the last prompt position, [n_vocab], computed as "
                  "without --dump-logits (the head runs for that row only)");
}

int run_command(RunOptions& o) {
  Status settings = apply_settings_file(o.session);
  if (!settings) return fail(settings.message());
  const SessionOptions& so = o.session;
  if (so.n_predict < 0) return fail("-n must be 0 or more");
  const auto t_load = std::chrono::steady_clock::now();
  Loaded l;
  auto model = load_model(so);
  if (!model) return fail(model.message());
  l.model = std::move(*model);
  auto tokenizer = tok::Tokenizer::load(l.model->file());
  if (tokenizer)
    l.tokenizer = std::move(*tokenizer);
  else if (o.tokens.empty())  // a text prompt needs the vocabulary; ids do not
    return fail(tokenizer.message());
  std::string prompt_text;
  auto tokens = prompt_tokens(o, l.tokenizer.get(), &prompt_text);
  if (!tokens) return fail(tokens.message());
  const int n_prompt = static_cast<int>(tokens->size());
  Status st = create_session(so, n_prompt + so.n_predict, &l);
  if (!st) return fail(st.message());
  l.load_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t_load).count();
  st = warm_up(so, n_prompt, &l);
  if (!st) return fail(st.message());

  std::vector<float> all_logits;
  st = l.session->prefill(*tokens, o.dump_logits.empty() ? nullptr : &all_logits);
  if (!st) return fail(st.message());
  if (!o.dump_logits.empty()) {
    st = runtime::write_file_atomic(
        o.dump_logits, std::string_view(reinterpret_cast<const char*>(all_logits.data()),
                                        all_logits.size() * sizeof(float)));
    if (!st) return fail(st.message());
  }
  if (!o.dump_last_logits.empty()) {
    const std::vector<float>& last = l.session->last_logits();
    st = runtime::write_file_atomic(
        o.dump_last_logits,
        std::string_view(reinterpret_cast<const char*>(last.data()), last.size() * sizeof(float)));
    if (!st) return fail(st.message());
  }

  const bool text_mode = o.tokens.empty();
  if (text_mode && so.n_predict > 0) std::printf("%s", prompt_text.c_str());
  runtime::Sampler sampler(sampler_params(so));
  const auto& cfg = l.model->config();
  auto gen = generate(*l.session, l.tokenizer.get(), sampler, cfg.n_vocab,
                      l.model->file().get_int("tokenizer.ggml.eos_token_id", -1), so.n_predict,
                      so.ignore_eos, /*print_ids=*/!text_mode, stdout);
  if (!gen) return fail(gen.message());
  if (!gen->ids.empty()) std::printf("\n");
  st = finish_report(so, l, n_prompt, *gen);
  if (!st) return fail(st.message());
  return 0;
}

}  // namespace kestrel::cli
