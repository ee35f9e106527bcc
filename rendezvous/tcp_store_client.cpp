#include "rendezvous/tcp_store_client.h"

#include "rendezvous/etcd_store.h"

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "lib/common/error.h"
#include "lib/common/net.h"
#include "lib/common/socket.h"
#include "rendezvous/tcp_store_client_internal.h"

namespace dtrain::rendezvous {

using proto::Op;
using proto::Status;
using client_detail::capWait;
using client_detail::kServerGrace;
using client_detail::unexpected;

namespace {

constexpr size_t kRecvBuffer = 16 * 1024;
constexpr size_t kKeepBuffer = 1 << 20;

int pollOne(int fd, short events, Millis timeout) {
  pollfd p{fd, events, 0};
  auto ms = static_cast<int>(std::min<Millis::rep>(timeout.count(), 1 << 30));
  for (;;) {
    int rc = ::poll(&p, 1, ms);
    if (rc >= 0 || errno != EINTR) return rc;
  }
}

// Printable rendering of what a non-store peer answered, for the error message.
std::string describeBytes(std::string_view bytes) {
  std::string out;
  for (unsigned char c : bytes) out += (c >= 0x20 && c < 0x7f) ? std::string(1, static_cast<char>(c)) : fmt::format("\\x{:02x}", c);
  return out;
}

}  // namespace

TcpStoreClient::TcpStoreClient(const TcpStoreClientOptions& options)
    : options_(options), address_(net::HostPort{options.host, options.port}.str()), in_(kRecvBuffer, '\0') {
  timeout_ = options.timeout;
  if (!options_.token) {
    const char* env = std::getenv(proto::kTokenEnv);
    options_.token = env != nullptr ? std::string(env) : std::string();
  }
}

TcpStoreClient::~TcpStoreClient() {
  if (fd_ >= 0) ::close(fd_);
}

std::shared_ptr<TcpStoreClient> TcpStoreClient::connect(const TcpStoreClientOptions& options) {
  std::shared_ptr<TcpStoreClient> client(new TcpStoreClient(options));
  client->openConnection();
  return client;
}

std::shared_ptr<Store> TcpStoreClient::clone() {
  auto options = options_;
  options.timeout = timeout_;
  return connect(options);
}

// Connects with exponential backoff until connectTimeout: the store may not be up yet (another node hosts
// it, or the agent that hosts it is still starting), which is normal during a launch.
void TcpStoreClient::openConnection() {
  Deadline deadline(options_.connectTimeout);
  net::ConnectOptions connectOptions;
  connectOptions.initialBackoff = options_.initialBackoff;
  connectOptions.maxBackoff = options_.maxBackoff;
  connectOptions.retry = options_.retry;
  net::Socket socket;
  try {
    socket = net::connect(net::HostPort{options_.host, options_.port}, deadline, connectOptions);
  } catch (const net::ConnectError& e) {
    if (e.timedOut())
      DTRAIN_THROW(RendezvousError, "cannot connect to the store at {} within {} ms ({} attempts): {}", address_,
                   options_.connectTimeout.count(), e.attempts(), e.reason());
    DTRAIN_THROW(RendezvousError, "cannot connect to the store at {}: {}", address_, e.reason());
  }
  handshake(socket.fd(), deadline);
  fd_ = socket.release();
}

void TcpStoreClient::handshake(int fd, const Deadline& deadline) {
  std::string hello;
  proto::putHandshake(hello);
  if (::send(fd, hello.data(), hello.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(hello.size()))
    DTRAIN_THROW(RendezvousError, "cannot send the handshake to the store at {}: {}", address_, std::strerror(errno));
  char reply[proto::kHandshakeReplyBytes];
  size_t have = 0;
  while (have < sizeof(reply)) {
    int ready = pollOne(fd, POLLIN, deadline.remaining());
    if (ready == 0)
      DTRAIN_THROW(ProtocolError,
                   "{} accepted the connection but did not answer the dtrain store handshake within {} ms: "
                   "not a dtrain store, or a store out of file descriptors (see its log)",
                   address_, options_.connectTimeout.count());
    ssize_t n = ::recv(fd, reply + have, sizeof(reply) - have, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      if (have > 0 && std::string_view(reply, std::min(have, proto::kMagic.size())) !=
                          proto::kMagic.substr(0, std::min(have, proto::kMagic.size())))
        break;  // diagnosed below as not a store
      DTRAIN_THROW(ProtocolError, "{} closed the connection during the store handshake{}: not a dtrain store, "
                   "or it is shutting down", address_, n < 0 ? fmt::format(" ({})", std::strerror(errno)) : "");
    }
    have += static_cast<size_t>(n);
  }
  std::string_view got(reply, have);
  if (have < sizeof(reply) || got.substr(0, proto::kMagic.size()) != proto::kMagic)
    DTRAIN_THROW(ProtocolError, "{} is not a dtrain store (it answered the handshake with \"{}\")", address_,
                 describeBytes(got));
  ByteReader r(got.substr(proto::kMagic.size()));
  auto version = r.get<uint16_t>();
  auto status = static_cast<proto::HandshakeStatus>(r.get<uint8_t>());
  if (status == proto::HandshakeStatus::kOk) return;
  if (status == proto::HandshakeStatus::kAuthRequired) {
    authenticate(fd, deadline);
    return;
  }
  if (status == proto::HandshakeStatus::kBadVersion)
    DTRAIN_THROW(ProtocolError, "store at {} speaks protocol v{}, this dtrain speaks v{}", address_, version,
                 proto::kVersion);
  DTRAIN_THROW(ProtocolError, "store at {} (protocol v{}) rejected the handshake (status {})", address_, version,
               static_cast<int>(status));
}

// Answers the store's challenge: reads its nonce, sends the digest, reads the verdict.
void TcpStoreClient::authenticate(int fd, const Deadline& deadline) {
  auto recvExactly = [&](size_t n, const char* what) {
    std::string got(n, '\0');
    size_t have = 0;
    while (have < n) {
      int ready = pollOne(fd, POLLIN, deadline.remaining());
      if (ready == 0)
        DTRAIN_THROW(RendezvousError, "the store at {} did not send its {} within {} ms", address_, what,
                     options_.connectTimeout.count());
      ssize_t r = ::recv(fd, got.data() + have, n - have, 0);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) return std::string();
      have += static_cast<size_t>(r);
    }
    return got;
  };
  auto nonce = recvExactly(proto::kNonceBytes, "authentication challenge");
  if (nonce.empty()) DTRAIN_THROW(RendezvousError, "the store at {} closed the connection during authentication", address_);
  if (options_.token->empty())
    DTRAIN_THROW(StoreAuthError,
                 "the store at {} requires a rendezvous token and none was given: pass the store's token with "
                 "--rdzv-token (or --rdzv-token-file, or the environment variable {})",
                 address_, proto::kTokenEnv);
  auto digest = proto::authDigest(*options_.token, nonce);
  if (::send(fd, digest.data(), digest.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(digest.size()))
    DTRAIN_THROW(RendezvousError, "cannot authenticate to the store at {}: {}", address_, std::strerror(errno));
  auto verdict = recvExactly(1, "authentication verdict");
  if (verdict.size() == 1 && verdict[0] == static_cast<char>(proto::HandshakeStatus::kOk)) return;
  DTRAIN_THROW(StoreAuthError,
               "the store at {} refused the rendezvous token: --rdzv-token (or --rdzv-token-file, {}) differs "
               "from the store's",
               address_, proto::kTokenEnv);
}

// ---------------------------------------------------------------------------------------------------------
// Framing

void TcpStoreClient::checkUsable() const {
  if (!broken_.empty())
    DTRAIN_THROW(NetworkError, "the connection to the store at {} is unusable after an earlier error ({})",
                 address_, broken_);
}

void TcpStoreClient::fail(const std::string& what, int err) {
  broken_ = err != 0 ? fmt::format("{}: {}", what, std::strerror(err)) : what;
  ::close(fd_);
  fd_ = -1;
  DTRAIN_THROW(NetworkError, "lost the connection to the store at {}: {}", address_, broken_);
}

void TcpStoreClient::begin(Op op) {
  checkUsable();
  out_.clear();
  frameStart_ = proto::beginFrame(out_);
  out_.push_back(static_cast<char>(op));
}

void TcpStoreClient::setRecvTimeout(Millis t) {
  t = std::max(t, Millis(1));  // 0 would mean "forever" to the kernel
  if (t == recvTimeout_) return;
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(t.count() / 1000);
  tv.tv_usec = static_cast<suseconds_t>((t.count() % 1000) * 1000);
  DTRAIN_SYSCALL(::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)));
  recvTimeout_ = t;
}

