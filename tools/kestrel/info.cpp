// `kestrel info`: what a GGUF file holds: metadata, the model's configuration, tensors.
#include <cstdio>
#include <map>

#include "commands.h"
#include "format/gguf.h"
#include "model/config.h"

namespace kestrel::cli {

namespace {

std::string describe(const gguf::Value& v) {
  using gguf::ValueType;
  switch (v.type) {
    case ValueType::STRING: {
      std::string s = v.str.size() > 120 ? v.str.substr(0, 117) + "..." : v.str;
      for (char& ch : s)
        if (ch == '\n') ch = ' ';
      return "\"" + s + "\"";
    }
    case ValueType::ARRAY: {
      std::string out = std::string("[") + gguf::value_type_name(v.elem_type) + " x " +
                        std::to_string(v.array_len) + "]";
      if (!v.strs.empty()) {
        out += " \"" + v.strs[0] + "\"" + (v.strs.size() > 1 ? ", ..." : "");
      }
      return out;
    }
    case ValueType::BOOL:
      return v.u ? "true" : "false";
    case ValueType::FLOAT32:
    case ValueType::FLOAT64:
      return format("%g", v.f);
    default:
      return v.is_integer() ? std::to_string(v.as_int()) : "?";
  }
}

}  // namespace

void add_info_command(CLI::App& app, InfoOptions& o) {
  CLI::App* info = app.add_subcommand("info", "Print a GGUF file's metadata and tensors");
  info->add_option("-m,--model", o.model, "GGUF model file")->required();
  info->add_flag("--tensors", o.all_tensors, "list every tensor");
}

int info_command(const InfoOptions& o) {
  auto file = gguf::File::open(o.model);
  if (!file) {
    std::fprintf(stderr, "kestrel: error: %s\n", file.message().c_str());
    return 1;
  }
  const gguf::File& f = **file;
  std::printf("file: %s (GGUF v%u, %.1f MiB, alignment %llu)\n", o.model.c_str(), f.version(),
              f.file_size() / 1048576.0, static_cast<unsigned long long>(f.alignment()));
  std::printf("\nmetadata (%zu keys):\n", f.metadata().size());
  for (const auto& [key, value] : f.metadata())
    std::printf("  %-44s %s\n", key.c_str(), describe(value).c_str());

  std::map<std::string, std::pair<int, uint64_t>> by_type;
  uint64_t params = 0, bytes = 0;
  for (const auto& t : f.tensors()) {
    auto& e = by_type[quant::type_name(t.type)];
    e.first += 1;
    e.second += t.n_bytes;
    params += t.n_elements();
    bytes += t.n_bytes;
  }
  std::printf("\ntensors: %zu, %.3f B parameters, %.1f MiB\n", f.tensors().size(), params / 1e9,
              bytes / 1048576.0);
  for (const auto& [type, e] : by_type)
    std::printf("  %-6s %5d tensors  %10.1f MiB\n", type.c_str(), e.first, e.second / 1048576.0);
  if (o.all_tensors) {
    for (const auto& t : f.tensors()) {
      std::string dims;
      for (size_t i = 0; i < t.dims.size(); ++i)
        dims += (i ? " x " : "") + std::to_string(t.dims[i]);
      std::printf("  %-40s %-6s [%s]\n", t.name.c_str(), quant::type_name(t.type), dims.c_str());
    }
  }

  auto cfg = model::read_config(f);
  if (!cfg) {
    std::printf("\nmodel: not runnable: %s\n", cfg.message().c_str());
    return 1;
  }
  const auto& c = *cfg;
  std::printf(
      "\nmodel: %s (%s), %d layers, n_embd %d, %d heads / %d KV heads (head_dim %d), n_ff %d, "
      "vocab %d, context %d, rope base %g (%s), %s output%s\n",
      c.name.c_str(), c.arch.c_str(), c.n_layer, c.n_embd, c.n_head, c.n_head_kv, c.head_dim,
      c.n_ff, c.n_vocab, c.n_ctx_train, c.rope_base,
      c.rope_layout == backend::RopeLayout::NeoX ? "neox" : "normal",
      c.tied_output ? "tied" : "separate", c.qkv_bias ? ", QKV bias" : "");
  return 0;
}

}  // namespace kestrel::cli
