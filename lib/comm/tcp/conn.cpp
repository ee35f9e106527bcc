#include "lib/comm/tcp/conn.h"

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "lib/common/error.h"
#include "lib/common/parse.h"

namespace dtrain::comm::tcp {

Conn::Conn(int fd, int peer) : fd_(fd), peer_(peer) {}

Conn::~Conn() {
  if (fd_ >= 0) ::close(fd_);
}

namespace {

[[noreturn]] void lost(int peer, int err) {
  if (err == 0)
    DTRAIN_THROW(CommError, "rank {} closed its connection (the process exited or crashed)", peer);
  DTRAIN_THROW(CommError, "connection to rank {} failed: {} (the process exited or crashed?)", peer,
               std::strerror(err));
}

}  // namespace

std::chrono::microseconds linkDelay() {
  static const std::chrono::microseconds delay = [] {
    const char* text = std::getenv("DTRAIN_LINK_DELAY");
    if (text == nullptr || *text == '\0') return std::chrono::microseconds(0);
    auto d = parse::toDuration(text);
    DTRAIN_CHECK_AS(UsageError, d.has_value() && d->count() >= 0, "DTRAIN_LINK_DELAY='{}': expected {}", text,
                    parse::kDurationExpected);
    return std::chrono::duration_cast<std::chrono::microseconds>(*d);
  }();
  return delay;
}

size_t Conn::sendSome(const void* buf, size_t len) {
  for (;;) {
    ssize_t n = ::send(fd_, buf, len, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n >= 0) return static_cast<size_t>(n);
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
    lost(peer_, errno);
  }
}

size_t Conn::recvSome(void* buf, size_t len) {
  for (;;) {
    ssize_t n = ::recv(fd_, buf, len, MSG_DONTWAIT);
    if (n > 0) return static_cast<size_t>(n);
    if (n == 0) lost(peer_, 0);
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
    lost(peer_, errno);
  }
}

void Waiter::wait(Conn& a, bool aRead, bool aWrite, Conn* b, bool bRead, bool bWrite, Clock::time_point wakeBy) {
  const bool timed = wakeBy != Clock::time_point::max();
  if (!aRead && !aWrite && !(b != nullptr && (bRead || bWrite))) {
    // Nothing to wait for but a held send's release time.
    if (timed) std::this_thread::sleep_until(std::min(wakeBy, Clock::now() + deadline_.remaining()));
    if (deadline_.expired())
      DTRAIN_THROW(CommError, "timed out after {} ms waiting to send to rank {}", timeout_.count(), a.peer());
    return;
  }
  pollfd fds[2];
  int n = 0;
  auto events = [](bool r, bool w) { return static_cast<short>((r ? POLLIN : 0) | (w ? POLLOUT : 0)); };
  fds[n++] = pollfd{a.fd(), events(aRead, aWrite), 0};
  if (b != nullptr && (bRead || bWrite)) {
    if (b == &a) {
      fds[0].events = static_cast<short>(fds[0].events | events(bRead, bWrite));
    } else {
      fds[n++] = pollfd{b->fd(), events(bRead, bWrite), 0};
    }
  }
  // The rank we are waiting for, for the timeout message: the one we read from when we read at all.
  const int waitedFor = aRead || b == nullptr || !(bRead || bWrite) ? a.peer() : b->peer();
  const auto spinUntil = Clock::now() + spin_;
  bool spinning = spin_.count() > 0;
  for (;;) {
    int timeoutMs = 0;
    if (!spinning) {
      auto left = deadline_.remaining();
      if (timed) {
        if (Clock::now() >= wakeBy) return;
        left = std::min(left, std::chrono::ceil<std::chrono::milliseconds>(wakeBy - Clock::now()));
      }
      // Round up so a wait never returns early just before the deadline and spins.
      timeoutMs = left == std::chrono::milliseconds::max() ? -1 : static_cast<int>(left.count()) + 1;
    }
    int rc = ::poll(fds, static_cast<nfds_t>(n), timeoutMs);
    if (rc < 0) {
      if (errno == EINTR) continue;
      DTRAIN_THROW(CommError, "poll failed: {}", std::strerror(errno));
    }
    if (rc > 0) {
      for (int i = 0; i < n; ++i) {
        // POLLERR/POLLHUP: let the next recv/send report the error with its errno.
        if (fds[i].revents != 0) return;
      }
    }
    if (spinning) {
      if (Clock::now() >= spinUntil) spinning = false;
      continue;
    }
    if (timed && Clock::now() >= wakeBy) return;
    if (deadline_.expired())
      DTRAIN_THROW(CommError, "timed out after {} ms waiting for rank {} (stalled or hung peer)", timeout_.count(),
                   waitedFor);
  }
}

void sendAll(Conn& to, const void* buf, size_t len, Waiter& waiter) {
  const auto* p = static_cast<const char*>(buf);
  size_t done = 0;
  if (linkDelay().count() > 0) waiter.wait(to, false, false, nullptr, false, false, Clock::now() + linkDelay());
  while (done < len) {
    size_t n = to.sendSome(p + done, len - done);
    if (n == 0) {
      waiter.wait(to, false, true);
      continue;
    }
    done += n;
  }
}

void recvAll(Conn& from, void* buf, size_t len, Waiter& waiter) {
  auto* p = static_cast<char*>(buf);
  size_t done = 0;
  while (done < len) {
    size_t n = from.recvSome(p + done, len - done);
    if (n == 0) {
      waiter.wait(from, true, false);
      continue;
    }
    done += n;
  }
}

void exchange(Conn& to, const void* sbuf, size_t slen, Conn& from, void* rbuf, size_t rlen, Waiter& waiter) {
  const auto* sp = static_cast<const char*>(sbuf);
  auto* rp = static_cast<char*>(rbuf);
  size_t sent = 0, got = 0;
  // A simulated link latency holds the send (linkDelay); the receive goes on meanwhile.
  const bool held = linkDelay().count() > 0 && slen > 0;
  const auto sendAt = held ? Clock::now() + linkDelay() : Clock::time_point::min();
  while (sent < slen || got < rlen) {
    bool moved = false;
    bool wantWrite = false, wantRead = false;
    const bool holding = held && sent == 0 && Clock::now() < sendAt;
    if (sent < slen && !holding) {
      size_t n = to.sendSome(sp + sent, slen - sent);
      sent += n;
      moved |= n > 0;
      wantWrite = sent < slen && n == 0;
    }
    if (got < rlen) {
      size_t n = from.recvSome(rp + got, rlen - got);
      got += n;
      moved |= n > 0;
      wantRead = got < rlen && n == 0;
    }
    if (!moved) waiter.wait(from, wantRead, false, &to, false, wantWrite, holding ? sendAt : Clock::time_point::max());
  }
}

}  // namespace dtrain::comm::tcp
