#include "lib/comm/tcp/mesh.h"

#include <fcntl.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <sys/socket.h>

#include <cstring>
#include <functional>
#include <utility>  // before Asio: Boost 1.74's awaitable.hpp uses std::exchange without it

#include <boost/asio.hpp>

#include "lib/comm/tcp/mesh_auth.h"
#include "lib/common/env.h"
#include "lib/common/error.h"
#include "lib/common/hash.h"
#include "lib/common/log.h"
#include "lib/common/net.h"
#include "lib/common/sha256.h"
#include "lib/common/socket.h"

namespace dtrain::comm::tcp {
namespace {

namespace asio = boost::asio;
using asio::ip::tcp;

// How long an accepted connection may take to complete the handshake (a peer answers in microseconds; a
// rogue that stalls must not hold a descriptor until the bootstrap deadline).
constexpr std::chrono::milliseconds kHandshakeTimeout{10000};

// "host:port" of an accepted connection's peer, for log lines; "an unknown address" when it is gone already.
std::string peerText(const tcp::socket& s) {
  boost::system::error_code ec;
  auto ep = s.remote_endpoint(ec);
  if (ec) return "an unknown address";
  return net::HostPort{ep.address().to_string(), ep.port()}.str();
}

// Turns an established socket into the data path's descriptor: non-blocking, no Nagle delay (every
// collective message is latency-bound at its end), close-on-exec, and optionally fixed socket buffers
// (0 keeps the kernel's autotuning, the default: see tcp_backend.cpp).
int adopt(net::Socket s, int bufferBytes) {
  const int fd = s.fd();
  int one = 1;
  DTRAIN_SYSCALL(::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)));
  int flags = DTRAIN_SYSCALL(::fcntl(fd, F_GETFL));
  DTRAIN_SYSCALL(::fcntl(fd, F_SETFL, flags | O_NONBLOCK));
  DTRAIN_SYSCALL(::fcntl(fd, F_SETFD, FD_CLOEXEC));
  if (bufferBytes > 0) {  // capped by net.core.wmem_max / rmem_max; best effort
    ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bufferBytes, sizeof(bufferBytes));
    ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bufferBytes, sizeof(bufferBytes));
  }
  return s.release();
}

}  // namespace