void TcpStoreClient::sendAll(const Deadline& deadline) {
  size_t off = 0;
  while (off < out_.size()) {
    ssize_t n = ::send(fd_, out_.data() + off, out_.size() - off, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      off += static_cast<size_t>(n);
      continue;
    }
    int err = errno;
    if (err == EINTR) continue;
    if (err != EAGAIN && err != EWOULDBLOCK) fail("send failed", err);
    if (pollOne(fd_, POLLOUT, deadline.remaining()) == 0) fail("send timed out (the store does not read)", 0);
  }
}

// One receive into in_[have, in_.size()): returns the bytes read (> 0). The receive timeout is `recvTimeout`
// (a call's usual timeout is already set: no syscall), then what is left of `deadline` for retries. The one place
// a receive fails: the store closed the connection or the receive failed (NetworkError), or the deadline passed
// (TimeoutError naming `waited`); each leaves the connection unusable, since it is out of step with the server.
size_t TcpStoreClient::recvSome(size_t have, Millis recvTimeout, Millis waited, const Deadline& deadline) {
  for (bool first = true;; first = false) {
    setRecvTimeout(first ? recvTimeout : deadline.remaining());
    ssize_t n = ::recv(fd_, in_.data() + have, in_.size() - have, 0);
    if (n > 0) return static_cast<size_t>(n);
    if (n == 0) fail("the store closed the connection", 0);
    int err = errno;
    if (err == EINTR) continue;
    if (err != EAGAIN && err != EWOULDBLOCK) fail("receive failed", err);
    if (deadline.expired()) {
      broken_ = fmt::format("no reply within {} ms", waited.count());
      ::close(fd_);
      fd_ = -1;
      DTRAIN_THROW(TimeoutError, "the store at {} did not answer within {} ms", address_, waited.count());
    }
  }
}

