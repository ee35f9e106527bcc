// A Store over etcd v3 (`--rdzv-backend etcd`), through etcd's HTTP/JSON gateway (the grpc-gateway every
// etcd >= 3.4 serves beside gRPC on its client port: POST /v3/kv/range, /v3/kv/put, /v3/kv/txn,
// /v3/kv/deleterange, /v3/lease/grant, /v3/lease/keepalive, /v3/watch; keys and values base64 in JSON, 64-bit
// integers as JSON strings). No gRPC or etcd library is needed: Boost.Beast over one keep-alive connection.
//
// Semantics are the Store contract's (store.h), the same as the TCP store's, so the rendezvous protocol runs
// unchanged over etcd:
//  - set/tryGet/remove/check: put, range, deleterange;
//  - compareSet: one txn (compare VALUE == expected, or CREATE revision == 0 for a missing key) whose failure
//    branch reads the current value;
//  - add/append: read-modify-write as a txn guarded by the key's mod_revision, retried on conflict;
//  - get/wait: a range, then a watch (/v3/watch, streamed) from the revision after that range, so a key created
//    in between is never missed; each wait has its own connection, closed at its timeout.
// Keys are stored under `prefix` (default "", i.e. the Store's keys as given; the rendezvous adds
// /dtrain/<run>/ itself).
//
// Heartbeats (leases): a key whose name contains "/hb/" (Rendezvous's heartbeat counters) is written with
// this client's lease (granted on first use with leaseTtl, kept alive by such writes, at most every TTL/3), so a dead agent's
// heartbeat key disappears from etcd by itself; liveness is still judged by the counter, as with any store.
//
// Failover: `endpoints` are tried in order; a connection error, an I/O timeout or an HTTP 5xx/408/409/429 answer
// (etcd unavailable, no leader, leader changed, a member shutting down) moves to the next one and retries the call until its deadline (the
// store's timeout; `connect` uses connectTimeout). An add/append whose txn committed but whose answer was lost
// may be applied twice (etcd's own clients share this limit); another 4xx answer is an Error naming the endpoint.
//
// Errors: no endpoint answered in time => RendezvousError naming every endpoint and the last failure; a get
// that times out => TimeoutError naming the key; TLS or auth refused => EtcdRefusedError at once.
// Thread-safety: calls are serialized on the one connection (a mutex), except wait/get's watches, which use
// their own connection each; clone() gives an independent client.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "lib/common/clock.h"
#include "lib/common/error.h"
#include "lib/common/net.h"
#include "rendezvous/store.h"

namespace boost::asio::ssl {
class context;
}

