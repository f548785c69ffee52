// Matmul micro-benchmark on a GPU backend: the weight shapes of one llama2-7b layer (Q4_0 by
// default) against micro-batches of several sizes, each product alone and as the model groups
// them (Q/K/V and gate/up through matmul_group). It answers "how far is this kernel from the
// floor" without a whole model: per call the time, the weight bytes over it (GB/s, and the
// share of the bandwidth given as BW_GBS) and the arithmetic rate (TFLOP/s).
//
//   kestrel_gpu_matmul_bench [--backend cuda|opencl] [--type q4_0|q8_0] [--tokens 1,16,64,512]
//                            [--bw GB/s] [--copies 8] [--ms 40] [--json FILE]
//
// Each case runs a few untimed calls, then back-to-back calls for about --ms milliseconds
// between two synchronizations (launch gaps count, as in the model without graphs). Successive
// calls take successive copies of the weights (--copies; a group takes distinct copies for its
// parts), so that they come from memory as in the model, not from the last call's L2: with one
// copy, a 4096 x 4096 Q4_0 matrix (9.4 MB) stays in an H100's 50 MB L2 and the Q/K/V group read
// the same matrix three times (gate/up "4,257 GB/s" on an H100 of 3,350, twentieth session). The
// % column's bandwidth is the device's where its name says it (H100 SXM 3,350 GB/s, H100 PCIe
// 2,000, H200 4,800), else --bw. The first
// row is the launch floor: a one-row add, whose time is the cost of a launch alone. Weights are
// random codes with scales in [0.002, 0.02], activations normal: speed does not depend on them.
// Not a test; bench/NOTES.md records what it measured.
#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "backend/registry.h"
#include "format/quant/fp16.h"
#include "format/quant/quant.h"

namespace {

using kestrel::backend::Backend;
using kestrel::backend::HostMatrix;
using kestrel::backend::MatmulOut;
using kestrel::backend::Tensor;
using kestrel::backend::Weight;
using kestrel::quant::DType;

struct Shape {
  const char* name;
  int64_t n_out, n_in;
};
// One llama2-7b layer.
constexpr Shape kShapes[] = {
    {"attn_q", 4096, 4096}, {"ffn_up", 11008, 4096}, {"ffn_down", 4096, 11008}};

// Random blocks of a 32-element type whose first two bytes are the fp16 scale (Q4_0, Q8_0).
std::vector<uint8_t> random_weight(DType type, int64_t n_out, int64_t n_in, std::mt19937& rng) {
  const int64_t block_bytes = kestrel::quant::row_bytes(type, 32);
  std::vector<uint8_t> raw(static_cast<size_t>(kestrel::quant::row_bytes(type, n_in) * n_out));
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> scale(0.002f, 0.02f);
  for (size_t b = 0; b < raw.size(); b += static_cast<size_t>(block_bytes)) {
    const uint16_t d = kestrel::quant::fp32_to_fp16(scale(rng));
    raw[b] = static_cast<uint8_t>(d & 255);
    raw[b + 1] = static_cast<uint8_t>(d >> 8);
    for (int64_t i = 2; i < block_bytes; ++i) raw[b + i] = static_cast<uint8_t>(byte(rng));
  }
  return raw;
}

struct Timing {
  double us = 0;
  int calls = 0;
  std::string error;  // the first failure, if any (the case is then not timed)
};

// Runs `op` untimed three times, then back to back for about `ms` milliseconds.
Timing time_calls(Backend& be, double ms, const std::function<kestrel::Status()>& op) {
  for (int i = 0; i < 3; ++i)
    if (kestrel::Status st = op(); !st) return {0, 0, st.message()};
  if (kestrel::Status st = be.synchronize(); !st) return {0, 0, st.message()};
  int n = 1;
  for (;;) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < n; ++i) (void)op();
    if (kestrel::Status st = be.synchronize(); !st) return {0, 0, st.message()};
    const double took =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (took >= ms || n >= (1 << 16)) return {took * 1000.0 / n, n, {}};
    n = took < ms / 16 ? n * 8 : n * 2;
  }
}

