// How a prompt is cut into chunks (at most n_batch tokens, the unit that is timed and
// reported) and micro-batches (at most n_ubatch tokens, the unit of one forward pass).
#pragma once

#include <string>
#include <vector>

#include "core/status.h"

namespace kestrel::runtime {

enum class Chunking {
  Balanced,  // equal sizes: 327 tokens with n_batch 128 -> 109 + 109 + 109
  Fixed,     // llama.cpp's split: 128 + 128 + 71
};
const char* chunking_name(Chunking c);
bool parse_chunking(const std::string& s, Chunking* out);

struct Chunk {
  int first_token = 0;
  int n_tokens = 0;
  std::vector<int> ubatches;  // sizes of its micro-batches, in order
};

// Splits n sizes into pieces of at most max_size, equal (balanced) or greedy (fixed).
std::vector<int> split_sizes(int n, int max_size, Chunking mode);

std::vector<Chunk> plan_chunks(int n_tokens, int n_batch, int n_ubatch, Chunking mode);

}  // namespace kestrel::runtime
