// GGUF reader. Layout (all little-endian):
//   uint32 magic "GGUF", uint32 version (2 or 3), uint64 n_tensors, uint64 n_kv,
//   n_kv x { string key, uint32 value type, value },
//   n_tensors x { string name, uint32 n_dims, n_dims x uint64 dim, uint32 type, uint64 offset },
//   padding up to general.alignment (default 32), then the data section.
// Strings are uint64 length + bytes; arrays are uint32 element type + uint64 count + elements.
//
// Every field is read through Parser, which checks each read against the bytes that remain,
// and every count against what those bytes could possibly hold, before allocating anything.
#include "format/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <exception>
#include <new>
#include <type_traits>

namespace kestrel::gguf {
namespace {

constexpr uint32_t kMagic = 0x46554747;         // "GGUF" read as little-endian uint32
constexpr uint32_t kMagicSwapped = 0x47475546;  // a big-endian writer's magic
constexpr uint64_t kDefaultAlignment = 32;
constexpr int kMaxArrayDepth = 2;  // an array may hold arrays, but those may not
constexpr uint64_t kMaxKeyBytes = 65535;
constexpr uint32_t kMaxDims = 4;
// Smallest encodings, used to bound counts by the bytes that remain.
constexpr uint64_t kMinKvBytes = 8 + 1 + 4 + 1;  // key len, 1 key byte, type, 1 byte
constexpr uint64_t kMinTensorInfoBytes =
    8 + 4 + 8 + 4 + 8;  // name len, n_dims, 1 dim, type, offset

// Type-safe message building: cat("a", 1, std::string("b")).
template <typename T>
void append(std::string& s, const T& v) {
  if constexpr (std::is_integral_v<T>) {
    s.append(std::to_string(v));
  } else {
    s.append(v);
  }
}
template <typename... A>
std::string cat(const A&... a) {
  std::string s;
  (append(s, a), ...);
  return s;
}

// A name from the file, quoted and made printable (keys and tensor names may be garbage).
std::string quoted(std::string_view name) {
  constexpr size_t kMaxShown = 80;
  std::string out = "'";
  for (size_t i = 0; i < name.size() && i < kMaxShown; ++i) {
    const auto c = static_cast<unsigned char>(name[i]);
    if (c >= 0x20 && c < 0x7f && c != '\\' && c != '\'') {
      out.push_back(static_cast<char>(c));
    } else {
      static const char* hex = "0123456789abcdef";
      out += "\\x";
      out.push_back(hex[c >> 4]);
      out.push_back(hex[c & 15]);
    }
  }
  if (name.size() > kMaxShown)
    out += cat("...' (", name.size(), " bytes)");
  else
    out += "'";
  return out;
}

bool valid_value_type(uint32_t t) {
  return t <= static_cast<uint32_t>(ValueType::FLOAT64);
}

// Smallest encoded size of one element of type t (t already validated).
uint64_t min_encoded_size(ValueType t) {
  switch (t) {
    case ValueType::UINT8:
    case ValueType::INT8:
    case ValueType::BOOL:
      return 1;
    case ValueType::UINT16:
    case ValueType::INT16:
      return 2;
    case ValueType::UINT32:
    case ValueType::INT32:
    case ValueType::FLOAT32:
      return 4;
    case ValueType::UINT64:
    case ValueType::INT64:
    case ValueType::FLOAT64:
    case ValueType::STRING:
      return 8;
    case ValueType::ARRAY:
      return 4 + 8;
  }
  return 1;
}

bool is_unsigned_type(ValueType t) {
  return t == ValueType::UINT8 || t == ValueType::UINT16 || t == ValueType::UINT32 ||
         t == ValueType::UINT64;
}
bool is_signed_type(ValueType t) {
  return t == ValueType::INT8 || t == ValueType::INT16 || t == ValueType::INT32 ||
         t == ValueType::INT64;
}

}  // namespace

const char* value_type_name(ValueType t) {
  switch (t) {
    case ValueType::UINT8:
      return "uint8";
    case ValueType::INT8:
      return "int8";
    case ValueType::UINT16:
      return "uint16";
    case ValueType::INT16:
      return "int16";
    case ValueType::UINT32:
      return "uint32";
    case ValueType::INT32:
      return "int32";
    case ValueType::FLOAT32:
      return "float32";
    case ValueType::BOOL:
      return "bool";
    case ValueType::STRING:
      return "string";
    case ValueType::ARRAY:
      return "array";
    case ValueType::UINT64:
      return "uint64";
    case ValueType::INT64:
      return "int64";
    case ValueType::FLOAT64:
      return "float64";
  }
  return "unknown";
}

bool Value::is_integer() const {
  return is_unsigned_type(type) || is_signed_type(type);
}

bool Value::is_number() const {
  return is_integer() || type == ValueType::FLOAT32 || type == ValueType::FLOAT64;
}

int64_t Value::as_int() const {
  if (is_signed_type(type)) return i;
  if (is_unsigned_type(type) || type == ValueType::BOOL) return static_cast<int64_t>(u);
  return 0;
}

double Value::as_double() const {
  if (type == ValueType::FLOAT32 || type == ValueType::FLOAT64) return f;
  if (is_signed_type(type)) return static_cast<double>(i);
  if (is_unsigned_type(type) || type == ValueType::BOOL) return static_cast<double>(u);
  return 0;
}

int64_t TensorInfo::n_elements() const {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;  // validated not to overflow when parsed
  return n;
}

int64_t TensorInfo::rows() const {
  int64_t n = 1;
  for (size_t k = 1; k < dims.size(); ++k) n *= dims[k];
  return n;
}

// Reads and validates one GGUF image into a File whose base_/size_/origin_ are set.
class Parser {
 public:
  explicit Parser(File& f) : f_(f), p_(f.base_), size_(f.size_) {}

