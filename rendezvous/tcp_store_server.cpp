#include "rendezvous/tcp_store_server.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <boost/asio/post.hpp>

#include <algorithm>
#include <cstring>
#include <limits>

#include "lib/common/error.h"
#include "lib/common/log.h"
#include "lib/common/net.h"
#include "lib/common/socket.h"
#include "rendezvous/tcp_store_session.h"

namespace dtrain::rendezvous {

namespace {

// Bound hint for the first retry after accept() ran out of descriptors: the backlog keeps the clients waiting.
constexpr auto kAcceptRetry = std::chrono::milliseconds(50);

std::string hostPortText(const std::string& host, uint16_t port) { return net::HostPort{host, port}.str(); }

}  // namespace

size_t connectionCapFor(uint64_t fileLimit) {
  if (fileLimit == 0 || fileLimit == RLIM_INFINITY) return std::numeric_limits<size_t>::max();
  const uint64_t reserve = std::clamp<uint64_t>(fileLimit / 8, 16, 1024);
  return static_cast<size_t>(fileLimit > 2 * reserve ? fileLimit - reserve : fileLimit / 2);
}

uint64_t raiseFileLimit() {
  rlimit lim{};
  if (::getrlimit(RLIMIT_NOFILE, &lim) != 0) return 0;
  if (lim.rlim_cur < lim.rlim_max) {
    rlimit raised = lim;
    raised.rlim_cur = lim.rlim_max;
    if (::setrlimit(RLIMIT_NOFILE, &raised) == 0) return raised.rlim_cur;
  }
  return lim.rlim_cur;
}

// ---------------------------------------------------------------------------------------------------------
// Impl

TcpStoreServer::Impl::Impl(const TcpStoreServerOptions& options)
    : limits_(options.limits),
      token_(options.token),
      state_(StoreState::Quota{options.limits.maxKeys, options.limits.maxStoredBytes}),
      host_(options.host) {
  DTRAIN_CHECK(limits_.maxBufferedBytes >= proto::kMaxFrameBytes + (64 << 10),
               "store: the buffer budget of {} bytes is below one maximal frame ({} bytes)", limits_.maxBufferedBytes,
               proto::kMaxFrameBytes);
  auto limit = raiseFileLimit();
  if (limit < 1100)
    log::warn("store: the open-file limit is {}; fewer than 512 clients may be able to connect (ulimit -n)",
              limit);
  connectionCap_ = limits_.maxConnections;
  capReason_ = "(max-connections)";
  if (auto cap = connectionCapFor(limit); cap < connectionCap_) {
    connectionCap_ = cap;
    capReason_ = fmt::format("(the open-file limit {} less {} descriptors kept for the rest of the process)", limit,
                             limit - cap);
    log::debug("store: at most {} connections {}", cap, capReason_);
  }
  // The listening socket is created by lib/common (Asio 1.74 opens sockets without SOCK_CLOEXEC, and the
  // agent forks); throws kAddressInUse naming host:port.
  auto listener = net::listen(options.host, options.port, {.backlog = options.backlog, .nonBlocking = true});
  port_ = listener.port;
  boost::system::error_code ec;
  v6_ = listener.family == AF_INET6;
  acceptor_.assign(v6_ ? asio::ip::tcp::v6() : asio::ip::tcp::v4(), listener.socket.fd(), ec);
  if (ec) DTRAIN_THROW(Error, "store: cannot register the listening socket: {}", ec.message());
  listener.socket.release();  // the acceptor owns it now
  armAccept();
  auto shortest = std::chrono::milliseconds::max();
  for (auto t : {limits_.handshakeTimeout, limits_.idleTimeout})
    if (t.count() > 0) shortest = std::min(shortest, t);
  if (shortest != std::chrono::milliseconds::max()) {
    sweepEvery_ = std::clamp(shortest / 4, std::chrono::milliseconds(10), std::chrono::milliseconds(1000));
    armSweep();
  }
  // The io thread inherits a fully blocked signal mask, so signals meant for the embedding process (SIGCHLD,
  // SIGTERM in the agent) are never delivered to it.
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  try {
    thread_ = std::thread([this] { run(); });
  } catch (...) {
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
    throw;
  }
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
}

TcpStoreServer::Impl::~Impl() { stop(); }

void TcpStoreServer::Impl::run() {
  pthread_setname_np(pthread_self(), "dtrain-store");
  for (;;) {
    try {
      io_.run();
      return;
    } catch (const std::exception& e) {
      // A handler threw something unexpected (e.g. bad_alloc on a huge frame): keep serving everyone else.
      log::error("store: internal error in the io thread: {}", e.what());
    }
  }
}

void TcpStoreServer::Impl::stop() {
  std::lock_guard<std::mutex> lock(stopMu_);
  if (!thread_.joinable()) return;
  asio::post(io_, [this] {
    shutdownAll();
    io_.stop();
  });
  thread_.join();
}

void TcpStoreServer::Impl::shutdownAll() {
  boost::system::error_code ec;
  acceptor_.close(ec);
  acceptRetry_.cancel();
  sweepTimer_.cancel();
  auto sessions = sessions_;  // close() removes from the registry
  for (auto& [ptr, session] : sessions) session->close();
}

void TcpStoreServer::Impl::removeSession(Session* session) {
  if (sessions_.erase(session) > 0) open_.fetch_sub(1, std::memory_order_relaxed);
}

void TcpStoreServer::Impl::adjustBuffered(size_t before, size_t after) {
  buffered_ = buffered_ - before + after;
  bufferedStat_.store(buffered_, std::memory_order_relaxed);
  if (after < before && !waitingForBudget_.empty()) {
    // Wake every waiter from a fresh handler; those that still do not fit wait again.
    auto waiting = std::move(waitingForBudget_);
    waitingForBudget_.clear();
    asio::post(io_, [waiting = std::move(waiting)] {
      for (const auto& w : waiting)
        if (auto s = w.lock()) s->resume();
    });
  }
}

void TcpStoreServer::Impl::waitForBudget(std::shared_ptr<Session> session) {
  waitingForBudget_.push_back(std::move(session));
}

void TcpStoreServer::Impl::armSweep() {
  sweepTimer_.expires_after(sweepEvery_);
  sweepTimer_.async_wait([this](const boost::system::error_code& ec) {
    if (ec) return;
    sweep();
    armSweep();
  });
}

void TcpStoreServer::Impl::sweep() {
  auto now = std::chrono::steady_clock::now();
  std::vector<std::pair<std::shared_ptr<Session>, const char*>> expired;
  for (auto& [ptr, session] : sessions_)
    if (const char* why = session->expired(now, limits_)) expired.emplace_back(session, why);
  for (auto& [session, why] : expired) {
    log::debug("store: closing a connection: {}", why);
    timedOut_.fetch_add(1, std::memory_order_relaxed);
    session->close();
  }
}

void TcpStoreServer::Impl::armAccept() {
  acceptor_.async_wait(asio::ip::tcp::acceptor::wait_read, [this](const boost::system::error_code& ec) {
    if (ec) return;  // closed by stop()
    acceptReady();
  });
}

// Accepts every pending connection with accept4(SOCK_CLOEXEC) and hands each to Asio.
void TcpStoreServer::Impl::acceptReady() {
  const int listenFd = acceptor_.native_handle();
  for (;;) {
    int fd = ::accept4(listenFd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) {
      int err = errno;
      if (err == EINTR || err == ECONNABORTED) continue;
      if (err == EAGAIN || err == EWOULDBLOCK) break;
      // Out of descriptors or memory: leave the clients in the backlog and try again shortly, instead of
      // spinning on a listening socket that stays readable.
      // Once per streak: a store at its descriptor limit would otherwise log every retry.
      if (!acceptFailing_)
        log::warn("store: cannot accept more connections ({}, {} open); retrying every {} ms",
                  std::strerror(err), open_.load(std::memory_order_relaxed), kAcceptRetry.count());
      acceptFailing_ = true;
      acceptRetry_.expires_after(kAcceptRetry);
      acceptRetry_.async_wait([this](const boost::system::error_code& e) {
        if (!e) armAccept();
      });
      return;
    }
    if (acceptFailing_) {
      log::info("store: accepting connections again");
      acceptFailing_ = false;
    }
    if (sessions_.size() >= connectionCap_) {
      // Accepted and closed at once: the client learns immediately instead of waiting in the backlog, and the
      // process keeps descriptors for everything else it does.
      if (!refusing_)
        log::warn("store: refusing connections: {} are open, the limit is {} {}", sessions_.size(), connectionCap_,
                  capReason_);
      refusing_ = true;
      refused_.fetch_add(1, std::memory_order_relaxed);
      ::close(fd);
      continue;
    }
    refusing_ = false;
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    asio::ip::tcp::socket socket(io_);
    boost::system::error_code ec;
    socket.assign(v6_ ? asio::ip::tcp::v6() : asio::ip::tcp::v4(), fd, ec);
    if (ec) {
      log::warn("store: cannot register an accepted connection: {}", ec.message());
      ::close(fd);
      continue;
    }
    auto session = std::make_shared<Session>(std::move(socket), *this);
    sessions_.emplace(session.get(), session);
    accepted_.fetch_add(1, std::memory_order_relaxed);
    open_.fetch_add(1, std::memory_order_relaxed);
    session->start();
  }
  armAccept();
}

// ---------------------------------------------------------------------------------------------------------
// TcpStoreServer

TcpStoreServer::TcpStoreServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

std::unique_ptr<TcpStoreServer> TcpStoreServer::start(const TcpStoreServerOptions& options) {
  auto impl = std::make_unique<Impl>(options);
  log::debug("store: listening on {}", hostPortText(impl->host_, impl->port_));
  return std::unique_ptr<TcpStoreServer>(new TcpStoreServer(std::move(impl)));
}

TcpStoreServer::~TcpStoreServer() { stop(); }

void TcpStoreServer::stop() { impl_->stop(); }

uint16_t TcpStoreServer::port() const { return impl_->port_; }

const std::string& TcpStoreServer::host() const { return impl_->host_; }

std::string TcpStoreServer::address() const { return hostPortText(impl_->host_, impl_->port_); }

TcpStoreServerStats TcpStoreServer::stats() const {
  TcpStoreServerStats s;
  s.connectionsAccepted = impl_->accepted_.load(std::memory_order_relaxed);
  s.connectionsOpen = impl_->open_.load(std::memory_order_relaxed);
  s.requests = impl_->requests_.load(std::memory_order_relaxed);
  s.replyWrites = impl_->replyWrites_.load(std::memory_order_relaxed);
  s.protocolErrors = impl_->protocolErrors_.load(std::memory_order_relaxed);
  s.waiters = impl_->waiters_.load(std::memory_order_relaxed);
  s.bufferedBytes = impl_->bufferedStat_.load(std::memory_order_relaxed);
  s.connectionsRefused = impl_->refused_.load(std::memory_order_relaxed);
  s.connectionsTimedOut = impl_->timedOut_.load(std::memory_order_relaxed);
  s.authFailures = impl_->authFailures_.load(std::memory_order_relaxed);
  s.keys = impl_->keysStat_.load(std::memory_order_relaxed);
  s.storedBytes = impl_->storedStat_.load(std::memory_order_relaxed);
  return s;
}

}  // namespace dtrain::rendezvous
