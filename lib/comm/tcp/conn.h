// Established TCP connections between ranks and the non-blocking I/O the algorithms are written against.
//
// The data path works on the native non-blocking descriptors with poll(2): one thread drives a send to one
// peer and a receive from another at once (ring steps), which needs no reactor, no callbacks and no thread
// hand-off. Failures name the peer: EOF or ECONNRESET is a CommError at once (the peer died), and a wait
// that outlives the operation's deadline is a CommError naming the rank waited for.
// Thread-safety: a Conn is used by one thread at a time (the backend runs one operation at a time).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>

#include "lib/common/clock.h"

namespace dtrain::comm::tcp {

class Conn {
 public:
  Conn(int fd, int peer);  // takes ownership of a connected, non-blocking socket
  ~Conn();
  Conn(const Conn&) = delete;
  Conn& operator=(const Conn&) = delete;

  int fd() const { return fd_; }
  int peer() const { return peer_; }
  // Move what the socket takes / has without blocking: bytes moved, 0 when it would block.
  // Throws CommError when the peer closed the connection or it failed.
  size_t sendSome(const void* buf, size_t len);
  size_t recvSome(void* buf, size_t len);

 private:
  int fd_;
  int peer_;
};

// The simulated one-way latency of this process's links: DTRAIN_LINK_DELAY ("20ms"; `dtrain sim`'s delay:nodeK=D
// fault sets it for that node's agent, whose workers inherit it), read once; zero when unset. The data path
// holds every message this process sends (a sendAll, the send half of an exchange, each step of a ring) this
// long after it is ready before its first byte goes out, receiving meanwhile: what a link with that latency
// does to a latency-bound collective, done in dtrain's transport because this kernel has no netem. Bandwidth
// is not affected. Throws UsageError naming the variable when it is not a duration.
std::chrono::microseconds linkDelay();

// How long one operation may wait, and how: busy-poll for `spin` first (a peer answering within microseconds
// is cheaper to catch awake than to be woken for), then sleep in poll(2) until the deadline.
class Waiter {
 public:
  Waiter(const Deadline& deadline, std::chrono::milliseconds timeout, std::chrono::microseconds spin)
      : deadline_(deadline), timeout_(timeout), spin_(spin) {}
  // Blocks until `conn` (or `conn2`, may be null or the same) is ready for what is asked, or until `wakeBy`
  // (a held send's release time, see linkDelay; then it returns normally). At least one of the wants must be
  // set unless wakeBy is. Throws CommError on timeout (naming the rank) or when a socket reports an error.
  void wait(Conn& a, bool aRead, bool aWrite, Conn* b = nullptr, bool bRead = false, bool bWrite = false,
            Clock::time_point wakeBy = Clock::time_point::max());
  const Deadline& deadline() const { return deadline_; }

 private:
  const Deadline& deadline_;
  std::chrono::milliseconds timeout_;
  std::chrono::microseconds spin_;
};

// Blocking whole-buffer transfers.
void sendAll(Conn& to, const void* buf, size_t len, Waiter& waiter);
void recvAll(Conn& from, void* buf, size_t len, Waiter& waiter);
// Sends `slen` bytes to `to` while receiving `rlen` bytes from `from` (the same Conn is fine); returns when
// both are complete. Neither side can deadlock on full socket buffers.
void exchange(Conn& to, const void* sbuf, size_t slen, Conn& from, void* rbuf, size_t rlen, Waiter& waiter);

}  // namespace dtrain::comm::tcp
