#include "runtime/history.h"

#include <fstream>
#include <sstream>

#include "runtime/settings.h"

namespace kestrel::runtime {

Status append_history(const std::string& path, const nlohmann::json& record) {
  std::string text;
  {
    std::ifstream in(path, std::ios::binary);
    if (in) {
      std::stringstream ss;
      ss << in.rdbuf();
      text = ss.str();
      if (!text.empty() && text.back() != '\n') text += '\n';
    }
  }
  text += record.dump() + "\n";
  return write_file_atomic(path, text);
}

Expected<std::vector<nlohmann::json>> read_history(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return error("cannot read history file '%s'", path.c_str());
  std::vector<nlohmann::json> out;
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object())
      return error("history file '%s', line %d: not a JSON object", path.c_str(), n);
    out.push_back(std::move(j));
  }
  if (out.empty())
    return error("history file '%s' is empty: record runs with --history %s first", path.c_str(),
                 path.c_str());
  return out;
}

}  // namespace kestrel::runtime
