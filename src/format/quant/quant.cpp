// Scalar reference implementations of the block formats declared in quant.h.
#include "format/quant/quant.h"

#include <cassert>
#include <cmath>
#include <cstring>
#include <limits>

#include "format/quant/fp16.h"
#include "format/quant/quant_ext.h"

namespace kestrel::quant {

namespace {

// Elements per block of a supported type, 0 for any other.
int64_t block_elems_of(DType t) {
  switch (t) {
    case DType::F32:
    case DType::F16:
    case DType::BF16:
      return 1;
    case DType::Q4_0:
    case DType::Q4_1:
    case DType::Q8_0:
    case DType::Q5_0:
    case DType::Q5_1:
      return kBlock;
    case DType::Q4_K:
    case DType::Q5_K:
    case DType::Q6_K:
      return kSuperBlock;
    default:
      return 0;
  }
}

// True when (t, n) satisfies the preconditions shared by the row routines.
bool row_ok(DType t, int64_t n) {
  const int64_t be = block_elems_of(t);
  return be > 0 && n >= 0 && n % be == 0;
}

// round(v) clamped to [lo, hi], clamped in float first so that no value (not even an
// infinity or a NaN, which gives lo) reaches the int conversion out of range.
int round_clamp(float v, int lo, int hi) {
  const float r =
      std::fmin(std::fmax(std::round(v), static_cast<float>(lo)), static_cast<float>(hi));
  return static_cast<int>(r);
}

// ---- one block each way ------------------------------------------------------------------

void dequantize_block(const BlockQ4_0& b, float* y) {
  const float d = fp16_to_fp32(b.d);
  for (int j = 0; j < kBlock / 2; ++j) {
    const int lo = (b.qs[j] & 0x0F) - 8;
    const int hi = (b.qs[j] >> 4) - 8;
    y[j] = static_cast<float>(lo) * d;
    y[j + kBlock / 2] = static_cast<float>(hi) * d;
  }
}

void dequantize_block(const BlockQ4_1& b, float* y) {
  const float d = fp16_to_fp32(b.d);
  const float m = fp16_to_fp32(b.m);
  for (int j = 0; j < kBlock / 2; ++j) {
    const int lo = b.qs[j] & 0x0F;
    const int hi = b.qs[j] >> 4;
    y[j] = static_cast<float>(lo) * d + m;
    y[j + kBlock / 2] = static_cast<float>(hi) * d + m;
  }
}

void dequantize_block(const BlockQ8_0& b, float* y) {
  const float d = fp16_to_fp32(b.d);
  for (int j = 0; j < kBlock; ++j) y[j] = static_cast<float>(b.qs[j]) * d;
}

void quantize_block(const float* x, BlockQ4_0* b) {
  // m: the element of largest magnitude, with its sign (the first one on ties).
  float amax = 0.0f;
  float m = 0.0f;
  for (int j = 0; j < kBlock; ++j) {
    if (std::fabs(x[j]) > amax) {
      amax = std::fabs(x[j]);
      m = x[j];
    }
  }
  b->d = fp32_to_fp16(m / -8.0f);
  const float d = fp16_to_fp32(b->d);  // quantize against the scale actually stored
  uint8_t q[kBlock];
  for (int j = 0; j < kBlock; ++j) {
    q[j] = d == 0.0f ? 8 : static_cast<uint8_t>(round_clamp(x[j] / d, -8, 7) + 8);
  }
  for (int j = 0; j < kBlock / 2; ++j) {
    b->qs[j] = static_cast<uint8_t>(q[j] | (q[j + kBlock / 2] << 4));
  }
}

void quantize_block(const float* x, BlockQ4_1* b) {
  float lo = x[0];
  float hi = x[0];
  for (int j = 1; j < kBlock; ++j) {
    if (x[j] < lo) lo = x[j];
    if (x[j] > hi) hi = x[j];
  }
  b->d = fp32_to_fp16((hi - lo) / 15.0f);
  b->m = fp32_to_fp16(lo);
  const float d = fp16_to_fp32(b->d);  // quantize against the stored scale and minimum
  const float m = fp16_to_fp32(b->m);
  uint8_t q[kBlock];
  for (int j = 0; j < kBlock; ++j) {
    q[j] = d == 0.0f ? 0 : static_cast<uint8_t>(round_clamp((x[j] - m) / d, 0, 15));
  }
  for (int j = 0; j < kBlock / 2; ++j) {
    b->qs[j] = static_cast<uint8_t>(q[j] | (q[j + kBlock / 2] << 4));
  }
}

void quantize_block(const float* x, BlockQ8_0* b) {
  float amax = 0.0f;
  for (int j = 0; j < kBlock; ++j) {
    if (std::fabs(x[j]) > amax) amax = std::fabs(x[j]);
  }
  b->d = fp32_to_fp16(amax / 127.0f);
  const float d = fp16_to_fp32(b->d);  // quantize against the scale actually stored
  for (int j = 0; j < kBlock; ++j) {
    b->qs[j] = d == 0.0f ? 0 : static_cast<int8_t>(round_clamp(x[j] / d, -127, 127));
  }
}

template <typename Block>
void dequantize_blocks(const void* src, float* dst, int64_t n) {
  const auto* blocks = static_cast<const Block*>(src);
  for (int64_t i = 0; i < n / kBlock; ++i) dequantize_block(blocks[i], dst + i * kBlock);
}

template <typename Block>
void quantize_blocks(const float* src, void* dst, int64_t n) {
  auto* blocks = static_cast<Block*>(dst);
  for (int64_t i = 0; i < n / kBlock; ++i) quantize_block(src + i * kBlock, &blocks[i]);
}

template <typename Block>
double dot_blocks(const void* w, const float* x, int64_t n) {
  const auto* blocks = static_cast<const Block*>(w);
  double sum = 0.0;
  float y[kBlock];
  for (int64_t i = 0; i < n / kBlock; ++i) {
    dequantize_block(blocks[i], y);
    for (int j = 0; j < kBlock; ++j) {
      sum += static_cast<double>(y[j]) * static_cast<double>(x[i * kBlock + j]);
    }
  }
  return sum;
}

// Reads element i of a 16-bit row without assuming alignment.
uint16_t load_u16(const void* src, int64_t i) {
  uint16_t v;
  std::memcpy(&v, static_cast<const unsigned char*>(src) + 2 * i, 2);
  return v;
}

void store_u16(void* dst, int64_t i, uint16_t v) {
  std::memcpy(static_cast<unsigned char*>(dst) + 2 * i, &v, 2);
}

float load_f32(const void* src, int64_t i) {
  float v;
  std::memcpy(&v, static_cast<const unsigned char*>(src) + 4 * i, 4);
  return v;
}

}  // namespace

bool is_supported(DType t) {
  return block_elems_of(t) > 0;
}

bool is_kv_type(DType t) {
  return t == DType::F16 || t == DType::Q8_0 || t == DType::Q4_0;
}

void dequantize_row(DType t, const void* src, float* dst, int64_t n) {
  assert(row_ok(t, n) && "dequantize_row: unsupported type or n not a multiple of the block");
  if (!row_ok(t, n)) {
    for (int64_t i = 0; i < n; ++i) dst[i] = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  switch (t) {
    case DType::F32:
      for (int64_t i = 0; i < n; ++i) dst[i] = load_f32(src, i);
      return;
    case DType::F16:
      for (int64_t i = 0; i < n; ++i) dst[i] = fp16_to_fp32(load_u16(src, i));
      return;
    case DType::BF16:
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_fp32(load_u16(src, i));
      return;
    case DType::Q4_0:
      return dequantize_blocks<BlockQ4_0>(src, dst, n);
    case DType::Q4_1:
      return dequantize_blocks<BlockQ4_1>(src, dst, n);
    case DType::Q8_0:
      return dequantize_blocks<BlockQ8_0>(src, dst, n);
    case DType::Q5_0:
    case DType::Q5_1:
    case DType::Q4_K:
    case DType::Q5_K:
    case DType::Q6_K:
      return detail::dequantize_slices(t, src, dst, n);
    default:
      return;  // unreachable: row_ok() rejected it
  }
}

void quantize_row(DType t, const float* src, void* dst, int64_t n) {
  assert(row_ok(t, n) && "quantize_row: unsupported type or n not a multiple of the block");
  if (!row_ok(t, n)) return;
  switch (t) {
    case DType::F32:
      if (n > 0) std::memcpy(dst, src, static_cast<size_t>(n) * 4);
      return;
    case DType::F16:
      for (int64_t i = 0; i < n; ++i) store_u16(dst, i, fp32_to_fp16(src[i]));
      return;
    case DType::BF16:
      for (int64_t i = 0; i < n; ++i) store_u16(dst, i, fp32_to_bf16(src[i]));
      return;
    case DType::Q4_0:
      return quantize_blocks<BlockQ4_0>(src, dst, n);
    case DType::Q4_1:
      return quantize_blocks<BlockQ4_1>(src, dst, n);
    case DType::Q8_0:
      return quantize_blocks<BlockQ8_0>(src, dst, n);
    case DType::Q5_0:
    case DType::Q5_1:
    case DType::Q4_K:
    case DType::Q5_K:
    case DType::Q6_K:
      return detail::quantize_ext(t, src, dst, n);
    default:
      return;  // unreachable: row_ok() rejected it
  }
}

double dot_row(DType t, const void* w, const float* x, int64_t n) {
  assert(row_ok(t, n) && "dot_row: unsupported type or n not a multiple of the block");
  if (!row_ok(t, n)) return std::numeric_limits<double>::quiet_NaN();
  double sum = 0.0;
  switch (t) {
    case DType::F32:
      for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(load_f32(w, i)) * x[i];
      return sum;
    case DType::F16:
      for (int64_t i = 0; i < n; ++i) {
        sum += static_cast<double>(fp16_to_fp32(load_u16(w, i))) * x[i];
      }
      return sum;
    case DType::BF16:
      for (int64_t i = 0; i < n; ++i) {
        sum += static_cast<double>(bf16_to_fp32(load_u16(w, i))) * x[i];
      }
      return sum;
    case DType::Q4_0:
      return dot_blocks<BlockQ4_0>(w, x, n);
    case DType::Q4_1:
      return dot_blocks<BlockQ4_1>(w, x, n);
    case DType::Q8_0:
      return dot_blocks<BlockQ8_0>(w, x, n);
    case DType::Q5_0:
    case DType::Q5_1:
    case DType::Q4_K:
    case DType::Q5_K:
    case DType::Q6_K:
      return detail::dot_slices(t, w, x, n);
    default:
      return std::numeric_limits<double>::quiet_NaN();  // unreachable
  }
}

}  // namespace kestrel::quant
