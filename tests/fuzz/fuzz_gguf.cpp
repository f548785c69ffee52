// libFuzzer entry point for the GGUF reader: any input must parse or fail cleanly, and a
// parsed file must only point inside the input. Build with -DKESTREL_FUZZ=ON (Clang), then:
//   ./build-fuzz/bin/fuzz_gguf -max_len=65536 corpus/
#include <cstddef>
#include <cstdint>

#include "format/gguf.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto f = kestrel::gguf::File::parse(data, size, "fuzz.gguf");
  if (!f) return 0;
  const kestrel::gguf::File& file = **f;
  volatile uint64_t sink = 0;
  for (const auto& t : file.tensors()) {
    if (t.data < data || t.n_bytes > size || t.data + t.n_bytes > data + size) __builtin_trap();
    // Touch the first and last byte so the sanitizer checks the range.
    if (t.n_bytes > 0) sink = sink + t.data[0] + t.data[t.n_bytes - 1];
    sink = sink + static_cast<uint64_t>(t.n_elements() + t.rows() + t.cols());
    if (file.tensor(t.name) != &t) __builtin_trap();
  }
  for (const auto& [key, value] : file.metadata()) {
    if (file.find(key) != &value) __builtin_trap();
    sink = sink + value.strs.size() + value.arr.size();
  }
  sink = sink + static_cast<uint64_t>(file.get_int("general.alignment", 0));
  (void)sink;
  return 0;
}
