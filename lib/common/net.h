// Host/port handling shared by the store, the launcher and the TCP collectives.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace dtrain::net {

struct HostPort {
  std::string host;
  uint16_t port = 0;
  std::string str() const;  // "host:port", "[v6]:port"
};

// Parses "host", "host:port", "[v6addr]:port". A missing port becomes defaultPort. nullopt on bad syntax.
std::optional<HostPort> parseHostPort(std::string_view s, uint16_t defaultPort);

// This machine's hostname (gethostname).
std::string hostname();

// True when every address `host` stands for is a loopback one (127.0.0.0/8, ::1): a literal, or a name whose
// every resolved address is (localhost). False for wildcards (0.0.0.0, ::, ""), other addresses, and names
// that do not resolve. Blocks for name resolution.
bool isLoopback(const std::string& host);

// A TCP port that was free on `host` a moment ago (bind to 0, read it, close). Racy by nature; used only
// for MASTER_PORT, which torch's own store binds later, exactly as torchrun does.
uint16_t pickFreePort(const std::string& host = "0.0.0.0");

}  // namespace dtrain::net
