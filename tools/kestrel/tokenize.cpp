// `kestrel tokenize`: the model's own tokenizer on a text, printing ids and pieces (or just
// the ids, for scripts). Reads only the vocabulary, so vocab-only GGUFs work too.
#include <cstdio>
#include <fstream>
#include <sstream>

#include "commands.h"
#include "format/gguf.h"
#include "tokenizer/tokenizer.h"

namespace kestrel::cli {

namespace {

// A piece made printable: control characters and bytes of unfinished UTF-8 are escaped.
std::string printable(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c == '\n')
      out += "\\n";
    else if (c == '\t')
      out += "\\t";
    else if (c == '\r')
      out += "\\r";
    else if (c < 0x20 || c == 0x7F)
      out += format("\\x%02X", c);
    else
      out += static_cast<char>(c);
  }
  return out;
}

}  // namespace

Expected<std::string> read_prompt(const std::string& text, const std::string& file) {
  if (!text.empty() && !file.empty()) return error("give the prompt with -p or -f, not both");
  if (file.empty()) return text;
  std::ifstream in(file, std::ios::binary);
  if (!in) return error("cannot read prompt file '%s'", file.c_str());
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void add_tokenize_command(CLI::App& app, TokenizeOptions& o) {
  CLI::App* c = app.add_subcommand("tokenize", "Print the token ids and pieces of a text");
  c->add_option("-m,--model", o.model, "GGUF model (or vocab-only GGUF)")->required();
  c->add_option("-p,--prompt", o.prompt, "text to tokenize");
  c->add_option("-f,--file", o.file, "file whose contents to tokenize");
  c->add_flag("--ids", o.ids_only, "print only the ids, as a list");
  c->add_flag("--no-bos", o.no_special, "do not add BOS/EOS even if the model asks for them");
  c->add_flag("--no-parse-special", o.no_parse_special,
              "treat special-token text like <|im_start|> as plain text");
}

int tokenize_command(const TokenizeOptions& o) {
  auto text = read_prompt(o.prompt, o.file);
  if (!text) return fail(text.message());
  auto file = gguf::File::open(o.model);
  if (!file) return fail(file.message());
  auto tok = tok::Tokenizer::load(**file);
  if (!tok) return fail(tok.message());
  tok::EncodeOptions opts;
  opts.add_special = !o.no_special;
  opts.parse_special = !o.no_parse_special;
  auto ids = (*tok)->encode(*text, opts);
  if (!ids) return fail(ids.message());
  if (o.ids_only) {
    std::string line = "[";
    for (size_t i = 0; i < ids->size(); ++i) line += (i ? ", " : "") + std::to_string((*ids)[i]);
    std::printf("%s]\n", line.c_str());
    return 0;
  }
  for (int32_t id : *ids)
    std::printf("%6d -> '%s'\n", id, printable((*tok)->token_bytes(id, true)).c_str());
  return 0;
}

}  // namespace kestrel::cli
