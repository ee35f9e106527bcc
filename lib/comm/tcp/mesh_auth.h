// The tcp mesh's connection handshake: who may join a collective group's connections.
//
// The rendezvous store's scheme (rendezvous/store_protocol.h: HMAC-SHA-256 keyed by the shared secret over a
// fresh random nonce, lib/common/sha256.h), applied in both directions and bound to the connection's identity,
// so a peer that does not know the job's token (DTRAIN_RDZV_TOKEN, BackendOptions::token) cannot join, inject
// data or impersonate a rank, and a connection from another job, round or group is refused even when it knows
// the token:
//
//   connector (rank c) -> acceptor (rank a)   Hello: "DTRC" u16 version u16 0 i32 c u32 tag      (16 bytes)
//                                             session[16] nonceC[32]                             (48 bytes)
//   acceptor -> connector                     nonceA[32] proofA[32]                              (64 bytes)
//   connector -> acceptor                     proofC[32]                                         (32 bytes)
//
//   proofA = HMAC(token, "dtrain mesh v2 accept:"  session tag a c nonceC nonceA)
//   proofC = HMAC(token, "dtrain mesh v2 connect:" session tag c a nonceA nonceC)
//
// `tag` hashes the group's key prefix (a connection that reached another group's listener), `session` is 16
// random bytes rank 0 of the group publishes through the store when the group is built (so another job, round
// or attempt, whose session differs, is refused even with the same token and run id), and the ranks are the
// claimed ones: a proof for one rank, session or nonce is worthless for any other. Both nonces are fresh per
// connection, so a recorded exchange cannot be replayed; the labels differ per direction, so one side's proof
// cannot be reflected as the other's. The acceptor checks the 16-byte header first, so an old (v1) peer or a
// stray client is refused by its first bytes, and it writes nothing to a connection before its header checked.
//
// With an empty token the same exchange runs keyed by "": it still refuses other groups, sessions and ranks
// that are taken, but anyone who can reach the port can compute it, so the mesh is then unauthenticated (as the
// store is without a token). Thread-safety: pure functions.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

#include "lib/common/sha256.h"

namespace dtrain::comm::tcp::auth {

inline constexpr uint32_t kHelloMagic = 0x43525444;  // "DTRC" little-endian
inline constexpr uint16_t kVersion = 2;               // v1: the unauthenticated 16-byte hello
inline constexpr size_t kSessionBytes = 16;
inline constexpr size_t kNonceBytes = 32;
inline constexpr size_t kProofBytes = 32;

struct HelloHeader {
  uint32_t magic = kHelloMagic;
  uint16_t version = kVersion;
  uint16_t reserved = 0;
  int32_t rank = -1;  // the connector's claimed rank
  uint32_t tag = 0;   // fnv1a32 of the group's key prefix
};
static_assert(sizeof(HelloHeader) == 16);

struct HelloTail {
  std::array<uint8_t, kSessionBytes> session{};
  std::array<uint8_t, kNonceBytes> nonce{};
};
static_assert(sizeof(HelloTail) == 48);

struct Challenge {
  std::array<uint8_t, kNonceBytes> nonce{};
  sha256::Digest proof{};
};
static_assert(sizeof(Challenge) == 64);

using Session = std::array<uint8_t, kSessionBytes>;
using Nonce = std::array<uint8_t, kNonceBytes>;

// Fills `out` from the kernel's CSPRNG (getrandom). Throws CommError when it fails.
void randomBytes(void* out, size_t n);

// The acceptor's proof (proofA) and the connector's (proofC), as in the header comment.
sha256::Digest acceptorProof(std::string_view token, const Session& session, uint32_t tag, int acceptor,
                             int connector, const Nonce& connectorNonce, const Nonce& acceptorNonce);
sha256::Digest connectorProof(std::string_view token, const Session& session, uint32_t tag, int connector,
                              int acceptor, const Nonce& acceptorNonce, const Nonce& connectorNonce);

// Why a header is refused by the acceptor `self` of a group of `size` with `tag` (ranks above `self` connect
// to it); "" when it is acceptable. The text completes "refused a connection from ADDR: ...".
std::string checkHeader(const HelloHeader& h, uint32_t tag, int self, int size);

}  // namespace dtrain::comm::tcp::auth
