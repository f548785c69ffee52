// Portable kernels (any CPU, ARM included), the weight packing and ISA selection.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string_view>

#include "backend/cpu/kernels.h"
#include "format/quant/fp16.h"
#include "format/quant/quant.h"

namespace kestrel::backend::cpu {

using quant::DType;

PanelFormat panel_format(DType t) {
  switch (t) {
    case DType::Q4_0:
      return PanelFormat::Q4_0;
    case DType::Q4_1:
    case DType::Q4_K:
      return PanelFormat::Q4_1;
    case DType::Q8_0:
    case DType::Q5_0:
      return PanelFormat::Q8_0;
    case DType::Q5_1:
    case DType::Q5_K:
      return PanelFormat::U8Min;
    case DType::Q6_K:
      return PanelFormat::Q6;
    default:
      return PanelFormat::None;
  }
}

int64_t packed_block_bytes(DType t) {
  switch (panel_format(t)) {
    case PanelFormat::Q4_0:
      return 64 + 256;
    case PanelFormat::Q4_1:
      return 128 + 256;
    case PanelFormat::Q8_0:
      return 64 + 512;
    case PanelFormat::U8Min:
    case PanelFormat::Q6:
      return 128 + 512;
    default:
      return 0;
  }
}

PanelKernel panel_kernel(const KernelTable& table, DType t) {
  switch (panel_format(t)) {
    case PanelFormat::Q4_0:
      return table.panel_q4_0;
    case PanelFormat::Q4_1:
      return table.panel_q4_1;
    case PanelFormat::Q8_0:
      return table.panel_q8_0;
    case PanelFormat::U8Min:
      return table.panel_u8min;
    case PanelFormat::Q6:
      return table.panel_q6;
    default:
      return nullptr;
  }
}

namespace {

// Element e (0..31) of a 4-bit block's 16 packed bytes (low nibbles first, then high).
inline uint8_t nibble(const uint8_t* qs, int e) {
  return e < 16 ? (qs[e] & 0x0F) : (qs[e - 16] >> 4);
}

}  // namespace

void pack_panels(DType type, const void* rows, int64_t n_out, int64_t n_in, bool q8_unsigned,
                 uint8_t* out) {
  const int64_t nb = n_in / kBlock;
  const int64_t n_panels = (n_out + kPanelRows - 1) / kPanelRows;
  const int64_t bb = packed_block_bytes(type);
  const int64_t src_row = quant::row_bytes(type, n_in);
  const auto* src = static_cast<const uint8_t*>(rows);
  for (int64_t p = 0; p < n_panels; ++p) {
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* dst = out + (p * nb + b) * bb;
      std::memset(dst, 0, bb);
      auto* scale = reinterpret_cast<float*>(dst);
      for (int r = 0; r < kPanelRows; ++r) {
        const int64_t row = p * kPanelRows + r;
        if (row >= n_out) {
          continue;  // padding row: zero scale (and min), so it contributes nothing
        }
        if (type != DType::Q4_0 && type != DType::Q4_1 && type != DType::Q8_0) {
          pack_slice(type, src + row * src_row, b, r, q8_unsigned, dst);  // transcoded types
          continue;
        }
        const uint8_t* blk = src + row * src_row + b * quant::type_info(type)->block_bytes;
        if (type == DType::Q4_0) {
          const auto* q = reinterpret_cast<const quant::BlockQ4_0*>(blk);
          scale[r] = quant::fp16_to_fp32(q->d);
          for (int j = 0; j < 4; ++j)
            for (int e = 0; e < 4; ++e)
              dst[64 + 64 * j + 4 * r + e] = static_cast<uint8_t>(
                  nibble(q->qs, 8 * j + e) | (nibble(q->qs, 8 * j + 4 + e) << 4));
        } else if (type == DType::Q4_1) {
          const auto* q = reinterpret_cast<const quant::BlockQ4_1*>(blk);
          scale[r] = quant::fp16_to_fp32(q->d);
          scale[16 + r] = quant::fp16_to_fp32(q->m);
          for (int j = 0; j < 4; ++j)
            for (int e = 0; e < 4; ++e)
              dst[128 + 64 * j + 4 * r + e] = static_cast<uint8_t>(
                  nibble(q->qs, 8 * j + e) | (nibble(q->qs, 8 * j + 4 + e) << 4));
        } else {
          const auto* q = reinterpret_cast<const quant::BlockQ8_0*>(blk);
          scale[r] = quant::fp16_to_fp32(q->d);
          for (int g = 0; g < 8; ++g)
            for (int e = 0; e < 4; ++e)
              dst[64 + 64 * g + 4 * r + e] =
                  static_cast<uint8_t>(q->qs[4 * g + e] + (q8_unsigned ? 128 : 0));
        }
      }
    }
  }
}

