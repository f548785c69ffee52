#include "backend/cpu/cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <new>

#include "format/quant/fp16.h"
#include "format/quant/quant.h"

namespace kestrel::backend::cpu {

using quant::DType;

namespace {

// A matmul weight on the CPU: quantized types repacked into 16-row panels, dense types
// used in place (usually straight from the file mapping).
class CpuWeight final : public Weight {
 public:
  std::vector<uint8_t> packed;  // quantized types
  const uint8_t* dense = nullptr;
  int64_t dense_row_bytes = 0;
  int64_t n_panels = 0;
  int64_t n_blocks = 0;
};

bool is_packed_type(DType t) {
  return panel_format(t) != PanelFormat::None;
}
bool is_dense_type(DType t) {
  return t == DType::F32 || t == DType::F16 || t == DType::BF16;
}

}  // namespace

std::string cpu_model_name() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(colon + 2);
    }
  }
  return "CPU";
}

CpuBackend::CpuBackend(int n_threads, const KernelTable* kernels)
    : pool_(n_threads), kernels_(kernels ? kernels : &best_kernels()), scratch_(8) {
  const char* e = std::getenv("KESTREL_CPU_DECODE_LAYER");
  decode_layer_reference_ = e && std::string(e) == "1";
}

CpuBackend::~CpuBackend() = default;

std::string CpuBackend::device_name() const {
  return cpu_model_name() + " (" + kernels_->isa + ", " + std::to_string(n_threads()) + " threads)";
}

int64_t CpuBackend::available_memory() const {
  std::ifstream in("/proc/meminfo");
  std::string key;
  int64_t kib = 0;
  std::string unit;
  while (in >> key >> kib >> unit)
    if (key == "MemAvailable:") return kib * 1024;
  return -1;
}

Expected<Tensor> CpuBackend::alloc(DType type, int64_t rows, int64_t cols, const char* what) {
  const int64_t rb = quant::row_bytes(type, cols);
  // rows * rb must not overflow (a hostile shape would otherwise allocate 0 bytes).
  if (rows <= 0 || cols <= 0 || rb < 0 || rows > static_cast<int64_t>(SIZE_MAX / 2) / rb)
    return error("cannot allocate %s: %lld x %lld elements of %s", what,
                 static_cast<long long>(rows), static_cast<long long>(cols),
                 quant::type_name(type));
  const size_t bytes = static_cast<size_t>(rb) * static_cast<size_t>(rows);
  const size_t rounded = (bytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded);
  if (!p) return error("out of host memory allocating %s (%.1f MiB)", what, bytes / 1048576.0);
  Tensor t;
  t.type = type;
  t.rows = rows;
  t.cols = cols;
  t.data = p;
  t.bytes = bytes;
  t.owner = this;
  return t;
}

void CpuBackend::free(Tensor& t) {
  std::free(t.data);
  t = Tensor{};
}

Status CpuBackend::upload(Tensor& dst, int64_t row0, int64_t n_rows, const void* src) {
  if (row0 < 0 || n_rows < 0 || row0 + n_rows > dst.rows)
    return error("upload of rows [%lld, %lld) outside a tensor of %lld rows",
                 static_cast<long long>(row0), static_cast<long long>(row0 + n_rows),
                 static_cast<long long>(dst.rows));
  const size_t rb = dst.row_bytes();
  std::memcpy(static_cast<uint8_t*>(dst.data) + row0 * rb, src, n_rows * rb);
  return Status::ok();
}

Status CpuBackend::download(const Tensor& src, int64_t row0, int64_t n_rows, void* dst) {
  if (row0 < 0 || n_rows < 0 || row0 + n_rows > src.rows)
    return error("download of rows [%lld, %lld) outside a tensor of %lld rows",
                 static_cast<long long>(row0), static_cast<long long>(row0 + n_rows),
                 static_cast<long long>(src.rows));
  const size_t rb = src.row_bytes();
  std::memcpy(dst, static_cast<const uint8_t*>(src.data) + row0 * rb, n_rows * rb);
  return Status::ok();
}

