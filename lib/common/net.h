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
  std::string str() const;  // joinHostPort(host, port)
};

// "host:port", or "[v6addr]:port" for a host with a colon (an IPv6 literal), as RFC 3986 writes it and
// parseHostPort reads it back ("::1:29400" is read as a bare host); a host given bracketed stays as it is. Every
// endpoint dtrain prints, logs or passes on is written by this function. Pure; thread-safe.
std::string joinHostPort(std::string_view host, int port);

// Parses "host", "host:port", "[v6addr]:port", and a bare IPv6 literal "v6addr" (a text with several colons that
// is not one, such as "::1:29400", is bad syntax: its port needs brackets). A missing port becomes defaultPort.
// nullopt on bad syntax.
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
