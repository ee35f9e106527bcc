// Client of the TCP store server (protocol in store_protocol.h): one blocking TCP connection.
//
// Blocking socket I/O is the fastest shape for strict request/response: one send and (usually) one recv per
// call. Every call still has a deadline: receives use SO_RCVTIMEO (changed only when a call needs a different
// timeout), sends poll when the socket buffer is full. GET/WAIT are answered by the server at their timeout;
// the client allows that plus a grace before it gives up on an unresponsive server.
//
// Errors: cannot connect within connectTimeout => RendezvousError naming host:port and the last errno text;
// the peer is not a dtrain store or speaks another version => ProtocolError; the server went away => NetworkError
// naming the store address; a call past its deadline => TimeoutError. After a NetworkError or a client-side
// TimeoutError the connection is out of step with the server and every later call fails fast with
// NetworkError; open a new client (clone) to continue.
//
// Thread-safety: all methods may be called from several threads; calls are serialized on the one connection
// (a mutex held for the whole request/response), so a long GET/WAIT delays other threads' calls: give a
// watcher thread its own connection with clone().
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "lib/common/clock.h"
#include "rendezvous/store.h"
#include "rendezvous/store_protocol.h"

namespace dtrain::rendezvous {

// The store refused this client's token, or wants one and the client has none (exit code 4).
class StoreAuthError : public RendezvousError {
 public:
  using RendezvousError::RendezvousError;
};

struct TcpStoreClientOptions {
  std::string host = "127.0.0.1";
  uint16_t port = 0;
  Millis connectTimeout{std::chrono::seconds(30)};  // retries (with backoff) and the handshake share this
  Millis timeout{std::chrono::seconds(300)};        // default timeout of get() and of every other call
  Millis initialBackoff{2};                         // first retry delay; doubles up to maxBackoff
  Millis maxBackoff{1000};
  // The store's shared secret, for a store started with one; nullopt reads DTRAIN_RDZV_TOKEN (proto::kTokenEnv),
  // so workers started by an agent authenticate without being told. A store that asks for a token when the
  // client has none, or refuses the one given, fails the connect with RendezvousError naming --rdzv-token.
  std::optional<std::string> token;
  // false: one connection attempt, a refused connection fails at once (RendezvousError) instead of being retried
  // until connectTimeout: for tools that read the store of a run that should be up (dtrain top, dtrain debug
  // dump), where nothing listening means the run has ended. A connect that does not complete still waits up to
  // connectTimeout.
  bool retry = true;
};

class TcpStoreClient : public Store {
 public:
  static std::shared_ptr<TcpStoreClient> connect(const TcpStoreClientOptions& options);
  ~TcpStoreClient() override;
  TcpStoreClient(const TcpStoreClient&) = delete;
  TcpStoreClient& operator=(const TcpStoreClient&) = delete;

  using Store::get;
  void set(std::string_view key, std::string_view value) override;
  std::string get(std::string_view key, Millis timeout) override;
  std::optional<std::string> tryGet(std::string_view key) override;
  int64_t add(std::string_view key, int64_t delta) override;
  std::string compareSet(std::string_view key, std::string_view expected, std::string_view desired) override;
  bool wait(const std::vector<std::string>& keys, Millis timeout) override;
  bool check(const std::vector<std::string>& keys) override;
  bool remove(std::string_view key) override;
  int64_t numKeys() override;
  void append(std::string_view key, std::string_view value) override;
  // Pipelined (the protocol allows it): up to kPipelineRequests requests are written back to back, then their
  // replies read in order, so a batch costs one round trip per chunk. A kError reply for one entry throws
  // after the chunk's other replies were read (the connection stays usable); later chunks are not sent.
  void multiSet(const std::vector<std::pair<std::string, std::string>>& entries) override;
  std::vector<std::optional<std::string>> multiGet(const std::vector<std::string>& keys) override;
  // Pipelined the same way, each op its own request; a get parks in the server, which answers the ops after it
  // once it is answered (a get that timed out: value nullopt). A kError reply throws once every reply of its chunk
  // was read (the connection stays usable); later chunks are not sent.
  std::vector<StoreResult> batch(const std::vector<StoreOp>& ops) override;
  // A new connection to the same server (same options, current default timeout).
  std::shared_ptr<Store> clone() override;

  // One round trip; throws like any call when the server is gone.
  void ping();
  // Round trips this client made (one per call, one per chunk of a pipelined batch): what the rendezvous
  // benchmark counts per agent.
  uint64_t roundTrips() const { return roundTrips_.load(std::memory_order_relaxed); }
  // "host:port" of the store, as used in every error message.
  const std::string& address() const { return address_; }

 private:
  explicit TcpStoreClient(const TcpStoreClientOptions& options);
  void openConnection();  // connect with retries + handshake; throws
  void handshake(int fd, const Deadline& deadline);
  void authenticate(int fd, const Deadline& deadline);

  // Starts a request frame for `op` in out_ (caller holds mu_); exchange() sends it and reads the reply into
  // in_, returning the reply status; fields follow at reply_.
  void begin(proto::Op op);
  proto::Status exchange(proto::Op op, Millis readTimeout, std::string_view key);
  void sendAll(const Deadline& deadline);
  // Reads `count` reply frames in order into in_, calling onReply(i, status, fields) for each (fields: a view into
  // in_). recvSome is its one receive, and the one place a receive error or timeout is handled.
  using OnReply = std::function<void(size_t, proto::Status, std::string_view)>;
  void readReplies(size_t count, Millis readTimeout, const Deadline& deadline, const OnReply& onReply);
  size_t recvSome(size_t have, Millis recvTimeout, Millis waited, const Deadline& deadline);
  // The batch behind multiSet/multiGet/batch: encode(w, i) writes request i (its op byte, then its fields);
  // decode(i, status, fields) reads reply i (never called for kError replies). Each chunk's replies are read
  // within `readTimeout`.
  using Encode = std::function<void(ByteWriter&, size_t)>;
  using Decode = std::function<void(size_t, proto::Status, std::string_view)>;
  void pipeline(size_t count, const Encode& encode, const Decode& decode, Millis readTimeout, std::string_view what);
  void setRecvTimeout(Millis t);
  [[noreturn]] void fail(const std::string& what, int err);
  [[noreturn]] void throwReplyError(proto::Op op, std::string_view key);
  void checkUsable() const;

  TcpStoreClientOptions options_;
  std::string address_;
  std::mutex mu_;
  int fd_ = -1;
  std::string broken_;  // why the connection is unusable; empty while healthy
  Millis recvTimeout_{-1};
  std::string out_;
  std::string in_;          // the last reply frame's body (status + fields)
  std::string_view reply_;  // fields of the last reply, a view into in_
  size_t frameStart_ = 0;
  std::atomic<uint64_t> roundTrips_{0};
};

// Parses "host:port" (port defaults to 29400, torchrun's rendezvous port) and connects within `timeout`; an
// "etcd://h1:2379,h2:2379" address connects to etcd instead (etcd_store.h).
// Throws UsageError on a malformed address.
StorePtr connectStore(const std::string& hostPort, Millis timeout);

}  // namespace dtrain::rendezvous