Expected<std::unique_ptr<Weight>> CpuBackend::load_weight(const HostMatrix& m) {
  auto w = std::make_unique<CpuWeight>();
  w->type = m.type;
  w->n_in = m.n_in;
  w->n_out = m.n_out;
  w->name = m.name;
  if (is_dense_type(m.type)) {
    w->dense = static_cast<const uint8_t*>(m.data);
    w->dense_row_bytes = quant::row_bytes(m.type, m.n_in);
    w->bytes = 0;  // read in place from the mapping
  } else if (is_packed_type(m.type)) {
    if (m.n_in % kBlock != 0 || quant::row_bytes(m.type, m.n_in) < 0)
      return error("weight '%s': %lld columns is not a multiple of the %s block (%lld)",
                   m.name.c_str(), static_cast<long long>(m.n_in), quant::type_name(m.type),
                   static_cast<long long>(quant::type_info(m.type)->block_elems));
    w->n_panels = (m.n_out + kPanelRows - 1) / kPanelRows;
    w->n_blocks = m.n_in / kBlock;
    const size_t bytes = w->n_panels * w->n_blocks * packed_block_bytes(m.type);
    try {
      w->packed.resize(bytes);
    } catch (const std::bad_alloc&) {
      return error("out of host memory repacking weight '%s' (%.1f MiB)", m.name.c_str(),
                   bytes / 1048576.0);
    }
    // Pack panels in parallel: each task writes its own panels.
    const int64_t per_panel = w->n_blocks * packed_block_bytes(m.type);
    const int64_t src_panel = quant::row_bytes(m.type, m.n_in) * kPanelRows;
    const int64_t n_panels = w->n_panels;
    CpuWeight* wp = w.get();
    pool_.parallel_for(n_panels, [&](int64_t p, int) {
      const int64_t rows = std::min<int64_t>(kPanelRows, m.n_out - p * kPanelRows);
      pack_panels(m.type, static_cast<const uint8_t*>(m.data) + p * src_panel, rows, m.n_in,
                  kernels_->q8_unsigned, wp->packed.data() + p * per_panel);
    });
    w->bytes = bytes;
  } else {
    return error("weight '%s' has type %s, which the CPU backend cannot multiply yet",
                 m.name.c_str(), quant::type_name(m.type));
  }
  return std::unique_ptr<Weight>(std::move(w));
}

Expected<Tensor> CpuBackend::load_vector(const float* data, int64_t n, const char* what) {
  KESTREL_ASSIGN_OR_RETURN(Tensor t, alloc(DType::F32, 1, n, what));
  std::memcpy(t.data, data, n * sizeof(float));
  return t;
}

uint8_t* CpuBackend::scratch_bytes(size_t n, int slot) {
  auto& buf = scratch_[slot];
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

float* CpuBackend::scratch_floats(size_t n, int slot) {
  return reinterpret_cast<float*>(scratch_bytes(n * sizeof(float), slot));
}

Status CpuBackend::embed(const HostMatrix& table, const int32_t* tokens, int n_tokens,
                         Tensor& out) {
  if (!quant::is_supported(table.type))
    return error("embedding table '%s' has type %s, which Kestrel cannot read yet",
                 table.name.c_str(), quant::type_name(table.type));
  for (int t = 0; t < n_tokens; ++t) {
    if (tokens[t] < 0 || tokens[t] >= table.n_out)
      return error("token id %d is outside the vocabulary [0, %lld)", tokens[t],
                   static_cast<long long>(table.n_out));
  }
  const int64_t rb = quant::row_bytes(table.type, table.n_in);
  pool_.parallel_for(n_tokens, [&](int64_t t, int) {
    quant::dequantize_row(table.type, static_cast<const uint8_t*>(table.data) + tokens[t] * rb,
                          static_cast<float*>(out.data) + t * out.cols, table.n_in);
  });
  return Status::ok();
}

Status CpuBackend::rms_norm(const Tensor& x, int n_tokens, const Tensor& weight, float eps,
                            Tensor& out) {
  const int64_t n = x.cols;
  const auto* w = static_cast<const float*>(weight.data);
  pool_.parallel_for(n_tokens, [&](int64_t t, int) {
    const float* xr = static_cast<const float*>(x.data) + t * n;
    float* o = static_cast<float*>(out.data) + t * out.cols;
    double ss = 0;
    for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / n + eps));
    for (int64_t i = 0; i < n; ++i) o[i] = xr[i] * inv * w[i];
  });
  return Status::ok();
}