  Status run() {
    try {
      return parse();
    } catch (const std::bad_alloc&) {
      return fail(pos_, "out of memory while reading the metadata");
    } catch (const std::exception& e) {
      return fail(pos_, cat("internal error while reading: ", e.what()));
    }
  }

 private:
  size_t left() const { return size_ - pos_; }

  Status fail(size_t at, const std::string& msg) const {
    std::string where = where_.empty() ? std::string() : where_ + " ";
    return Status::error(cat(f_.origin_, ": ", where, "at byte offset ", at, ": ", msg));
  }

  Status need(uint64_t n, const char* what) const {
    if (n <= left()) return Status::ok();
    return fail(pos_,
                cat(what, " needs ", n, " bytes but only ", left(), " remain in the file (size ",
                    size_, "): the file is truncated or corrupt"));
  }

  template <typename T>
  Status read_uint(T* out, const char* what) {
    static_assert(std::is_unsigned_v<T>);
    KESTREL_TRY(need(sizeof(T), what));
    T v = 0;
    for (size_t k = 0; k < sizeof(T); ++k)
      v |= static_cast<T>(static_cast<T>(p_[pos_ + k]) << (8 * k));
    pos_ += sizeof(T);
    *out = v;
    return Status::ok();
  }

  Status read_string(std::string* out, const char* what) {
    const size_t at = pos_;
    uint64_t len = 0;
    KESTREL_TRY(read_uint(&len, what));
    if (len > left()) {
      return fail(at, cat(what, " has length ", len, " but only ", left(),
                          " bytes remain in the file (size ", size_,
                          "): the file is truncated or corrupt"));
    }
    out->assign(reinterpret_cast<const char*>(p_ + pos_), static_cast<size_t>(len));
    pos_ += static_cast<size_t>(len);
    return Status::ok();
  }

