#include "lib/common/socket.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <thread>

namespace dtrain::net {

void Socket::close() noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

namespace {

std::string connectMessage(const std::string& endpoint, int attempts, const std::string& reason, bool timedOut) {
  if (timedOut)
    return fmt::format("cannot connect to {} before the deadline ({} attempt{}): {}", endpoint, attempts,
                       attempts == 1 ? "" : "s", reason);
  return fmt::format("cannot connect to {}: {}", endpoint, reason);
}

// Failures that a later attempt can cure: nobody listening yet, a route or a peer still coming up.
bool transientErrno(int err) {
  switch (err) {
    case ECONNREFUSED:
    case ETIMEDOUT:
    case EHOSTUNREACH:
    case ENETUNREACH:
    case ECONNRESET:
    case ECONNABORTED:
    case EAGAIN:
    case EINTR:
      return true;
    default:
      return false;
  }
}

int pollOne(int fd, short events, Millis timeout) {
  pollfd p{fd, events, 0};
  auto ms = static_cast<int>(std::clamp<Millis::rep>(timeout.count(), 0, 1 << 30));
  for (;;) {
    int rc = ::poll(&p, 1, ms);
    if (rc >= 0 || errno != EINTR) return rc;
  }
}

// TCP simultaneous open lets a connect to a local port nobody listens on succeed when the kernel happens to
// pick that same port as the source port: the socket is connected to itself, and it holds the port that the
// server is about to bind (the server then fails with EADDRINUSE). Treated as "refused", and retried.
bool connectedToItself(int fd) {
  sockaddr_storage local{}, peer{};
  socklen_t localLen = sizeof(local), peerLen = sizeof(peer);
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &localLen) != 0 ||
      ::getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &peerLen) != 0)
    return false;
  return localLen == peerLen && std::memcmp(&local, &peer, localLen) == 0;
}

// One non-blocking connect to one address, waiting at most `wait`. Returns 0 and the socket, or the errno.
int connectOne(const addrinfo& ai, Millis wait, Socket& out) {
  Socket s(::socket(ai.ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, ai.ai_protocol));
  if (!s.valid()) return errno;
  if (::connect(s.fd(), ai.ai_addr, ai.ai_addrlen) != 0) {
    int err = errno;
    if (err != EINPROGRESS && err != EINTR) return err;
    int ready = pollOne(s.fd(), POLLOUT, wait);
    if (ready <= 0) return ready == 0 ? ETIMEDOUT : errno;
    socklen_t len = sizeof(err);
    if (::getsockopt(s.fd(), SOL_SOCKET, SO_ERROR, &err, &len) != 0) return errno;
    if (err != 0) return err;
  }
  if (connectedToItself(s.fd())) return ECONNREFUSED;
  out = std::move(s);
  return 0;
}

}  // namespace

ConnectError::ConnectError(std::string endpoint, int attempts, int err, std::string reason, bool timedOut)
    : NetworkError(connectMessage(endpoint, attempts, reason, timedOut)),
      endpoint_(std::move(endpoint)),
      attempts_(attempts),
      err_(err),
      reason_(std::move(reason)),
      timedOut_(timedOut) {}

ListenError::ListenError(std::string endpoint, std::string reason)
    : Error(fmt::format("cannot listen on {}: {}", endpoint, reason), ExitCode::kAddressInUse),
      endpoint_(std::move(endpoint)),
      reason_(std::move(reason)) {}