// x += y and the norm of the new row in one pass per token (one dispatch instead of two).
Status CpuBackend::add_rms_norm(Tensor& x, const Tensor& y, int n_tokens, const Tensor& weight,
                                float eps, Tensor& out) {
  const int64_t n = x.cols;
  const auto* w = static_cast<const float*>(weight.data);
  pool_.parallel_for(n_tokens, [&](int64_t t, int) {
    float* xr = static_cast<float*>(x.data) + t * x.cols;
    const float* yr = static_cast<const float*>(y.data) + t * y.cols;
    float* o = static_cast<float*>(out.data) + t * out.cols;
    double ss = 0;
    for (int64_t i = 0; i < n; ++i) {
      xr[i] += yr[i];
      ss += static_cast<double>(xr[i]) * xr[i];
    }
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / n + eps));
    for (int64_t i = 0; i < n; ++i) o[i] = xr[i] * inv * w[i];
  });
  return Status::ok();
}

Status CpuBackend::matmul(const Weight& wbase, const Tensor& x, int n_tokens, Tensor& out,
                          const Tensor* bias) {
  const auto& w = static_cast<const CpuWeight&>(wbase);
  if (n_tokens < 0) return error("matmul '%s': negative token count %d", w.name.c_str(), n_tokens);
  if (n_tokens == 0) return Status::ok();
  if (x.type != DType::F32 || out.type != DType::F32 || (bias && bias->cols < w.n_out))
    return error("matmul '%s': activations must be f32 and the bias cover %lld outputs",
                 w.name.c_str(), static_cast<long long>(w.n_out));
  if (x.cols != w.n_in || out.cols < w.n_out || x.rows < n_tokens || out.rows < n_tokens)
    return error("matmul '%s': input [%lld x %lld] does not fit weight [%lld x %lld]",
                 w.name.c_str(), static_cast<long long>(n_tokens), static_cast<long long>(x.cols),
                 static_cast<long long>(w.n_out), static_cast<long long>(w.n_in));
  const auto* xf = static_cast<const float*>(x.data);
  auto* of = static_cast<float*>(out.data);
  const int64_t ld_out = out.cols;
  if (w.dense) {
    const int64_t n_groups = (w.n_out + kPanelRows - 1) / kPanelRows;
    pool_.parallel_for(n_groups, [&](int64_t g, int) {
      const int rows = static_cast<int>(std::min<int64_t>(kPanelRows, w.n_out - g * kPanelRows));
      kernels_->dense(w.type, w.dense + g * kPanelRows * w.dense_row_bytes, w.dense_row_bytes, rows,
                      xf, x.cols, n_tokens, w.n_in, of + g * kPanelRows, ld_out);
    });
  } else {
    const QuantActs acts = quantize_input(w.type, w.n_in, xf, x.cols, n_tokens);
    const MatmulPart part{&w, of, ld_out};
    run_panels(&part, 1, acts, n_tokens);
  }
  if (bias) {
    const auto* b = static_cast<const float*>(bias->data);
    pool_.parallel_for(n_tokens, [&](int64_t t, int) {
      for (int64_t i = 0; i < w.n_out; ++i) of[t * ld_out + i] += b[i];
    });
  }
  return Status::ok();
}