Mesh::Mesh(rendezvous::Store& store, const std::string& prefix, int rank, int size, const std::string& host,
           int bufferBytes, const Deadline& deadline, const std::string& token)
    : rank_(rank), size_(size), conns_(static_cast<size_t>(size)) {
  if (size == 1) return;
  asio::io_context io;
  boost::system::error_code ec;
  // This instance of the group: rank 0 draws it, everyone binds their handshakes to it (mesh_auth.h).
  auth::Session session{};
  if (rank == 0) {
    auth::randomBytes(session.data(), session.size());
    store.set(prefix + "session", std::string_view(reinterpret_cast<const char*>(session.data()), session.size()));
  } else {
    std::string got;
    try {
      got = store.get(prefix + "session", deadline.remaining());
    } catch (const TimeoutError&) {
      DTRAIN_THROW(CommError, "rank 0 never published the collective group's session (did it start?)");
    }
    DTRAIN_CHECK_AS(ProtocolError, got.size() == session.size(), "malformed collective session in the store");
    std::memcpy(session.data(), got.data(), session.size());
  }
  // The listening socket comes from lib/common (close-on-exec, host names resolved); no SO_REUSEADDR, as
  // before: with port 0 it could hand out a port another bound socket still holds.
  net::Listener listener;
  try {
    listener = net::listen(host, 0, {.backlog = size, .reuseAddress = false});
  } catch (const net::ListenError& e) {
    // Port 0 is never in use: the address is not this machine's. The README's code for that is 5.
    throw Error(fmt::format("cannot listen on {}{} for collectives: {}; expected an address of this machine", host,
                            hostOrigin(host), e.reason()),
                ExitCode::kAddressInUse);
  }
  tcp::acceptor acceptor(io);
  acceptor.assign(listener.family == AF_INET6 ? tcp::v6() : tcp::v4(), listener.socket.fd(), ec);
  DTRAIN_CHECK_AS(CommError, !ec, "listen failed: {}", ec.message());
  listener.socket.release();  // the acceptor owns it now
  const uint16_t port = listener.port;
  store.set(prefix + "addr/" + std::to_string(rank), net::HostPort{host, port}.str());

  const uint32_t tag = fnv1a32(prefix);
  std::vector<net::Socket> sockets(static_cast<size_t>(size));
  int pending = size - 1;
  std::string failure;
  auto fail = [&](std::string why) {
    if (failure.empty()) failure = std::move(why);
  };

  // Accept the higher ranks, each proving who it is (mesh_auth.h) before it counts. A connection that fails
  // (a port scanner, a peer of an earlier attempt, someone without the token) is closed and logged; the
  // accept stays armed, so the real peers still connect.
  struct Handshake {
    explicit Handshake(asio::io_context& io) : socket(io), timer(io) {}
    tcp::socket socket;
    asio::steady_timer timer;  // a connection that stalls mid-handshake is dropped, not held to the deadline
    bool over = false;         // refused, timed out or taken over: later completions are ignored
    auth::HelloHeader header;
    auth::HelloTail tail;
    auth::Challenge challenge;
    sha256::Digest proof{};
  };
  auto refuse = [&](const std::shared_ptr<Handshake>& h, const std::string& why) {
    if (h->over) return;
    h->over = true;
    h->timer.cancel();
    log::warn("collectives: rank {} refused a connection from {}: {}", rank, peerText(h->socket), why);
    boost::system::error_code ignored;
    h->socket.close(ignored);
  };
  const int toAccept = size - 1 - rank;
  asio::steady_timer acceptRetry(io);
  bool acceptFailing = false;
  std::function<void()> acceptNext = [&] {
    auto h = std::make_shared<Handshake>(io);
    acceptor.async_accept(h->socket, [&, h](const boost::system::error_code& e) {
      if (e) {
        // Out of descriptors (a flood of connections, or the process's own use): the peers wait in the backlog;
        // retrying at once would spin on the readable listener, and giving up would fail the whole group.
        if (!acceptFailing)
          log::warn("collectives: rank {} cannot accept connections ({}); retrying every 50 ms", rank, e.message());
        acceptFailing = true;
        acceptRetry.expires_after(std::chrono::milliseconds(50));
        acceptRetry.async_wait([&](const boost::system::error_code& e0) {
          if (!e0) acceptNext();
        });
        return;
      }
      acceptFailing = false;
      h->timer.expires_after(std::min<std::chrono::milliseconds>(kHandshakeTimeout, deadline.remaining()));
      h->timer.async_wait([&, h](const boost::system::error_code& et) {
        if (!et) refuse(h, fmt::format("it did not complete the handshake within {} s", kHandshakeTimeout.count() / 1000));
      });
      asio::async_read(h->socket, asio::buffer(&h->header, sizeof(h->header)), [&, h](const boost::system::error_code& e1, size_t) {
        if (h->over) return;
        if (e1) return refuse(h, "it closed before its hello (" + e1.message() + ")");
        if (auto why = auth::checkHeader(h->header, tag, rank, size); !why.empty()) return refuse(h, why);
        asio::async_read(h->socket, asio::buffer(&h->tail, sizeof(h->tail)), [&, h](const boost::system::error_code& e2, size_t) {
          if (h->over) return;
          if (e2) return refuse(h, "it closed during its hello (" + e2.message() + ")");
          if (h->tail.session != session)
            return refuse(h, fmt::format("it claims rank {} of another job, round or attempt (its session differs)",
                                         h->header.rank));
          auth::randomBytes(h->challenge.nonce.data(), h->challenge.nonce.size());
          h->challenge.proof = auth::acceptorProof(token, session, tag, rank, h->header.rank, h->tail.nonce,
                                                   h->challenge.nonce);
          asio::async_write(h->socket, asio::buffer(&h->challenge, sizeof(h->challenge)), [&, h](const boost::system::error_code& e3, size_t) {
            if (h->over) return;
            if (e3) return refuse(h, "it closed before the challenge (" + e3.message() + ")");
            asio::async_read(h->socket, asio::buffer(h->proof.data(), h->proof.size()), [&, h](const boost::system::error_code& e4, size_t) {
              if (h->over) return;
              const int r = h->header.rank;
              if (e4) return refuse(h, fmt::format("it claimed rank {} and closed before proving it ({})", r, e4.message()));
              auto expected = auth::connectorProof(token, session, tag, r, rank, h->challenge.nonce, h->tail.nonce);
              if (!sha256::equal(expected, h->proof))
                return refuse(h, fmt::format("it claimed rank {} without proving it knows the job's token "
                                             "(DTRAIN_RDZV_TOKEN / --rdzv-token)", r));
              if (sockets[static_cast<size_t>(r)].valid())
                return refuse(h, fmt::format("rank {} is connected already", r));
              h->over = true;
              h->timer.cancel();
              boost::system::error_code e5;
              int fd = h->socket.release(e5);
              if (e5) return fail("cannot take over a collective socket: " + e5.message());
              sockets[static_cast<size_t>(r)] = net::Socket(fd);
              --pending;
            });
          });
        });
      });
      acceptNext();  // keep one accept armed until the mesh is complete
    });
  };
  if (toAccept > 0) acceptNext();

  // Connect to the lower ranks. The listener exists before its address is published, so a refusal is rare
  // (a firewall's, or an address of an earlier attempt); net::connect retries it until the deadline. The
  // listener's backlog holds the connection until that rank's loop below accepts it and answers the hello
  // (lower ranks finish their own connections first; rank 0 has none, so this always progresses).
  for (int peer = 0; peer < rank; ++peer) {
    std::string where;
    try {
      where = store.get(prefix + "addr/" + std::to_string(peer), deadline.remaining());
    } catch (const TimeoutError&) {
      DTRAIN_THROW(CommError, "rank {} never published its collective address (did it start?)", peer);
    }
    auto hp = net::parseHostPort(where, 0);
    DTRAIN_CHECK_AS(ProtocolError, hp.has_value(),
                    "rank {} published a malformed address '{}'", peer, where);
    net::Socket s;
    try {
      s = net::connect(*hp, deadline, {.initialBackoff = std::chrono::milliseconds(20)});
    } catch (const net::ConnectError& e) {
      DTRAIN_THROW(CommError, "connecting to rank {} at {} failed: {}", peer, hp->host, e.reason());
    }
    auth::HelloHeader hello;
    hello.rank = rank;
    hello.tag = tag;
    auth::HelloTail tail;
    tail.session = session;
    auth::randomBytes(tail.nonce.data(), tail.nonce.size());
    auth::Challenge challenge;
    if (!net::sendAll(s.fd(), &hello, sizeof(hello)) || !net::sendAll(s.fd(), &tail, sizeof(tail)))
      DTRAIN_THROW(CommError, "greeting rank {} at {} failed: {}", peer, where, std::strerror(errno));
    if (!net::recvAll(s.fd(), &challenge, sizeof(challenge), deadline))
      DTRAIN_THROW(CommError, "rank {} at {} did not answer the collective handshake: {}", peer, where,
                   errno == 0 ? std::string("it closed the connection (see its log)") : std::string(std::strerror(errno)));
    auto expected = auth::acceptorProof(token, session, tag, peer, rank, tail.nonce, challenge.nonce);
    if (!sha256::equal(expected, challenge.proof))
      DTRAIN_THROW(CommError,
                   "rank {} at {} did not prove it knows the job's token: the ranks were given different "
                   "DTRAIN_RDZV_TOKEN values, or that address is not rank {} of this job",
                   peer, where, peer);
    auto proof = auth::connectorProof(token, session, tag, rank, peer, challenge.nonce, tail.nonce);
    if (!net::sendAll(s.fd(), proof.data(), proof.size()))
      DTRAIN_THROW(CommError, "greeting rank {} at {} failed: {}", peer, where, std::strerror(errno));
    sockets[static_cast<size_t>(peer)] = std::move(s);
    --pending;
  }

  while (pending > 0 && failure.empty()) {
    if (deadline.expired()) {
      std::string missing;
      for (int r = 0; r < size; ++r)
        if (r != rank && !sockets[static_cast<size_t>(r)].valid()) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
      DTRAIN_THROW(CommError, "collective connections to rank(s) {} not established before the timeout", missing);
    }
    io.run_one_for(std::min<std::chrono::milliseconds>(deadline.remaining(), std::chrono::milliseconds(100)));
  }
  DTRAIN_CHECK_AS(CommError, failure.empty(), "{}", failure);
  for (int r = 0; r < size; ++r) {
    if (r == rank) continue;
    conns_[static_cast<size_t>(r)] = std::make_unique<Conn>(adopt(std::move(sockets[static_cast<size_t>(r)]), bufferBytes), r);
  }
}

