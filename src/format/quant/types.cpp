// The table of tensor element types Kestrel knows: block geometry for every GGUF type id the
// reader accepts, and which of them the compute backends can actually use.
#include "format/quant/types.h"

#include <cstdint>

namespace kestrel::quant {
namespace {

constexpr TypeInfo kTypes[] = {
    {DType::F32, "f32", 1, 4, true},        {DType::F16, "f16", 1, 2, true},
    {DType::BF16, "bf16", 1, 2, true},      {DType::Q4_0, "q4_0", 32, 18, true},
    {DType::Q4_1, "q4_1", 32, 20, true},    {DType::Q5_0, "q5_0", 32, 22, true},
    {DType::Q5_1, "q5_1", 32, 24, true},    {DType::Q8_0, "q8_0", 32, 34, true},
    {DType::Q8_1, "q8_1", 32, 36, false},   {DType::Q2_K, "q2_K", 256, 84, false},
    {DType::Q3_K, "q3_K", 256, 110, false}, {DType::Q4_K, "q4_K", 256, 144, true},
    {DType::Q5_K, "q5_K", 256, 176, true},  {DType::Q6_K, "q6_K", 256, 210, true},
    {DType::Q8_K, "q8_K", 256, 292, false},
};

char lower(char c) {
  return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c;
}

bool equals_ignore_case(const char* a, const char* b) {
  for (; *a != '\0' && *b != '\0'; ++a, ++b) {
    if (lower(*a) != lower(*b)) return false;
  }
  return *a == '\0' && *b == '\0';
}

}  // namespace

const TypeInfo* type_info(uint32_t ggml_type) {
  for (const TypeInfo& t : kTypes) {
    if (static_cast<uint32_t>(t.type) == ggml_type) return &t;
  }
  return nullptr;
}

const char* type_name(DType t) {
  const TypeInfo* info = type_info(t);
  return info ? info->name : "unknown";
}

// -1 also when n is negative, the type is unknown, or the byte count would overflow int64.
int64_t row_bytes(DType t, int64_t n) {
  const TypeInfo* info = type_info(t);
  if (info == nullptr || n < 0 || n % info->block_elems != 0) return -1;
  const int64_t blocks = n / info->block_elems;
  if (blocks > INT64_MAX / info->block_bytes) return -1;
  return blocks * info->block_bytes;
}

bool parse_type(const char* name, DType* out) {
  if (name == nullptr) return false;
  for (const TypeInfo& t : kTypes) {
    if (equals_ignore_case(name, t.name)) {
      if (out != nullptr) *out = t.type;
      return true;
    }
  }
  return false;
}

}  // namespace kestrel::quant
