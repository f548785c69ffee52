// Subcommands of the `kestrel` tool.
#pragma once

#include <CLI/CLI.hpp>
#include <string>

#include "core/status.h"
#include "generate.h"

namespace kestrel::cli {

// Prints "kestrel: error: MESSAGE" on stderr and returns the exit status 1.
int fail(const std::string& message);
// The prompt from -p TEXT or -f FILE (at most one of them).
Expected<std::string> read_prompt(const std::string& text, const std::string& file);
// Writes a file atomically: a temporary beside it, renamed into place when complete.
Status write_file(const std::string& path, const void* data, size_t bytes);

struct RunOptions {
  SessionOptions session;
  std::string prompt;  // -p
  std::string file;    // -f
  std::string tokens;  // "1,2,3"
  std::string dump_logits;
};
void add_run_command(CLI::App& app, RunOptions& o);
int run_command(RunOptions& o);

struct InfoOptions {
  std::string model;
  bool all_tensors = false;
};
void add_info_command(CLI::App& app, InfoOptions& o);
int info_command(const InfoOptions& o);

struct TokenizeOptions {
  std::string model;
  std::string prompt;
  std::string file;
  bool ids_only = false;
  bool no_special = false;
  bool no_parse_special = false;
};
void add_tokenize_command(CLI::App& app, TokenizeOptions& o);
int tokenize_command(const TokenizeOptions& o);

struct ChatOptions {
  SessionOptions session;
  std::string prompt;  // one turn; empty (and no file): interactive
  std::string file;
  std::string system;
  std::string template_file;
  bool verbose_prompt = false;
};
void add_chat_command(CLI::App& app, ChatOptions& o);
int chat_command(ChatOptions& o);

}  // namespace kestrel::cli
