// CPU compute kernels behind one function table, chosen once at start-up from what the CPU
// supports (AVX-512 VNNI, AVX2, or portable C++ that also builds for ARM).
//
// Quantized matmuls run in int8: activations are quantized per 32-element block (q8 with a
// float scale and the block's integer sum), weights are repacked at load time into panels of
// 16 output rows so that one 64-byte vector holds 4 consecutive elements of 16 rows, the
// shape that dpbusd (u8 x s8 -> 4-way sums in int32 lanes) consumes with the activation's
// 4 bytes broadcast. Each lane then accumulates a whole block dot for one row, and the float
// conversion and scaling happen once per block per 16 rows instead of once per 64 products.
#pragma once

#include <cstddef>
#include <cstdint>

#include "format/quant/types.h"

namespace kestrel::backend::cpu {

constexpr int kPanelRows = 16;
constexpr int kBlock = 32;

// Activations of T tokens quantized for the int8 kernels, in two int8 planes per 32-element
// block: x ~= unit * (128 * q1 + q2), with q1 the usual 8-bit quantization (unit * 128 =
// max|x| / 127) and q2 its rounding residual. One plane alone (as llama.cpp's q8_0
// activations) costs about 0.5% relative error per matmul and far more next to outlier
// channels, which puts whole-model logits outside 1e-2 of the float reference; two planes
// are about 128x tighter for twice the dot instructions and the same weight traffic.
// Row t starts at base + t * stride: int8 q1[k], int8 q2[k], float unit[k/32],
// int32 sum[k/32] (sum of 128 * q1 + q2 over the block), int32 half_sum[k/16] (the same sum
// per 16 elements; filled by quantize_acts_half_sums only for weights that need it, Q6_K).
struct QuantActs {
  const uint8_t* base = nullptr;
  int64_t stride = 0;
  int64_t k = 0;
  const int8_t* q1(int64_t t) const { return reinterpret_cast<const int8_t*>(base + t * stride); }
  const int8_t* q2(int64_t t) const {
    return reinterpret_cast<const int8_t*>(base + t * stride + k);
  }
  const float* d(int64_t t) const {
    return reinterpret_cast<const float*>(base + t * stride + 2 * k);
  }
  const int32_t* s(int64_t t) const {
    return reinterpret_cast<const int32_t*>(base + t * stride + 2 * k + 4 * (k / kBlock));
  }
  const int32_t* hs(int64_t t) const {
    return reinterpret_cast<const int32_t*>(base + t * stride + 2 * k + 8 * (k / kBlock));
  }
  static int64_t row_stride(int64_t k) { return 2 * k + 16 * (k / kBlock); }
};

// Fills half_sum[k/16] of one quantized activation row from its q1 / q2 planes.
void quantize_acts_half_sums(int64_t k, uint8_t* row);

// Packed panel formats, per (panel, block):
//   Q4_0: float scale[16], u8 nibbles[256]    (320 bytes)
//   Q4_1: float scale[16], float min[16], u8 nibbles[256]   (384 bytes)
//   Q8_0: float scale[16], u8 quants[512]     (576 bytes; stored q+128 when q8_unsigned)
//   U8Min: float scale[16], float min[16], u8 quants[512]   (640 bytes): value = scale*q + min
//   Q6:   float scale_lo[16], float scale_hi[16], u8 quants[512]   (640 bytes): value =
//         scale_lo*(q - 32) for elements 0..15 of the block, scale_hi*(q - 32) for 16..31
// Nibble chunk j (64 bytes, j = 0..3): byte 4r+e holds element 4(2j)+e of row r in its low
// nibble and element 4(2j+1)+e in its high nibble. Q8 chunk g (g = 0..7): byte 4r+e holds
// element 4g+e of row r.
//
// The GGUF types map onto these at load time (pack_panels), every one of them exactly: the
// panel scales and mins are f32, and the 5-bit and K-quant per-32 parameters are f32 products
// of fp16 super-scales and small integers (exact in f32), see quant::Slice32.
//   Q4_0 -> Q4_0; Q4_1 -> Q4_1; Q8_0 -> Q8_0;
//   Q4_K -> Q4_1 (scale d*sc, min -dmin*mn per 32: the Q4_1 kernels run it unchanged);
//   Q5_0 -> Q8_0 (q - 16 is a signed 5-bit integer: the Q8_0 kernels run it unchanged);
//   Q5_1, Q5_K -> U8Min (5-bit codes widened to bytes: 8 dot instructions per 32 with no
//         unpacking, the fastest form for prefill; 2x Q4_0's panel bytes, which only a
//         memory-bound decode notices);
//   Q6_K -> Q6 (two scales per 32; the -32 offset is applied through half-block activation
//         sums, so the u8 codes go straight into the dot instructions).
enum class PanelFormat { None, Q4_0, Q4_1, Q8_0, U8Min, Q6 };
PanelFormat panel_format(quant::DType t);
// Bytes per (panel, block) of the panel format type t is packed into; 0 when it has none.
int64_t packed_block_bytes(quant::DType t);

using PanelKernel = void (*)(const uint8_t* panel, int64_t n_blocks, const QuantActs& acts,
                             int64_t t0, int n_tokens, float* out, int64_t ld_out,
                             int n_valid_rows);

// out[t][r] for r < n_rows, t < n_tokens = dot(w row r, x row t) for dense weight types.
using DenseKernel = void (*)(quant::DType type, const uint8_t* w, int64_t w_row_bytes, int n_rows,
                             const float* x, int64_t ld_x, int n_tokens, int64_t k, float* out,
                             int64_t ld_out);

struct KernelTable {
  const char* isa = "generic";
  bool q8_unsigned = false;  // Q8_0 panels hold q+128 (for u8 x s8 dot instructions)
  void (*quantize_acts)(const float* x, int64_t k, uint8_t* row_out) = nullptr;
  PanelKernel panel_q4_0 = nullptr;
  PanelKernel panel_q4_1 = nullptr;
  PanelKernel panel_q8_0 = nullptr;
  PanelKernel panel_u8min = nullptr;  // Q5_1, Q5_K
  PanelKernel panel_q6 = nullptr;     // Q6_K (reads QuantActs::hs)
  DenseKernel dense = nullptr;
  float (*dot_f32)(const float* a, const float* b, int n) = nullptr;
  void (*axpy_f32)(float a, const float* x, float* y, int n) = nullptr;  // y += a x
  void (*f16_to_f32)(const uint16_t* x, float* y, int64_t n) = nullptr;  // KV cache reads
};

const KernelTable& generic_kernels();
// Whether this CPU runs the kernels of "avx2" (with FMA and F16C) or "avx512" (F, BW, VL, DQ
// and VNNI).
bool cpu_has(const char* feature);
// nullptr when not compiled in. Call only when cpu_has() says the CPU runs the ISA: the first
// call builds the table with code compiled for it.
const KernelTable* avx2_kernels();
const KernelTable* avx512_kernels();
// The best table this CPU runs; KESTREL_CPU_ISA=generic|avx2|avx512 overrides (for tests).
const KernelTable& best_kernels();

// The kernel of `table` for a weight of type t (nullptr if it has no panel format).
PanelKernel panel_kernel(const KernelTable& table, quant::DType t);

// Panel kernels of the transcoded formats, one file per ISA (kernels_kquant*.cpp).
void panel_u8min_generic(const uint8_t*, int64_t, const QuantActs&, int64_t, int, float*, int64_t,
                         int);
void panel_q6_generic(const uint8_t*, int64_t, const QuantActs&, int64_t, int, float*, int64_t,
                      int);
void panel_u8min_avx2(const uint8_t*, int64_t, const QuantActs&, int64_t, int, float*, int64_t,
                      int);
void panel_q6_avx2(const uint8_t*, int64_t, const QuantActs&, int64_t, int, float*, int64_t, int);
void panel_u8min_avx512(const uint8_t*, int64_t, const QuantActs&, int64_t, int, float*, int64_t,
                        int);
void panel_q6_avx512(const uint8_t*, int64_t, const QuantActs&, int64_t, int, float*, int64_t, int);
// Writes row r of one packed (panel, block) of a transcoded type (Q5_0, Q5_1, Q4_K, Q5_K,
// Q6_K) from 32-element slice b of the GGUF row `row`.
void pack_slice(quant::DType type, const uint8_t* row, int64_t b, int r, bool q8_unsigned,
                uint8_t* dst);

// Packing from GGUF rows (n_out rows of n_in elements) into panels; writes
// ceil(n_out/16) * (n_in/32) * packed_block_bytes(type) bytes.
void pack_panels(quant::DType type, const void* rows, int64_t n_out, int64_t n_in, bool q8_unsigned,
                 uint8_t* out);

}  // namespace kestrel::backend::cpu
