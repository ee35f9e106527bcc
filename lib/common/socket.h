// TCP sockets for every stack in dtrain: the store client, the store server and the tcp collectives' mesh.
//
// connect(): resolves the host with getaddrinfo (names, IPv4 and IPv6 literals), tries every address it
// returns, and retries the whole list with exponential backoff while the failures are transient, until the
// deadline. A peer that is not listening yet is normal during a launch (another node hosts the store, a rank is
// still starting), so these count as transient: ECONNREFUSED, ETIMEDOUT, EHOSTUNREACH, ENETUNREACH, ECONNRESET,
// ECONNABORTED, EAGAIN, and the resolver's EAI_AGAIN and EAI_NONAME (a cluster's DNS record may appear after the
// job starts, as a Kubernetes pod's does). Any other failure (EACCES, an invalid address...) is reported at once.
// The order of the resolver's list is kept (RFC 6724, /etc/gai.conf); each address gets at most an equal share
// of the time left, so one black-holed address cannot use the whole budget. A connection to itself (TCP
// simultaneous open on a local port nobody listens on yet) counts as refused: it would hold the port the server
// is about to bind.
//
// listen(): binds host:port ("" or a wildcard address: any), port 0 picks a free port; the first address the
// resolver returns that binds wins. Returns the socket and the bound port.
//
// Every descriptor is close-on-exec (SOCK_CLOEXEC): the launcher forks workers, and a listening socket or a
// store connection leaked into a worker would outlive the agent. TCP_NODELAY is set on connect() by default:
// every caller here exchanges small request/response frames or latency-bound collective messages.
//
// ConnectOptions::retry = false makes one pass over the addresses instead (a refused connection fails at once).
//
// Errors: connect() throws ConnectError (a NetworkError) naming the endpoint, the attempts and the last error
// text; listen() throws ListenError (ExitCode::kAddressInUse) "cannot listen on host:port: <reason>".
// Callers that report in their own words catch these and keep the fields (see tcp_store_client.cpp).
// Thread-safety: the functions are reentrant; a Socket is owned by one thread at a time.
// Blocking: connect() blocks until connected or the deadline; listen() does not block.
#pragma once

#include <cstdint>
#include <string>
#include <utility>

#include "lib/common/clock.h"
#include "lib/common/error.h"
#include "lib/common/net.h"

namespace dtrain::net {

// An owned socket descriptor, closed on destruction. Movable, not copyable.
class Socket {
 public:
  Socket() = default;
  explicit Socket(int fd) noexcept : fd_(fd) {}
  ~Socket() { close(); }
  Socket(Socket&& other) noexcept : fd_(other.release()) {}
  Socket& operator=(Socket&& other) noexcept {
    if (this != &other) {
      close();
      fd_ = other.release();
    }
    return *this;
  }
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;

  int fd() const noexcept { return fd_; }
  bool valid() const noexcept { return fd_ >= 0; }
  // Gives up ownership: the caller closes the returned descriptor.
  int release() noexcept { return std::exchange(fd_, -1); }
  void close() noexcept;

 private:
  int fd_ = -1;
};

struct ConnectOptions {
  Millis initialBackoff{2};   // first retry delay; doubles up to maxBackoff (and never past the deadline)
  Millis maxBackoff{1000};
  bool noDelay = true;        // TCP_NODELAY on the connected socket
  bool nonBlocking = false;   // leave the connected socket O_NONBLOCK
  // false: one pass over the resolver's addresses, no retry of transient failures: for a probe of a server that
  // already listened (an agent's published /metrics), where a refused connection means it is gone
  bool retry = true;
};

// connect() gave up: at the deadline (timedOut) or on a failure that retrying cannot fix.
class ConnectError : public NetworkError {
 public:
  ConnectError(std::string endpoint, int attempts, int err, std::string reason, bool timedOut);
  const std::string& endpoint() const noexcept { return endpoint_; }
  int attempts() const noexcept { return attempts_; }
  int err() const noexcept { return err_; }            // the last errno; 0 when the resolver failed
  const std::string& reason() const noexcept { return reason_; }  // strerror / gai_strerror text of the last failure
  bool timedOut() const noexcept { return timedOut_; }

 private:
  std::string endpoint_;
  int attempts_;
  int err_;
  std::string reason_;
  bool timedOut_;
};

// Connects to `to` before `deadline` (see the header comment for the retry rule). Throws ConnectError.
Socket connect(const HostPort& to, const Deadline& deadline, const ConnectOptions& options = {});

// listen() failed: "cannot listen on host:port: <reason>", ExitCode::kAddressInUse.
class ListenError : public Error {
 public:
  ListenError(std::string endpoint, std::string reason);
  const std::string& endpoint() const noexcept { return endpoint_; }
  const std::string& reason() const noexcept { return reason_; }

 private:
  std::string endpoint_;
  std::string reason_;
};

struct ListenOptions {
  int backlog = 1024;
  bool reuseAddress = true;  // SO_REUSEADDR: a restarted server reuses a port in TIME_WAIT
  bool nonBlocking = false;  // O_NONBLOCK on the listening socket (for event loops)
};

struct Listener {
  Socket socket;
  uint16_t port = 0;    // the bound port (the one picked when 0 was asked)
  int family = 0;       // AF_INET or AF_INET6
};

// Binds and listens on host:port; "" binds the wildcard address. Throws ListenError naming host:port.
Listener listen(const std::string& host, uint16_t port, const ListenOptions& options = {});

// The local port a socket is bound to (IPv4 or IPv6).
uint16_t localPort(int fd);

// Writes all of `bytes` to a blocking socket (MSG_NOSIGNAL); false with errno set on failure.
bool sendAll(int fd, const void* bytes, size_t size);

// Reads exactly `size` bytes from a socket (blocking or not), waiting in poll(2) no later than `deadline`.
// Returns true when all arrived; false with errno set on failure: 0 for an orderly close by the peer before
// the last byte, ETIMEDOUT at the deadline, else the recv/poll error.
bool recvAll(int fd, void* bytes, size_t size, const Deadline& deadline);

}  // namespace dtrain::net
