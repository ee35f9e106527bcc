// SHA-256 (NIST FIPS 180-4, "Secure Hash Standard", 2015, section 6.2) and HMAC-SHA-256 (RFC 2104 with the
// parameters of RFC 4231), for the rendezvous store's challenge-response handshake. dtrain has no crypto
// dependency (OpenSSL is not one, Boost has no HMAC), so this small, test-vector-checked implementation is it.
// Not for bulk data (it is straightforward, not fast) and not constant-time in its inputs' lengths; equal()
// compares digests in time independent of where they differ.
// Thread-safety: pure functions.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

namespace dtrain::sha256 {

using Digest = std::array<uint8_t, 32>;

Digest hash(std::string_view data);
Digest hmac(std::string_view key, std::string_view message);
// Lower-case hex of a digest (64 characters).
std::string hex(const Digest& d);
// Compares in time independent of the position of the first difference.
bool equal(const Digest& a, const Digest& b);

}  // namespace dtrain::sha256
