// Test support: a plain HTTP/1.1 GET over a loopback TCP socket, so tests talk to the monitoring endpoints the
// way Prometheus does without depending on curl. Blocks up to `timeout`; throws std::runtime_error on failure.
#pragma once

#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <arpa/inet.h>

#include <chrono>
#include <stdexcept>
#include <string>

namespace dtrain::testing {

struct HttpReply {
  int status = 0;
  std::string headers;
  std::string body;
};

inline HttpReply httpGet(int port, const std::string& target,
                         std::chrono::milliseconds timeout = std::chrono::milliseconds(10'000)) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw std::runtime_error("socket failed");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    ::close(fd);
    throw std::runtime_error("cannot connect to 127.0.0.1:" + std::to_string(port));
  }
  std::string req = "GET " + target + " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
  if (::send(fd, req.data(), req.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(req.size())) {
    ::close(fd);
    throw std::runtime_error("send failed");
  }
  std::string raw;
  auto end = std::chrono::steady_clock::now() + timeout;
  char buf[65536];
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - std::chrono::steady_clock::now()).count();
    pollfd p{fd, POLLIN, 0};
    if (left <= 0 || ::poll(&p, 1, static_cast<int>(left)) <= 0) {
      ::close(fd);
      throw std::runtime_error("no complete HTTP reply from 127.0.0.1:" + std::to_string(port) + " in time");
    }
    ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) break;
    raw.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  HttpReply r;
  auto split = raw.find("\r\n\r\n");
  if (raw.compare(0, 5, "HTTP/") != 0 || split == std::string::npos) throw std::runtime_error("not an HTTP reply");
  r.status = std::stoi(raw.substr(raw.find(' ') + 1, 3));
  r.headers = raw.substr(0, split);
  r.body = raw.substr(split + 4);
  return r;
}

}  // namespace dtrain::testing
