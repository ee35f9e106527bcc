// Bootstrap of the TCP backend: one connection between every pair of ranks, found through the Store.
//
// Rank 0 publishes a random session under `<prefix>session`; each rank listens on an ephemeral port (never a
// fixed one) and publishes "host:port" under `<prefix>addr/<rank>`. Rank j connects to every lower rank i and
// both prove who they are before any data (mesh_auth.h: HMAC-SHA-256 with the job's token over fresh nonces,
// the claimed ranks, the group's tag and the session), so a connection from someone without the token, from
// another job, round or group, or claiming a rank it is not, is closed with a warning naming its address, and
// the real peers still connect; rank i accepts the higher ranks. Listening and connecting (host names, IPv4
// and IPv6, retries with backoff) use lib/common/socket.h; connections to the lower ranks are made in turn
// (the peers' listen backlogs hold them), then the accepts and their hellos progress on one Boost.Asio
// io_context, all bounded by the deadline. The sockets are then handed to the data path as plain non-blocking
// descriptors with TCP_NODELAY (see conn.h for why).
//
// A full mesh costs size-1 sockets per rank: fine for the tens of ranks dtrain targets; connections could be
// made lazily if that ever matters.
// Blocking: the constructor blocks until the mesh is complete or the deadline passes (CommError).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "lib/comm/tcp/conn.h"
#include "lib/common/clock.h"
#include "rendezvous/store.h"

namespace dtrain::comm::tcp {

class Mesh {
 public:
  // bufferBytes: SO_SNDBUF/SO_RCVBUF of every connection; 0 keeps the kernel's autotuning. token: the shared
  // secret every connection proves (BackendOptions::token); "" leaves the mesh unauthenticated (mesh_auth.h).
  Mesh(rendezvous::Store& store, const std::string& prefix, int rank, int size, const std::string& host,
       int bufferBytes, const Deadline& deadline, const std::string& token = "");
  ~Mesh();

  Conn& peer(int r) { return *conns_[static_cast<size_t>(r)]; }
  int rank() const { return rank_; }
  int size() const { return size_; }

 private:
  int rank_;
  int size_;
  std::vector<std::unique_ptr<Conn>> conns_;  // [rank_] is empty
};

// The address to listen on and publish when TcpOptions::host is empty: DTRAIN_COMM_HOST, else 127.0.0.1
// when every rank is on this node, else this host's first non-loopback IPv4 address.
std::string chooseHost(const std::string& configured, bool singleNode);

// Where a listening address came from, for an error that cannot listen on it: " (DTRAIN_COMM_HOST, which dtrain run
// sets to its --local-addr for the workers unless the agent's environment sets it)" when `host` is the value of
// DTRAIN_COMM_HOST, else "" (the caller's own field or the default). Reads the process environment.
std::string hostOrigin(const std::string& host);

}  // namespace dtrain::comm::tcp
