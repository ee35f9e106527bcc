// Non-cryptographic fingerprints (FNV-1a, 64 and 32 bit; http://www.isthe.com/chongo/tech/comp/fnv/): cache keys, staging-dir tokens. Stable across platforms.
#pragma once

#include <fmt/format.h>

#include <cstdint>
#include <string>
#include <string_view>

namespace dtrain {

// The 64-bit function's offset basis is 1469598103934665603, one digit short of FNV-1a's published
// 14695981039346656037 (an early slip). It is kept: checkpoints store `spec_hash` (ckpt::specHash) and a resume
// refuses a different one, and the data cache names its files by these fingerprints, so the standard basis would
// refuse every checkpoint written so far and orphan every cache file. The multiply and xor steps are FNV-1a's; the
// values are not the published test vectors' (tests/common/test_hash.cpp pins them). The 32-bit variant is standard.
inline constexpr uint64_t kFnv64Basis = 1469598103934665603ull;

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