namespace dtrain::rendezvous {

namespace etcd {
class Http;
}

// etcd refused this client for good: a server certificate that does not verify against the CA, a client
// certificate the server refuses, a wrong user or password, or credentials missing for an etcd with auth on.
// Retrying does not help, so it is raised at once (exit code 4, before any worker starts).
class EtcdRefusedError : public RendezvousError {
 public:
  using RendezvousError::RendezvousError;
};

struct EtcdStoreOptions {
  std::vector<net::HostPort> endpoints;  // at least one; port 2379 when a name gives none
  std::string prefix;                    // prepended to every key
  Millis connectTimeout{std::chrono::seconds(30)};  // connect(): until one endpoint answered
  Millis requestTimeout{std::chrono::seconds(5)};   // one HTTP exchange (a watch's own wait excluded)
  int64_t leaseTtlSeconds = 10;                     // TTL of the heartbeat keys' lease
  // TLS (https:// endpoints; torchrun's etcd rdzv_conf protocol=https, cacert, cert, key): every endpoint's
  // certificate is verified against `caCert` (PEM; empty: the system's CAs) and must name the host dialled (DNS
  // name or IP address in its subjectAltName); `cert`/`key` (PEM) are presented when given, for an etcd started
  // with --client-cert-auth.
  bool tls = false;
  std::string caCert, cert, key;
  // etcd authentication (`etcdctl auth enable`): exchanged for a token (/v3/auth/authenticate) that every request
  // carries; a token etcd no longer accepts is renewed once per request. Empty user: no authentication.
  std::string user, password;
};

// Reads the TLS and auth settings a worker inherits from its agent (the environment variables below) into `o`.
void etcdOptionsFromEnvironment(EtcdStoreOptions& o);
inline constexpr const char* kEtcdCaCertEnv = "DTRAIN_ETCD_CACERT";
inline constexpr const char* kEtcdCertEnv = "DTRAIN_ETCD_CERT";
inline constexpr const char* kEtcdKeyEnv = "DTRAIN_ETCD_KEY";
inline constexpr const char* kEtcdUserEnv = "DTRAIN_ETCD_USER";
inline constexpr const char* kEtcdPasswordEnv = "DTRAIN_ETCD_PASSWORD";

// "etcd://h1:2379,h2:2379" or "h1:2379,h2" -> endpoints (port 2379 by default); each may carry http:// or
// https:// (all the same); `tls` (when given) is set for https://. nullopt when malformed or schemes are mixed.
std::optional<std::vector<net::HostPort>> parseEtcdEndpoints(std::string_view text, bool* tls = nullptr);
// True for a store address that names etcd ("etcd://...").
bool isEtcdAddress(std::string_view address);

class EtcdStore : public Store {
 public:
  // Checks that some endpoint answers (a range) within connectTimeout; throws RendezvousError otherwise.
  static std::shared_ptr<EtcdStore> connect(const EtcdStoreOptions& options);
  ~EtcdStore() override;

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
  // One txn per kEtcdTxnOps keys (see batch).
  void multiSet(const std::vector<std::pair<std::string, std::string>>& entries) override;
  std::vector<std::optional<std::string>> multiGet(const std::vector<std::string>& keys) override;
  // Runs of set/tryGet/remove (and a get, as a txn's last operation) are one /v3/kv/txn each, of at most
  // kEtcdTxnOps operations; add/compareSet/append are their own requests. Stops at the first failure.
  std::vector<StoreResult> batch(const std::vector<StoreOp>& ops) override;
  std::shared_ptr<Store> clone() override;

  // "etcd://h1:2379,h2:2379" (what DTRAIN_STORE carries to workers; "etcd://https://h1:2379,..." with TLS).
  std::string address() const;
  // The endpoint the last successful request went to (for tests and messages).
  std::string currentEndpoint() const;
  // HTTP requests answered so far (watches excluded): what a batch saves is visible here.
  uint64_t requests() const { return requests_.load(std::memory_order_relaxed); }

 private:
  explicit EtcdStore(EtcdStoreOptions options);
  struct Kv;
  // POSTs `body` (JSON) to `path`, failing over between endpoints until `deadline`; returns the JSON answer.
  std::string call(const std::string& path, const std::string& body, const Deadline& deadline);
  // The auth token for requests ("" without a user); authenticates (a request) when there is none yet. mu_ held.
  const std::string& tokenLocked(const Deadline& deadline);
  // Maps an answer that says the credentials are wrong or missing to EtcdRefusedError; returns otherwise.
  void refuseIfAuthError(const std::string& endpoint, unsigned status, const std::string& body) const;
  std::optional<Kv> range(const std::string& fullKey, const Deadline& deadline, int64_t* revision = nullptr);
  // Blocks until `fullKey` exists (true) or the deadline passes (false), through watches.
  bool waitOne(const std::string& fullKey, const Deadline& deadline);
  int64_t leaseFor(const std::string& fullKey, const Deadline& deadline);
  std::string full(std::string_view key) const { return options_.prefix + std::string(key); }

  EtcdStoreOptions options_;
  mutable std::mutex mu_;
  std::shared_ptr<boost::asio::ssl::context> tls_;  // with options_.tls: the client context, shared by clones
  std::unique_ptr<etcd::Http> http_;  // the keep-alive connection (guarded by mu_)
  std::string token_;                 // etcd auth token (guarded by mu_)
  size_t current_ = 0;          // index of the endpoint in use (guarded by mu_)
  std::atomic<uint64_t> requests_{0};
  std::mutex leaseMu_;
  int64_t lease_ = 0;           // heartbeat lease id; 0 before the first heartbeat key (guarded by leaseMu_)
  Clock::time_point leaseRenewed_{};  // when lease_ was granted or last kept alive (guarded by leaseMu_)
};

}  // namespace dtrain::rendezvous