// Peak memory bandwidth in GB/s of the devices whose name says it (the % column), else 4800.
double bandwidth_by_name(const std::string& name) {
  if (name.find("H200") != std::string::npos) return 4800;
  if (name.find("H100") != std::string::npos)
    return name.find("PCIe") != std::string::npos ? 2000 : 3350;
  return 4800;
}

std::vector<int> parse_list(const std::string& s) {
  std::vector<int> v;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) v.push_back(std::stoi(item));
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"GPU matmul micro-benchmark (llama2-7b layer shapes)"};
  std::string backend_name = "cuda", type_name = "q4_0", tokens_text = "1,16,64,512", json_path;
  double bw_gbs = 0, ms = 40;
  int copies = 8;
  app.add_option("--backend", backend_name, "cuda or opencl");
  app.add_option("--type", type_name, "weight type: q4_0 or q8_0");
  app.add_option("--tokens", tokens_text, "micro-batch sizes, comma-separated");
  app.add_option("--bw", bw_gbs, "memory bandwidth in GB/s for the % column (default: by name)");
  app.add_option("--copies", copies, "copies of each weight, taken in turn")
      ->check(CLI::Range(1, 64));
  app.add_option("--ms", ms, "timed milliseconds per case");
  app.add_option("--json", json_path, "also write the rows as JSON here");
  CLI11_PARSE(app, argc, argv);
  const DType type = type_name == "q8_0" ? DType::Q8_0 : DType::Q4_0;
  if (type_name != "q4_0" && type_name != "q8_0") {
    std::fprintf(stderr, "gpu_matmul_bench: --type must be q4_0 or q8_0\n");
    return 2;
  }
  auto be_or = kestrel::backend::create_backend(backend_name, {});
  if (!be_or) {
    std::fprintf(stderr, "gpu_matmul_bench: %s\n", be_or.message().c_str());
    return 1;
  }
  Backend& be = **be_or;
  const std::vector<int> token_counts = parse_list(tokens_text);
  int max_tokens = 1;
  for (int t : token_counts) max_tokens = std::max(max_tokens, t);

  if (bw_gbs <= 0) bw_gbs = bandwidth_by_name(be.device_name());
  std::mt19937 rng(1);
  // weights[shape][copy]
  std::vector<std::vector<std::unique_ptr<Weight>>> weights(std::size(kShapes));
  for (size_t i = 0; i < std::size(kShapes); ++i) {
    const Shape& s = kShapes[i];
    const auto raw = random_weight(type, s.n_out, s.n_in, rng);
    for (int c = 0; c < copies; ++c) {
      auto w = be.load_weight(HostMatrix{type, s.n_in, s.n_out, raw.data(), s.name});
      if (!w) {
        std::fprintf(stderr, "gpu_matmul_bench: %s (lower --copies)\n", w.message().c_str());
        return 1;
      }
      weights[i].push_back(std::move(*w));
    }
  }
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> xf(static_cast<size_t>(max_tokens) * 11008);
  for (float& v : xf) v = nd(rng);
  auto x4096 = be.alloc(DType::F32, max_tokens, 4096, "x4096");
  auto x11008 = be.alloc(DType::F32, max_tokens, 11008, "x11008");
  auto out_a = be.alloc(DType::F32, max_tokens, 4096, "out_a");
  auto out_b = be.alloc(DType::F32, max_tokens, 4096, "out_b");
  auto out_c = be.alloc(DType::F32, max_tokens, 4096, "out_c");
  auto out_d = be.alloc(DType::F32, max_tokens, 11008, "out_d");
  auto out_e = be.alloc(DType::F32, max_tokens, 11008, "out_e");
  if (!x4096 || !x11008 || !out_a || !out_b || !out_c || !out_d || !out_e) {
    std::fprintf(stderr, "gpu_matmul_bench: out of device memory for the activations\n");
    return 1;
  }
  (void)be.upload(*x4096, 0, max_tokens, xf.data());
  (void)be.upload(*x11008, 0, max_tokens, xf.data());
  (void)be.synchronize();

  nlohmann::json rows = nlohmann::json::array();
  std::printf("%s, %s weights, %d copies taken in turn; bandwidth for %% column: %.0f GB/s\n",
              be.device_name().c_str(), type_name.c_str(), copies, bw_gbs);
  std::printf("| case | tokens | us per call | weight GB/s | %% of bw | TFLOP/s |\n");
  std::printf("|---|---|---|---|---|---|\n");
  int failures = 0;
  auto report = [&](const std::string& name, int t, double bytes, double flops, Timing tm) {
    if (!tm.error.empty()) {
      std::printf("| %s | %d | failed: %s | | | |\n", name.c_str(), t, tm.error.c_str());
      ++failures;
      return;
    }
    const double gbs = bytes / (tm.us * 1e3);
    const double tflops = flops / (tm.us * 1e6);
    std::printf("| %s | %d | %.1f | %.0f | %.0f%% | %.1f |\n", name.c_str(), t, tm.us, gbs,
                100.0 * gbs / bw_gbs, tflops);
    rows.push_back({{"case", name},
                    {"tokens", t},
                    {"us", tm.us},
                    {"calls", tm.calls},
                    {"weight_gbs", gbs},
                    {"bw_share", gbs / bw_gbs},
                    {"tflops", tflops}});
  };
  // The launch floor: an op with next to no work (x += y on one 4096-value row), back to back.
  // Its time per call is what each kernel of a pass costs beyond its work when the device waits
  // for the host (NVIDIA's OpenCL driver: the suspected limit of the seed's case).
  {
    const Timing tm = time_calls(be, ms, [&] { return be.add(*out_b, *out_c, 1); });
    if (tm.error.empty()) {
      std::printf("| launch floor (add, 1 x 4096) | 1 | %.1f | | | |\n", tm.us);
      rows.push_back({{"case", "launch floor"}, {"tokens", 1}, {"us", tm.us}, {"calls", tm.calls}});
    } else {
      std::printf("| launch floor (add, 1 x 4096) | 1 | failed: %s | | | |\n", tm.error.c_str());
      ++failures;
    }
  }
  int turn = 0;  // the copy the next call takes
  const auto next = [&](size_t shape) -> const Weight& {
    return *weights[shape][static_cast<size_t>(turn++ % copies)];
  };
  for (int t : token_counts) {
    for (size_t i = 0; i < weights.size(); ++i) {
      const Weight& w = *weights[i][0];
      Tensor& x = w.n_in == 4096 ? *x4096 : *x11008;
      Tensor& out = w.n_out == 4096 ? *out_a : *out_d;
      const Timing tm = time_calls(be, ms, [&] { return be.matmul(next(i), x, t, out, nullptr); });
      report(kShapes[i].name, t, static_cast<double>(w.bytes), 2.0 * t * w.n_in * w.n_out, tm);
    }
    // As the model runs them: Q, K, V of one input (3 x attn_q's shape), gate and up.
    const Weight& q = *weights[0][0];
    Timing tm = time_calls(be, ms, [&] {
      const MatmulOut qkv[3] = {
          {&next(0), &*out_a, nullptr}, {&next(0), &*out_b, nullptr}, {&next(0), &*out_c, nullptr}};
      return be.matmul_group(*x4096, t, qkv, 3);
    });
    report("qkv group", t, 3.0 * q.bytes, 6.0 * t * q.n_in * q.n_out, tm);
    const Weight& up = *weights[1][0];
    tm = time_calls(be, ms, [&] {
      const MatmulOut gate_up[2] = {{&next(1), &*out_d, nullptr}, {&next(1), &*out_e, nullptr}};
      return be.matmul_group(*x4096, t, gate_up, 2);
    });
    report("gate/up group", t, 2.0 * up.bytes, 4.0 * t * up.n_in * up.n_out, tm);
  }
  for (Tensor* tp : {&*x4096, &*x11008, &*out_a, &*out_b, &*out_c, &*out_d, &*out_e}) be.free(*tp);
  if (!json_path.empty()) {
    std::ofstream f(json_path);
    f << nlohmann::json{{"device", be.device_name()}, {"type", type_name}, {"rows", rows}}.dump(1)
      << "\n";
  }
  return failures ? 1 : 0;
}