// The activations quantized once for the panel kernels of w's type.
QuantActs CpuBackend::quantize_input(DType type, int64_t n_in, const float* xf, int64_t ld_x,
                                     int n_tokens) {
  const int64_t stride = QuantActs::row_stride(n_in);
  uint8_t* qbuf = scratch_bytes(stride * n_tokens, 0);
  const bool half_sums = panel_format(type) == PanelFormat::Q6;
  pool_.parallel_for(n_tokens, [&](int64_t t, int) {
    kernels_->quantize_acts(xf + t * ld_x, n_in, qbuf + t * stride);
    if (half_sums) quantize_acts_half_sums(n_in, qbuf + t * stride);
  });
  return QuantActs{qbuf, stride, n_in};
}

// The weight panels of one or more products of the same quantized activations, as one
// parallel_for: tasks of a few panels each, so both threads stay busy to the end; inside a task
// a strip of tokens is reused across its panels while it sits in L1/L2.
void CpuBackend::run_panels(const MatmulPart* parts, int n_parts, const QuantActs& acts,
                            int n_tokens) {
  constexpr int64_t kPanelsPerTask = 4;
  constexpr int kTokenStrip = 32;
  int64_t first_task[kMaxMatmulParts + 1] = {0};
  for (int i = 0; i < n_parts; ++i)
    first_task[i + 1] =
        first_task[i] +
        (static_cast<const CpuWeight&>(*parts[i].w).n_panels + kPanelsPerTask - 1) / kPanelsPerTask;
  pool_.parallel_for(first_task[n_parts], [&](int64_t task, int) {
    int i = 0;
    while (task >= first_task[i + 1]) ++i;
    const auto& w = static_cast<const CpuWeight&>(*parts[i].w);
    const PanelKernel kernel = panel_kernel(*kernels_, w.type);
    const int64_t bb = packed_block_bytes(w.type) * w.n_blocks;
    const int64_t p0 = (task - first_task[i]) * kPanelsPerTask;
    const int64_t p1 = std::min(w.n_panels, p0 + kPanelsPerTask);
    for (int t0 = 0; t0 < n_tokens; t0 += kTokenStrip) {
      const int nt = std::min(kTokenStrip, n_tokens - t0);
      for (int64_t p = p0; p < p1; ++p) {
        const int valid = static_cast<int>(std::min<int64_t>(kPanelRows, w.n_out - p * kPanelRows));
        kernel(w.packed.data() + p * bb, w.n_blocks, acts, t0, nt, parts[i].out + p * kPanelRows,
               parts[i].ld_out, valid);
      }
    }
  });
}

// Q, K and V (gate and up) of one input: the activations quantized once and every panel in one
// parallel_for, when the weights are packed with one panel format (decode on two threads pays
// ~2 parallel_for dispatches per matmul otherwise).
Status CpuBackend::matmul_group(const Tensor& x, int n_tokens, const MatmulOut* outs, int n_outs) {
  bool together = n_tokens > 0 && n_outs >= 2 && n_outs <= kMaxMatmulParts;
  for (int i = 0; i < n_outs && together; ++i) {
    const auto& w = static_cast<const CpuWeight&>(*outs[i].w);
    const auto& w0 = static_cast<const CpuWeight&>(*outs[0].w);
    together = !w.dense && !outs[i].bias && w.n_in == w0.n_in && x.cols == w.n_in &&
               panel_format(w.type) == panel_format(w0.type) && outs[i].out->data != x.data;
  }
  if (!together) return Backend::matmul_group(x, n_tokens, outs, n_outs);
  MatmulPart parts[kMaxMatmulParts];
  for (int i = 0; i < n_outs; ++i) {
    const auto& w = static_cast<const CpuWeight&>(*outs[i].w);
    const Tensor& out = *outs[i].out;
    if (x.type != DType::F32 || out.type != DType::F32 || out.cols < w.n_out || x.rows < n_tokens ||
        out.rows < n_tokens)
      return error("matmul '%s': input [%lld x %lld] does not fit weight [%lld x %lld]",
                   w.name.c_str(), static_cast<long long>(n_tokens), static_cast<long long>(x.cols),
                   static_cast<long long>(w.n_out), static_cast<long long>(w.n_in));
    parts[i] = {&w, static_cast<float*>(out.data), out.cols};
  }
  const auto& w0 = static_cast<const CpuWeight&>(*parts[0].w);
  const QuantActs acts =
      quantize_input(w0.type, w0.n_in, static_cast<const float*>(x.data), x.cols, n_tokens);
  run_panels(parts, n_outs, acts, n_tokens);
  return Status::ok();
}

