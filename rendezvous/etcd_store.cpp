#include "rendezvous/etcd_store.h"

#include <nlohmann/json.hpp>

#include <cstdlib>

#include <algorithm>
#include <thread>

#include "lib/common/clock.h"
#include "lib/common/error.h"
#include "lib/common/log.h"
#include "lib/common/parse.h"
#include "rendezvous/etcd_http.h"

namespace dtrain::rendezvous {

using json = nlohmann::json;
using namespace std::chrono_literals;

namespace {

constexpr uint16_t kEtcdPort = 2379;
constexpr std::string_view kScheme = "etcd://";

const char kB64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

std::string b64(std::string_view in) {
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    uint32_t v = (uint8_t(in[i]) << 16) | (uint8_t(in[i + 1]) << 8) | uint8_t(in[i + 2]);
    for (int s = 18; s >= 0; s -= 6) out += kB64[(v >> s) & 63];
  }
  if (i + 1 == in.size()) {
    uint32_t v = uint8_t(in[i]) << 16;
    out += kB64[(v >> 18) & 63];
    out += kB64[(v >> 12) & 63];
    out += "==";
  } else if (i + 2 == in.size()) {
    uint32_t v = (uint8_t(in[i]) << 16) | (uint8_t(in[i + 1]) << 8);
    out += kB64[(v >> 18) & 63];
    out += kB64[(v >> 12) & 63];
    out += kB64[(v >> 6) & 63];
    out += '=';
  }
  return out;
}

std::string unb64(std::string_view in) {
  auto val = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+' || c == '-') return 62;
    if (c == '/' || c == '_') return 63;
    return -1;
  };
  std::string out;
  uint32_t acc = 0;
  int bits = 0;
  for (char c : in) {
    int v = val(c);
    if (v < 0) continue;  // padding
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out += static_cast<char>((acc >> bits) & 0xff);
    }
  }
  return out;
}

// grpc-gateway writes int64 as strings and leaves out zero values.
int64_t int64Field(const json& j, const char* name) {
  auto it = j.find(name);
  if (it == j.end()) return 0;
  if (it->is_string()) return parse::toInt(it->get<std::string>()).value_or(0);
  if (it->is_number_integer()) return it->get<int64_t>();
  return 0;
}

using etcd::EndpointFailure;
using etcd::HttpError;

}  // namespace

std::optional<std::vector<net::HostPort>> parseEtcdEndpoints(std::string_view text, bool* tls) {
  if (text.substr(0, kScheme.size()) == kScheme) text.remove_prefix(kScheme.size());
  while (!text.empty() && text.back() == '/') text.remove_suffix(1);
  std::vector<net::HostPort> out;
  std::optional<bool> https;  // the scheme of the first entry that names one; the others must agree
  while (!text.empty()) {
    auto comma = text.find(',');
    auto one = text.substr(0, comma);
    while (!one.empty() && one.back() == '/') one.remove_suffix(1);
    for (bool secure : {false, true}) {
      std::string_view scheme = secure ? "https://" : "http://";
      if (one.substr(0, scheme.size()) != scheme) continue;
      if (https && *https != secure) return std::nullopt;
      https = secure;
      one.remove_prefix(scheme.size());
    }
    auto hp = net::parseHostPort(one, kEtcdPort);
    if (!hp || hp->host.empty()) return std::nullopt;
    out.push_back(*hp);
    if (comma == std::string_view::npos) break;
    text.remove_prefix(comma + 1);
  }
  if (out.empty()) return std::nullopt;
  if (tls) *tls = https.value_or(false);
  return out;
}

void etcdOptionsFromEnvironment(EtcdStoreOptions& o) {
  auto env = [](const char* name, std::string& out) {
    if (const char* v = std::getenv(name); v != nullptr && *v != '\0') out = v;
  };
  env(kEtcdCaCertEnv, o.caCert);
  env(kEtcdCertEnv, o.cert);
  env(kEtcdKeyEnv, o.key);
  env(kEtcdUserEnv, o.user);
  env(kEtcdPasswordEnv, o.password);
}

