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
// Memory is bounded against careless or hostile clients (TcpStoreLimits): a frame's buffer grows as its bytes
// arrive (never from the declared length alone); all connections' buffers together stay under a server-wide
// budget (a connection that would exceed it stops being read until others release memory); a connection whose
// queued replies exceed a bound is not read or answered further until its client drains them (back-pressure);
// connections that do not finish the handshake in time, or (optionally) stay idle, are closed; connections
// over the cap are accepted and closed at once; the key/value data has quotas on keys and bytes, answered
// with an error naming the quota. Descriptors: the cap is lowered to connectionCapFor(the open-file limit), so
// clients alone never exhaust the process's descriptors (the agent hosting the store still forks workers and
// opens logs; a metrics endpoint still accepts). Should accept() still fail (EMFILE/ENFILE: something else in
// the process used them), it logs once, leaves the clients in the backlog and retries every 50 ms: it never
// spins on the readable listening socket and never stops accepting.
//
// Thread-safety: start/stop/port/stats may be called from any thread; stop() is idempotent and blocks until
// the io thread has exited, after closing every connection (blocked clients see their connection drop).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

namespace dtrain::rendezvous {

// Resource limits of one server. Defaults are sized for jobs of thousands of agents (each agent and worker
// holds one connection and a few small keys) while keeping a flood far below the machine's memory.
struct TcpStoreLimits {
  size_t maxConnections = 20000;                  // more are accepted and closed at once (logged once a streak);
                                                  // lowered to connectionCapFor(the open-file limit)
  size_t maxBufferedBytes = size_t{512} << 20;    // all connections' input buffers and queued replies together
  size_t maxQueuedReplyBytes = size_t{4} << 20;   // per connection; one reply is always allowed, however large
  std::chrono::milliseconds handshakeTimeout{10000};  // connect -> complete handshake; 0 = none
  std::chrono::milliseconds idleTimeout{0};           // no request and nothing parked/queued; 0 = none (default)
  size_t maxKeys = 1000000;                      // quota on the number of keys
  size_t maxStoredBytes = size_t{1} << 30;       // quota on stored bytes (keys + values + kEntryOverheadBytes each)
  size_t maxKeysPerRequest = 100000;             // check/wait: number of keys in one request
};

struct TcpStoreServerOptions {
  std::string host = "0.0.0.0";  // address to bind: "0.0.0.0", "::", "127.0.0.1", a hostname
  uint16_t port = 0;             // 0 picks a free port (read it back with port())
  int backlog = 1024;
  TcpStoreLimits limits;
  // Shared secret: when not empty, every client must answer the handshake's challenge with it
  // (store_protocol.h); a client with a wrong or no token is closed before any request.
  std::string token;
};

struct TcpStoreServerStats {
  uint64_t connectionsAccepted = 0;
  uint64_t connectionsOpen = 0;
  uint64_t requests = 0;
  // Writes of replies: one per burst of pipelined requests answered together (and one per parked get/wait
  // answered), so about the clients' round trips; requests / replyWrites is how much pipelining saved.
  uint64_t replyWrites = 0;
  uint64_t protocolErrors = 0;  // connections closed for a malformed frame or a bad handshake
  uint64_t authFailures = 0;    // connections closed for a wrong or missing token
  uint64_t waiters = 0;         // GET/WAIT requests parked right now
  uint64_t bufferedBytes = 0;   // input buffers + queued replies of all connections right now
  uint64_t connectionsRefused = 0;  // accepted and closed at once: over the cap (maxConnections, connectionCapFor)
  uint64_t connectionsTimedOut = 0;  // closed by the handshake or idle timeout
  uint64_t keys = 0, storedBytes = 0;  // the data, as counted by the quotas
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
// The most connections a server may hold under an open-file limit: the limit less a reserve for the rest of the
// process (an eighth of it, at least 16 and at most 1024 descriptors); half of a tiny limit. SIZE_MAX when
// unlimited or unknown (0).
size_t connectionCapFor(uint64_t fileLimit);

}  // namespace dtrain::rendezvous
