// The key-value store every dtrain process coordinates through (rendezvous, collective bootstrap, heartbeats).
//
// Semantics follow torch.distributed's Store (c10d) so that habits carry over:
//  - keys and values are arbitrary bytes (std::string is used as a byte container);
//  - `get` blocks until the key exists; `wait` blocks until every key exists;
//  - `add` treats a missing key as 0 and the value as a decimal integer string;
//  - `compareSet` sets `desired` when the current value equals `expected` (a missing key matches an empty
//    `expected`) and returns the value after the operation, so the caller learns whether it won;
//  - `append` creates the key when missing.
// Blocking calls take a timeout. A `get` that times out is an error (the caller relied on the key); a `wait`
// that times out is an expected outcome and returns false.
//
// Thread-safety: implementations are safe to call from several threads. A TCP client serializes calls on its
// one connection, so a thread parked in a long `wait` delays the others: give a watcher its own client (`clone`).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace dtrain::rendezvous {

using Millis = std::chrono::milliseconds;

// torchrun's default rendezvous port: the store's port when an endpoint gives none (`dtrain store`, `dtrain run
// --rdzv-endpoint HOST`, DTRAIN_STORE=HOST) and the base of the ports derived under Slurm.
inline constexpr uint16_t kDefaultPort = 29400;

// Every key of run `runId` lives under "/dtrain/<runId>/" (rendezvous rounds, heartbeats, the workers'
// collective bootstrap), so runs sharing one store never meet each other's keys.
inline std::string runPrefix(std::string_view runId) { return "/dtrain/" + std::string(runId) + "/"; }

// Limits enforced by every implementation (the TCP server rejects larger fields with an error reply).
inline constexpr size_t kMaxKeyBytes = 4096;
inline constexpr size_t kMaxValueBytes = 64u << 20;

// One operation of Store::batch; build it with the named constructors.
struct StoreOp {
  enum class Kind : uint8_t { kSet, kTryGet, kGet, kAdd, kCompareSet, kAppend, kRemove };
  Kind kind = Kind::kTryGet;
  std::string key;
  std::string value;     // set, append: the value; compareSet: desired
  std::string expected;  // compareSet
  int64_t delta = 0;     // add
  Millis timeout{0};     // get: how long it may block in the store

  static StoreOp set(std::string key, std::string value) { return {Kind::kSet, std::move(key), std::move(value), {}, 0, {}}; }
  static StoreOp tryGet(std::string key) { return {Kind::kTryGet, std::move(key), {}, {}, 0, {}}; }
  static StoreOp get(std::string key, Millis timeout) { return {Kind::kGet, std::move(key), {}, {}, 0, timeout}; }
  static StoreOp add(std::string key, int64_t delta) { return {Kind::kAdd, std::move(key), {}, {}, delta, {}}; }
  static StoreOp compareSet(std::string key, std::string expected, std::string desired) {
    return {Kind::kCompareSet, std::move(key), std::move(desired), std::move(expected), 0, {}};
  }
  static StoreOp append(std::string key, std::string value) { return {Kind::kAppend, std::move(key), std::move(value), {}, 0, {}}; }
  static StoreOp remove(std::string key) { return {Kind::kRemove, std::move(key), {}, {}, 0, {}}; }
};

// The result of one StoreOp: `value` for tryGet (nullopt: missing), get (nullopt: timed out) and compareSet (the
// value after);
// `number` for add (the new value) and remove (1: the key existed).
struct StoreResult {
  std::optional<std::string> value;
  int64_t number = 0;
};

// etcd's default --max-txn-ops: an etcd batch is cut into txns of at most this many operations.
inline constexpr size_t kEtcdTxnOps = 128;

class Store {
 public:
  virtual ~Store() = default;

  virtual void set(std::string_view key, std::string_view value) = 0;
  // Blocks until `key` exists; throws TimeoutError naming the key after `timeout`.
  virtual std::string get(std::string_view key, Millis timeout) = 0;
  // Non-blocking read; nullopt when the key does not exist.
  virtual std::optional<std::string> tryGet(std::string_view key) = 0;
  virtual int64_t add(std::string_view key, int64_t delta) = 0;
  virtual std::string compareSet(std::string_view key, std::string_view expected, std::string_view desired) = 0;
  // True when all keys exist; false when `timeout` passed first.
  virtual bool wait(const std::vector<std::string>& keys, Millis timeout) = 0;
  // True when all keys exist right now.
  virtual bool check(const std::vector<std::string>& keys) = 0;
  // True when the key existed.
  virtual bool remove(std::string_view key) = 0;
  virtual int64_t numKeys() = 0;
  virtual void append(std::string_view key, std::string_view value) = 0;

  // Batches (c10d's multi_set / multi_get): the same result as calling set / tryGet for each entry in order,
  // in as few round trips as the implementation allows (the TCP client pipelines them: one round trip per
  // few hundred keys instead of one per key). Not atomic: another client may see some of the keys set before
  // the others. multiGet's results are in the order of `keys` (nullopt: missing). The defaults loop.
  virtual void multiSet(const std::vector<std::pair<std::string, std::string>>& entries);
  virtual std::vector<std::optional<std::string>> multiGet(const std::vector<std::string>& keys);
  // Mixed batch: `ops` (set, tryGet, get, add, compareSet, append, remove) with the results of calling each in
  // order, in as few round trips as the implementation allows: the TCP client pipelines them (one write, the
  // replies read in order: one round trip per few hundred ops, a blocking get parked in the server in between),
  // etcd sends runs of set/tryGet/remove as one txn (at most kEtcdTxnOps operations each) and the others one by
  // one. Not atomic. A get that times out is not an error here: its result's value is nullopt. Any other failure
  // is thrown (the first; the TCP client reads every reply first, so its connection stays in step; whether ops
  // after a failed one ran depends on the implementation). The default loops.
  virtual std::vector<StoreResult> batch(const std::vector<StoreOp>& ops);

  // A new handle on the same store with its own connection (the same object for in-process stores).
  virtual std::shared_ptr<Store> clone() = 0;

  // get() with this store's default timeout.
  std::string get(std::string_view key) { return get(key, timeout_); }
  Millis timeout() const { return timeout_; }
  void setTimeout(Millis t) { timeout_ = t; }

 protected:
  Millis timeout_{std::chrono::seconds(300)};
};

using StorePtr = std::shared_ptr<Store>;

// Validates key/value sizes; throws dtrain::Error naming the limit. Used by every implementation.
void checkKey(std::string_view key);
void checkValue(std::string_view value);

}  // namespace dtrain::rendezvous
