// The TCP store server: serves the Store protocol (store_protocol.h) to any number of clients.
//
// Threading: one Boost.Asio io_context run by one thread that the server owns. All store state lives on that
// thread, so requests never take a lock; blocked GET/WAIT requests park server-side (no thread per waiter)
// and are woken by SET/ADD/COMPARE_SET/APPEND from any connection, or answered TIMEOUT by a timer.
// One thread is enough (measured in docs/store.md): a request costs about two syscalls on the server, and with
// 64 clients on loopback the io thread used ~65% of a core while the clients saturated the machine.
//
// Embedding: the launcher agent hosts the store and forks workers, so every descriptor the server opens is
// close-on-exec (listening socket, accepted sockets, epoll/timer/event fds), and the server thread blocks
// all signals so the agent's signal handling stays on the agent's threads.
//
// Limits: at start the RLIMIT_NOFILE soft limit is raised to the hard limit (one fd per connection; at least
// 512 connections must work). A malformed frame closes that one connection; the server keeps serving.
//
// Thread-safety: start/stop/port/stats may be called from any thread; stop() is idempotent and blocks until
// the io thread has exited, after closing every connection (blocked clients see their connection drop).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

namespace dtrain::rendezvous {

struct TcpStoreServerOptions {
  std::string host = "0.0.0.0";  // address to bind: "0.0.0.0", "::", "127.0.0.1", a hostname
  uint16_t port = 0;             // 0 picks a free port (read it back with port())
  int backlog = 1024;
};

struct TcpStoreServerStats {
  uint64_t connectionsAccepted = 0;
  uint64_t connectionsOpen = 0;
  uint64_t requests = 0;
  uint64_t protocolErrors = 0;  // connections closed for a malformed frame or a bad handshake
  uint64_t waiters = 0;         // GET/WAIT requests parked right now
};

class TcpStoreServer {
 public:
  // Binds and listens synchronously, then starts the io thread. Throws dtrain::Error with
  // ExitCode::kAddressInUse naming host:port when the address is in use or not local.
  static std::unique_ptr<TcpStoreServer> start(const TcpStoreServerOptions& options);
  ~TcpStoreServer();  // stop()
  TcpStoreServer(const TcpStoreServer&) = delete;
  TcpStoreServer& operator=(const TcpStoreServer&) = delete;

  uint16_t port() const;
  const std::string& host() const;
  // "host:port" as bound (the wildcard host stays "0.0.0.0": clients use a real address).
  std::string address() const;
  TcpStoreServerStats stats() const;
  void stop();

  class Impl;

 private:
  explicit TcpStoreServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Raises RLIMIT_NOFILE's soft limit to its hard limit; returns the new soft limit. Never throws.
uint64_t raiseFileLimit();

}  // namespace dtrain::rendezvous