Status CpuBackend::rope(Tensor& x, int n_tokens, const int32_t* positions, const RopeParams& p) {
  const int half = p.head_dim / 2;
  // inv_freq[i] = base^(-2i/head_dim), computed in double once per call
  std::vector<double> inv_freq(half);
  for (int i = 0; i < half; ++i)
    inv_freq[i] = std::pow(static_cast<double>(p.freq_base), -2.0 * i / p.head_dim);
  pool_.parallel_for(n_tokens, [&](int64_t t, int) {
    float* row = static_cast<float*>(x.data) + t * x.cols;
    for (int i = 0; i < half; ++i) {
      const double theta = positions[t] * inv_freq[i];
      const float c = static_cast<float>(std::cos(theta));
      const float s = static_cast<float>(std::sin(theta));
      for (int h = 0; h < p.n_heads; ++h) {
        float* head = row + h * p.head_dim;
        const int i0 = p.layout == RopeLayout::Normal ? 2 * i : i;
        const int i1 = p.layout == RopeLayout::Normal ? 2 * i + 1 : i + half;
        const float a = head[i0], b = head[i1];
        head[i0] = a * c - b * s;
        head[i1] = a * s + b * c;
      }
    }
  });
  return Status::ok();
}

Status CpuBackend::kv_store(const Tensor& k, const Tensor& v, int n_tokens,
                            const int32_t* positions, Tensor& k_cache, Tensor& v_cache) {
  const int64_t cache_rows = std::min(k_cache.rows, v_cache.rows);
  if (k.cols != k_cache.cols || v.cols != v_cache.cols)
    return error("KV store: rows of %lld/%lld values do not match the caches' %lld/%lld",
                 static_cast<long long>(k.cols), static_cast<long long>(v.cols),
                 static_cast<long long>(k_cache.cols), static_cast<long long>(v_cache.cols));
  for (int t = 0; t < n_tokens; ++t)
    if (positions[t] < 0 || positions[t] >= cache_rows)
      return error("KV store at position %d outside the cache of %lld positions", positions[t],
                   static_cast<long long>(cache_rows));
  pool_.parallel_for(2 * static_cast<int64_t>(n_tokens), [&](int64_t i, int) {
    const Tensor& src = i % 2 ? v : k;
    Tensor& dst = i % 2 ? v_cache : k_cache;
    const int64_t t = i / 2;
    quant::quantize_row(dst.type, static_cast<const float*>(src.data) + t * src.cols,
                        static_cast<uint8_t*>(dst.data) + positions[t] * dst.row_bytes(), dst.cols);
  });
  return Status::ok();
}

void CpuBackend::dequantize_rows(const Tensor& t, int64_t n_rows, float* out) {
  const int64_t per_task = 16;
  pool_.parallel_for((n_rows + per_task - 1) / per_task, [&](int64_t task, int) {
    const int64_t r1 = std::min(n_rows, (task + 1) * per_task);
    for (int64_t r = task * per_task; r < r1; ++r) {
      const uint8_t* src = static_cast<const uint8_t*>(t.data) + r * t.row_bytes();
      if (t.type == DType::F16)
        kernels_->f16_to_f32(reinterpret_cast<const uint16_t*>(src), out + r * t.cols, t.cols);
      else
        quant::dequantize_row(t.type, src, out + r * t.cols, t.cols);
    }
  });
}

