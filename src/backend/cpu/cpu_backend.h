// The CPU backend: host memory, a thread pool, and the kernels of kernels.h.
#pragma once

#include <memory>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/kernels.h"
#include "core/thread_pool.h"

namespace kestrel::backend::cpu {

// The host CPU's model name from /proc/cpuinfo ("CPU" when it does not say).
std::string cpu_model_name();

class CpuBackend final : public Backend {
 public:
  // `kernels` defaults to the best this CPU supports.
  explicit CpuBackend(int n_threads, const KernelTable* kernels = nullptr);
  ~CpuBackend() override;

  const char* name() const override { return "cpu"; }
  std::string device_name() const override;
  int64_t available_memory() const override;  // MemAvailable of /proc/meminfo, -1 elsewhere
  const KernelTable& kernels() const { return *kernels_; }
  int n_threads() const { return pool_.n_threads(); }

  Expected<Tensor> alloc(quant::DType type, int64_t rows, int64_t cols, const char* what) override;
  void free(Tensor& t) override;
  Status upload(Tensor& dst, int64_t row0, int64_t n_rows, const void* src) override;
  Status download(const Tensor& src, int64_t row0, int64_t n_rows, void* dst) override;
  Expected<std::unique_ptr<Weight>> load_weight(const HostMatrix& m) override;
  Expected<Tensor> load_vector(const float* data, int64_t n, const char* what) override;

  Status embed(const HostMatrix& table, const int32_t* tokens, int n_tokens, Tensor& out) override;
  Status rms_norm(const Tensor& x, int n_tokens, const Tensor& weight, float eps,
                  Tensor& out) override;
  Status add_rms_norm(Tensor& x, const Tensor& y, int n_tokens, const Tensor& weight, float eps,
                      Tensor& out) override;
  Status matmul_group(const Tensor& x, int n_tokens, const MatmulOut* outs, int n_outs) override;
  Status matmul(const Weight& w, const Tensor& x, int n_tokens, Tensor& out,
                const Tensor* bias) override;
  Status rope(Tensor& x, int n_tokens, const int32_t* positions, const RopeParams& p) override;
  Status kv_store(const Tensor& k, const Tensor& v, int n_tokens, const int32_t* positions,
                  Tensor& k_cache, Tensor& v_cache) override;
  Status attention(const Tensor& q, int n_tokens, const int32_t* positions, const Tensor& k_cache,
                   const Tensor& v_cache, const AttentionParams& p, Tensor& out) override;
  Status swiglu(const Tensor& gate, const Tensor& up, int n_tokens, Tensor& out) override;
  Status add(Tensor& x, const Tensor& y, int n_tokens) override;
  Status get_rows(const Tensor& x, const int32_t* rows, int n_rows, Tensor& out) override;
  Status synchronize() override { return Status::ok(); }
  // KESTREL_CPU_DECODE_LAYER=1: decode steps through Backend::decode_layer (the op sequence as
  // one op), so that the forward pass's use of a fused decode layer is checked on any machine.
  bool fuses_decode_layer(const DecodeLayer& /*layer*/) const override {
    return decode_layer_reference_;
  }

 private:
  static constexpr int kAttentionBlock = 16;  // query tokens a task of attention
  void attention_tiled(const Tensor& q, int n_tokens, const int32_t* positions,
                       const Tensor& k_cache, const Tensor& v_cache, int64_t n_kv,
                       const AttentionParams& p, Tensor& out);
  void attention_heads(const Tensor& q, int n_tokens, const int32_t* positions,
                       const Tensor& k_cache, const Tensor& v_cache, int64_t n_kv,
                       const AttentionParams& p, Tensor& out);
  float* scratch_floats(size_t n, int slot);  // grows a per-purpose scratch buffer
  uint8_t* scratch_bytes(size_t n, int slot);
  // One product of run_panels: w's panels (a packed weight of this backend) into out (rows of
  // ld_out floats).
  static constexpr int kMaxMatmulParts = 3;
  struct MatmulPart {
    const Weight* w = nullptr;
    float* out = nullptr;
    int64_t ld_out = 0;
  };
  QuantActs quantize_input(quant::DType type, int64_t n_in, const float* xf, int64_t ld_x,
                           int n_tokens);
  void run_panels(const MatmulPart* parts, int n_parts, const QuantActs& acts, int n_tokens);
  void dequantize_rows(const Tensor& t, int64_t n_rows, float* out);

  ThreadPool pool_;
  const KernelTable* kernels_;
  bool decode_layer_reference_ = false;
  std::vector<std::vector<uint8_t>> scratch_;
};

}  // namespace kestrel::backend::cpu