  Status read_value(ValueType t, Value* out, int depth) {
    out->type = t;
    const size_t at = pos_;
    switch (t) {
      case ValueType::UINT8: {
        uint8_t v;
        KESTREL_TRY(read_uint(&v, "uint8 value"));
        out->u = v;
        return Status::ok();
      }
      case ValueType::INT8: {
        uint8_t v;
        KESTREL_TRY(read_uint(&v, "int8 value"));
        out->i = static_cast<int8_t>(v);
        return Status::ok();
      }
      case ValueType::UINT16: {
        uint16_t v;
        KESTREL_TRY(read_uint(&v, "uint16 value"));
        out->u = v;
        return Status::ok();
      }
      case ValueType::INT16: {
        uint16_t v;
        KESTREL_TRY(read_uint(&v, "int16 value"));
        out->i = static_cast<int16_t>(v);
        return Status::ok();
      }
      case ValueType::UINT32: {
        uint32_t v;
        KESTREL_TRY(read_uint(&v, "uint32 value"));
        out->u = v;
        return Status::ok();
      }
      case ValueType::INT32: {
        uint32_t v;
        KESTREL_TRY(read_uint(&v, "int32 value"));
        out->i = static_cast<int32_t>(v);
        return Status::ok();
      }
      case ValueType::UINT64: {
        KESTREL_TRY(read_uint(&out->u, "uint64 value"));
        return Status::ok();
      }
      case ValueType::INT64: {
        uint64_t v;
        KESTREL_TRY(read_uint(&v, "int64 value"));
        out->i = static_cast<int64_t>(v);
        return Status::ok();
      }
      case ValueType::FLOAT32: {
        uint32_t v;
        KESTREL_TRY(read_uint(&v, "float32 value"));
        float x;
        std::memcpy(&x, &v, sizeof x);
        out->f = x;
        return Status::ok();
      }
      case ValueType::FLOAT64: {
        uint64_t v;
        KESTREL_TRY(read_uint(&v, "float64 value"));
        std::memcpy(&out->f, &v, sizeof v);
        return Status::ok();
      }
      case ValueType::BOOL: {
        uint8_t v;
        KESTREL_TRY(read_uint(&v, "bool value"));
        if (v > 1) return fail(at, cat("bool value is ", v, "; it must be 0 or 1"));
        out->u = v;
        return Status::ok();
      }
      case ValueType::STRING:
        return read_string(&out->str, "string value");
      case ValueType::ARRAY:
        return read_array(out, depth);
    }
    return fail(at, cat("unknown metadata value type ", static_cast<uint32_t>(t)));
  }

  Status read_array(Value* out, int depth) {
    if (depth + 1 > kMaxArrayDepth) {
      return fail(pos_, cat("arrays are nested more than ", kMaxArrayDepth, " deep"));
    }
    const size_t type_at = pos_;
    uint32_t raw_type = 0;
    KESTREL_TRY(read_uint(&raw_type, "array element type"));
    if (!valid_value_type(raw_type)) {
      return fail(type_at,
                  cat("array has unknown element type ", raw_type, " (known types are 0..12)"));
    }
    const auto elem = static_cast<ValueType>(raw_type);
    const size_t count_at = pos_;
    uint64_t count = 0;
    KESTREL_TRY(read_uint(&count, "array length"));
    const uint64_t min_size = min_encoded_size(elem);
    if (count > left() / min_size) {
      return fail(count_at, cat("array of ", count, " ", value_type_name(elem),
                                " elements cannot fit in the ", left(),
                                " bytes left in the file (each needs at least ", min_size,
                                "): the file is truncated or corrupt"));
    }
    out->elem_type = elem;
    out->array_len = count;
    if (elem == ValueType::STRING) {
      out->strs.resize(static_cast<size_t>(count));
      for (auto& s : out->strs) KESTREL_TRY(read_string(&s, "string array element"));
    } else {
      out->arr.resize(static_cast<size_t>(count));
      for (auto& v : out->arr) KESTREL_TRY(read_value(elem, &v, depth + 1));
    }
    return Status::ok();
  }

  Status parse_header(uint64_t* n_tensors, uint64_t* n_kv) {
    if (size_ < 4) {
      return fail(0, cat("the file is ", size_, " bytes long, too short to be a GGUF file"));
    }
    uint32_t magic = 0, version = 0;
    KESTREL_TRY(read_uint(&magic, "magic"));
    if (magic == kMagicSwapped) {
      return fail(0, "this is a big-endian GGUF file; only little-endian files are supported");
    }
    if (magic != kMagic) {
      std::string shown(reinterpret_cast<const char*>(p_), 4);
      return fail(0,
                  cat("not a GGUF file: the magic bytes are ", quoted(shown), ", expected 'GGUF'"));
    }
    KESTREL_TRY(read_uint(&version, "version"));
    if (version == 1) {
      return fail(4,
                  "GGUF version 1 is obsolete and not supported (only versions 2 and 3 "
                  "are); re-convert the model with a current converter");
    }
    if (version != 2 && version != 3) {
      return fail(4, cat("unsupported GGUF version ", version,
                         " (only versions 2 and 3 are "
                         "supported)"));
    }
    f_.version_ = version;
    KESTREL_TRY(read_uint(n_tensors, "tensor count"));
    KESTREL_TRY(read_uint(n_kv, "metadata count"));
    if (*n_kv > left() / kMinKvBytes) {
      return fail(16, cat("metadata count ", *n_kv, " cannot fit in the ", left(),
                          " bytes left in the file: the file is truncated or corrupt"));
    }
    if (*n_tensors > left() / kMinTensorInfoBytes) {
      return fail(8, cat("tensor count ", *n_tensors, " cannot fit in the ", left(),
                         " bytes left in the file: the file is truncated or corrupt"));
    }
    return Status::ok();
  }

