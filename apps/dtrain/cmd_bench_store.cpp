// `dtrain bench store`: throughput and latency of the TCP store under N concurrent clients doing set/get
// pairs, against an in-process server (default) or a running store (--store HOST:PORT).
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <latch>
#include <memory>
#include <thread>

#include "apps/dtrain/commands.h"
#include "lib/common/clock.h"
#include "lib/common/error.h"
#include "lib/common/parse.h"
#include "rendezvous/tcp_store_client.h"
#include "rendezvous/tcp_store_server.h"

namespace dtrain::app {

namespace {

struct BenchStoreArgs {
  std::string store;
  int clients = 64;
  double seconds = 2.0;
  int valueBytes = 64;
  std::string connectTimeout = "30s";
};

struct ClientResult {
  std::vector<uint32_t> setNs, getNs;  // one latency per op
  std::exception_ptr error;
};

double percentileUs(const std::vector<uint32_t>& sorted, double p) {
  if (sorted.empty()) return 0.0;
  auto i = static_cast<size_t>(p * static_cast<double>(sorted.size() - 1) + 0.5);
  return sorted[std::min(i, sorted.size() - 1)] / 1000.0;
}

void printRow(const char* name, double opsPerSec, std::vector<uint32_t>* lat) {
  if (lat == nullptr) {
    std::printf("%-6s %12.0f\n", name, opsPerSec);
    return;
  }
  std::sort(lat->begin(), lat->end());
  std::printf("%-6s %12.0f %9.1f %9.1f %9.1f %9.1f %9.1f\n", name, opsPerSec, percentileUs(*lat, 0.5),
              percentileUs(*lat, 0.9), percentileUs(*lat, 0.99), percentileUs(*lat, 0.999),
              lat->empty() ? 0.0 : lat->back() / 1000.0);
}

uint32_t nanosSince(Clock::time_point t) {
  auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t).count();
  return static_cast<uint32_t>(std::min<int64_t>(ns, UINT32_MAX));
}

int runBench(const BenchStoreArgs& a) {
  DTRAIN_CHECK_AS(UsageError, a.clients > 0, "--clients {}: expected at least 1", a.clients);
  DTRAIN_CHECK_AS(UsageError, a.seconds > 0, "--seconds {}: expected a positive duration", a.seconds);
  DTRAIN_CHECK_AS(UsageError, a.valueBytes >= 0 && static_cast<size_t>(a.valueBytes) <= rendezvous::kMaxValueBytes,
                  "--value-bytes {}: expected 0..{}", a.valueBytes, rendezvous::kMaxValueBytes);
  auto connectTimeout = parse::toDuration(a.connectTimeout);
  DTRAIN_CHECK_AS(UsageError, connectTimeout.has_value(), "--connect-timeout {}: expected a duration such as 30s",
                  a.connectTimeout);
  std::unique_ptr<rendezvous::TcpStoreServer> server;
  std::string address = a.store;
  if (address.empty()) {
    rendezvous::TcpStoreServerOptions o;
    o.host = "127.0.0.1";
    server = rendezvous::TcpStoreServer::start(o);
    address = server->address();
  }

  const auto n = static_cast<size_t>(a.clients);
  const std::string value(static_cast<size_t>(a.valueBytes), 'v');
  const std::string prefix = fmt::format("/dtrain-bench/{}/", ::getpid());
  std::vector<ClientResult> results(n);
  std::vector<std::thread> threads;
  std::latch ready(static_cast<std::ptrdiff_t>(n) + 1);
  std::latch go(1);
  std::atomic<bool> stop{false};
  for (size_t i = 0; i < n; ++i)
    threads.emplace_back([&, i] {
      auto& r = results[i];
      rendezvous::StorePtr store;
      try {
        store = rendezvous::connectStore(address, *connectTimeout);
      } catch (...) {
        r.error = std::current_exception();
      }
      ready.count_down();
      go.wait();
      if (!store) return;
      const std::string key = prefix + std::to_string(i);
      r.setNs.reserve(1 << 16);
      r.getNs.reserve(1 << 16);
      try {
        while (!stop.load(std::memory_order_relaxed)) {
          auto t0 = Clock::now();
          store->set(key, value);
          r.setNs.push_back(nanosSince(t0));
          auto t1 = Clock::now();
          auto got = store->get(key, std::chrono::seconds(30));
          r.getNs.push_back(nanosSince(t1));
          if (got.size() != value.size()) throw Error("store bench: get returned a value of the wrong size");
        }
        store->remove(key);
      } catch (...) {
        r.error = std::current_exception();
        stop = true;
      }
    });
  ready.arrive_and_wait();
  auto start = Clock::now();
  go.count_down();
  std::this_thread::sleep_for(std::chrono::duration<double>(a.seconds));  // the measured interval
  stop = true;
  for (auto& t : threads) t.join();
  double elapsed = secondsSince(start);
  for (auto& r : results)
    if (r.error) std::rethrow_exception(r.error);

  std::vector<uint32_t> sets, gets;
  for (auto& r : results) {
    sets.insert(sets.end(), r.setNs.begin(), r.setNs.end());
    gets.insert(gets.end(), r.getNs.begin(), r.getNs.end());
  }
  std::printf("dtrain bench store: %d clients x %.1f s, %d-byte values, %s store at %s\n", a.clients, elapsed,
              a.valueBytes, server ? "in-process" : "external", address.c_str());
  std::printf("%-6s %12s %9s %9s %9s %9s %9s\n", "op", "ops/s", "p50 us", "p90 us", "p99 us", "p99.9 us",
              "max us");
  double setRate = static_cast<double>(sets.size()) / elapsed;
  double getRate = static_cast<double>(gets.size()) / elapsed;
  printRow("set", setRate, &sets);
  printRow("get", getRate, &gets);
  printRow("total", setRate + getRate, nullptr);
  std::fflush(stdout);
  return 0;
}

}  // namespace

void addBenchStore(CLI::App& bench, Action& action) {
  auto args = std::make_shared<BenchStoreArgs>();
  auto* sub = bench.add_subcommand("store", "Store throughput and latency: N clients doing set/get pairs");
  sub->add_option("--store", args->store, "HOST:PORT of a running store (default: start one in this process)");
  sub->add_option("--clients", args->clients, "Concurrent clients, one connection and thread each")
      ->capture_default_str();
  sub->add_option("--seconds", args->seconds, "Measured duration")->capture_default_str();
  sub->add_option("--value-bytes", args->valueBytes, "Size of each value")->capture_default_str();
  sub->add_option("--connect-timeout", args->connectTimeout, "How long each client retries connecting")
      ->capture_default_str();
  sub->callback([&action, args] { action = [args] { return runBench(*args); }; });
}

}  // namespace dtrain::app
