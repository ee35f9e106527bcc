#include "rendezvous/tcp_store_session.h"

#include <sys/random.h>

#include <boost/asio/post.hpp>
#include <boost/asio/write.hpp>

#include <algorithm>
#include <cstring>

#include "lib/common/error.h"
#include "lib/common/net.h"
#include "lib/common/log.h"

namespace dtrain::rendezvous {

using proto::Op;
using proto::Status;

namespace {

constexpr size_t kInitialBuffer = 16 * 1024;
constexpr size_t kMinReadSpace = 4 * 1024;
// A parked client that keeps sending is not read past this (it would only grow our buffer).
constexpr size_t kMaxBufferedWhileParked = 1 << 20;
// Buffers grown for one large frame are released afterwards, so 512 idle connections stay small.
constexpr size_t kKeepBuffer = 1 << 20;

void expectEnd(const ByteReader& r) {
  if (!r.done()) throw ProtocolError(fmt::format("{} unexpected trailing bytes", r.remaining()));
}

// A check/wait names at most `maxKeys` keys: bounds the memory and the time one request holds the io thread.
std::vector<std::string> getKeys(ByteReader& r, Op op, size_t maxKeys) {
  auto n = r.get<uint32_t>();
  DTRAIN_CHECK(n <= maxKeys, "store {} of {} keys exceeds the limit of {} keys per request (max-keys-per-request)",
               proto::opName(op), n, maxKeys);
  std::vector<std::string> keys;
  keys.reserve(std::min<size_t>(n, r.remaining() / sizeof(uint32_t)));  // never trust n for an allocation
  for (uint32_t i = 0; i < n; ++i) keys.emplace_back(r.getBytes());
  return keys;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// Session: framing

Session::Session(asio::ip::tcp::socket socket, TcpStoreServer::Impl& core)
    : socket_(std::move(socket)), core_(core), in_(kInitialBuffer) {
  started_ = lastActive_ = std::chrono::steady_clock::now();
  account();
}

void Session::start() { readMore(); }

std::string Session::peer() {
  boost::system::error_code ec;
  auto ep = socket_.remote_endpoint(ec);
  if (ec) return "a client";
  return net::joinHostPort(ep.address().to_string(), ep.port());
}

void Session::account() {
  size_t now = closed_ ? 0 : bufferedBytes();
  if (now == accounted_) return;
  core_.adjustBuffered(accounted_, now);
  accounted_ = now;
}

const char* Session::expired(std::chrono::steady_clock::time_point now, const TcpStoreLimits& limits) const {
  if (closed_) return nullptr;
  if (!handshaken_ && limits.handshakeTimeout.count() > 0 && now - started_ > limits.handshakeTimeout)
    return "no handshake within the handshake timeout";
  if (handshaken_ && limits.idleTimeout.count() > 0 && !parked_ && !writing_ && out_.empty() &&
      now - lastActive_ > limits.idleTimeout)
    return "idle for longer than the idle timeout";
  return nullptr;
}

void Session::resume() {
  if (closed_) return;
  waitingForBudget_ = false;
  process();
  readMore();
}

void Session::readMore() {
  if (reading_ || closed_ || closing_ || waitingForBudget_) return;
  if (parked_ && end_ - begin_ > kMaxBufferedWhileParked) return;  // resumed by finishParked
  if (repliesBlocked()) return;                                    // resumed when the replies drain
  if (begin_ == end_) {
    begin_ = end_ = 0;
    if (in_.size() > kKeepBuffer && need_ == 0) {
      std::vector<char>(kInitialBuffer).swap(in_);
      account();
    }
  }
  if (in_.size() - end_ < kMinReadSpace) {
    // Move the partial frame to the front; grow only as its bytes arrive (doubling, at most to the frame's
    // declared size), never to a declared length no byte of which is here yet.
    size_t pending = end_ - begin_;
    if (begin_ > 0) {
      std::memmove(in_.data(), in_.data() + begin_, pending);
      begin_ = 0;
      end_ = pending;
    }
    if (in_.size() - end_ < kMinReadSpace) {
      size_t target = std::max(end_ + kMinReadSpace, std::min(need_, 2 * in_.size()));
      // A large frame reserves its whole declared size from the server-wide budget before its buffer grows
      // past kKeepBuffer (the memory itself is still only allocated as its bytes arrive). Reserving the
      // whole frame means two half-read frames can never each wait for the other's memory.
      size_t want = target > kKeepBuffer ? std::max(target, need_) : target;
      size_t have = std::max(in_.size(), reserved_);
      if (want > have) {
        if (!core_.canBuffer(want - have)) {
          waitingForBudget_ = true;  // resumed by the core when others release memory
          core_.waitForBudget(shared_from_this());
          return;
        }
        if (target > kKeepBuffer) reserved_ = want;
      }
      in_.resize(target);
      account();
    }
  }
  reading_ = true;
  socket_.async_read_some(asio::buffer(in_.data() + end_, in_.size() - end_),
                          [self = shared_from_this()](const boost::system::error_code& ec, size_t n) {
                            self->reading_ = false;
                            self->onRead(ec, n);
                          });
}

void Session::onRead(const boost::system::error_code& ec, size_t n) {
  if (closed_) return;
  if (ec) {  // EOF or reset: close() also cancels a parked waiter
    // A dtrain client without a token reads the challenge and gives up (StoreAuthError on its side): say so here
    // too, where the job's first agent (hosting the store) or `dtrain store` logs it.
    if (!nonce_.empty())
      log::warn("store: connection from {} closed without answering the authentication challenge: a client without "
                "the store's token (--rdzv-token)",
                peer());
    close();
    return;
  }
  if (closing_) return;
  end_ += n;
  lastActive_ = std::chrono::steady_clock::now();
  process();
  readMore();
}

void Session::process() {
  while (!closed_ && !closing_ && !parked_ && !repliesBlocked()) {
    size_t avail = end_ - begin_;
    const char* p = in_.data() + begin_;
    if (!nonce_.empty()) {
      if (avail < proto::kDigestBytes) break;
      begin_ += proto::kDigestBytes;
      authenticate(std::string_view(p, proto::kDigestBytes));
      continue;
    }
    if (!handshaken_) {
      if (avail < proto::kHandshakeBytes) break;
      begin_ += proto::kHandshakeBytes;
      handshake(std::string_view(p, proto::kHandshakeBytes));
      continue;
    }
    if (avail < proto::kFrameHeaderBytes) break;
    uint32_t len = 0;
    std::memcpy(&len, p, sizeof(len));
    if (len > proto::kMaxFrameBytes) {
      violation(fmt::format("frame of {} bytes exceeds the limit of {} bytes", len, proto::kMaxFrameBytes));
      break;
    }
    size_t total = proto::kFrameHeaderBytes + len;
    if (avail < total) {
      need_ = total;
      break;
    }
    need_ = 0;
    reserved_ = 0;  // the frame is complete; its buffer is released by readMore once consumed
    begin_ += total;  // the body stays valid: nothing touches in_ during dispatch
    dispatch(std::string_view(p + proto::kFrameHeaderBytes, len));
  }
  core_.keysStat_.store(static_cast<uint64_t>(core_.state_.numKeys()), std::memory_order_relaxed);
  core_.storedStat_.store(core_.state_.storedBytes(), std::memory_order_relaxed);
  flush();
  account();
}

void Session::handshake(std::string_view hello) {
  ByteReader r(hello);
  auto magic = r.getRaw(proto::kMagic.size());
  auto version = r.get<uint16_t>();
  auto status = proto::HandshakeStatus::kOk;
  if (magic != proto::kMagic)
    status = proto::HandshakeStatus::kBadMagic;
  else if (version != proto::kVersion)
    status = proto::HandshakeStatus::kBadVersion;
  if (status == proto::HandshakeStatus::kOk && !core_.token_.empty()) {
    nonce_.resize(proto::kNonceBytes);
    size_t got = 0;
    while (got < nonce_.size()) {
      ssize_t n = ::getrandom(nonce_.data() + got, nonce_.size() - got, 0);
      if (n > 0) got += static_cast<size_t>(n);
      else if (errno != EINTR) DTRAIN_THROW(Error, "store: getrandom failed: {}", std::strerror(errno));
    }
    proto::putHandshake(out_);
    out_.push_back(static_cast<char>(proto::HandshakeStatus::kAuthRequired));
    out_.append(nonce_);
    return;
  }
  proto::putHandshake(out_);
  out_.push_back(static_cast<char>(status));
  if (status == proto::HandshakeStatus::kOk) {
    handshaken_ = true;
    return;
  }
  core_.protocolErrors_.fetch_add(1, std::memory_order_relaxed);
  log::warn("store: closing connection from {}: {}", peer(),
            status == proto::HandshakeStatus::kBadMagic
                ? std::string("not a dtrain store client (bad handshake magic)")
                : fmt::format("client speaks store protocol v{}, this store speaks v{}", version, proto::kVersion));
  closing_ = true;
}

void Session::authenticate(std::string_view digest) {
  auto expected = proto::authDigest(core_.token_, nonce_);
  nonce_.clear();
  // Compare all bytes whatever the first difference, so the timing says nothing about the token.
  unsigned char diff = 0;
  for (size_t i = 0; i < proto::kDigestBytes; ++i) diff |= static_cast<unsigned char>(expected[i] ^ digest[i]);
  if (diff == 0) {
    out_.push_back(static_cast<char>(proto::HandshakeStatus::kOk));
    handshaken_ = true;
    return;
  }
  core_.authFailures_.fetch_add(1, std::memory_order_relaxed);
  log::warn("store: closing connection from {}: wrong rendezvous token (--rdzv-token)", peer());
  out_.push_back(static_cast<char>(proto::HandshakeStatus::kBadToken));
  closing_ = true;
}

void Session::violation(const std::string& message) {
  core_.protocolErrors_.fetch_add(1, std::memory_order_relaxed);
  log::warn("store: closing connection from {}: {}", peer(), message);
  replyBytes(Status::kError, "protocol violation: " + message);
  closing_ = true;
}

void Session::flush() {
  if (writing_ || closed_) return;
  if (out_.empty()) {
    if (closing_) close();
    return;
  }
  if (sending_.capacity() > kKeepBuffer) std::string().swap(sending_);
  sending_.swap(out_);
  account();
  writing_ = true;
  core_.replyWrites_.fetch_add(1, std::memory_order_relaxed);
  asio::async_write(socket_, asio::buffer(sending_),
                    [self = shared_from_this()](const boost::system::error_code& ec, size_t) {
                      self->writing_ = false;
                      bool wasBlocked = self->repliesBlocked();
                      self->sending_.clear();
                      if (self->sending_.capacity() > kKeepBuffer) std::string().swap(self->sending_);
                      self->account();
                      if (ec) {
                        self->close();
                        return;
                      }
                      self->lastActive_ = std::chrono::steady_clock::now();
                      if (wasBlocked && !self->repliesBlocked()) {
                        self->process();  // answers what waited behind the replies, then flushes
                        self->readMore();
                      } else {
                        self->flush();
                      }
                    });
}

void Session::close() {
  if (closed_) return;
  auto self = shared_from_this();  // the registry may hold the last reference
  closed_ = true;
  if (parked_) {
    parked_->cancel();
    parked_.reset();
  }
  boost::system::error_code ec;
  socket_.close(ec);
  std::vector<char>().swap(in_);
  std::string().swap(out_);
  account();  // closed_: reports 0 (sending_ may still be in flight; it is freed with the session)
  core_.removeSession(this);
}

void Session::finishParked(Status status, const std::string* value) {
  auto self = shared_from_this();
  parked_.reset();
  if (value != nullptr)
    replyBytes(status, *value);
  else
    reply(status);
  // Requests that arrived while parked are answered from a fresh handler, not from inside another session's
  // mutation (which is where a waiter completes).
  asio::post(core_.io_, [self] {
    self->process();
    self->readMore();
  });
}

// ---------------------------------------------------------------------------------------------------------
// Replies

void Session::reply(Status status) {
  size_t start = proto::beginFrame(out_);
  out_.push_back(static_cast<char>(status));
  proto::finishFrame(out_, start);
}

void Session::replyBytes(Status status, std::string_view bytes) {
  size_t start = proto::beginFrame(out_);
  out_.push_back(static_cast<char>(status));
  ByteWriter(out_).putBytes(bytes);
  proto::finishFrame(out_, start);
}

void Session::replyInt(int64_t value) {
  size_t start = proto::beginFrame(out_);
  out_.push_back(static_cast<char>(Status::kOk));
  ByteWriter(out_).put<int64_t>(value);
  proto::finishFrame(out_, start);
}

void Session::replyBool(bool value) {
  size_t start = proto::beginFrame(out_);
  out_.push_back(static_cast<char>(Status::kOk));
  out_.push_back(value ? 1 : 0);
  proto::finishFrame(out_, start);
}

// ---------------------------------------------------------------------------------------------------------
// The dispatcher. Request fields (after the u8 op) and the replies of each op:
//
//   op           request fields                  reply
//   PING         -                               kOk
//   SET          bytes key, bytes value          kOk
//   GET          bytes key, u64 timeoutMs        kOk bytes value | kTimeout      (parks until the key exists)
//   TRY_GET      bytes key                       kOk bytes value | kNotFound
//   ADD          bytes key, i64 delta            kOk i64 newValue
//   COMPARE_SET  bytes key, bytes expected,      kOk bytes valueAfter
//                bytes desired
//   WAIT         keys, u64 timeoutMs             kOk | kTimeout                  (parks until all keys exist)
//   CHECK        keys                            kOk u8 allExist
//   DELETE       bytes key                       kOk u8 existed
//   NUM_KEYS     -                               kOk i64 count
//   APPEND       bytes key, bytes value          kOk
//
// Any op may instead reply kError bytes message (a key or value over the limits of store.h, ADD on a value
// that is not an integer). A malformed request (unknown op, truncated or trailing bytes) is a violation.

void Session::dispatch(std::string_view body) {
  core_.requests_.fetch_add(1, std::memory_order_relaxed);
  ByteReader r(body);
  Op op = Op::kPing;
  try {
    op = static_cast<Op>(r.get<uint8_t>());
    switch (op) {
      case Op::kPing: expectEnd(r); reply(Status::kOk); return;
      case Op::kSet: onSet(r); return;
      case Op::kGet: onGet(r); return;
      case Op::kTryGet: onTryGet(r); return;
      case Op::kAdd: onAdd(r); return;
      case Op::kCompareSet: onCompareSet(r); return;
      case Op::kWait: onWait(r); return;
      case Op::kCheck: onCheck(r); return;
      case Op::kDelete: onDelete(r); return;
      case Op::kNumKeys: onNumKeys(r); return;
      case Op::kAppend: onAppend(r); return;
    }
    violation(fmt::format("unknown op {}", static_cast<int>(op)));
  } catch (const ProtocolError& e) {
    violation(fmt::format("malformed {} request: {}", body.empty() ? "empty" : proto::opName(op), e.what()));
  } catch (const Error& e) {
    replyBytes(Status::kError, e.what());
  }
}

void Session::onSet(ByteReader& r) {
  auto key = r.getBytes();
  auto value = r.getBytes();
  expectEnd(r);
  core_.state_.set(key, value);
  reply(Status::kOk);
}

void Session::onGet(ByteReader& r) {
  auto key = r.getBytes();
  auto timeoutMs = r.get<uint64_t>();
  expectEnd(r);
  checkKey(key);
  if (const auto* value = core_.state_.find(key)) {
    replyBytes(Status::kOk, *value);
  } else if (timeoutMs == 0) {
    reply(Status::kTimeout);
  } else {
    park(true, {std::string(key)}, timeoutMs);
  }
}

void Session::onTryGet(ByteReader& r) {
  auto key = r.getBytes();
  expectEnd(r);
  checkKey(key);
  if (const auto* value = core_.state_.find(key))
    replyBytes(Status::kOk, *value);
  else
    reply(Status::kNotFound);
}

void Session::onAdd(ByteReader& r) {
  auto key = r.getBytes();
  auto delta = r.get<int64_t>();
  expectEnd(r);
  replyInt(core_.state_.add(key, delta));
}

void Session::onCompareSet(ByteReader& r) {
  auto key = r.getBytes();
  auto expected = r.getBytes();
  auto desired = r.getBytes();
  expectEnd(r);
  replyBytes(Status::kOk, core_.state_.compareSet(key, expected, desired));
}

void Session::onWait(ByteReader& r) {
  auto keys = getKeys(r, Op::kWait, core_.limits_.maxKeysPerRequest);
  auto timeoutMs = r.get<uint64_t>();
  expectEnd(r);
  for (const auto& k : keys) checkKey(k);
  if (core_.state_.firstMissing(keys) == nullptr)
    reply(Status::kOk);
  else if (timeoutMs == 0)
    reply(Status::kTimeout);
  else
    park(false, std::move(keys), timeoutMs);
}

void Session::onCheck(ByteReader& r) {
  auto keys = getKeys(r, Op::kCheck, core_.limits_.maxKeysPerRequest);
  expectEnd(r);
  replyBool(core_.state_.firstMissing(keys) == nullptr);
}

void Session::onDelete(ByteReader& r) {
  auto key = r.getBytes();
  expectEnd(r);
  replyBool(core_.state_.remove(key));
}

void Session::onNumKeys(ByteReader& r) {
  expectEnd(r);
  replyInt(core_.state_.numKeys());
}

void Session::onAppend(ByteReader& r) {
  auto key = r.getBytes();
  auto value = r.getBytes();
  expectEnd(r);
  core_.state_.append(key, value);
  reply(Status::kOk);
}

void Session::park(bool isGet, std::vector<std::string> keys, uint64_t timeoutMs) {
  parked_ = std::make_shared<Waiter>(*this, core_, isGet, std::move(keys));
  parked_->arm(std::chrono::milliseconds(std::min(timeoutMs, proto::kMaxWaitMillis)));
}

// ---------------------------------------------------------------------------------------------------------
// Waiter

Waiter::Waiter(Session& session, TcpStoreServer::Impl& core, bool isGet, std::vector<std::string> keys)
    : session_(session), core_(core), isGet_(isGet), keys_(std::move(keys)), timer_(core.io_) {
  core_.waiters_.fetch_add(1, std::memory_order_relaxed);
}

void Waiter::arm(std::chrono::milliseconds timeout) {
  watching_ = *core_.state_.firstMissing(keys_);
  core_.state_.watch(watching_, shared_from_this());
  timer_.expires_after(timeout);
  timer_.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
    if (!ec && !self->done_) self->onTimeout();
  });
}

void Waiter::onKeyChanged() {
  if (done_) return;
  const auto* missing = core_.state_.firstMissing(keys_);
  if (missing == nullptr) {
    complete();
    return;
  }
  watching_ = *missing;
  core_.state_.watch(watching_, shared_from_this());
}

void Waiter::complete() {
  done_ = true;
  core_.waiters_.fetch_sub(1, std::memory_order_relaxed);
  timer_.cancel();
  if (isGet_)
    session_.finishParked(Status::kOk, core_.state_.find(keys_.front()));
  else
    session_.finishParked(Status::kOk, nullptr);
}

void Waiter::onTimeout() {
  done_ = true;
  core_.waiters_.fetch_sub(1, std::memory_order_relaxed);
  core_.state_.unwatch(watching_, this);
  session_.finishParked(Status::kTimeout, nullptr);
}

void Waiter::cancel() {
  if (done_) return;
  done_ = true;
  core_.waiters_.fetch_sub(1, std::memory_order_relaxed);
  core_.state_.unwatch(watching_, this);
  timer_.cancel();
}

}  // namespace dtrain::rendezvous
