// The `kestrel` command: one binary, subcommands. Flag names follow llama.cpp's so users
// can switch without relearning. Errors from the library end here as a message on stderr
// and a non-zero exit status.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <string>
#include <vector>

#include "commands.h"

namespace {

// llama.cpp spells some long options with one dash (-ub, -ctk, ...), which CLI11 reserves
// for one-letter flags; translate them to their long names before parsing.
std::vector<std::string> translate_llama_flags(int argc, char** argv) {
  static const std::pair<const char*, const char*> kAliases[] = {
      {"-ub", "--ubatch-size"},   {"-ctk", "--cache-type-k"}, {"-ctv", "--cache-type-v"},
      {"-ngl", "--n-gpu-layers"}, {"-fa", "--flash-attn"},    {"-pg", "--prompt-gen"},
  };
  std::vector<std::string> args;
  for (int i = 0; i < argc; ++i) {
    std::string a = argv[i];
    for (const auto& [from, to] : kAliases) {
      const std::string f = from;
      if (a == f)
        a = to;
      else if (a.rfind(f + "=", 0) == 0)
        a = std::string(to) + a.substr(f.size());
    }
    args.push_back(a);
  }
  return args;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Kestrel: fast prompt evaluation for llama-family GGUF models"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string(KESTREL_VERSION) + " (" KESTREL_GIT_VERSION ")");
  kestrel::cli::RunOptions run;
  kestrel::cli::add_run_command(app, run);
  kestrel::cli::InfoOptions info;
  kestrel::cli::add_info_command(app, info);
  kestrel::cli::ChatOptions chat;
  kestrel::cli::add_chat_command(app, chat);
  kestrel::cli::TuneOptions tune;
  kestrel::cli::add_tune_command(app, tune);
  kestrel::cli::TokenizeOptions tokenize;
  kestrel::cli::add_tokenize_command(app, tokenize);
  kestrel::cli::BenchOptions bench;
  kestrel::cli::add_bench_command(app, bench);
  kestrel::cli::ReportOptions report;
  kestrel::cli::add_report_command(app, report);
  try {
    std::vector<std::string> args = translate_llama_flags(argc, argv);
    std::vector<std::string> reversed(args.rbegin(), args.rend() - 1);  // CLI11 wants them so
    app.parse(reversed);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  int rc = 0;
  if (app.got_subcommand("run"))
    rc = kestrel::cli::run_command(run);
  else if (app.got_subcommand("info"))
    rc = kestrel::cli::info_command(info);
  else if (app.got_subcommand("chat"))
    rc = kestrel::cli::chat_command(chat);
  else if (app.got_subcommand("tune"))
    rc = kestrel::cli::tune_command(tune);
  else if (app.got_subcommand("tokenize"))
    rc = kestrel::cli::tokenize_command(tokenize);
  else if (app.got_subcommand("bench"))
    rc = kestrel::cli::bench_command(bench);
  else if (app.got_subcommand("report"))
    rc = kestrel::cli::report_command(report);
  return rc;
}
