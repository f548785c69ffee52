// Block formats of the quantized weight / KV types (the GGUF / ggml layouts, bit for bit) and
// their scalar reference routines. The functions here are written as plain loops for clarity:
// they are the definition every SIMD and GPU kernel is tested against, not the fast path.
//
// Element formats (n elements per row, n a multiple of the block size):
//   F32   4 bytes per element.
//   F16   IEEE binary16, round-to-nearest-even on quantization.
//   BF16  upper half of an IEEE binary32, round-to-nearest-even on quantization.
//   Q4_0  blocks of 32: fp16 scale d, 16 bytes of nibbles. Element j (0..15) is the low nibble
//         of qs[j], element j+16 the high nibble of qs[j]; value = (nibble - 8) * d.
//   Q4_1  blocks of 32: fp16 scale d, fp16 minimum m, nibbles as Q4_0; value = nibble * d + m.
//   Q8_0  blocks of 32: fp16 scale d, 32 int8; value = q * d.
#pragma once

#include <cstdint>

#include "format/quant/types.h"

namespace kestrel::quant {

// Elements per block of the block-quantized types Q4_0, Q4_1, Q8_0.
constexpr int kBlock = 32;

struct BlockQ4_0 {
  uint16_t d;              // fp16 scale
  uint8_t qs[kBlock / 2];  // nibbles: low = elements 0..15, high = elements 16..31
};
static_assert(sizeof(BlockQ4_0) == 18, "BlockQ4_0 must match the ggml layout");

struct BlockQ4_1 {
  uint16_t d;              // fp16 scale
  uint16_t m;              // fp16 minimum (offset)
  uint8_t qs[kBlock / 2];  // nibbles as in BlockQ4_0
};
static_assert(sizeof(BlockQ4_1) == 20, "BlockQ4_1 must match the ggml layout");

struct BlockQ8_0 {
  uint16_t d;         // fp16 scale
  int8_t qs[kBlock];  // one signed byte per element
};
static_assert(sizeof(BlockQ8_0) == 34, "BlockQ8_0 must match the ggml layout");

// F32, F16, BF16, Q4_0, Q4_1, Q8_0: the types the reference routines below handle.
bool is_supported(DType t);

// F16, Q8_0, Q4_0: the types the KV cache may be stored in.
bool is_kv_type(DType t);

// Preconditions of the three routines below: is_supported(t), n >= 0 and n a multiple of
// the block size of t (1 or kBlock), src/dst/w/x valid for the row. They are checked with assert();
// in a release build a violated precondition leaves dst untouched (quantize_row), fills dst with
// NaN (dequantize_row) or returns NaN (dot_row) rather than reading or writing out of bounds.

// Expands one row of n elements of type t at src into n floats.
void dequantize_row(DType t, const void* src, float* dst, int64_t n);

// Encodes n finite floats into one row of type t at dst (row_bytes(t, n) bytes).
//   F16 / BF16: round-to-nearest-even (overflow to infinity).
//   Q4_0: per block, m = the element with the largest |x| (keeping its sign, first one on ties),
//         d = m / -8, q = clamp(round(x / d) + 8, 0, 15); d == 0 gives all q = 8.
//   Q4_1: per block, d = (max - min) / 15, m = min, q = clamp(round((x - m) / d), 0, 15);
//         d == 0 gives all q = 0.
//   Q8_0: per block, d = max|x| / 127, q = clamp(round(x / d), -127, 127); d == 0 gives q = 0.
// d and m are stored as fp16 (fp32_to_fp16), and q is computed against the STORED, fp16-rounded
// values of d and m, so the reconstruction error is measured from the values actually used on
// dequantization. round() is round-half-away-from-zero (std::round). The Q types assume each
// block's d and m are within fp16 range (|d| <= 65504); larger blocks do not round-trip.
void quantize_row(DType t, const float* src, void* dst, int64_t n);

// sum_i dequant(w)[i] * x[i], each product and the sum in double, in index order.
double dot_row(DType t, const void* w, const float* x, int64_t n);

}  // namespace kestrel::quant