namespace {

// Elements [col0, col0 + n) of row `row` of a cache as floats (col0 on a block boundary).
void cache_slice_to_f32(const KernelTable& kt, const Tensor& t, int64_t row, int64_t col0,
                        int64_t n, float* out) {
  const uint8_t* src = static_cast<const uint8_t*>(t.data) + row * t.row_bytes();
  if (t.type == DType::F16)
    kt.f16_to_f32(reinterpret_cast<const uint16_t*>(src) + col0, out, n);
  else
    quant::dequantize_row(t.type, src + quant::row_bytes(t.type, col0), out, n);
}

// Rows r = 0 .. nt * group - 1 of one task: token t0 + r / group, query head kvh * group +
// r % group, against the keys 0 .. max position of its tokens. k: K rows of D floats, k_stride
// apart; vt: V^T, D rows of vt_stride floats, zero past the keys. S = Q K^T in the dense kernel's
// register tiles, a causal softmax per row, then O = P V the same way. Keys are padded to a
// multiple of 16 (zero probabilities, zero V columns) so that P V stays on the SIMD path.
void attend_task(const KernelTable& kt, const Tensor& q, int t0, int nt, int kvh, int group, int D,
                 const int32_t* positions, float scale, const float* k, int64_t k_stride,
                 const float* vt, int64_t vt_stride, Tensor& out) {
  const int rows = nt * group;
  int32_t max_pos = 0;
  for (int t = t0; t < t0 + nt; ++t) max_pos = std::max(max_pos, positions[t]);
  const int64_t n_keys = max_pos + 1, n_keys_pad = (n_keys + 15) / 16 * 16;
  // Per-thread buffers, kept across calls: no allocation per task once they have grown.
  thread_local std::vector<float> qg, pm, og;
  qg.resize(static_cast<size_t>(rows) * D);
  pm.resize(static_cast<size_t>(rows) * n_keys_pad);
  og.resize(static_cast<size_t>(rows) * D);
  for (int r = 0; r < rows; ++r) {
    const int t = t0 + r / group, h = kvh * group + r % group;
    std::memcpy(&qg[static_cast<size_t>(r) * D],
                static_cast<const float*>(q.data) + t * q.cols + static_cast<int64_t>(h) * D,
                D * sizeof(float));
  }
  // S[r][j] = q_r . k_j for the keys the task sees.
  kt.dense(DType::F32, reinterpret_cast<const uint8_t*>(k), k_stride * 4, static_cast<int>(n_keys),
           qg.data(), D, rows, D, pm.data(), n_keys_pad);
  for (int r = 0; r < rows; ++r) {
    float* row = &pm[static_cast<size_t>(r) * n_keys_pad];
    const int64_t n = positions[t0 + r / group] + 1;  // causal: keys 0..pos
    float mx = -INFINITY;
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, row[j] * scale);
    double sum = 0;
    for (int64_t j = 0; j < n; ++j) {
      row[j] = std::exp(row[j] * scale - mx);
      sum += row[j];
    }
    const float inv = static_cast<float>(1.0 / sum);
    for (int64_t j = 0; j < n; ++j) row[j] *= inv;
    for (int64_t j = n; j < n_keys_pad; ++j) row[j] = 0.0f;
  }
  // O[r][d] = sum_j P[r][j] V[j][d], with V^T rows of vt_stride values.
  kt.dense(DType::F32, reinterpret_cast<const uint8_t*>(vt), vt_stride * 4, D, pm.data(),
           n_keys_pad, rows, n_keys_pad, og.data(), D);
  for (int r = 0; r < rows; ++r) {
    const int t = t0 + r / group, h = kvh * group + r % group;
    std::memcpy(static_cast<float*>(out.data) + t * out.cols + static_cast<int64_t>(h) * D,
                &og[static_cast<size_t>(r) * D], D * sizeof(float));
  }
}

}  // namespace

