#include "lib/common/net.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fmt/format.h>

#include "lib/common/error.h"
#include "lib/common/parse.h"

namespace dtrain::net {

std::string joinHostPort(std::string_view host, int port) {
  if (host.find(':') != std::string_view::npos && host.front() != '[') return fmt::format("[{}]:{}", host, port);
  return fmt::format("{}:{}", host, port);
}

std::string HostPort::str() const { return joinHostPort(host, port); }

std::optional<HostPort> parseHostPort(std::string_view s, uint16_t defaultPort) {
  s = parse::trim(s);
  if (s.empty()) return std::nullopt;
  HostPort hp;
  std::string_view portPart;
  if (s.front() == '[') {
    auto close = s.find(']');
    if (close == std::string_view::npos) return std::nullopt;
    hp.host = std::string(s.substr(1, close - 1));
    auto rest = s.substr(close + 1);
    if (!rest.empty()) {
      if (rest.front() != ':') return std::nullopt;
      portPart = rest.substr(1);
    }
  } else {
    auto colon = s.rfind(':');
    if (colon != std::string_view::npos && s.find(':') == colon) {
      hp.host = std::string(s.substr(0, colon));
      portPart = s.substr(colon + 1);
    } else {
      hp.host = std::string(s);  // bare host (or bare v6 address without port)
      // Two colons or more: only an IPv6 literal (a zone "%eth0" aside). "::1:29400" is not one: the port of an
      // IPv6 address needs brackets, [::1]:29400 (taking the text as a host name failed later, at connect).
      if (colon != std::string_view::npos) {
        in6_addr a6{};
        const std::string literal = hp.host.substr(0, hp.host.find('%'));
        if (::inet_pton(AF_INET6, literal.c_str(), &a6) != 1) return std::nullopt;
      }
    }
  }
  if (hp.host.empty()) return std::nullopt;
  if (portPart.empty()) {
    hp.port = defaultPort;
  } else {
    auto p = parse::toInt(portPart);
    if (!p || *p < 0 || *p > 65535) return std::nullopt;
    hp.port = static_cast<uint16_t>(*p);
  }
  return hp;
}

std::string hostname() {
  char buf[256] = {};
  if (::gethostname(buf, sizeof(buf) - 1) != 0) return "localhost";
  return buf;
}

uint16_t pickFreePort(const std::string& host) {
  int fd = DTRAIN_SYSCALL(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = 0;
  if (::inet_pton(AF_INET, host.c_str(), &addr.sin_addr) != 1) addr.sin_addr.s_addr = htonl(INADDR_ANY);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    int err = errno;
    ::close(fd);
    throw SystemError(fmt::format("cannot bind a free port on {}", host), err, ExitCode::kAddressInUse);
  }
  socklen_t len = sizeof(addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

namespace {
bool loopbackAddress(const sockaddr* a) {
  if (a->sa_family == AF_INET)
    return (ntohl(reinterpret_cast<const sockaddr_in*>(a)->sin_addr.s_addr) >> 24) == 127;
  if (a->sa_family == AF_INET6) return IN6_IS_ADDR_LOOPBACK(&reinterpret_cast<const sockaddr_in6*>(a)->sin6_addr);
  return false;
}
}  // namespace

bool isLoopback(const std::string& host) {
  if (host.empty()) return false;
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (::getaddrinfo(host.c_str(), nullptr, &hints, &res) != 0 || res == nullptr) return false;
  bool all = true;
  for (addrinfo* i = res; i != nullptr; i = i->ai_next) all = all && loopbackAddress(i->ai_addr);
  ::freeaddrinfo(res);
  return all;
}

}  // namespace dtrain::net
