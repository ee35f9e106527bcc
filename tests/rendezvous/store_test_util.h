// Helpers for the TCP store tests: a raw TCP connection that speaks bytes (to send what no client would), and
// a bounded wait for a condition that another thread or the server's io thread makes true.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>

#include "lib/common/bytes.h"
#include "lib/common/clock.h"
#include "rendezvous/store_protocol.h"

namespace dtrain::testing {

class RawConn {
 public:
  explicit RawConn(uint16_t port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0)
      throw std::runtime_error(std::string("raw connect failed: ") + std::strerror(errno));
  }
  ~RawConn() { closeNow(); }
  RawConn(const RawConn&) = delete;
  RawConn& operator=(const RawConn&) = delete;

  void send(std::string_view bytes) {
    if (::send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(bytes.size()))
      throw std::runtime_error("raw send failed");
  }
  // Reads exactly n bytes; returns fewer only when the peer closed or the timeout passed.
  std::string recvExactly(size_t n, std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
    std::string out;
    Deadline deadline(timeout);
    while (out.size() < n) {
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(deadline.remaining().count())) <= 0) break;
      char buf[4096];
      ssize_t got = ::recv(fd_, buf, std::min(sizeof(buf), n - out.size()), 0);
      if (got <= 0) break;
      out.append(buf, static_cast<size_t>(got));
    }
    return out;
  }
  // True when the peer closes the connection (EOF or reset) within the timeout; data before it is discarded.
  bool closedByPeer(std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
    Deadline deadline(timeout);
    for (;;) {
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(deadline.remaining().count())) <= 0) return false;
      char buf[4096];
      ssize_t got = ::recv(fd_, buf, sizeof(buf), 0);
      if (got <= 0) return true;
    }
  }
  int fd() const { return fd_; }
  void closeNow() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  // Sends the handshake and checks the server accepted it.
  bool handshake() {
    std::string hello;
    rendezvous::proto::putHandshake(hello);
    send(hello);
    auto reply = recvExactly(rendezvous::proto::kHandshakeReplyBytes);
    return reply.size() == rendezvous::proto::kHandshakeReplyBytes && reply.back() == 0;
  }
  // Reads one reply frame; returns its body (status byte first), empty when the connection closed first.
  std::string recvFrame() {
    auto header = recvExactly(4);
    if (header.size() < 4) return {};
    uint32_t len = 0;
    std::memcpy(&len, header.data(), 4);
    return recvExactly(len);
  }

 private:
  int fd_ = -1;
};

// Frames a request body (op byte + fields) as the client would.
inline std::string frame(std::string_view body) {
  std::string out;
  ByteWriter(out).put<uint32_t>(static_cast<uint32_t>(body.size()));
  out.append(body);
  return out;
}

// Polls `cond` until it holds or `timeout` passes: for state owned by another thread (the server's counters),
// where there is no event to block on. Returns the last value of cond().
inline bool eventually(const std::function<bool()>& cond, std::chrono::milliseconds timeout) {
  Deadline deadline(timeout);
  while (!cond()) {
    if (deadline.expired()) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return true;
}

}  // namespace dtrain::testing