bool isEtcdAddress(std::string_view address) { return address.substr(0, kScheme.size()) == kScheme; }

struct EtcdStore::Kv {
  std::string value;
  int64_t modRevision = 0;
};

EtcdStore::EtcdStore(EtcdStoreOptions options) : options_(std::move(options)) {
  DTRAIN_CHECK(!options_.endpoints.empty(), "etcd store: no endpoint given");
  tls_ = etcd::makeTlsContext(options_);
}

EtcdStore::~EtcdStore() = default;

std::shared_ptr<EtcdStore> EtcdStore::connect(const EtcdStoreOptions& options) {
  std::shared_ptr<EtcdStore> store(new EtcdStore(options));
  Deadline deadline(options.connectTimeout);
  store->range(store->full("__dtrain_ping__"), deadline);
  return store;
}

std::string EtcdStore::address() const {
  std::string out(kScheme);
  for (size_t i = 0; i < options_.endpoints.size(); ++i)
    out += (i ? "," : "") + std::string(options_.tls ? "https://" : "") + options_.endpoints[i].str();
  return out;
}

std::string EtcdStore::currentEndpoint() const {
  std::lock_guard<std::mutex> lock(mu_);
  return options_.endpoints[current_].str();
}

std::string EtcdStore::call(const std::string& path, const std::string& body, const Deadline& deadline) {
  std::lock_guard<std::mutex> lock(mu_);
  std::string last;
  Millis backoff{20};
  size_t failures = 0;
  for (;;) {
    const auto& ep = options_.endpoints[current_];
    try {
      auto t = std::max(Millis(1), std::min(options_.requestTimeout, deadline.remaining()));
      if (!http_) http_ = std::make_unique<etcd::Http>(ep, t, tls_.get());
      for (int attempt = 0;; ++attempt) {
        try {
          auto answer = http_->exchange(path, body, t, tokenLocked(deadline));
          requests_.fetch_add(1, std::memory_order_relaxed);
          return answer;
        } catch (const HttpError& e) {
          // A token etcd no longer accepts (expired, or issued before a restart): authenticate again, once.
          if (!options_.user.empty() && attempt == 0 && (e.status == 401 || e.body.find("invalid auth token") != std::string::npos)) {
            token_.clear();
            continue;
          }
          refuseIfAuthError(ep.str(), e.status, e.body);
          DTRAIN_THROW(Error, "{}", e.what());
        }
      }
    } catch (const EndpointFailure& e) {
      last = e.what();
      http_.reset();
      token_.clear();  // etcd's simple tokens are the issuing member's: authenticate again at the next one
      if (failures++ == 0 || failures % options_.endpoints.size() == 0)
        log::debug("etcd store: {}; trying the next endpoint", last);
      current_ = (current_ + 1) % options_.endpoints.size();
    }
    if (deadline.expired())
      DTRAIN_THROW(RendezvousError, "no etcd endpoint of {} answered {} in time: {}", address(), path, last);
    // A full pass over the endpoints failed: back off a little (an election takes ~1 s) before the next pass.
    if (current_ == 0 || options_.endpoints.size() == 1) {
      std::this_thread::sleep_for(std::min(backoff, deadline.remaining()));
      backoff = std::min(backoff * 2, Millis(500));
    }
  }
}

const std::string& EtcdStore::tokenLocked(const Deadline& deadline) {
  if (options_.user.empty() || !token_.empty()) return token_;
  auto t = std::max(Millis(1), std::min(options_.requestTimeout, deadline.remaining()));
  const auto& ep = options_.endpoints[current_];
  try {
    auto res = json::parse(http_->exchange("/v3/auth/authenticate",
                                           json{{"name", options_.user}, {"password", options_.password}}.dump(), t, ""));
    token_ = res.value("token", "");
  } catch (const HttpError& e) {
    refuseIfAuthError(ep.str(), e.status, e.body);
    DTRAIN_THROW(Error, "{}", e.what());
  }
  DTRAIN_CHECK_AS(EtcdRefusedError, !token_.empty(),
                  "etcd at {} gave no token for user '{}': is authentication enabled there (etcdctl auth enable)?",
                  ep.str(), options_.user);
  return token_;
}