  Status parse_kv(uint64_t index, uint64_t n_kv) {
    where_ = cat("metadata entry ", index, " of ", n_kv);
    const size_t key_at = pos_;
    std::string key;
    KESTREL_TRY(read_string(&key, "key"));
    if (key.empty()) return fail(key_at, "the key is empty");
    if (key.size() > kMaxKeyBytes) {
      return fail(key_at, cat("the key is ", key.size(), " bytes long (at most ", kMaxKeyBytes,
                              " allowed)"));
    }
    where_ = cat("metadata key ", quoted(key));
    if (f_.kv_index_.count(key) != 0) return fail(key_at, "the key appears more than once");
    const size_t type_at = pos_;
    uint32_t raw_type = 0;
    KESTREL_TRY(read_uint(&raw_type, "value type"));
    if (!valid_value_type(raw_type)) {
      return fail(type_at,
                  cat("unknown metadata value type ", raw_type, " (known types are 0..12)"));
    }
    if (key == "general.alignment") alignment_at_ = type_at;
    Value v;
    KESTREL_TRY(read_value(static_cast<ValueType>(raw_type), &v, 0));
    f_.kv_index_.emplace(key, f_.kv_.size());
    f_.kv_.emplace_back(std::move(key), std::move(v));
    return Status::ok();
  }

  Status parse_alignment() {
    where_ = "metadata key 'general.alignment'";
    const Value* v = f_.find("general.alignment");
    if (v == nullptr) {
      f_.alignment_ = kDefaultAlignment;
      return Status::ok();
    }
    if (!v->is_integer()) {
      return fail(alignment_at_,
                  cat("has type ", value_type_name(v->type), "; expected an integer"));
    }
    if (is_signed_type(v->type) && v->i <= 0) {
      return fail(alignment_at_, cat("alignment ", v->i, " must be a positive power of two"));
    }
    const uint64_t a = is_signed_type(v->type) ? static_cast<uint64_t>(v->i) : v->u;
    if (a == 0 || (a & (a - 1)) != 0) {
      return fail(alignment_at_, cat("alignment ", a, " must be a non-zero power of two"));
    }
    f_.alignment_ = a;
    return Status::ok();
  }

