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

#include "lib/common/env.h"
#include "lib/common/error.h"
#include "lib/common/hash.h"
#include "lib/common/log.h"
#include "lib/common/net.h"
#include "lib/common/socket.h"

namespace dtrain::comm::tcp {
namespace {

namespace asio = boost::asio;
using asio::ip::tcp;

constexpr uint32_t kHelloMagic = 0x43525444;  // "DTRC"
constexpr uint16_t kHelloVersion = 1;

struct Hello {
  uint32_t magic = kHelloMagic;
  uint16_t version = kHelloVersion;
  uint16_t reserved = 0;
  int32_t rank = -1;
  uint32_t tag = 0;  // hash of the group's key prefix
};
static_assert(sizeof(Hello) == 16);

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
           int bufferBytes, const Deadline& deadline)
    : rank_(rank), size_(size), conns_(static_cast<size_t>(size)) {
  if (size == 1) return;
  asio::io_context io;
  boost::system::error_code ec;
  // The listening socket comes from lib/common (close-on-exec, host names resolved); no SO_REUSEADDR, as
  // before: with port 0 it could hand out a port another bound socket still holds.
  net::Listener listener;
  try {
    listener = net::listen(host, 0, {.backlog = size, .reuseAddress = false});
  } catch (const net::ListenError& e) {
    DTRAIN_THROW(ConfigError, "cannot listen on {} for collectives: {}", host, e.reason());
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

  // Accept the higher ranks, each introducing itself before it counts. A connection that does not greet
  // like a member of this group (a port scanner, a peer of an earlier attempt) is dropped, not fatal.
  const int toAccept = size - 1 - rank;
  std::function<void()> acceptNext = [&] {
    auto s = std::make_shared<tcp::socket>(io);
    acceptor.async_accept(*s, [&, s](const boost::system::error_code& e) {
      if (e) return fail("accept failed: " + e.message());
      auto hello = std::make_shared<Hello>();
      asio::async_read(*s, asio::buffer(hello.get(), sizeof(Hello)),
                       [&, s, hello](const boost::system::error_code& e2, size_t) {
                         const int r = hello->rank;
                         if (e2 || hello->magic != kHelloMagic || hello->version != kHelloVersion ||
                             hello->tag != tag || r <= rank || r >= size || sockets[static_cast<size_t>(r)].valid()) {
                           log::warn("dropped a connection to the collective port that is not from this group");
                           return;
                         }
                         boost::system::error_code e3;
                         int fd = s->release(e3);
                         if (e3) return fail("cannot take over a collective socket: " + e3.message());
                         sockets[static_cast<size_t>(r)] = net::Socket(fd);
                         --pending;
                       });
      acceptNext();  // keep one accept armed until the mesh is complete
    });
  };
  if (toAccept > 0) acceptNext();

  // Connect to the lower ranks. The listener exists before its address is published, so a refusal is rare
  // (a firewall's, or an address of an earlier attempt); net::connect retries it until the deadline. The
  // listener's backlog holds the connection until that rank's loop below accepts it and reads the hello.
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
    Hello hello;
    hello.rank = rank;
    hello.tag = tag;
    if (!net::sendAll(s.fd(), &hello, sizeof(hello)))
      DTRAIN_THROW(CommError, "greeting rank {} failed: {}", peer, std::strerror(errno));
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

}  // namespace dtrain::comm::tcp
