// One random seed per test run, shared by the tests that draw fresh random inputs: fresh
// each run unless KESTREL_TEST_SEED is set, which reproduces a failure (tests print it
// through SCOPED_TRACE).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <random>

namespace kestrel::testing {

inline uint64_t test_seed() {
  static const uint64_t seed = [] {
    if (const char* s = std::getenv("KESTREL_TEST_SEED")) {
      return static_cast<uint64_t>(std::strtoull(s, nullptr, 0));
    }
    std::random_device rd;
    return (static_cast<uint64_t>(rd()) << 32) ^ static_cast<uint64_t>(rd());
  }();
  return seed;
}

}  // namespace kestrel::testing
