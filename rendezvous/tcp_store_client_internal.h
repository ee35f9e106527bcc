// Internal to the TCP store client (tcp_store_client.cpp, tcp_store_client_batch.cpp): the wait limits and the
// reply check both files share. Not part of the client's public contract; include nowhere else.
#pragma once

#include <algorithm>
#include <string>

#include "lib/common/clock.h"
#include "lib/common/error.h"
#include "rendezvous/store_protocol.h"

namespace dtrain::rendezvous::client_detail {

// How long past a GET/WAIT's own timeout the client waits for the server's TIMEOUT reply before it
// concludes that the server is unresponsive.
inline constexpr Millis kServerGrace{5000};

// A GET/WAIT timeout as the wire carries it: never negative, never past the server's limit.
inline Millis capWait(Millis t) {
  return std::clamp(t, Millis(0), Millis(static_cast<Millis::rep>(proto::kMaxWaitMillis)));
}

// A reply status the op never answers with: the peer is broken (ProtocolError).
[[noreturn]] inline void unexpected(const std::string& address, proto::Op op, proto::Status status) {
  DTRAIN_THROW(ProtocolError, "store at {} sent an unexpected status {} to {}", address, static_cast<int>(status),
               proto::opName(op));
}

}  // namespace dtrain::rendezvous::client_detail