Socket connect(const HostPort& to, const Deadline& deadline, const ConnectOptions& options) {
  const std::string endpoint = to.str();
  const std::string service = std::to_string(to.port);
  Millis backoff = std::max(options.initialBackoff, Millis(1));
  int attempts = 0;
  int lastErr = 0;
  std::string reason = "no address to try";
  for (;;) {
    ++attempts;
    bool transient = false;
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    addrinfo* res = nullptr;
    int rc = ::getaddrinfo(to.host.c_str(), service.c_str(), &hints, &res);
    if (rc != 0) {
      lastErr = rc == EAI_SYSTEM ? errno : 0;
      reason = rc == EAI_SYSTEM ? std::strerror(lastErr) : ::gai_strerror(rc);
      transient = rc == EAI_AGAIN || rc == EAI_NONAME || (rc == EAI_SYSTEM && transientErrno(lastErr));
    } else {
      int left = 0;
      for (auto* ai = res; ai != nullptr; ai = ai->ai_next) ++left;
      for (auto* ai = res; ai != nullptr; ai = ai->ai_next, --left) {
        Socket s;
        int err = connectOne(*ai, deadline.remaining() / left, s);
        if (err == 0) {
          ::freeaddrinfo(res);
          if (!options.nonBlocking) {
            int flags = DTRAIN_SYSCALL(::fcntl(s.fd(), F_GETFL));
            DTRAIN_SYSCALL(::fcntl(s.fd(), F_SETFL, flags & ~O_NONBLOCK));
          }
          if (options.noDelay) {
            int one = 1;
            ::setsockopt(s.fd(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
          }
          return s;
        }
        lastErr = err;
        reason = std::strerror(err);
        transient = transient || transientErrno(err);
      }
      ::freeaddrinfo(res);
    }
    if (!transient) throw ConnectError(endpoint, attempts, lastErr, reason, false);
    if (deadline.expired() || !options.retry)
      throw ConnectError(endpoint, attempts, lastErr, reason, deadline.expired());
    std::this_thread::sleep_for(std::min(backoff, deadline.remaining()));
    backoff = std::min(backoff * 2, std::max(options.maxBackoff, Millis(1)));
  }
}

Listener listen(const std::string& host, uint16_t port, const ListenOptions& options) {
  const std::string where = HostPort{host, port}.str();
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  auto service = std::to_string(port);
  int rc = ::getaddrinfo(host.empty() ? nullptr : host.c_str(), service.c_str(), &hints, &res);
  if (rc != 0)
    throw ListenError(where, ::gai_strerror(rc));
  int lastErr = EADDRNOTAVAIL;
  Listener out;
  for (auto* ai = res; ai != nullptr && !out.socket.valid(); ai = ai->ai_next) {
    Socket s(::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | (options.nonBlocking ? SOCK_NONBLOCK : 0),
                      ai->ai_protocol));
    if (!s.valid()) {
      lastErr = errno;
      continue;
    }
    if (options.reuseAddress) {
      // Lets a restarted server reuse a port in TIME_WAIT; Linux still refuses a second listener.
      int one = 1;
      ::setsockopt(s.fd(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    }
    if (::bind(s.fd(), ai->ai_addr, ai->ai_addrlen) != 0 || ::listen(s.fd(), options.backlog) != 0) {
      lastErr = errno;
      continue;
    }
    out.socket = std::move(s);
    out.family = ai->ai_family;
  }
  ::freeaddrinfo(res);
  if (!out.socket.valid())
    throw ListenError(where, std::strerror(lastErr));
  out.port = localPort(out.socket.fd());
  return out;
}

uint16_t localPort(int fd) {
  sockaddr_storage addr{};
  socklen_t len = sizeof(addr);
  DTRAIN_SYSCALL(::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len));
  if (addr.ss_family == AF_INET6) return ntohs(reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port);
  return ntohs(reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
}

bool sendAll(int fd, const void* bytes, size_t size) {
  const char* p = static_cast<const char*>(bytes);
  while (size > 0) {
    ssize_t n = ::send(fd, p, size, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

bool recvAll(int fd, void* bytes, size_t size, const Deadline& deadline) {
  char* p = static_cast<char*>(bytes);
  while (size > 0) {
    pollfd pfd{fd, POLLIN, 0};
    const auto left = deadline.remaining();
    const int waitMs = static_cast<int>(std::min<Millis::rep>(left.count(), 1000 * 60));
    int ready = ::poll(&pfd, 1, waitMs);
    if (ready < 0 && errno == EINTR) continue;
    if (ready < 0) return false;
    if (ready == 0) {
      if (deadline.expired()) {
        errno = ETIMEDOUT;
        return false;
      }
      continue;
    }
    ssize_t n = ::recv(fd, p, size, 0);
    if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) continue;
    if (n < 0) return false;
    if (n == 0) {
      errno = 0;
      return false;
    }
    p += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

}  // namespace dtrain::net