// Attention of a prompt chunk (more than one block of query tokens): the cache rows it can see
// dequantized once for all heads and blocks, V transposed once, then a task a (KV head, block
// of query tokens): each K/V row is read once a block instead of once a (token, head).
void CpuBackend::attention_tiled(const Tensor& q, int n_tokens, const int32_t* positions,
                                 const Tensor& k_cache, const Tensor& v_cache, int64_t n_kv,
                                 const AttentionParams& p, Tensor& out) {
  const int D = p.head_dim, group = p.n_head / p.n_head_kv;
  const int64_t kv_dim = k_cache.cols, n_pad = (n_kv + 15) / 16 * 16;
  float* kf = scratch_floats(n_kv * kv_dim, 1);
  float* vf = scratch_floats(n_kv * kv_dim, 2);
  dequantize_rows(k_cache, n_kv, kf);
  dequantize_rows(v_cache, n_kv, vf);
  // vt[kvh][d][j] = V[j][kvh*D + d], zero for j >= n_kv.
  float* vt = scratch_floats(static_cast<size_t>(p.n_head_kv) * D * n_pad, 3);
  pool_.parallel_for(p.n_head_kv, [&](int64_t kvh, int) {
    float* dst = vt + kvh * D * n_pad;
    for (int d = 0; d < D; ++d) {
      float* row = dst + static_cast<int64_t>(d) * n_pad;
      for (int64_t j = 0; j < n_kv; ++j) row[j] = vf[j * kv_dim + kvh * D + d];
      for (int64_t j = n_kv; j < n_pad; ++j) row[j] = 0.0f;
    }
  });
  const int n_blocks = (n_tokens + kAttentionBlock - 1) / kAttentionBlock;
  pool_.parallel_for(static_cast<int64_t>(p.n_head_kv) * n_blocks, [&](int64_t task, int) {
    const int kvh = static_cast<int>(task / n_blocks);
    const int t0 = static_cast<int>(task % n_blocks) * kAttentionBlock;
    attend_task(*kernels_, q, t0, std::min(kAttentionBlock, n_tokens - t0), kvh, group, D,
                positions, p.scale, kf + kvh * D, kv_dim, vt + kvh * D * n_pad, n_pad, out);
  });
}

// Attention of a micro-batch or decode step (one block of query tokens): a task a KV head that
// converts only its own head's columns of the visible rows, K as rows and V already transposed.
// attention_tiled's whole-cache dequantization and transposition have nothing to share here: 16
// tokens over ~320 keys of llama2-7b's f16 cache took 2.14 ms a call on 2 threads against 0.95
// this way (nineteenth session; 1.9 against 1.6 ms on the GPU machine's 16-thread host, in a
// profile that waits for the GPU between ops, so that each op also pays ~0.3 ms to wake the
// sleeping workers).
void CpuBackend::attention_heads(const Tensor& q, int n_tokens, const int32_t* positions,
                                 const Tensor& k_cache, const Tensor& v_cache, int64_t n_kv,
                                 const AttentionParams& p, Tensor& out) {
  const int D = p.head_dim, group = p.n_head / p.n_head_kv;
  const int64_t n_pad = (n_kv + 15) / 16 * 16;
  pool_.parallel_for(p.n_head_kv, [&](int64_t kvh, int) {
    thread_local std::vector<float> kh, vt, vtile;
    kh.resize(static_cast<size_t>(n_kv) * D);
    vt.resize(static_cast<size_t>(D) * n_pad);
    vtile.resize(static_cast<size_t>(16) * D);
    for (int64_t j = 0; j < n_kv; ++j)
      cache_slice_to_f32(*kernels_, k_cache, j, kvh * D, D, &kh[j * D]);
    // V^T 16 keys at a time: the keys' rows into a tile, then 16 contiguous values a row of
    // V^T (a value at a time, each store went to another cache line: half the time here).
    for (int64_t j0 = 0; j0 < n_pad; j0 += 16) {
      const int64_t nj = std::min<int64_t>(16, n_kv - j0);
      for (int64_t i = 0; i < nj; ++i)
        cache_slice_to_f32(*kernels_, v_cache, j0 + i, kvh * D, D, &vtile[i * D]);
      for (int64_t i = nj; i < 16; ++i) std::fill_n(&vtile[i * D], D, 0.0f);
      for (int d = 0; d < D; ++d)
        for (int i = 0; i < 16; ++i) vt[d * n_pad + j0 + i] = vtile[i * D + d];
    }
    attend_task(*kernels_, q, 0, n_tokens, static_cast<int>(kvh), group, D, positions, p.scale,
                kh.data(), D, vt.data(), n_pad, out);
  });
}

