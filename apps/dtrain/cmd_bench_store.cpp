// `dtrain bench store`: CLI parsing and the table; rendezvous/store_bench.h measures.
#include <cstdio>
#include <memory>

#include "apps/dtrain/commands.h"
#include "lib/common/error.h"
#include "lib/common/parse.h"
#include "rendezvous/store_bench.h"

namespace dtrain::app {

namespace {

struct BenchStoreArgs {
  std::string store;
  int clients = 64;
  double seconds = 2.0;
  int valueBytes = 64;
  std::string connectTimeout = "30s";
};

void printRow(const char* name, const rendezvous::OpFigures& f) {
  std::printf("%-6s %12.0f %9.1f %9.1f %9.1f %9.1f %9.1f\n", name, f.opsPerSecond, f.p50Us, f.p90Us, f.p99Us,
              f.p999Us, f.maxUs);
}

int runBench(const BenchStoreArgs& a) {
  DTRAIN_CHECK_AS(UsageError, a.clients > 0, "--clients {}: expected at least 1", a.clients);
  DTRAIN_CHECK_AS(UsageError, a.seconds > 0, "--seconds {}: expected a positive duration", a.seconds);
  DTRAIN_CHECK_AS(UsageError, a.valueBytes >= 0 && static_cast<size_t>(a.valueBytes) <= rendezvous::kMaxValueBytes,
                  "--value-bytes {}: expected 0..{}", a.valueBytes, rendezvous::kMaxValueBytes);
  const auto connectTimeout = parse::durationFlag("--connect-timeout", a.connectTimeout);
  rendezvous::StoreBenchOptions o;
  o.address = a.store;
  o.clients = a.clients;
  o.duration = std::chrono::duration<double>(a.seconds);
  o.valueBytes = static_cast<size_t>(a.valueBytes);
  o.connectTimeout = connectTimeout;
  const auto r = rendezvous::runStoreBenchmark(o);

  std::printf("dtrain bench store: %d clients x %.1f s, %d-byte values, %s store at %s\n", a.clients,
              r.elapsedSeconds, a.valueBytes, r.inProcess ? "in-process" : "external", r.address.c_str());
  std::printf("%-6s %12s %9s %9s %9s %9s %9s\n", "op", "ops/s", "p50 us", "p90 us", "p99 us", "p99.9 us",
              "max us");
  printRow("set", r.set);
  printRow("get", r.get);
  std::printf("%-6s %12.0f\n", "total", r.set.opsPerSecond + r.get.opsPerSecond);
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
