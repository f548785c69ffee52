// Test driver: tokenizes many texts with one loaded vocabulary, for the Python tests.
// Input (JSON file): {"model": PATH, "texts": [...], "add_special": bool, "parse_special": bool}
// Output (stdout): {"ids": [[...], ...], "decoded": [...]} where decoded is the streamed
// decode of the ids (render_special = parse_special) and chunks_valid says whether every
// streamed piece was valid UTF-8 on its own; or {"error": MESSAGE} with exit 1.
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "format/gguf.h"
#include "tokenizer/tokenizer.h"
#include "core/utf8.h"

using nlohmann::json;

int main(int argc, char** argv) {
  auto fail = [](const std::string& m) {
    std::printf("%s\n", json{{"error", m}}.dump().c_str());
    return 1;
  };
  if (argc != 2) return fail("usage: tokenize_batch INPUT.json");
  std::ifstream in(argv[1]);
  if (!in) return fail(std::string("cannot read ") + argv[1]);
  const json req = json::parse(in, nullptr, false);
  if (req.is_discarded()) return fail("input is not JSON");
  auto file = kestrel::gguf::File::open(req.at("model").get<std::string>());
  if (!file) return fail(file.message());
  auto tok = kestrel::tok::Tokenizer::load(**file);
  if (!tok) return fail(tok.message());
  kestrel::tok::EncodeOptions opts;
  opts.add_special = req.value("add_special", false);
  opts.parse_special = req.value("parse_special", false);
  json ids = json::array(), decoded = json::array();
  bool chunks_valid = true;  // every streamed piece ends on a character boundary
  for (const auto& t : req.at("texts")) {
    auto r = (*tok)->encode(t.get<std::string>(), opts);
    if (!r) return fail(r.message());
    ids.push_back(*r);
    kestrel::tok::Detokenizer d(**tok, /*at_text_start=*/true, opts.parse_special);
    std::string text;
    for (int32_t id : *r) {
      const std::string piece = d.push(id);
      if (kestrel::utf8_invalid_offset(piece) != std::string::npos) chunks_valid = false;
      text += piece;
    }
    text += d.flush();
    // As a list of byte values: a decoded text need not be valid UTF-8.
    decoded.push_back(std::vector<uint8_t>(text.begin(), text.end()));
  }
  std::printf(
      "%s\n",
      json{{"ids", ids}, {"decoded", decoded}, {"chunks_valid", chunks_valid}}.dump().c_str());
  return 0;
}
