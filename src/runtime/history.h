// Run history: one JSON object per line (JSON Lines), appended by `--history FILE` after each
// run or benchmark, read back by `kestrel report`. Appending rewrites the file through a
// temporary renamed into place, so an interrupted write never leaves half a line.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/status.h"

namespace kestrel::runtime {

Status append_history(const std::string& path, const nlohmann::json& record);
// Every record, in order. Errors: unreadable file, empty file, a line that is not a JSON
// object (the message gives its number).
Expected<std::vector<nlohmann::json>> read_history(const std::string& path);

}  // namespace kestrel::runtime