// Reads `count` reply frames, in order, into in_ and hands each to onReply(i, status, fields). Replies arrive as
// one byte stream: several frames may come in one receive, a frame may span several. The first receive waits up
// to `readTimeout`, the whole read up to `deadline`.
void TcpStoreClient::readReplies(size_t count, Millis readTimeout, const Deadline& deadline, const OnReply& onReply) {
  if (in_.size() > kKeepBuffer) std::string(kRecvBuffer, '\0').swap(in_);
  size_t have = 0, pos = 0;
  bool first = true;
  for (size_t i = 0; i < count;) {
    while (i < count && have - pos >= proto::kFrameHeaderBytes) {
      uint32_t len = 0;
      std::memcpy(&len, in_.data() + pos, sizeof(len));
      if (len == 0 || len > proto::kMaxFrameBytes) fail(fmt::format("reply frame of {} bytes is invalid", len), 0);
      if (have - pos < proto::kFrameHeaderBytes + len) {
        if (in_.size() < pos + proto::kFrameHeaderBytes + len) in_.resize(pos + proto::kFrameHeaderBytes + len);
        break;
      }
      auto status = static_cast<Status>(in_[pos + proto::kFrameHeaderBytes]);
      onReply(i, status, std::string_view(in_.data() + pos + proto::kFrameHeaderBytes + 1, len - 1));
      pos += proto::kFrameHeaderBytes + len;
      ++i;
    }
    if (i == count) break;
    if (pos > 0) {  // keep the partial frame at the front
      std::memmove(in_.data(), in_.data() + pos, have - pos);
      have -= pos;
      pos = 0;
    }
    if (have == in_.size()) in_.resize(in_.size() * 2);
    have += recvSome(have, first ? readTimeout : deadline.remaining(), readTimeout, deadline);
    first = false;
  }
  // The server answers each request with exactly one frame, so anything more is a broken peer.
  if (pos != have) fail("the store sent more replies than requests", 0);
}