  Status parse_tensor_info(uint64_t index, uint64_t n_tensors) {
    where_ = cat("tensor entry ", index, " of ", n_tensors);
    const size_t name_at = pos_;
    TensorInfo t;
    KESTREL_TRY(read_string(&t.name, "tensor name"));
    if (t.name.empty()) return fail(name_at, "the tensor name is empty");
    where_ = cat("tensor ", quoted(t.name));
    if (f_.tensor_index_.count(t.name) != 0) {
      return fail(name_at, "a tensor with this name appears more than once");
    }
    const size_t dims_at = pos_;
    uint32_t n_dims = 0;
    KESTREL_TRY(read_uint(&n_dims, "dimension count"));
    if (n_dims < 1 || n_dims > kMaxDims) {
      return fail(dims_at,
                  cat("has ", n_dims, " dimensions; between 1 and ", kMaxDims, " are supported"));
    }
    int64_t n_elements = 1;
    t.dims.reserve(n_dims);
    for (uint32_t k = 0; k < n_dims; ++k) {
      const size_t dim_at = pos_;
      uint64_t d = 0;
      KESTREL_TRY(read_uint(&d, "dimension"));
      if (d == 0) return fail(dim_at, cat("dimension ", k, " is 0"));
      if (d > static_cast<uint64_t>(INT64_MAX) ||
          __builtin_mul_overflow(n_elements, static_cast<int64_t>(d), &n_elements)) {
        return fail(dim_at,
                    cat("the element count overflows int64 at dimension ", k, " (", d, ")"));
      }
      t.dims.push_back(static_cast<int64_t>(d));
    }
    const size_t type_at = pos_;
    uint32_t raw_type = 0;
    KESTREL_TRY(read_uint(&raw_type, "tensor type"));
    const quant::TypeInfo* info = quant::type_info(raw_type);
    if (info == nullptr) {
      return fail(type_at, cat("has unknown tensor type id ", raw_type,
                               " (a newer or unsupported quantization format)"));
    }
    t.type = info->type;
    if (t.dims[0] % info->block_elems != 0) {
      return fail(type_at, cat("row length ", t.dims[0], " is not a multiple of the ", info->name,
                               " block size ", info->block_elems));
    }
    int64_t row = 0, total = 0;
    if (__builtin_mul_overflow(t.dims[0] / info->block_elems, info->block_bytes, &row) ||
        __builtin_mul_overflow(row, t.rows(), &total)) {
      return fail(type_at, cat("the byte size of this ", info->name, " tensor overflows int64"));
    }
    t.n_bytes = static_cast<uint64_t>(total);
    KESTREL_TRY(read_uint(&t.offset, "tensor data offset"));
    f_.tensor_index_.emplace(t.name, f_.tensors_.size());
    f_.tensors_.push_back(std::move(t));
    info_at_.push_back(name_at);
    return Status::ok();
  }

  Status place_tensor(size_t k, uint64_t data_start) {
    TensorInfo& t = f_.tensors_[k];
    where_ = cat("tensor ", quoted(t.name));
    const size_t at = info_at_[k];
    if (t.offset % f_.alignment_ != 0) {
      return fail(
          at, cat("data offset ", t.offset, " is not a multiple of the alignment ", f_.alignment_));
    }
    const uint64_t size = size_;
    if (data_start > size || t.offset > size - data_start ||
        t.n_bytes > size - data_start - t.offset) {
      std::string span = t.offset <= UINT64_MAX - data_start
                             ? cat("offset ", data_start + t.offset)
                             : cat("data section offset ", t.offset);
      return fail(at, cat("data [", span, ", ", t.n_bytes, " bytes] lies outside the file (size ",
                          size_, "): the file is truncated or corrupt"));
    }
    t.data = p_ + data_start + t.offset;
    return Status::ok();
  }

  Status parse() {
    uint64_t n_tensors = 0, n_kv = 0;
    KESTREL_TRY(parse_header(&n_tensors, &n_kv));
    f_.kv_.reserve(static_cast<size_t>(n_kv));
    for (uint64_t k = 0; k < n_kv; ++k) KESTREL_TRY(parse_kv(k, n_kv));
    KESTREL_TRY(parse_alignment());

    // Re-check against what is left now that the metadata has been consumed.
    where_.clear();
    if (n_tensors > left() / kMinTensorInfoBytes) {
      return fail(8, cat("tensor count ", n_tensors, " cannot fit in the ", left(),
                         " bytes left after the metadata: the file is truncated or corrupt"));
    }
    f_.tensors_.reserve(static_cast<size_t>(n_tensors));
    info_at_.reserve(static_cast<size_t>(n_tensors));
    for (uint64_t k = 0; k < n_tensors; ++k) KESTREL_TRY(parse_tensor_info(k, n_tensors));

    const uint64_t a = f_.alignment_;
    const uint64_t pad = (a - pos_ % a) % a;
    where_.clear();
    if (pad > UINT64_MAX - pos_) {
      return fail(pos_, cat("padding to the alignment ", a, " overflows"));
    }
    const uint64_t data_start = pos_ + pad;
    for (size_t k = 0; k < f_.tensors_.size(); ++k) KESTREL_TRY(place_tensor(k, data_start));
    return Status::ok();
  }

