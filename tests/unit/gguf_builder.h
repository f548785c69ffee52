// Test helper: serializes a GGUF file into memory. It writes whatever it is told, so tests
// can build valid files and deliberately broken ones (wrong counts, raw values, bad offsets).
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "format/gguf.h"

namespace kestrel::gguf_test {

// Little-endian byte sink.
struct Bytes {
  std::vector<uint8_t> b;

  Bytes& u8(uint8_t v) {
    b.push_back(v);
    return *this;
  }
  Bytes& u16(uint16_t v) { return le(v, 2); }
  Bytes& u32(uint32_t v) { return le(v, 4); }
  Bytes& u64(uint64_t v) { return le(v, 8); }
  Bytes& i8(int8_t v) { return u8(static_cast<uint8_t>(v)); }
  Bytes& i16(int16_t v) { return u16(static_cast<uint16_t>(v)); }
  Bytes& i32(int32_t v) { return u32(static_cast<uint32_t>(v)); }
  Bytes& i64(int64_t v) { return u64(static_cast<uint64_t>(v)); }
  Bytes& f32(float v) {
    uint32_t w;
    std::memcpy(&w, &v, 4);
    return u32(w);
  }
  Bytes& f64(double v) {
    uint64_t w;
    std::memcpy(&w, &v, 8);
    return u64(w);
  }
  // GGUF string: uint64 length + bytes.
  Bytes& str(std::string_view s) {
    u64(s.size());
    b.insert(b.end(), s.begin(), s.end());
    return *this;
  }
  Bytes& raw(const Bytes& other) {
    b.insert(b.end(), other.b.begin(), other.b.end());
    return *this;
  }
  Bytes& raw(const std::vector<uint8_t>& other) {
    b.insert(b.end(), other.begin(), other.end());
    return *this;
  }
  // One scalar of type t, converted from v (used by arrays of numbers).
  Bytes& scalar(gguf::ValueType t, double v) {
    using VT = gguf::ValueType;
    switch (t) {
      case VT::UINT8:
        return u8(static_cast<uint8_t>(v));
      case VT::INT8:
        return i8(static_cast<int8_t>(v));
      case VT::UINT16:
        return u16(static_cast<uint16_t>(v));
      case VT::INT16:
        return i16(static_cast<int16_t>(v));
      case VT::UINT32:
        return u32(static_cast<uint32_t>(v));
      case VT::INT32:
        return i32(static_cast<int32_t>(v));
      case VT::FLOAT32:
        return f32(static_cast<float>(v));
      case VT::BOOL:
        return u8(v != 0 ? 1 : 0);
      case VT::UINT64:
        return u64(static_cast<uint64_t>(v));
      case VT::INT64:
        return i64(static_cast<int64_t>(v));
      case VT::FLOAT64:
        return f64(v);
      case VT::STRING:
      case VT::ARRAY:
        break;
    }
    return *this;
  }

 private:
  Bytes& le(uint64_t v, int n) {
    for (int k = 0; k < n; ++k) b.push_back(static_cast<uint8_t>(v >> (8 * k)));
    return *this;
  }
};

class GgufBuilder {
 public:
  using VT = gguf::ValueType;
  static constexpr uint32_t kMagic = 0x46554747;

  uint32_t magic = kMagic;
  uint32_t version = 3;  // version 1 writes uint32 counts, as that format did
  std::optional<uint64_t> n_kv_override;
  std::optional<uint64_t> n_tensors_override;
  uint64_t data_alignment = 32;  // padding before the data section and between tensor data