void EtcdStore::refuseIfAuthError(const std::string& endpoint, unsigned status, const std::string& body) const {
  auto has = [&](const char* text) { return body.find(text) != std::string::npos; };
  if (has("authentication failed") || has("invalid user ID or password"))
    DTRAIN_THROW(EtcdRefusedError,
                 "etcd at {} refused user '{}': wrong user name or password (--rdzv-conf user=...,password=..., or "
                 "the environment variable {})",
                 endpoint, options_.user, kEtcdPasswordEnv);
  if (has("user name is empty") || has("user name not found") || (status == 401 && options_.user.empty()))
    DTRAIN_THROW(EtcdRefusedError,
                 "etcd at {} requires authentication (it answered {}: {}): give --rdzv-conf user=...,password=...",
                 endpoint, status, body.substr(0, 200));
  if (has("permission denied"))
    DTRAIN_THROW(EtcdRefusedError,
                 "etcd at {} denied user '{}' access to dtrain's keys (it answered {}: {}): grant the user a role "
                 "with read/write on the /dtrain/ prefix",
                 endpoint, options_.user, status, body.substr(0, 200));
}

std::optional<EtcdStore::Kv> EtcdStore::range(const std::string& fullKey, const Deadline& deadline, int64_t* revision) {
  auto res = json::parse(call("/v3/kv/range", json{{"key", b64(fullKey)}}.dump(), deadline));
  if (revision) *revision = int64Field(res.value("header", json::object()), "revision");
  auto kvs = res.find("kvs");
  if (kvs == res.end() || !kvs->is_array() || kvs->empty()) return std::nullopt;
  const auto& kv = kvs->front();
  return Kv{unb64(kv.value("value", "")), int64Field(kv, "mod_revision")};
}

int64_t EtcdStore::leaseFor(const std::string& fullKey, const Deadline& deadline) {
  if (fullKey.find("/hb/") == std::string::npos || options_.leaseTtlSeconds <= 0) return 0;
  std::lock_guard<std::mutex> lock(leaseMu_);
  // A lease renewed less than a third of its TTL ago cannot have expired: no keepalive (a request) for it, so a
  // heartbeat is one request, not two.
  const auto now = Clock::now();
  if (lease_ != 0 && now - leaseRenewed_ < std::chrono::seconds(options_.leaseTtlSeconds) / 3) return lease_;
  if (lease_ != 0) {
    auto res = json::parse(call("/v3/lease/keepalive", json{{"ID", std::to_string(lease_)}}.dump(), deadline));
    // keepalive answers {"result": {"TTL": ...}}; a TTL of 0 (or none) means the lease expired: grant another.
    auto result = res.value("result", json::object());
    if (int64Field(result, "TTL") > 0) {
      leaseRenewed_ = now;
      return lease_;
    }
  }
  auto res = json::parse(call("/v3/lease/grant", json{{"TTL", std::to_string(options_.leaseTtlSeconds)}}.dump(), deadline));
  lease_ = int64Field(res, "ID");
  leaseRenewed_ = now;
  return lease_;
}

void EtcdStore::set(std::string_view key, std::string_view value) {
  checkKey(key);
  checkValue(value);
  Deadline deadline(timeout_);
  auto k = full(key);
  json req{{"key", b64(k)}, {"value", b64(value)}};
  if (auto lease = leaseFor(k, deadline)) req["lease"] = std::to_string(lease);
  call("/v3/kv/put", req.dump(), deadline);
}

std::optional<std::string> EtcdStore::tryGet(std::string_view key) {
  checkKey(key);
  auto kv = range(full(key), Deadline(timeout_));
  if (!kv) return std::nullopt;
  return kv->value;
}

std::string EtcdStore::get(std::string_view key, Millis timeout) {
  checkKey(key);
  Deadline deadline(timeout);
  auto k = full(key);
  for (;;) {
    if (auto kv = range(k, Deadline(std::max(timeout_, Millis(1000))))) return kv->value;
    if (!waitOne(k, deadline))
      DTRAIN_THROW(TimeoutError, "etcd store at {}: key '{}' did not appear within {} ms", address(), key,
                   timeout.count());
  }
}

