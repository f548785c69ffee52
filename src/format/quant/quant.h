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
//   Q5_0  blocks of 32: fp16 d, qh (4 bytes: bit j of the little-endian uint32 is bit 4 of
//         element j), 16 bytes of nibbles as Q4_0; value = (q - 16) * d, q = 0..31.
//   Q5_1  blocks of 32: fp16 d, fp16 m, qh and nibbles as Q5_0; value = q * d + m.
//   Q4_K  superblocks of 256 = 8 sub-blocks of 32: fp16 d, fp16 dmin, 12 bytes of 6-bit
//         sub-block scales sc[8] and mins mn[8], 128 bytes of nibbles. Element 64i + 32s + l
//         (i 0..3, s 0..1, l 0..31) is nibble s (0 = low) of qs[32i + l], in sub-block
//         j = 2i + s; value = (d * sc[j]) * q - (dmin * mn[j]). Scale packing: for j < 4,
//         sc[j] = scales[j] & 63, mn[j] = scales[j + 4] & 63; for j >= 4,
//         sc[j] = (scales[j + 4] & 15) | (scales[j - 4] >> 6) << 4 and
//         mn[j] = (scales[j + 4] >> 4) | (scales[j] >> 6) << 4.
//   Q5_K  as Q4_K with qh[32] between scales and qs: bit j of qh[l] is bit 4 of element
//         32j + l; q = 0..31.
//   Q6_K  superblocks of 256 = 16 sub-blocks of 16: ql[128], qh[64], int8 scales[16], fp16 d
//         (last). Element 128h + 32c + l (h 0..1, c 0..3, l 0..31) has its low 4 bits in nibble
//         c / 2 of ql[64h + 32(c % 2) + l] and its high 2 bits in bits 2c, 2c + 1 of
//         qh[32h + l]; value = (d * scales[e / 16]) * (q - 32), q = 0..63.
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

// Elements per superblock of the K-quants (Q4_K, Q5_K, Q6_K).
constexpr int kSuperBlock = 256;

struct BlockQ5_0 {
  uint16_t d;              // fp16 scale
  uint8_t qh[4];           // bit 4 of each element, element j in bit j (little-endian)
  uint8_t qs[kBlock / 2];  // low 4 bits, as BlockQ4_0
};
static_assert(sizeof(BlockQ5_0) == 22, "BlockQ5_0 must match the ggml layout");

struct BlockQ5_1 {
  uint16_t d;  // fp16 scale
  uint16_t m;  // fp16 minimum
  uint8_t qh[4];
  uint8_t qs[kBlock / 2];
};
static_assert(sizeof(BlockQ5_1) == 24, "BlockQ5_1 must match the ggml layout");

struct BlockQ4_K {
  uint16_t d;                   // fp16 super-scale of the sub-block scales
  uint16_t dmin;                // fp16 super-scale of the sub-block mins
  uint8_t scales[12];           // 8 scales and 8 mins of 6 bits (packing above)
  uint8_t qs[kSuperBlock / 2];  // nibbles
};
static_assert(sizeof(BlockQ4_K) == 144, "BlockQ4_K must match the ggml layout");

struct BlockQ5_K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[12];
  uint8_t qh[kSuperBlock / 8];  // bit 4 of each element
  uint8_t qs[kSuperBlock / 2];
};
static_assert(sizeof(BlockQ5_K) == 176, "BlockQ5_K must match the ggml layout");

struct BlockQ6_K {
  uint8_t ql[kSuperBlock / 2];  // low 4 bits
  uint8_t qh[kSuperBlock / 4];  // high 2 bits
  int8_t scales[16];            // per 16 elements
  uint16_t d;                   // fp16 super-scale
};
static_assert(sizeof(BlockQ6_K) == 210, "BlockQ6_K must match the ggml layout");

// One 32-element slice of a quantized row in integer form, for backends that transcode
// weights: element i = scale[i / 16] * (q[i] + bias) + min, computed in float in exactly that
// order (so a kernel that multiplies q by scale in a wider type reproduces dequantize_row;
// for Q5_0, Q5_1, Q4_K, Q5_K and Q6_K, dequantize_row is defined through this decoding).
struct Slice32 {
  uint8_t q[kBlock];  // unsigned codes: 0..31 (Q5_*), 0..15 (Q4_K), 0..63 (Q6_K)
  float scale[2];     // per 16 elements; equal except for Q6_K
  float min;          // 0 for the symmetric types
  int bias;           // -16 (Q5_0), -32 (Q6_K), else 0
};

// Slice b (elements 32b .. 32b + 31) of a row of type t; false for a type other than
// Q5_0, Q5_1, Q4_K, Q5_K, Q6_K.
bool decode_slice32(DType t, const void* row, int64_t b, Slice32* out);

// F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K: the types the reference
// routines below handle.
bool is_supported(DType t);

// F16, Q8_0, Q4_0: the types the KV cache may be stored in.
bool is_kv_type(DType t);

// Preconditions of the three routines below: is_supported(t), n >= 0 and n a multiple of
// the block size of t (1, kBlock or kSuperBlock), src/dst/w/x valid for the row. They are checked
// with assert(); in a release build a violated precondition leaves dst untouched (quantize_row),
// fills dst with NaN (dequantize_row) or returns NaN (dot_row) rather than reading or writing out
// of bounds.

// Expands one row of n elements of type t at src into n floats.
void dequantize_row(DType t, const void* src, float* dst, int64_t n);

// Encodes n finite floats into one row of type t at dst (row_bytes(t, n) bytes).
//   F16 / BF16: round-to-nearest-even (overflow to infinity).
//   Q4_0: per block, m = the element with the largest |x| (keeping its sign, first one on ties),
//         d = m / -8, q = clamp(round(x / d) + 8, 0, 15); d == 0 gives all q = 8.
//   Q4_1: per block, d = (max - min) / 15, m = min, q = clamp(round((x - m) / d), 0, 15);
//         d == 0 gives all q = 0.
//   Q8_0: per block, d = max|x| / 127, q = clamp(round(x / d), -127, 127); d == 0 gives q = 0.
//   Q5_0, Q5_1: as Q4_0 (d = m / -16) and Q4_1 (d = (max - min) / 31) with 5-bit codes.
//   Q4_K, Q5_K: per sub-block of 32, the scale s = (max - min(min, 0)) / qmax and offset
//         o = -min(min, 0) (qmax = 15 or 31); d = max s / 63, dmin = max o / 63 (fp16),
//         sc = round(s / d), mn = round(o / dmin) (6 bits), q from the stored values.
//   Q6_K: per sub-block of 16, s = m / -32 (m the element of largest |x|); d = max|s| / 127
//         (fp16), scales = round(s / d) (int8), q = clamp(round(x / (d * scale)) + 32, 0, 63).
// d and m are stored as fp16 (fp32_to_fp16), and q is computed against the STORED, fp16-rounded
// values of d and m, so the reconstruction error is measured from the values actually used on
// dequantization. round() is round-half-away-from-zero (std::round). The Q types assume each
// block's d and m are within fp16 range (|d| <= 65504); larger blocks do not round-trip.
void quantize_row(DType t, const float* src, void* dst, int64_t n);

// sum_i dequant(w)[i] * x[i], each product and the sum in double, in index order.
double dot_row(DType t, const void* w, const float* x, int64_t n);

}  // namespace kestrel::quant