Status TcpStoreClient::exchange(Op op, Millis readTimeout, std::string_view key) {
  proto::finishFrame(out_, frameStart_);
  Deadline deadline(readTimeout);
  Status status = Status::kOk;
  try {
    sendAll(deadline);
    readReplies(1, readTimeout, deadline, [&](size_t, Status s, std::string_view fields) {
      status = s;
      reply_ = fields;  // a view into in_, valid until the next call
    });
  } catch (Error& e) {
    // Name the call that failed: "... (during get('k'))".
    auto message = key.empty() ? fmt::format("{} (during {})", e.what(), proto::opName(op))
                               : fmt::format("{} (during {}('{}'))", e.what(), proto::opName(op), key);
    if (dynamic_cast<TimeoutError*>(&e)) DTRAIN_THROW(TimeoutError, "{}", message);
    DTRAIN_THROW(NetworkError, "{}", message);
  }
  roundTrips_.fetch_add(1, std::memory_order_relaxed);
  if (status == Status::kError) throwReplyError(op, key);
  return status;
}

void TcpStoreClient::throwReplyError(Op op, std::string_view key) {
  ByteReader r(reply_);
  auto message = r.getBytes();
  if (message.starts_with("protocol violation"))
    DTRAIN_THROW(ProtocolError, "store at {} refused {}('{}'): {}", address_, proto::opName(op), key, message);
  DTRAIN_THROW(Error, "{}", message);
}

// ---------------------------------------------------------------------------------------------------------
// Store operations: each builds its request (fields as in the dispatcher table of tcp_store_session.cpp),
// exchanges it, and decodes the reply while holding mu_ (reply_ points into in_). The pipelined ones (multiSet,
// multiGet, batch) are in tcp_store_client_batch.cpp.

void TcpStoreClient::set(std::string_view key, std::string_view value) {
  checkKey(key);
  checkValue(value);
  std::lock_guard<std::mutex> lock(mu_);
  begin(Op::kSet);
  ByteWriter w(out_);
  w.putBytes(key);
  w.putBytes(value);
  auto status = exchange(Op::kSet, timeout_, key);
  if (status != Status::kOk) unexpected(address_, Op::kSet, status);
}

std::string TcpStoreClient::get(std::string_view key, Millis timeout) {
  checkKey(key);
  timeout = capWait(timeout);
  std::lock_guard<std::mutex> lock(mu_);
  begin(Op::kGet);
  ByteWriter w(out_);
  w.putBytes(key);
  w.put<uint64_t>(static_cast<uint64_t>(timeout.count()));
  auto status = exchange(Op::kGet, timeout + kServerGrace, key);
  if (status == Status::kTimeout)
    DTRAIN_THROW(TimeoutError, "store get('{}') timed out after {} ms (store at {})", key, timeout.count(), address_);
  if (status != Status::kOk) unexpected(address_, Op::kGet, status);
  ByteReader r(reply_);
  return std::string(r.getBytes());
}

std::optional<std::string> TcpStoreClient::tryGet(std::string_view key) {
  checkKey(key);
  std::lock_guard<std::mutex> lock(mu_);
  begin(Op::kTryGet);
  ByteWriter(out_).putBytes(key);
  auto status = exchange(Op::kTryGet, timeout_, key);
  if (status == Status::kNotFound) return std::nullopt;
  if (status != Status::kOk) unexpected(address_, Op::kTryGet, status);
  ByteReader r(reply_);
  return std::string(r.getBytes());
}

int64_t TcpStoreClient::add(std::string_view key, int64_t delta) {
  checkKey(key);
  std::lock_guard<std::mutex> lock(mu_);
  begin(Op::kAdd);
  ByteWriter w(out_);
  w.putBytes(key);
  w.put<int64_t>(delta);
  auto status = exchange(Op::kAdd, timeout_, key);
  if (status != Status::kOk) unexpected(address_, Op::kAdd, status);
  return ByteReader(reply_).get<int64_t>();
}

std::string TcpStoreClient::compareSet(std::string_view key, std::string_view expected, std::string_view desired) {
  checkKey(key);
  checkValue(expected);
  checkValue(desired);
  std::lock_guard<std::mutex> lock(mu_);
  begin(Op::kCompareSet);
  ByteWriter w(out_);
  w.putBytes(key);
  w.putBytes(expected);
  w.putBytes(desired);
  auto status = exchange(Op::kCompareSet, timeout_, key);
  if (status != Status::kOk) unexpected(address_, Op::kCompareSet, status);
  ByteReader r(reply_);
  return std::string(r.getBytes());
}

