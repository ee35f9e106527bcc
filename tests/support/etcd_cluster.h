// Test support: a real etcd cluster of N members on 127.0.0.1 (Debian etcd-server), in a temporary directory,
// for the etcd store and rendezvous tests. Members can be stopped and restarted (with their data) to test
// failover and leader changes. Everything it started is killed when it is destroyed (tests/support/process.h).
// EtcdCluster::available() is false when the etcd binary is missing: the tests then skip with a message.
#pragma once

#include <signal.h>
#include <unistd.h>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <filesystem>
#include <memory>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "lib/common/clock.h"
#include "lib/common/net.h"
#include "tests/support/process.h"

namespace dtrain::testing {

// TLS for the members' client port (PEM files): the server's certificate and key, the CA clients' certificates
// must chain to (etcd's --client-cert-auth), and a client certificate etcdctl uses.
struct EtcdTls {
  std::string ca, serverCert, serverKey, clientCert, clientKey;
};

class EtcdCluster {
 public:
  static std::string binary() {
    for (const char* p : {"/usr/bin/etcd", "/usr/local/bin/etcd"})
      if (::access(p, X_OK) == 0) return p;
    return {};
  }
  static bool available() { return !binary().empty(); }

  explicit EtcdCluster(int members, std::optional<EtcdTls> tls = std::nullopt) : tls_(std::move(tls)) {
    std::random_device rd;
    dir_ = std::filesystem::temp_directory_path() / fmt::format("dtrain-etcd-{:x}", rd());
    std::filesystem::create_directories(dir_);
    for (int i = 0; i < members; ++i)
      members_.push_back({net::pickFreePort("127.0.0.1"), net::pickFreePort("127.0.0.1"), nullptr, false});
    for (int i = 0; i < members; ++i) start(i);
    waitHealthy(std::chrono::seconds(60));
  }
  ~EtcdCluster() {
    for (auto& m : members_) m.process.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  int size() const { return static_cast<int>(members_.size()); }
  std::string endpoint(int i) const {
    return fmt::format("{}127.0.0.1:{}", tls_ ? "https://" : "", members_[static_cast<size_t>(i)].client);
  }
  // etcdctl with this cluster's TLS client files (when TLS is on) and `args`.
  std::vector<std::string> etcdctl(std::vector<std::string> args) const {
    std::vector<std::string> out{"etcdctl"};
    if (tls_) {
      out.push_back("--cacert=" + tls_->ca);
      out.push_back("--cert=" + tls_->clientCert);
      out.push_back("--key=" + tls_->clientKey);
    }
    out.insert(out.end(), args.begin(), args.end());
    return out;
  }
  // Every member's client endpoint, comma-separated, starting with member `first`.
  std::string endpoints(int first = 0) const {
    std::string out;
    for (int k = 0; k < size(); ++k) out += (k ? "," : "") + endpoint((first + k) % size());
    return out;
  }

  void start(int i) {
    auto& m = members_[static_cast<size_t>(i)];
    std::string cluster;
    for (int k = 0; k < size(); ++k)
      cluster += fmt::format("{}m{}=http://127.0.0.1:{}", k ? "," : "", k, members_[static_cast<size_t>(k)].peer);
    auto client = fmt::format("{}://127.0.0.1:{}", tls_ ? "https" : "http", m.client);
    auto peer = fmt::format("http://127.0.0.1:{}", m.peer);
    RunOptions o;
    o.timeout = std::chrono::hours(1);
    std::vector<std::string> args{binary(), "--name", fmt::format("m{}", i), "--data-dir", (dir_ / fmt::format("m{}", i)).string(),
                                  "--listen-client-urls", client, "--advertise-client-urls", client,
                                  "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                                  "--initial-cluster", cluster, "--initial-cluster-state", m.started ? "existing" : "new",
                                  "--initial-cluster-token", dir_.filename().string(), "--heartbeat-interval", "100",
                                  "--election-timeout", "1000", "--log-level", "error"};
    if (tls_)
      for (const auto& a : {"--cert-file=" + tls_->serverCert, "--key-file=" + tls_->serverKey,
                            "--trusted-ca-file=" + tls_->ca, std::string("--client-cert-auth")})
        args.push_back(a);
    m.process = std::make_unique<Background>(args, o);
    m.started = true;
  }
  // SIGKILL (a crash) or SIGTERM, then wait for the exit.
  void stop(int i, int sig = SIGKILL) {
    auto& m = members_[static_cast<size_t>(i)];
    if (!m.process) return;
    m.process->signal(sig);
    m.process->wait(std::chrono::seconds(30));
    m.process.reset();
  }

  // Index of the member that leads now, or -1 (asks each live member with etcdctl).
  int leader() const {
    for (int i = 0; i < size(); ++i) {
      if (!members_[static_cast<size_t>(i)].process) continue;
      auto r = run(etcdctl({"--endpoints=" + endpoint(i), "endpoint", "status", "-w", "json"}),
                   RunOptions{std::chrono::seconds(10)});
      if (r.exitCode != 0) continue;
      auto j = nlohmann::json::parse(r.out, nullptr, false);
      if (!j.is_array() || j.empty()) continue;
      const auto& s = j[0]["Status"];
      if (s["leader"] == s["header"]["member_id"]) return i;
    }
    return -1;
  }

  // Blocks until every running member answers `endpoint health` (which needs a leader); throws after timeout.
  void waitHealthy(std::chrono::seconds timeout) {
    Deadline deadline(timeout);
    std::string eps;
    for (int i = 0; i < size(); ++i)
      if (members_[static_cast<size_t>(i)].process) eps += (eps.empty() ? "" : ",") + endpoint(i);
    for (;;) {
      auto r = run(etcdctl({"--endpoints=" + eps, "--command-timeout=2s", "endpoint", "health"}),
                   RunOptions{std::chrono::seconds(10)});
      if (r.exitCode == 0) return;
      if (deadline.expired()) throw std::runtime_error("etcd cluster not healthy: " + r.out + r.err);
      std::this_thread::sleep_for(std::chrono::milliseconds(100));  // polling a condition, bounded by the deadline
    }
  }

 private:
  struct Member {
    uint16_t client, peer;
    std::unique_ptr<Background> process;
    bool started;
  };
  std::optional<EtcdTls> tls_;
  std::filesystem::path dir_;
  std::vector<Member> members_;
};

}  // namespace dtrain::testing