Status CpuBackend::attention(const Tensor& q, int n_tokens, const int32_t* positions,
                             const Tensor& k_cache, const Tensor& v_cache, const AttentionParams& p,
                             Tensor& out) {
  if (p.n_head <= 0 || p.n_head_kv <= 0 || p.n_head % p.n_head_kv != 0 || p.head_dim <= 0 ||
      q.cols < static_cast<int64_t>(p.n_head) * p.head_dim ||
      out.cols < static_cast<int64_t>(p.n_head) * p.head_dim ||
      k_cache.cols < static_cast<int64_t>(p.n_head_kv) * p.head_dim || k_cache.cols != v_cache.cols)
    return error("attention: %d heads / %d KV heads of %d do not fit q [%lld] and caches [%lld]",
                 p.n_head, p.n_head_kv, p.head_dim, static_cast<long long>(q.cols),
                 static_cast<long long>(k_cache.cols));
  int32_t max_pos = 0;
  for (int t = 0; t < n_tokens; ++t) {
    if (positions[t] < 0 || positions[t] >= std::min(k_cache.rows, v_cache.rows))
      return error("attention at position %d outside the cache of %lld positions", positions[t],
                   static_cast<long long>(std::min(k_cache.rows, v_cache.rows)));
    max_pos = std::max(max_pos, positions[t]);
  }
  const int64_t n_kv = max_pos + 1;
  // A head's columns start on a quantization block of both caches (head sizes of 32 and up).
  const bool head_slices = quant::row_bytes(k_cache.type, p.head_dim) >= 0 &&
                           quant::row_bytes(v_cache.type, p.head_dim) >= 0;
  if (n_tokens <= kAttentionBlock && head_slices)
    attention_heads(q, n_tokens, positions, k_cache, v_cache, n_kv, p, out);
  else
    attention_tiled(q, n_tokens, positions, k_cache, v_cache, n_kv, p, out);
  return Status::ok();
}

Status CpuBackend::swiglu(const Tensor& gate, const Tensor& up, int n_tokens, Tensor& out) {
  const int64_t n = gate.cols;
  pool_.parallel_for(n_tokens, [&](int64_t t, int) {
    const float* g = static_cast<const float*>(gate.data) + t * gate.cols;
    const float* u = static_cast<const float*>(up.data) + t * up.cols;
    float* o = static_cast<float*>(out.data) + t * out.cols;
    for (int64_t i = 0; i < n; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  });
  return Status::ok();
}

Status CpuBackend::add(Tensor& x, const Tensor& y, int n_tokens) {
  const int64_t n = x.cols;
  pool_.parallel_for(n_tokens, [&](int64_t t, int) {
    float* a = static_cast<float*>(x.data) + t * x.cols;
    const float* b = static_cast<const float*>(y.data) + t * y.cols;
    for (int64_t i = 0; i < n; ++i) a[i] += b[i];
  });
  return Status::ok();
}

Status CpuBackend::get_rows(const Tensor& x, const int32_t* rows, int n_rows, Tensor& out) {
  for (int i = 0; i < n_rows; ++i) {
    if (rows[i] < 0 || rows[i] >= x.rows) return error("get_rows: row %d out of range", rows[i]);
    std::memcpy(static_cast<float*>(out.data) + i * out.cols,
                static_cast<const float*>(x.data) + rows[i] * x.cols, x.cols * sizeof(float));
  }
  return Status::ok();
}

}  // namespace kestrel::backend::cpu
