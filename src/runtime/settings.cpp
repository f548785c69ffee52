#include "runtime/settings.h"

#include <cstdio>
#include <fstream>
#include <sstream>

#include "format/quant/quant.h"

namespace kestrel::runtime {

Status write_file_atomic(const std::string& path, std::string_view bytes) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out)
      return error("cannot write '%s' (is the directory there and writable?)", path.c_str());
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    out.flush();
    if (!out) {
      std::remove(tmp.c_str());
      return error("writing '%s' failed (disk full?)", path.c_str());
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return error("cannot move '%s' into place", path.c_str());
  }
  return Status::ok();
}

namespace {

Status read_int(const nlohmann::json& j, const char* key, int lo, int hi, std::optional<int>* out) {
  if (!j.contains(key)) return Status::ok();
  const auto& v = j.at(key);
  if (!v.is_number_integer() || v.get<int64_t>() < lo || v.get<int64_t>() > hi)
    return error("'%s' must be an integer in [%d, %d]", key, lo, hi);
  *out = v.get<int>();
  return Status::ok();
}

Status read_kv_type(const nlohmann::json& j, const char* key, std::optional<std::string>* out) {
  if (!j.contains(key)) return Status::ok();
  quant::DType t;
  if (!j.at(key).is_string() || !quant::parse_type(j.at(key).get<std::string>().c_str(), &t) ||
      !quant::is_kv_type(t))
    return error("'%s' must be a KV cache type: f16, q8_0 or q4_0", key);
  *out = j.at(key).get<std::string>();
  return Status::ok();
}

}  // namespace

Expected<Settings> load_settings(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return error("cannot read settings file '%s'", path.c_str());
  std::stringstream ss;
  ss << in.rdbuf();
  const nlohmann::json j = nlohmann::json::parse(ss.str(), nullptr, false);
  if (j.is_discarded() || !j.is_object())
    return error("settings file '%s' is not a JSON object (write one with `kestrel tune`)",
                 path.c_str());
  if (!j.contains("kestrel_settings"))
    return error("'%s' is not a Kestrel settings file (no \"kestrel_settings\" key)", path.c_str());
  Settings s;
  Status st = read_int(j, "n_batch", 1, 1 << 20, &s.n_batch);
  if (st) st = read_int(j, "n_ubatch", 1, 1 << 20, &s.n_ubatch);
  if (st) st = read_int(j, "n_threads", 0, 4096, &s.n_threads);
  if (st) st = read_int(j, "n_gpu_layers", 0, 1 << 16, &s.n_gpu_layers);
  if (st) st = read_kv_type(j, "type_k", &s.type_k);
  if (st) st = read_kv_type(j, "type_v", &s.type_v);
  if (st && j.contains("chunking")) {
    const auto& c = j.at("chunking");
    if (!c.is_string() || (c != "balanced" && c != "fixed"))
      st = error("'chunking' must be \"balanced\" or \"fixed\"");
    else
      s.chunking = c.get<std::string>();
  }
  if (st && j.contains("backend")) {
    if (!j.at("backend").is_string())
      st = error("'backend' must be a string such as \"cpu\"");
    else
      s.backend = j.at("backend").get<std::string>();  // checked against the build when used
  }
  if (!st) return error("settings file '%s': %s", path.c_str(), st.message().c_str());
  if (j.contains("tuned_for")) s.tuned_for = j.at("tuned_for");
  return s;
}

nlohmann::json settings_to_json(const Settings& s) {
  nlohmann::json j = {{"kestrel_settings", 1}};
  if (s.n_batch) j["n_batch"] = *s.n_batch;
  if (s.n_ubatch) j["n_ubatch"] = *s.n_ubatch;
  if (s.n_threads) j["n_threads"] = *s.n_threads;
  if (s.n_gpu_layers) j["n_gpu_layers"] = *s.n_gpu_layers;
  if (s.type_k) j["type_k"] = *s.type_k;
  if (s.type_v) j["type_v"] = *s.type_v;
  if (s.chunking) j["chunking"] = *s.chunking;
  if (s.backend) j["backend"] = *s.backend;
  if (!s.tuned_for.is_null()) j["tuned_for"] = s.tuned_for;
  return j;
}

Status save_settings(const std::string& path, const Settings& s) {
  return write_file_atomic(path, settings_to_json(s).dump(2) + "\n");
}

}  // namespace kestrel::runtime
