// Matmul micro-benchmark per weight type: one weight of N_OUT x N_IN (default the llama3-1b
// ffn_up, 8192 x 2048) against T tokens (default 512, a prefill micro-batch), on the CPU
// backend's best kernel table (KESTREL_CPU_ISA overrides). The types run interleaved, round
// after round, and each keeps its best time, so a busy shared machine slows every type alike.
//
//   build-quant/bin/kestrel_matmul_bench [rounds=7] [threads=2] [tokens=512] [n_out] [n_in]
//
// Prints ms per matmul, ns per weight per token... and the ratio to Q4_0. Not a test.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "format/quant/quant.h"

using kestrel::backend::HostMatrix;
using kestrel::backend::Tensor;
using kestrel::backend::Weight;
using kestrel::backend::cpu::CpuBackend;
using kestrel::quant::DType;

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 7;
  const int threads = argc > 2 ? std::atoi(argv[2]) : 2;
  const int tokens = argc > 3 ? std::atoi(argv[3]) : 512;
  const int64_t n_out = argc > 4 ? std::atoll(argv[4]) : 8192;
  const int64_t n_in = argc > 5 ? std::atoll(argv[5]) : 2048;
  const DType types[] = {DType::Q4_0, DType::Q4_1, DType::Q8_0, DType::Q5_0,
                         DType::Q5_1, DType::Q4_K, DType::Q5_K, DType::Q6_K};
  constexpr int kTypes = sizeof(types) / sizeof(types[0]);
  CpuBackend be(threads);
  std::printf("matmul %lld x %lld, %d tokens, %d threads, %s\n", static_cast<long long>(n_out),
              static_cast<long long>(n_in), tokens, threads, be.device_name().c_str());
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> wf(static_cast<size_t>(n_out * n_in));
  for (float& v : wf) v = nd(rng) * 0.02f;
  std::vector<std::vector<uint8_t>> raw(kTypes);
  std::vector<std::unique_ptr<Weight>> weights(kTypes);
  for (int i = 0; i < kTypes; ++i) {
    const int64_t rb = kestrel::quant::row_bytes(types[i], n_in);
    raw[i].resize(static_cast<size_t>(rb * n_out));
    for (int64_t r = 0; r < n_out; ++r)
      kestrel::quant::quantize_row(types[i], wf.data() + r * n_in, raw[i].data() + r * rb, n_in);
    auto w = be.load_weight(HostMatrix{types[i], n_in, n_out, raw[i].data(), "w"});
    if (!w) {
      std::fprintf(stderr, "%s\n", w.message().c_str());
      return 1;
    }
    weights[i] = std::move(*w);
  }
  auto x = be.alloc(DType::F32, tokens, n_in, "x");
  auto out = be.alloc(DType::F32, tokens, n_out, "out");
  if (!x || !out) return 1;
  std::vector<float> xf(static_cast<size_t>(tokens * n_in));
  for (float& v : xf) v = nd(rng);
  (void)be.upload(*x, 0, tokens, xf.data());
  std::vector<double> best(kTypes, 1e30);
  for (int round = 0; round < rounds; ++round) {
    for (int i = 0; i < kTypes; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      (void)be.matmul(*weights[i], *x, tokens, *out, nullptr);
      const double ms =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      if (ms < best[i]) best[i] = ms;
    }
  }
  std::printf("| type | ms | ns per weight-token | vs q4_0 | panel bytes per weight |\n");
  std::printf("|---|---|---|---|---|\n");
  for (int i = 0; i < kTypes; ++i) {
    const double ns = best[i] * 1e6 / (static_cast<double>(n_out) * n_in * tokens);
    std::printf("| %s | %.1f | %.4f | %.2fx | %.3f |\n", kestrel::quant::type_name(types[i]),
                best[i], ns, best[i] / best[0],
                static_cast<double>(weights[i]->bytes) / static_cast<double>(n_out * n_in));
  }
  be.free(*x);
  be.free(*out);
  return 0;
}