namespace {

void quantize_acts_generic(const float* x, int64_t k, uint8_t* row_out) {
  auto* q1 = reinterpret_cast<int8_t*>(row_out);
  auto* q2 = reinterpret_cast<int8_t*>(row_out + k);
  auto* d = reinterpret_cast<float*>(row_out + 2 * k);
  auto* s = reinterpret_cast<int32_t*>(row_out + 2 * k + 4 * (k / kBlock));
  for (int64_t b = 0; b < k / kBlock; ++b) {
    const float* xb = x + b * kBlock;
    float amax = 0;
    for (int i = 0; i < kBlock; ++i) amax = std::fmax(amax, std::fabs(xb[i]));
    const float unit = amax / (127.0f * 128.0f);
    const float inv = unit > 0 ? 1.0f / unit : 0.0f;
    int32_t sum = 0;
    for (int i = 0; i < kBlock; ++i) {
      // v in units, |v| <= 16256; split into 128 * hi + lo with |lo| <= 64
      const int v = static_cast<int>(std::nearbyint(xb[i] * inv));
      const int hi = static_cast<int>(std::nearbyint(static_cast<float>(v) / 128.0f));
      q1[b * kBlock + i] = static_cast<int8_t>(hi);
      q2[b * kBlock + i] = static_cast<int8_t>(v - 128 * hi);
      sum += v;
    }
    d[b] = unit;
    s[b] = sum;
  }
}

// One panel, plain loops over the packed layout: the portable path and the definition the
// SIMD kernels must agree with.
template <DType T>
void panel_generic(const uint8_t* panel, int64_t n_blocks, const QuantActs& acts, int64_t t0,
                   int n_tokens, float* out, int64_t ld_out, int n_valid_rows, bool q8_unsigned) {
  const int64_t bb = packed_block_bytes(T);
  for (int t = 0; t < n_tokens; ++t) {
    const int8_t* q1 = acts.q1(t0 + t);
    const int8_t* q2 = acts.q2(t0 + t);
    const float* xd = acts.d(t0 + t);
    const int32_t* xs = acts.s(t0 + t);
    for (int r = 0; r < n_valid_rows; ++r) {
      float acc = 0;
      for (int64_t b = 0; b < n_blocks; ++b) {
        const uint8_t* blk = panel + b * bb;
        const float* scale = reinterpret_cast<const float*>(blk);
        // x element i of the block, in units: 128 * q1 + q2
        auto xv = [&](int i) { return 128 * q1[b * kBlock + i] + q2[b * kBlock + i]; };
        int32_t dot = 0;
        if constexpr (T == DType::Q8_0) {
          for (int g = 0; g < 8; ++g)
            for (int e = 0; e < 4; ++e) {
              const uint8_t raw = blk[64 + 64 * g + 4 * r + e];
              const int w = q8_unsigned ? static_cast<int>(raw) - 128 : static_cast<int8_t>(raw);
              dot += w * xv(4 * g + e);
            }
          acc += scale[r] * xd[b] * static_cast<float>(dot);
        } else {
          const uint8_t* nib = blk + (T == DType::Q4_1 ? 128 : 64);
          for (int j = 0; j < 4; ++j)
            for (int e = 0; e < 4; ++e) {
              const uint8_t byte = nib[64 * j + 4 * r + e];
              dot += (byte & 0x0F) * xv(8 * j + e) + (byte >> 4) * xv(8 * j + 4 + e);
            }
          if constexpr (T == DType::Q4_0) {
            acc += scale[r] * xd[b] * static_cast<float>(dot - 8 * xs[b]);
          } else {
            acc += scale[r] * xd[b] * static_cast<float>(dot) + scale[16 + r] * xd[b] * xs[b];
          }
        }
      }
      out[(t0 + t) * ld_out + r] = acc;
    }
  }
}

void panel_q4_0_generic(const uint8_t* p, int64_t nb, const QuantActs& a, int64_t t0, int nt,
                        float* out, int64_t ld, int nv) {
  panel_generic<DType::Q4_0>(p, nb, a, t0, nt, out, ld, nv, false);
}
void panel_q4_1_generic(const uint8_t* p, int64_t nb, const QuantActs& a, int64_t t0, int nt,
                        float* out, int64_t ld, int nv) {
  panel_generic<DType::Q4_1>(p, nb, a, t0, nt, out, ld, nv, false);
}
void panel_q8_0_generic(const uint8_t* p, int64_t nb, const QuantActs& a, int64_t t0, int nt,
                        float* out, int64_t ld, int nv) {
  panel_generic<DType::Q8_0>(p, nb, a, t0, nt, out, ld, nv, false);
}

inline float load_dense(DType type, const uint8_t* w, int64_t i) {
  switch (type) {
    case DType::F16:
      return quant::fp16_to_fp32(reinterpret_cast<const uint16_t*>(w)[i]);
    case DType::BF16:
      return quant::bf16_to_fp32(reinterpret_cast<const uint16_t*>(w)[i]);
    default:
      return reinterpret_cast<const float*>(w)[i];
  }
}

void dense_generic(DType type, const uint8_t* w, int64_t w_row_bytes, int n_rows, const float* x,
                   int64_t ld_x, int n_tokens, int64_t k, float* out, int64_t ld_out) {
  for (int r = 0; r < n_rows; ++r) {
    const uint8_t* wr = w + r * w_row_bytes;
    for (int t = 0; t < n_tokens; ++t) {
      const float* xt = x + t * ld_x;
      float acc = 0;
      for (int64_t i = 0; i < k; ++i) acc += load_dense(type, wr, i) * xt[i];
      out[t * ld_out + r] = acc;
    }
  }
}

float dot_f32_generic(const float* a, const float* b, int n) {
  float acc = 0;
  for (int i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

void axpy_f32_generic(float a, const float* x, float* y, int n) {
  for (int i = 0; i < n; ++i) y[i] += a * x[i];
}

void f16_to_f32_generic(const uint16_t* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = quant::fp16_to_fp32(x[i]);
}

KernelTable make_generic() {
  KernelTable k;
  k.isa = "generic";
  k.q8_unsigned = false;
  k.quantize_acts = quantize_acts_generic;
  k.panel_q4_0 = panel_q4_0_generic;
  k.panel_q4_1 = panel_q4_1_generic;
  k.panel_q8_0 = panel_q8_0_generic;
  k.panel_u8min = panel_u8min_generic;
  k.panel_q6 = panel_q6_generic;
  k.dense = dense_generic;
  k.dot_f32 = dot_f32_generic;
  k.axpy_f32 = axpy_f32_generic;
  k.f16_to_f32 = f16_to_f32_generic;
  return k;
}

}  // namespace

bool cpu_has(const char* feature) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  std::string_view f(feature);
  if (f == "avx512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni");
  }
  if (f == "avx2") {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }
#else
  (void)feature;
#endif
  return false;
}

const KernelTable& generic_kernels() {
  static const KernelTable table = make_generic();
  return table;
}

#if !defined(__x86_64__)
const KernelTable* avx2_kernels() {
  return nullptr;
}
const KernelTable* avx512_kernels() {
  return nullptr;
}
#endif

const KernelTable& best_kernels() {
  static const KernelTable* chosen = [] {
    const char* want = std::getenv("KESTREL_CPU_ISA");
    const std::string_view w = want ? want : "";
    if (w == "generic") return &generic_kernels();
    // The CPU is asked first: building a table runs code compiled for its ISA (an AVX-512
    // table's initialization uses zmm stores, SIGILL on an AVX2-only CPU).
    if (w != "avx2" && cpu_has("avx512") && avx512_kernels()) return avx512_kernels();
    if (cpu_has("avx2") && avx2_kernels()) return avx2_kernels();
    return &generic_kernels();
  }();
  return *chosen;
}

}  // namespace kestrel::backend::cpu
