// Internal: the reference routines of Q5_0, Q5_1, Q4_K, Q5_K and Q6_K (quant_k.cpp), called
// by the public entry points of quant.h once they have checked the row preconditions.
#pragma once

#include <cstdint>

#include "format/quant/quant.h"

namespace kestrel::quant::detail {

bool decode_slice(DType t, const void* row, int64_t b, Slice32* out);
void dequantize_slices(DType t, const void* src, float* dst, int64_t n);
void quantize_ext(DType t, const float* src, void* dst, int64_t n);
double dot_slices(DType t, const void* w, const float* x, int64_t n);

}  // namespace kestrel::quant::detail
