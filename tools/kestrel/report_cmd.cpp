// `kestrel report FILE`: the trend across a run history (--history of run, chat and bench) as
// markdown or JSON, how far the latest record is from a target, and plots drawn by
// scripts/plot_report.py (matplotlib).
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "commands.h"
#include "runtime/history.h"
#include "runtime/trend.h"

#ifndef KESTREL_SCRIPTS_DIR
#define KESTREL_SCRIPTS_DIR "scripts"
#endif

namespace kestrel::cli {

namespace {

bool file_exists(const std::string& path) {
  return ::access(path.c_str(), R_OK) == 0;
}

std::string lower_extension(const std::string& path) {
  const size_t dot = path.find_last_of('.');
  const size_t slash = path.find_last_of('/');
  if (dot == std::string::npos || (slash != std::string::npos && dot < slash)) return "";
  std::string ext = path.substr(dot + 1);
  std::transform(ext.begin(), ext.end(), ext.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return ext;
}

// Runs argv[0] (looked up on PATH) and waits; its stderr is captured into `err`. Returns the
// exit status, 127 when it could not be started, 128+signal when killed.
int run_capturing_stderr(const std::vector<std::string>& args, std::string* err) {
  int fds[2];
  if (::pipe(fds) != 0) return 127;
  const pid_t pid = ::fork();
  if (pid < 0) {
    ::close(fds[0]);
    ::close(fds[1]);
    return 127;
  }
  if (pid == 0) {
    ::dup2(fds[1], STDERR_FILENO);
    ::close(fds[0]);
    ::close(fds[1]);
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execvp(argv[0], argv.data());
    ::_exit(127);
  }
  ::close(fds[1]);
  char buf[4096];
  for (;;) {
    const ssize_t n = ::read(fds[0], buf, sizeof buf);
    if (n > 0) {
      err->append(buf, static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    break;
  }
  ::close(fds[0]);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 127;
}

std::string trim(std::string s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
  return s;
}

// Where scripts/plot_report.py lies: $KESTREL_SCRIPTS_DIR, else the source tree the binary was
// built from.
std::string plot_script() {
  const char* env = std::getenv("KESTREL_SCRIPTS_DIR");
  const std::string dir = env && *env ? env : KESTREL_SCRIPTS_DIR;
  return dir + "/plot_report.py";
}

// Draws the plots of `history` into `out` (.svg or .png) through scripts/plot_report.py, which
// writes a temporary beside `out` and renames it into place.
Status draw_plot(const std::string& history, const std::string& out) {
  const std::string script = plot_script();
  if (!file_exists(script))
    return error(
        "--plot: the plotting script '%s' is not there (set KESTREL_SCRIPTS_DIR to the "
        "scripts/ folder of the Kestrel sources)",
        script.c_str());
  const char* py_env = std::getenv("KESTREL_PYTHON");
  const std::string python = py_env && *py_env ? py_env : "python3";
  std::string err;
  const int rc = run_capturing_stderr({python, script, "--out=" + out, "--", history}, &err);
  err = trim(err);
  if (rc == 0) {
    if (!file_exists(out))
      return error("--plot: %s said nothing but wrote no '%s'", script.c_str(), out.c_str());
    return Status::ok();
  }
  if (rc == 127)
    return error(
        "--plot needs Python 3, and '%s' could not be run: install python3 and "
        "`pip install matplotlib`",
        python.c_str());
  if (rc == 3)
    return error("--plot needs matplotlib for %s: pip install matplotlib", python.c_str());
  return error(
      "--plot %s: %s", out.c_str(),
      err.empty() ? format("%s exited with status %d", script.c_str(), rc).c_str() : err.c_str());
}

}  // namespace

void add_report_command(CLI::App& app, ReportOptions& o) {
  CLI::App* cmd = app.add_subcommand(
      "report", "Trend and target tables (and plots) from a --history file of run/bench records");
  cmd->add_option("file", o.history, "history file (JSON lines) written by --history")->required();
  cmd->add_option("-o,--output", o.format, "md or json")
      ->check(CLI::IsMember({"md", "json"}))
      ->capture_default_str();
  cmd->add_option("--target-ms", o.target_ms, "target ms/token range, e.g. 20-50");
  cmd->add_flag("--target-all", o.target_all,
                "compare every prompt record with the target (default: the latest)");
  cmd->add_option("--plot", o.plot,
                  "draw ms/token per chunk of the latest run and tokens/s against prompt "
                  "length into OUT.svg or OUT.png (python3 + matplotlib)");
}

int report_command(const ReportOptions& o) {
  std::optional<runtime::TargetRange> target;
  if (!o.target_ms.empty()) {
    runtime::TargetRange t;
    if (!runtime::parse_target(o.target_ms, &t))
      return fail(
          format("--target-ms %s: expected LOW-HIGH in ms/token with 0 < LOW <= HIGH, "
                 "e.g. 20-50",
                 o.target_ms.c_str()));
    target = t;
  }
  if (!o.plot.empty()) {
    const std::string ext = lower_extension(o.plot);
    if (ext != "svg" && ext != "png")
      return fail(format("--plot %s: the file name must end in .svg or .png", o.plot.c_str()));
  }
  auto records = runtime::read_history(o.history);
  if (!records) return fail(records.message());
  auto trend = runtime::build_trend(*records);
  if (!trend) return fail(format("%s: %s", o.history.c_str(), trend.message().c_str()));

  std::vector<runtime::TargetRow> target_rows;
  if (target) {
    for (auto it = trend->rows.rbegin(); it != trend->rows.rend(); ++it) {
      if (!it->is_prompt_test()) continue;  // the target is for prompt evaluation
      target_rows.push_back(runtime::target_row(*it, *target));
      if (!o.target_all) break;
    }
    std::reverse(target_rows.begin(), target_rows.end());
    if (target_rows.empty())
      return fail(format("--target-ms: %s holds no prompt-evaluation record to compare",
                         o.history.c_str()));
  }
  // Draw first, so that a failed plot does not follow a printed table.
  if (!o.plot.empty()) {
    Status st = draw_plot(o.history, o.plot);
    if (!st) return fail(st.message());
  }
  if (o.format == "json")
    std::printf("%s\n", runtime::trend_to_json(*trend, target_rows, target).dump(2).c_str());
  else
    std::printf("%s", runtime::render_trend_markdown(*trend, target_rows).c_str());
  if (!o.plot.empty()) std::fprintf(stderr, "kestrel: wrote %s\n", o.plot.c_str());
  return 0;
}

}  // namespace kestrel::cli