  File& f_;
  const uint8_t* p_;
  size_t size_;
  size_t pos_ = 0;
  std::string where_;            // what is being read, for error messages
  std::vector<size_t> info_at_;  // byte offset of each tensor info
  size_t alignment_at_ = 0;      // byte offset of general.alignment's value type
};

Expected<std::unique_ptr<File>> File::parse(const uint8_t* data, size_t size, std::string origin) {
  std::unique_ptr<File> f;
  try {
    f.reset(new File());
    f->origin_ = std::move(origin);
  } catch (const std::bad_alloc&) {
    return Status::error("out of memory while opening a GGUF file");
  }
  f->base_ = data;
  f->size_ = data == nullptr ? 0 : size;
  Parser parser(*f);
  KESTREL_TRY(parser.run());
  return f;
}

Expected<std::unique_ptr<File>> File::open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    return Status::error(cat(path, ": cannot open the model file: ", std::strerror(err)));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return Status::error(cat(path, ": cannot stat the model file: ", std::strerror(err)));
  }
  if (S_ISDIR(st.st_mode)) {
    ::close(fd);
    return Status::error(cat(path, ": is a directory, not a GGUF model file"));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return Status::error(cat(path, ": is not a regular file"));
  }
  if (st.st_size == 0) {
    ::close(fd);
    return Status::error(cat(path, ": the file is empty (0 bytes), not a GGUF model"));
  }
  const auto size = static_cast<size_t>(st.st_size);
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_err = errno;
  ::close(fd);
  if (map == MAP_FAILED) {
    return Status::error(
        cat(path, ": cannot memory-map the file (", size, " bytes): ", std::strerror(map_err)));
  }
  std::unique_ptr<File> f;
  try {
    f.reset(new File());
    f->origin_ = path;
  } catch (const std::bad_alloc&) {
    ::munmap(map, size);
    return Status::error(cat(path, ": out of memory while opening the file"));
  }
  f->mapping_ = map;
  f->base_ = static_cast<const uint8_t*>(map);
  f->size_ = size;
  Parser parser(*f);
  KESTREL_TRY(parser.run());  // on failure the File (and its mapping) is released here
  return f;
}

File::~File() {
  if (mapping_ != nullptr) ::munmap(mapping_, size_);
}

const Value* File::find(std::string_view key) const {
  auto it = kv_index_.find(std::string(key));
  return it == kv_index_.end() ? nullptr : &kv_[it->second].second;
}

Expected<int64_t> File::get_int(std::string_view key) const {
  const Value* v = find(key);
  if (v == nullptr)
    return Status::error(cat(origin_, ": metadata key ", quoted(key), " is missing"));
  if (!v->is_integer()) {
    return Status::error(cat(origin_, ": metadata key ", quoted(key), " has type ",
                             value_type_name(v->type), "; expected an integer"));
  }
  if (is_unsigned_type(v->type) && v->u > static_cast<uint64_t>(INT64_MAX)) {
    return Status::error(
        cat(origin_, ": metadata key ", quoted(key), " value ", v->u, " does not fit in int64"));
  }
  return v->as_int();
}

int64_t File::get_int(std::string_view key, int64_t def) const {
  const Value* v = find(key);
  if (v == nullptr || !v->is_integer()) return def;
  if (is_unsigned_type(v->type) && v->u > static_cast<uint64_t>(INT64_MAX)) return def;
  return v->as_int();
}

double File::get_float(std::string_view key, double def) const {
  const Value* v = find(key);
  return v != nullptr && v->is_number() ? v->as_double() : def;
}

Expected<std::string> File::get_string(std::string_view key) const {
  const Value* v = find(key);
  if (v == nullptr)
    return Status::error(cat(origin_, ": metadata key ", quoted(key), " is missing"));
  if (v->type != ValueType::STRING) {
    return Status::error(cat(origin_, ": metadata key ", quoted(key), " has type ",
                             value_type_name(v->type), "; expected a string"));
  }
  return v->str;
}

std::string File::get_string(std::string_view key, const std::string& def) const {
  const Value* v = find(key);
  return v != nullptr && v->type == ValueType::STRING ? v->str : def;
}

bool File::get_bool(std::string_view key, bool def) const {
  const Value* v = find(key);
  return v != nullptr && v->type == ValueType::BOOL ? v->u != 0 : def;
}

const TensorInfo* File::tensor(std::string_view name) const {
  auto it = tensor_index_.find(std::string(name));
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

}  // namespace kestrel::gguf