bool EtcdStore::waitOne(const std::string& fullKey, const Deadline& deadline) {
  std::string last;
  size_t endpoint = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    endpoint = current_;
  }
  for (;;) {
    int64_t revision = 0;
    if (range(fullKey, Deadline(std::max(timeout_, Millis(1000))), &revision)) return true;  // authenticates
    if (deadline.expired()) return false;
    std::string token;
    {
      std::lock_guard<std::mutex> lock(mu_);
      token = token_;
    }
    try {
      etcd::Http watcher(options_.endpoints[endpoint], std::min(options_.requestTimeout, deadline.remaining()),
                         tls_.get());
      json req{{"create_request", {{"key", b64(fullKey)}, {"start_revision", std::to_string(revision + 1)}}}};
      if (watcher.watch(req.dump(), deadline, options_.requestTimeout, token)) continue;  // an event: re-check
      return false;
    } catch (const EndpointFailure& e) {
      last = e.what();
      endpoint = (endpoint + 1) % options_.endpoints.size();
      log::debug("etcd store: watch on {}: {}; trying the next endpoint", options_.endpoints[endpoint].str(), last);
      std::this_thread::sleep_for(std::min(Millis(50), deadline.remaining()));
    }
  }
}

bool EtcdStore::wait(const std::vector<std::string>& keys, Millis timeout) {
  for (const auto& k : keys) checkKey(k);
  Deadline deadline(timeout);
  // Each key must exist; once one does it stays (keys are removed only by their owners, after the waits).
  for (const auto& k : keys)
    if (!waitOne(full(k), deadline)) return false;
  return true;
}

bool EtcdStore::check(const std::vector<std::string>& keys) {
  for (const auto& k : keys) {
    checkKey(k);
    if (!range(full(k), Deadline(timeout_))) return false;
  }
  return true;
}

bool EtcdStore::remove(std::string_view key) {
  checkKey(key);
  auto res = json::parse(call("/v3/kv/deleterange", json{{"key", b64(full(key))}}.dump(), Deadline(timeout_)));
  return int64Field(res, "deleted") > 0;
}

int64_t EtcdStore::numKeys() {
  // Every key under the prefix: range [prefix, prefix + 1) in the last byte (etcd's "prefix end").
  std::string start = options_.prefix.empty() ? std::string(1, '\0') : options_.prefix;
  std::string end = options_.prefix;
  if (end.empty()) {
    end = std::string(1, '\0');  // with key "\0": the whole keyspace
  } else {
    while (!end.empty() && static_cast<unsigned char>(end.back()) == 0xff) end.pop_back();
    if (!end.empty()) end.back() = static_cast<char>(end.back() + 1);
  }
  auto res = json::parse(call("/v3/kv/range",
                              json{{"key", b64(start)}, {"range_end", b64(end)}, {"count_only", true}}.dump(),
                              Deadline(timeout_)));
  return int64Field(res, "count");
}

std::string EtcdStore::compareSet(std::string_view key, std::string_view expected, std::string_view desired) {
  checkKey(key);
  checkValue(desired);
  Deadline deadline(timeout_);
  const auto k = b64(full(key));
  const json put = {{"request_put", {{"key", k}, {"value", b64(desired)}}}};
  const json read = {{"request_range", {{"key", k}}}};
  for (bool missingTried = false;;) {
    // A missing key matches an empty `expected` (c10d semantics), and so does an existing empty value.
    json compare = expected.empty() && !missingTried
                       ? json{{"key", k}, {"target", "CREATE"}, {"result", "EQUAL"}, {"create_revision", "0"}}
                       : json{{"key", k}, {"target", "VALUE"}, {"result", "EQUAL"}, {"value", b64(expected)}};
    json txn{{"compare", json::array({compare})}, {"success", json::array({put})}, {"failure", json::array({read})}};
    auto res = json::parse(call("/v3/kv/txn", txn.dump(), deadline));
    if (res.value("succeeded", false)) return std::string(desired);
    std::optional<std::string> current;
    for (const auto& r : res.value("responses", json::array())) {
      auto kvs = r.value("response_range", json::object()).value("kvs", json::array());
      if (!kvs.empty()) current = unb64(kvs.front().value("value", ""));
    }
    if (!current) {
      if (expected.empty()) continue;  // deleted between: try again
      return std::string();
    }
    if (expected.empty() && current->empty() && !missingTried) {
      missingTried = true;  // the key exists with an empty value: compare on the value instead
      continue;
    }
    return *current;
  }
}

