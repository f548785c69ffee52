#include "runtime/scheduler.h"

#include <algorithm>

namespace kestrel::runtime {

const char* chunking_name(Chunking c) {
  return c == Chunking::Balanced ? "balanced" : "fixed";
}

bool parse_chunking(const std::string& s, Chunking* out) {
  if (s == "balanced")
    *out = Chunking::Balanced;
  else if (s == "fixed")
    *out = Chunking::Fixed;
  else
    return false;
  return true;
}

std::vector<int> split_sizes(int n, int max_size, Chunking mode) {
  std::vector<int> out;
  if (n <= 0 || max_size <= 0) return out;
  const int pieces = (n + max_size - 1) / max_size;
  if (mode == Chunking::Fixed) {
    for (int done = 0; done < n; done += max_size) out.push_back(std::min(max_size, n - done));
    return out;
  }
  // Balanced: the first n % pieces pieces carry one token more.
  const int base = n / pieces, extra = n % pieces;
  for (int i = 0; i < pieces; ++i) out.push_back(base + (i < extra ? 1 : 0));
  return out;
}

std::vector<Chunk> plan_chunks(int n_tokens, int n_batch, int n_ubatch, Chunking mode) {
  std::vector<Chunk> chunks;
  int first = 0;
  for (int size : split_sizes(n_tokens, n_batch, mode)) {
    Chunk c;
    c.first_token = first;
    c.n_tokens = size;
    c.ubatches = split_sizes(size, std::min(n_ubatch, n_batch), mode);
    chunks.push_back(std::move(c));
    first += size;
  }
  return chunks;
}

}  // namespace kestrel::runtime
