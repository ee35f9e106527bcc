// Wire protocol of the TCP store (shared by tcp_store_server.cpp and tcp_store_client.cpp).
//
// Connection start (handshake), once per TCP connection:
//   client -> server   "DTRS" u16 version                          (6 bytes)
//   server -> client   "DTRS" u16 serverVersion u8 HandshakeStatus (7 bytes)
// A store started with a token (shared secret) answers kAuthRequired followed by a random 32-byte nonce; the
// client then sends authDigest(token, nonce) (32 bytes) and the server answers one byte, kOk or kBadToken
// (then it closes). Any other status other than kOk is followed by the server closing the connection. The client checks the reply's
// magic itself, so a service that is not a dtrain store is named as such instead of being misread.
//
// Then request/response frames, strictly in order (one response per request, the client may pipeline):
//   frame    = u32 bodyLength, body            (bodyLength <= kMaxFrameBytes, else the server closes)
//   request  = u8 Op, fields...
//   response = u8 Status, fields...
// Field types: u8/u32/i64/u64 little-endian; `bytes` = u32 length + raw bytes; `keys` = u32 count + bytes*.
// The fields of each op are listed with the dispatcher in tcp_store_server.cpp. A response with kError
// carries one `bytes` field, the message. A frame with an unknown op, trailing bytes or a truncated field
// is a protocol violation: the server answers kError once and closes that connection (never the server).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "lib/common/bytes.h"
#include "rendezvous/store.h"

namespace dtrain::rendezvous::proto {

inline constexpr std::string_view kMagic = "DTRS";
inline constexpr uint16_t kVersion = 1;
inline constexpr size_t kHandshakeBytes = 6;
inline constexpr size_t kHandshakeReplyBytes = 7;
inline constexpr size_t kFrameHeaderBytes = 4;
// Large enough for a compareSet with two maximal values; anything larger is a broken or hostile peer.
inline constexpr size_t kMaxFrameBytes = 2 * kMaxValueBytes + 2 * kMaxKeyBytes + 64;
// Server-side waits are capped (a u64 of milliseconds from the wire must not overflow a time_point).
inline constexpr uint64_t kMaxWaitMillis = 30ull * 24 * 3600 * 1000;

enum class HandshakeStatus : uint8_t { kOk = 0, kBadVersion = 1, kBadMagic = 2, kAuthRequired = 3, kBadToken = 4 };
inline constexpr size_t kNonceBytes = 32;
inline constexpr size_t kDigestBytes = 32;
// The challenge's answer: HMAC-SHA-256 keyed by the token over a fixed label and the nonce.
std::string authDigest(std::string_view token, std::string_view nonce);
// The environment variable a client reads its token from when it is given none, and the agent sets for workers.
inline constexpr const char* kTokenEnv = "DTRAIN_RDZV_TOKEN";

enum class Op : uint8_t {
  kPing = 0,
  kSet = 1,
  kGet = 2,
  kTryGet = 3,
  kAdd = 4,
  kCompareSet = 5,
  kWait = 6,
  kCheck = 7,
  kDelete = 8,
  kNumKeys = 9,
  kAppend = 10,
};

enum class Status : uint8_t { kOk = 0, kNotFound = 1, kTimeout = 2, kError = 3 };

const char* opName(Op op);

// Appends a frame header placeholder; finishFrame patches in the body length once the body is written.
inline size_t beginFrame(std::string& out) {
  size_t start = out.size();
  out.append(kFrameHeaderBytes, '\0');
  return start;
}
inline void finishFrame(std::string& out, size_t start) {
  auto len = static_cast<uint32_t>(out.size() - start - kFrameHeaderBytes);
  std::memcpy(out.data() + start, &len, sizeof(len));
}

inline void putHandshake(std::string& out, uint16_t version = kVersion) {
  out.append(kMagic);
  ByteWriter(out).put<uint16_t>(version);
}

}  // namespace dtrain::rendezvous::proto
