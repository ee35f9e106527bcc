// Internals of the TCP store server (tcp_store_server.h), shared by its two source files: the server core
// (listener, io thread, session registry) and a Session (one client connection: framing, dispatch, waiters).
// Not a public header: everything here runs on the server's single io thread unless stated otherwise.
#pragma once

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>

#include <algorithm>
#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

#include "lib/common/bytes.h"
#include "rendezvous/store_protocol.h"
#include "rendezvous/store_state.h"
#include "rendezvous/tcp_store_server.h"

namespace dtrain::rendezvous {

namespace asio = boost::asio;

class Session;

class TcpStoreServer::Impl {
 public:
  explicit Impl(const TcpStoreServerOptions& options);
  ~Impl();
  void run();   // io thread body
  void stop();  // any thread; idempotent

  // Called by sessions (io thread).
  void removeSession(Session* session);
  // Buffer accounting against limits_.maxBufferedBytes: sessions report every change of their buffers.
  void adjustBuffered(size_t before, size_t after);
  bool canBuffer(size_t more) const { return buffered_ + more <= limits_.maxBufferedBytes; }
  // A session that could not grow its input buffer waits here until another releases memory.
  void waitForBudget(std::shared_ptr<Session> session);

  // Members the sessions use directly (io thread only, except the atomics).
  asio::io_context io_{1};  // hint: one thread runs it
  TcpStoreLimits limits_;
  std::string token_;
  StoreState state_;
  std::atomic<uint64_t> accepted_{0}, open_{0}, requests_{0}, replyWrites_{0}, protocolErrors_{0}, waiters_{0};
  std::atomic<uint64_t> bufferedStat_{0}, refused_{0}, timedOut_{0}, authFailures_{0}, keysStat_{0}, storedStat_{0};

  std::string host_;
  uint16_t port_ = 0;
  bool v6_ = false;

 private:
  void armAccept();
  void acceptReady();
  void shutdownAll();
  void armSweep();
  void sweep();  // closes connections past the handshake or idle timeout

  asio::ip::tcp::acceptor acceptor_{io_};
  asio::steady_timer acceptRetry_{io_};
  asio::steady_timer sweepTimer_{io_};
  std::chrono::milliseconds sweepEvery_{0};
  std::unordered_map<Session*, std::shared_ptr<Session>> sessions_;
  std::vector<std::weak_ptr<Session>> waitingForBudget_;
  size_t buffered_ = 0;
  bool acceptFailing_ = false;  // accept() ran out of descriptors; logged once until it recovers
  bool refusing_ = false;       // over connectionCap_; logged once until a connection is accepted again
  // limits_.maxConnections, lowered so that the open-file limit keeps descriptors free for the rest of the
  // process (the agent hosting the store forks workers and opens logs; a metrics endpoint accepts too).
  size_t connectionCap_ = 0;
  std::string capReason_;  // why connectionCap_ is what it is, for the refusal log line
  std::thread thread_;
  std::mutex stopMu_;
};

class Waiter;

// One client connection. Reads whole frames into one buffer and answers them in order; output is batched into
// one write per read burst. A GET/WAIT that cannot be answered parks the session (it keeps reading, to notice a
// disconnect, but answers nothing else) until its Waiter completes or times out, so replies stay in order.
class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(asio::ip::tcp::socket socket, TcpStoreServer::Impl& core);
  void start();
  void close();
  // The sweep's question: should this connection be closed for a timeout now? Returns the reason or nullptr.
  const char* expired(std::chrono::steady_clock::time_point now, const TcpStoreLimits& limits) const;
  void resume();  // memory became available or replies drained: read and answer again
  // The parked request is answered: kOk with the value (GET) or without (WAIT, value null), or kTimeout.
  void finishParked(proto::Status status, const std::string* value);

 private:
  void readMore();
  void onRead(const boost::system::error_code& ec, size_t n);
  void process();
  void handshake(std::string_view hello);
  void authenticate(std::string_view digest);
  void dispatch(std::string_view body);
  void violation(const std::string& message);
  void flush();
  std::string peer();
  size_t bufferedBytes() const { return std::max(in_.size(), reserved_) + out_.size() + sending_.size(); }
  void account();  // reports bufferedBytes() changes to the core
  // Back-pressure: stop answering (and reading) while the client has not taken its queued replies.
  bool repliesBlocked() const {
    size_t queued = out_.size() + sending_.size();
    return queued > core_.limits_.maxQueuedReplyBytes || (queued > 0 && !core_.canBuffer(0));
  }

  // Replies (append one frame to out_).
  void reply(proto::Status status);
  void replyBytes(proto::Status status, std::string_view bytes);
  void replyInt(int64_t value);
  void replyBool(bool value);

  // One handler per op; each parses all its fields first (a truncated field is a violation), then acts.
  void onSet(ByteReader& r);
  void onGet(ByteReader& r);
  void onTryGet(ByteReader& r);
  void onAdd(ByteReader& r);
  void onCompareSet(ByteReader& r);
  void onWait(ByteReader& r);
  void onCheck(ByteReader& r);
  void onDelete(ByteReader& r);
  void onNumKeys(ByteReader& r);
  void onAppend(ByteReader& r);
  void park(bool isGet, std::vector<std::string> keys, uint64_t timeoutMs);

  asio::ip::tcp::socket socket_;
  TcpStoreServer::Impl& core_;
  std::vector<char> in_;
  size_t begin_ = 0, end_ = 0;  // unconsumed bytes are in_[begin_, end_)
  size_t need_ = 0;             // size of the incomplete frame at begin_, when known
  std::string out_, sending_;
  bool handshaken_ = false;
  bool reading_ = false, writing_ = false;
  bool closing_ = false;  // answer what is queued, then close (after a protocol violation)
  bool closed_ = false;
  bool waitingForBudget_ = false;
  std::string nonce_;  // the challenge sent; not empty while its answer is awaited
  size_t accounted_ = 0;  // bufferedBytes() as last reported to the core
  size_t reserved_ = 0;   // budget reserved for the whole large frame being read (its buffer grows within it)
  std::chrono::steady_clock::time_point started_, lastActive_;
  std::shared_ptr<Waiter> parked_;
};

// A parked GET (one key) or WAIT (several keys): watches one missing key at a time (see store_state.h) and
// owns the timer that answers kTimeout.
class Waiter : public StoreState::Watcher, public std::enable_shared_from_this<Waiter> {
 public:
  Waiter(Session& session, TcpStoreServer::Impl& core, bool isGet, std::vector<std::string> keys);
  void arm(std::chrono::milliseconds timeout);
  void onKeyChanged() override;
  void cancel();  // the session is closing

 private:
  void complete();
  void onTimeout();

  Session& session_;
  TcpStoreServer::Impl& core_;
  bool isGet_;
  std::vector<std::string> keys_;
  std::string watching_;
  asio::steady_timer timer_;
  bool done_ = false;
};

}  // namespace dtrain::rendezvous