int64_t EtcdStore::add(std::string_view key, int64_t delta) {
  checkKey(key);
  Deadline deadline(timeout_);
  const auto fk = full(key);
  const auto k = b64(fk);
  for (;;) {
    auto kv = range(fk, deadline);
    int64_t current = 0;
    if (kv) {
      auto parsed = parse::toInt(kv->value);
      DTRAIN_CHECK(parsed.has_value(), "store add('{}'): current value is not an integer", key);
      current = *parsed;
    }
    int64_t result = 0;
    DTRAIN_CHECK(!__builtin_add_overflow(current, delta, &result), "store add('{}'): {} + {} overflows int64", key,
                 current, delta);
    if (kv && delta == 0) return current;  // a read: nothing to write
    json compare = kv ? json{{"key", k}, {"target", "MOD"}, {"result", "EQUAL"},
                             {"mod_revision", std::to_string(kv->modRevision)}}
                      : json{{"key", k}, {"target", "CREATE"}, {"result", "EQUAL"}, {"create_revision", "0"}};
    json put = {{"request_put", {{"key", k}, {"value", b64(std::to_string(result))}}}};
    json txn{{"compare", json::array({compare})}, {"success", json::array({put})}};
    if (json::parse(call("/v3/kv/txn", txn.dump(), deadline)).value("succeeded", false)) return result;
    if (deadline.expired()) DTRAIN_THROW(TimeoutError, "etcd store at {}: add('{}') kept conflicting", address(), key);
  }
}

void EtcdStore::append(std::string_view key, std::string_view value) {
  checkKey(key);
  Deadline deadline(timeout_);
  const auto fk = full(key);
  const auto k = b64(fk);
  for (;;) {
    auto kv = range(fk, deadline);
    std::string next = kv ? kv->value + std::string(value) : std::string(value);
    DTRAIN_CHECK(next.size() <= kMaxValueBytes, "store append('{}') would exceed the value limit of {} bytes", key,
                 kMaxValueBytes);
    json compare = kv ? json{{"key", k}, {"target", "MOD"}, {"result", "EQUAL"},
                             {"mod_revision", std::to_string(kv->modRevision)}}
                      : json{{"key", k}, {"target", "CREATE"}, {"result", "EQUAL"}, {"create_revision", "0"}};
    json put = {{"request_put", {{"key", k}, {"value", b64(next)}}}};
    json txn{{"compare", json::array({compare})}, {"success", json::array({put})}};
    if (json::parse(call("/v3/kv/txn", txn.dump(), deadline)).value("succeeded", false)) return;
    if (deadline.expired()) DTRAIN_THROW(TimeoutError, "etcd store at {}: append('{}') kept conflicting", address(), key);
  }
}