bool TcpStoreClient::wait(const std::vector<std::string>& keys, Millis timeout) {
  for (const auto& k : keys) checkKey(k);
  timeout = capWait(timeout);
  std::lock_guard<std::mutex> lock(mu_);
  begin(Op::kWait);
  ByteWriter w(out_);
  w.put<uint32_t>(static_cast<uint32_t>(keys.size()));
  for (const auto& k : keys) w.putBytes(k);
  w.put<uint64_t>(static_cast<uint64_t>(timeout.count()));
  auto status = exchange(Op::kWait, timeout + kServerGrace, keys.empty() ? std::string_view() : keys.front());
  if (status == Status::kTimeout) return false;
  if (status != Status::kOk) unexpected(address_, Op::kWait, status);
  return true;
}

bool TcpStoreClient::check(const std::vector<std::string>& keys) {
  for (const auto& k : keys) checkKey(k);
  std::lock_guard<std::mutex> lock(mu_);
  begin(Op::kCheck);
  ByteWriter w(out_);
  w.put<uint32_t>(static_cast<uint32_t>(keys.size()));
  for (const auto& k : keys) w.putBytes(k);
  auto status = exchange(Op::kCheck, timeout_, keys.empty() ? std::string_view() : keys.front());
  if (status != Status::kOk) unexpected(address_, Op::kCheck, status);
  return ByteReader(reply_).get<uint8_t>() != 0;
}

bool TcpStoreClient::remove(std::string_view key) {
  checkKey(key);
  std::lock_guard<std::mutex> lock(mu_);
  begin(Op::kDelete);
  ByteWriter(out_).putBytes(key);
  auto status = exchange(Op::kDelete, timeout_, key);
  if (status != Status::kOk) unexpected(address_, Op::kDelete, status);
  return ByteReader(reply_).get<uint8_t>() != 0;
}

int64_t TcpStoreClient::numKeys() {
  std::lock_guard<std::mutex> lock(mu_);
  begin(Op::kNumKeys);
  auto status = exchange(Op::kNumKeys, timeout_, {});
  if (status != Status::kOk) unexpected(address_, Op::kNumKeys, status);
  return ByteReader(reply_).get<int64_t>();
}

void TcpStoreClient::append(std::string_view key, std::string_view value) {
  checkKey(key);
  checkValue(value);
  std::lock_guard<std::mutex> lock(mu_);
  begin(Op::kAppend);
  ByteWriter w(out_);
  w.putBytes(key);
  w.putBytes(value);
  auto status = exchange(Op::kAppend, timeout_, key);
  if (status != Status::kOk) unexpected(address_, Op::kAppend, status);
}

void TcpStoreClient::ping() {
  std::lock_guard<std::mutex> lock(mu_);
  begin(Op::kPing);
  auto status = exchange(Op::kPing, timeout_, {});
  if (status != Status::kOk) unexpected(address_, Op::kPing, status);
}

StorePtr connectStore(const std::string& hostPort, Millis timeout) {
  if (isEtcdAddress(hostPort)) {
    EtcdStoreOptions options;
    auto endpoints = parseEtcdEndpoints(hostPort, &options.tls);
    if (!endpoints) DTRAIN_THROW(UsageError, "invalid etcd address '{}': expected etcd://HOST[:PORT][,HOST[:PORT]...]", hostPort);
    options.endpoints = *endpoints;
    etcdOptionsFromEnvironment(options);  // TLS files and credentials, from the agent
    options.connectTimeout = timeout;
    return EtcdStore::connect(options);
  }
  auto hp = net::parseHostPort(hostPort, kDefaultPort);
  if (!hp) DTRAIN_THROW(UsageError, "invalid store address '{}': expected HOST:PORT ([ADDR]:PORT for an IPv6 address)",
                            hostPort);
  TcpStoreClientOptions options;
  options.host = hp->host;
  options.port = hp->port;
  options.connectTimeout = timeout;
  return TcpStoreClient::connect(options);
}

}  // namespace dtrain::rendezvous
