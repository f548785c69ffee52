// GGUF reader (versions 2 and 3). The file is untrusted input: every count, string length,
// offset and size is checked against the mapping before it is used, and a bad file yields
// an error naming what is wrong, never a crash or a huge allocation.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "core/status.h"
#include "format/quant/types.h"

namespace kestrel::gguf {

enum class ValueType : uint32_t {
  UINT8 = 0,
  INT8 = 1,
  UINT16 = 2,
  INT16 = 3,
  UINT32 = 4,
  INT32 = 5,
  FLOAT32 = 6,
  BOOL = 7,
  STRING = 8,
  ARRAY = 9,
  UINT64 = 10,
  INT64 = 11,
  FLOAT64 = 12,
};
const char* value_type_name(ValueType t);

// One metadata value. Scalars are widened into i64/u64/f64 (whichever fits the type);
// arrays keep their element type and either a vector of strings or of scalars.
struct Value {
  ValueType type = ValueType::UINT8;
  ValueType elem_type = ValueType::UINT8;  // for ARRAY
  uint64_t u = 0;                          // unsigned integer types and BOOL
  int64_t i = 0;                           // signed integer types
  double f = 0;                            // FLOAT32 / FLOAT64
  std::string str;                         // STRING
  // ARRAY of scalars: each element converted as above; ARRAY of STRING: strs.
  std::vector<Value> arr;         // nested scalars / arrays (not strings)
  std::vector<std::string> strs;  // string arrays (vocabularies are large)
  uint64_t array_len = 0;

  bool is_integer() const;
  bool is_number() const;
  int64_t as_int() const;    // any integer type (caller checks is_integer)
  double as_double() const;  // any number type
};

struct TensorInfo {
  std::string name;
  std::vector<int64_t> dims;  // GGUF order: dims[0] is the contiguous (row) dimension
  quant::DType type = quant::DType::F32;
  uint64_t offset = 0;            // relative to the data section
  uint64_t n_bytes = 0;           // validated to lie inside the file
  const uint8_t* data = nullptr;  // into the mapping

  int64_t n_elements() const;
  int64_t rows() const;  // product of dims[1..]
  int64_t cols() const { return dims.empty() ? 1 : dims[0]; }
};

class File {
 public:
  // Maps and validates the whole header, metadata and tensor directory.
  static Expected<std::unique_ptr<File>> open(const std::string& path);
  // Same checks on bytes already in memory (used by tests and fuzzing); the caller keeps
  // `data` alive for the File's lifetime.
  static Expected<std::unique_ptr<File>> parse(const uint8_t* data, size_t size,
                                               std::string origin = "<memory>");
  ~File();
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  const std::string& path() const { return origin_; }
  size_t file_size() const { return size_; }

  const std::vector<std::pair<std::string, Value>>& metadata() const { return kv_; }
  const Value* find(std::string_view key) const;
  // Typed lookups: error if present with the wrong type; `def` when absent.
  Expected<int64_t> get_int(std::string_view key) const;  // error when absent
  int64_t get_int(std::string_view key, int64_t def) const;
  double get_float(std::string_view key, double def) const;
  Expected<std::string> get_string(std::string_view key) const;
  std::string get_string(std::string_view key, const std::string& def) const;
  bool get_bool(std::string_view key, bool def) const;

  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* tensor(std::string_view name) const;

 private:
  File() = default;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  std::string origin_;
  const uint8_t* base_ = nullptr;
  size_t size_ = 0;
  void* mapping_ = nullptr;  // non-null when we own an mmap
  std::vector<std::pair<std::string, Value>> kv_;
  std::unordered_map<std::string, size_t> kv_index_;
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, size_t> tensor_index_;
  friend class Parser;
};

}  // namespace kestrel::gguf