  // --- metadata -------------------------------------------------------------------------
  // Key, type id and an already encoded value, written as given.
  GgufBuilder& kv(std::string_view key, uint32_t type, const Bytes& value) {
    kvs_.str(key).u32(type).raw(value);
    ++n_kv_;
    return *this;
  }
  GgufBuilder& kv(std::string_view key, VT type, const Bytes& value) {
    return kv(key, static_cast<uint32_t>(type), value);
  }
  // A whole entry written raw (for broken keys); still counted in n_kv.
  GgufBuilder& raw_kv(const Bytes& entry) {
    kvs_.raw(entry);
    ++n_kv_;
    return *this;
  }
  GgufBuilder& u8(std::string_view k, uint8_t v) { return kv(k, VT::UINT8, Bytes().u8(v)); }
  GgufBuilder& i8(std::string_view k, int8_t v) { return kv(k, VT::INT8, Bytes().i8(v)); }
  GgufBuilder& u16(std::string_view k, uint16_t v) { return kv(k, VT::UINT16, Bytes().u16(v)); }
  GgufBuilder& i16(std::string_view k, int16_t v) { return kv(k, VT::INT16, Bytes().i16(v)); }
  GgufBuilder& u32(std::string_view k, uint32_t v) { return kv(k, VT::UINT32, Bytes().u32(v)); }
  GgufBuilder& i32(std::string_view k, int32_t v) { return kv(k, VT::INT32, Bytes().i32(v)); }
  GgufBuilder& u64(std::string_view k, uint64_t v) { return kv(k, VT::UINT64, Bytes().u64(v)); }
  GgufBuilder& i64(std::string_view k, int64_t v) { return kv(k, VT::INT64, Bytes().i64(v)); }
  GgufBuilder& f32(std::string_view k, float v) { return kv(k, VT::FLOAT32, Bytes().f32(v)); }
  GgufBuilder& f64(std::string_view k, double v) { return kv(k, VT::FLOAT64, Bytes().f64(v)); }
  GgufBuilder& boolean(std::string_view k, bool v) {
    return kv(k, VT::BOOL, Bytes().u8(v ? 1 : 0));
  }
  GgufBuilder& str(std::string_view k, std::string_view v) {
    return kv(k, VT::STRING, Bytes().str(v));
  }
  GgufBuilder& arr_str(std::string_view k, const std::vector<std::string>& v) {
    Bytes b;
    b.u32(static_cast<uint32_t>(VT::STRING)).u64(v.size());
    for (const auto& s : v) b.str(s);
    return kv(k, VT::ARRAY, b);
  }
  template <typename T>
  GgufBuilder& arr(std::string_view k, VT elem, const std::vector<T>& v) {
    return kv(k, VT::ARRAY, array_value(elem, v));
  }
  // Encoded array value (element type, count, elements), for nesting via kv(..., ARRAY, ...).
  template <typename T>
  static Bytes array_value(VT elem, const std::vector<T>& v) {
    Bytes b;
    b.u32(static_cast<uint32_t>(elem)).u64(v.size());
    for (const auto& x : v) b.scalar(elem, static_cast<double>(x));
    return b;
  }
  // Writes general.alignment (uint32) and pads the data section to it.
  GgufBuilder& alignment(uint32_t a) {
    data_alignment = a;
    return u32("general.alignment", a);
  }

  // --- tensors --------------------------------------------------------------------------
  // Tensor info plus its data, placed at the next aligned offset of the data section.
  GgufBuilder& tensor(std::string_view name, const std::vector<uint64_t>& dims, uint32_t type,
                      const std::vector<uint8_t>& data) {
    pad_data();
    const uint64_t offset = data_.size();
    data_.insert(data_.end(), data.begin(), data.end());
    return tensor_info(name, dims, type, offset);
  }
  GgufBuilder& tensor(std::string_view name, const std::vector<uint64_t>& dims, quant::DType type,
                      const std::vector<uint8_t>& data) {
    return tensor(name, dims, static_cast<uint32_t>(type), data);
  }
  // Only the tensor info, with an explicit offset; no data is added.
  GgufBuilder& tensor_info(std::string_view name, const std::vector<uint64_t>& dims, uint32_t type,
                           uint64_t offset) {
    infos_.str(name).u32(static_cast<uint32_t>(dims.size()));
    for (uint64_t d : dims) infos_.u64(d);
    infos_.u32(type).u64(offset);
    ++n_tensors_;
    return *this;
  }
  GgufBuilder& tensor_info(std::string_view name, const std::vector<uint64_t>& dims,
                           quant::DType type, uint64_t offset) {
    return tensor_info(name, dims, static_cast<uint32_t>(type), offset);
  }
  // The data section, for appending raw bytes.
  std::vector<uint8_t>& data() { return data_; }

  // --- output ---------------------------------------------------------------------------
  std::vector<uint8_t> build() const {
    Bytes out;
    out.u32(magic).u32(version);
    const uint64_t n_tensors = n_tensors_override.value_or(n_tensors_);
    const uint64_t n_kv = n_kv_override.value_or(n_kv_);
    if (version == 1) {
      out.u32(static_cast<uint32_t>(n_tensors)).u32(static_cast<uint32_t>(n_kv));
    } else {
      out.u64(n_tensors).u64(n_kv);
    }
    out.raw(kvs_).raw(infos_);
    while (data_alignment > 0 && out.b.size() % data_alignment != 0) out.u8(0);
    out.raw(data_);
    return std::move(out.b);
  }
  // Where the data section starts in a built file (it ends the file).
  static size_t data_start(const std::vector<uint8_t>& built, const GgufBuilder& b) {
    return built.size() - b.data_.size();
  }

 private:
  void pad_data() {
    while (data_alignment > 0 && data_.size() % data_alignment != 0) data_.push_back(0);
  }

  Bytes kvs_;
  uint64_t n_kv_ = 0;
  Bytes infos_;
  uint64_t n_tensors_ = 0;
  std::vector<uint8_t> data_;
};

}  // namespace kestrel::gguf_test
