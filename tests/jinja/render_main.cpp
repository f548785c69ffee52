// jinja_render TEMPLATE_FILE CONTEXT_JSON_FILE: prints the render to stdout, byte for byte, or
// the error to stderr with exit code 1. Used by test_templates.py to compare with jinja2.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>

#include "template/jinja.h"

namespace {

bool read_file(const char* path, std::string& out) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return false;
  std::ostringstream ss;
  ss << f.rdbuf();
  out = ss.str();
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: jinja_render TEMPLATE_FILE CONTEXT_JSON_FILE\n");
    return 2;
  }
  std::string source, context_text;
  if (!read_file(argv[1], source) || !read_file(argv[2], context_text)) {
    std::fprintf(stderr, "error: cannot read %s or %s\n", argv[1], argv[2]);
    return 2;
  }
  auto context = nlohmann::ordered_json::parse(context_text, nullptr, false);
  if (context.is_discarded()) {
    std::fprintf(stderr, "error: %s is not valid JSON\n", argv[2]);
    return 2;
  }
  auto out = kestrel::jinja::render(source, context);
  if (!out) {
    std::fprintf(stderr, "%s\n", out.message().c_str());
    return 1;
  }
  std::fwrite(out->data(), 1, out->size(), stdout);
  return 0;
}