// Runs of set/tryGet/remove go out as one txn without compares (its success branch holds the operations, in
// order, and always runs), cut at kEtcdTxnOps operations, at ~1 MiB (etcd refuses requests over 1.5 MiB by
// default) and before a key the txn already names (etcd refuses a txn that writes one key twice). A get is the
// txn's last operation and, when its key is missing, then blocks like get() before anything after it runs; add,
// compareSet and append are their own requests (they read, then write under a compare). The first failure is
// thrown, and the ops after it are not run.
std::vector<StoreResult> EtcdStore::batch(const std::vector<StoreOp>& ops) {
  using Kind = StoreOp::Kind;
  for (const auto& op : ops) {
    checkKey(op.key);
    checkValue(op.value);
  }
  std::vector<StoreResult> results(ops.size());
  Deadline deadline(timeout_);
  json txn = json::array();
  std::vector<size_t> inTxn;       // op index of each txn operation
  std::vector<std::string> named;  // full keys the txn names
  size_t txnBytes = 0;
  auto flush = [&] {
    if (inTxn.empty()) return;
    auto res = json::parse(call("/v3/kv/txn", json{{"success", txn}}.dump(), deadline));
    auto responses = res.value("responses", json::array());
    for (size_t j = 0; j < inTxn.size(); ++j) {
      const auto& op = ops[inTxn[j]];
      auto& r = results[inTxn[j]];
      const json one = j < responses.size() ? responses[j] : json::object();
      if (op.kind == Kind::kTryGet || op.kind == Kind::kGet) {
        auto kvs = one.value("response_range", json::object()).value("kvs", json::array());
        if (!kvs.empty()) r.value = unb64(kvs.front().value("value", ""));
      } else if (op.kind == Kind::kRemove) {
        r.number = int64Field(one.value("response_delete_range", json::object()), "deleted") > 0 ? 1 : 0;
      }
    }
    txn = json::array();
    inTxn.clear();
    named.clear();
    txnBytes = 0;
  };
  for (size_t i = 0; i < ops.size(); ++i) {
    const auto& op = ops[i];
    auto& r = results[i];
    const auto fk = full(op.key);
    if (op.kind == Kind::kAdd || op.kind == Kind::kCompareSet || op.kind == Kind::kAppend) {
      flush();
      if (op.kind == Kind::kAdd) r.number = add(op.key, op.delta);
      else if (op.kind == Kind::kCompareSet) r.value = compareSet(op.key, op.expected, op.value);
      else append(op.key, op.value);
      continue;
    }
    const size_t bytes = fk.size() + op.value.size() * 4 / 3 + 64;
    if (inTxn.size() >= kEtcdTxnOps || (txnBytes + bytes > (1u << 20) && !inTxn.empty()) ||
        std::find(named.begin(), named.end(), fk) != named.end())
      flush();
    const auto k = b64(fk);
    if (op.kind == Kind::kSet) {
      json put{{"key", k}, {"value", b64(op.value)}};
      if (auto lease = leaseFor(fk, deadline)) put["lease"] = std::to_string(lease);
      txn.push_back({{"request_put", put}});
    } else if (op.kind == Kind::kRemove) {
      txn.push_back({{"request_delete_range", {{"key", k}}}});
    } else {
      txn.push_back({{"request_range", {{"key", k}}}});
    }
    inTxn.push_back(i);
    named.push_back(fk);
    txnBytes += bytes;
    if (op.kind == Kind::kGet) {
      flush();
      if (!r.value) {
        try {
          r.value = get(op.key, op.timeout);  // blocks (a watch) until the key exists
        } catch (const TimeoutError&) {
          r.value.reset();  // a timed-out get is a result in a batch
        }
      }
    }
  }
  flush();
  return results;
}

void EtcdStore::multiSet(const std::vector<std::pair<std::string, std::string>>& entries) {
  std::vector<StoreOp> ops;
  ops.reserve(entries.size());
  for (const auto& [key, value] : entries) ops.push_back(StoreOp::set(key, value));
  batch(ops);
}

std::vector<std::optional<std::string>> EtcdStore::multiGet(const std::vector<std::string>& keys) {
  std::vector<StoreOp> ops;
  ops.reserve(keys.size());
  for (const auto& key : keys) ops.push_back(StoreOp::tryGet(key));
  auto results = batch(ops);
  std::vector<std::optional<std::string>> values;
  values.reserve(results.size());
  for (auto& r : results) values.push_back(std::move(r.value));
  return values;
}

std::shared_ptr<Store> EtcdStore::clone() {
  std::shared_ptr<EtcdStore> copy(new EtcdStore(options_));
  copy->setTimeout(timeout_);
  return copy;
}

}  // namespace dtrain::rendezvous
