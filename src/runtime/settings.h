// A settings file: the session settings `kestrel tune` found fastest, loaded by
// `kestrel run --config FILE` and `kestrel bench --config FILE`. JSON, written atomically:
//   {"kestrel_settings": 1, "n_batch": 256, "n_ubatch": 256, "n_threads": 2,
//    "n_gpu_layers": 0, "backend": "cpu", "type_k": "f16", "type_v": "f16", "chunking": "balanced",
//    "tuned_for": {...what it was measured on...}}
// Every key but the marker is optional; a key that is present must be valid.
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>

#include "core/status.h"

namespace kestrel::runtime {

struct Settings {
  std::optional<int> n_batch, n_ubatch, n_threads, n_gpu_layers;
  std::optional<std::string> type_k, type_v, chunking, backend;
  nlohmann::json tuned_for;  // free-form: model, prompt length, device, measured t/s
};

Expected<Settings> load_settings(const std::string& path);
Status save_settings(const std::string& path, const Settings& s);
nlohmann::json settings_to_json(const Settings& s);

// Writes `bytes` to `path` through a temporary file renamed into place, so a reader never
// sees half a file and a failed write leaves the old file as it was.
Status write_file_atomic(const std::string& path, std::string_view bytes);

}  // namespace kestrel::runtime
