// Non-cryptographic fingerprints (FNV-1a, 64 and 32 bit; http://www.isthe.com/chongo/tech/comp/fnv/): cache keys, staging-dir tokens. Stable across platforms.
#pragma once

#include <fmt/format.h>

#include <cstdint>
#include <string>
#include <string_view>

namespace dtrain {

// FNV-1a's published offset bases and primes. The 64-bit basis was once 1469598103934665603 (one digit short): the
// only values it ever persisted are the data cache's file names (a cache miss: one inflate again) and the staging-dir
// tokens of checkpoints being written (removed at the next commit); checkpoints' `spec_hash` (ckpt::specHash) was
// always computed with the published basis, so no checkpoint changes. tests/common/test_hash.cpp checks the
// published test vectors.
inline constexpr uint64_t kFnv64Basis = 14695981039346656037ull;  // 0xcbf29ce484222325

inline uint64_t fnv1a64(std::string_view data, uint64_t h = kFnv64Basis) {
  for (unsigned char c : data) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

// The 32-bit variant (wire tags that must stay 4 bytes).
inline uint32_t fnv1a32(std::string_view data, uint32_t h = 2166136261u) {
  for (unsigned char c : data) {
    h ^= c;
    h *= 16777619u;
  }
  return h;
}

// 16 lowercase hex digits.
inline std::string fnv1aHex(std::string_view data) { return fmt::format("{:016x}", fnv1a64(data)); }

}  // namespace dtrain
