// Tensor element types as numbered by the GGUF format (ggml_type ids), and what Kestrel
// knows about each: block size in elements and block size in bytes.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kestrel::quant {

enum class DType : uint32_t {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q8_1 = 9,
  Q2_K = 10,
  Q3_K = 11,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  Q8_K = 15,
  BF16 = 30,
};

struct TypeInfo {
  DType type;
  const char* name;  // "q4_0", as llama.cpp spells it
  int64_t block_elems;
  int64_t block_bytes;
  bool supported;  // Kestrel can compute with it (dequantize, matmul)
};

// nullptr for an id the GGUF reader does not know at all.
const TypeInfo* type_info(uint32_t ggml_type);
inline const TypeInfo* type_info(DType t) {
  return type_info(static_cast<uint32_t>(t));
}
const char* type_name(DType t);

// Bytes of one row of n elements; -1 when n is not a multiple of the block size.
int64_t row_bytes(DType t, int64_t n);

// Parses "f16", "q8_0", ... (case-insensitive); false when unknown.
bool parse_type(const char* name, DType* out);

}  // namespace kestrel::quant