Mesh::~Mesh() = default;

std::string chooseHost(const std::string& configured, bool singleNode) {
  if (!configured.empty()) return configured;
  if (auto fromEnv = env::get("DTRAIN_COMM_HOST"); fromEnv && !fromEnv->empty()) return *fromEnv;
  if (singleNode) return "127.0.0.1";
  ifaddrs* list = nullptr;
  std::string found;
  if (::getifaddrs(&list) == 0) {
    for (ifaddrs* i = list; i != nullptr && found.empty(); i = i->ifa_next) {
      if (i->ifa_addr == nullptr || i->ifa_addr->sa_family != AF_INET) continue;
      if ((i->ifa_flags & IFF_UP) == 0 || (i->ifa_flags & IFF_LOOPBACK) != 0) continue;
      char buf[INET_ADDRSTRLEN] = {};
      auto* sin = reinterpret_cast<sockaddr_in*>(i->ifa_addr);
      if (::inet_ntop(AF_INET, &sin->sin_addr, buf, sizeof(buf)) != nullptr) found = buf;
    }
    ::freeifaddrs(list);
  }
  if (found.empty()) {
    log::warn("no non-loopback IPv4 address found for collectives across nodes; using 127.0.0.1 "
              "(set DTRAIN_COMM_HOST)");
    return "127.0.0.1";
  }
  return found;
}

std::string hostOrigin(const std::string& host) {
  auto fromEnv = env::get("DTRAIN_COMM_HOST");
  if (!fromEnv || fromEnv->empty() || *fromEnv != host) return "";
  return " (DTRAIN_COMM_HOST, which dtrain run sets to its --local-addr for the workers unless the agent's "
         "environment sets it)";
}

}  // namespace dtrain::comm::tcp
