// `dtrain bench store` and `dtrain bench rdzv`: CLI parsing and the tables; rendezvous/store_bench.h and
// rendezvous/rdzv_bench.h measure.
#include <cstdio>
#include <memory>

#include "apps/dtrain/commands.h"
#include "lib/common/error.h"
#include "lib/common/parse.h"
#include "rendezvous/rdzv_bench.h"
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

struct BenchRdzvArgs {
  std::string store;
  int agents = 4096;
  int nproc = 8;
  int beats = 5;
  std::string interval = "1s";
  std::string connectTimeout = "120s";
  std::string joinTimeout = "300s";
};

int runBenchRdzv(const BenchRdzvArgs& a) {
  DTRAIN_CHECK_AS(UsageError, a.agents > 0, "--agents {}: expected at least 1", a.agents);
  DTRAIN_CHECK_AS(UsageError, a.nproc > 0, "--nproc-per-node {}: expected at least 1", a.nproc);
  DTRAIN_CHECK_AS(UsageError, a.beats >= 0, "--beats {}: expected 0 or more", a.beats);
  rendezvous::RdzvBenchOptions o;
  o.address = a.store;
  o.agents = a.agents;
  o.nprocPerAgent = a.nproc;
  o.beats = a.beats;
  o.interval = parse::durationFlag("--heartbeat-interval", a.interval);
  DTRAIN_CHECK_AS(UsageError, o.interval.count() > 0, "--heartbeat-interval {}: expected a positive duration",
                  a.interval);
  o.connectTimeout = parse::durationFlag("--connect-timeout", a.connectTimeout);
  o.joinTimeout = parse::durationFlag("--rdzv-timeout", a.joinTimeout);
  const auto r = rendezvous::runRdzvBenchmark(o);

  std::printf("dtrain bench rdzv: %d agents x %d workers, one round, %s store at %s\n", a.agents, a.nproc,
              r.inProcess ? "in-process" : "external", r.address.c_str());
  std::printf("connect   %8.3f s   (every agent's store connection)\n", r.connectSeconds);
  std::printf("form      %8.3f s   (all agents join -> the last join returns; world size %d)\n", r.formSeconds,
              r.worldSize);
  std::printf("join      p50 %.1f ms  p99 %.1f ms  max %.1f ms (per agent)\n", r.joinP50Ms, r.joinP99Ms, r.joinMaxMs);
  if (r.formStoreCpuSeconds >= 0)
    std::printf("form CPU  %8.3f s   (this process: agents %.3f s, in-process store io thread %.3f s)\n",
                r.formCpuSeconds, r.formCpuSeconds - r.formStoreCpuSeconds, r.formStoreCpuSeconds);
  else
    std::printf("form CPU  %8.3f s   (this process: the %d agents' threads)\n", r.formCpuSeconds, a.agents);
  std::printf("memory    %8.1f MiB peak resident (this process)\n", r.peakRssMiB);
  std::printf("%d heartbeats per agent at %s, spread over the interval:\n", a.beats, a.interval.c_str());
  std::printf("%-10s %10s %9s %9s %9s %9s %9s\n", "op", "ops/s", "p50 us", "p90 us", "p99 us", "p99.9 us",
              "max us");
  auto row = [](const char* name, const rendezvous::OpFigures& f) {
    std::printf("%-10s %10.0f %9.1f %9.1f %9.1f %9.1f %9.1f\n", name, f.opsPerSecond, f.p50Us, f.p90Us, f.p99Us,
                f.p999Us, f.maxUs);
  };
  row("heartbeat", r.heartbeat);
  std::printf("(heartbeat: bump this agent's counter and read the watched members' counters, one batch)\n");
  if (r.joinRoundTripsPerAgent >= 0)
    std::printf("round trips per agent: %.2f to join, %.2f per heartbeat\n", r.joinRoundTripsPerAgent,
                r.beatRoundTripsPerAgent);
  if (r.inProcess)
    std::printf("store: %llu requests in %llu reply writes, io thread CPU %.2f s over the whole run\n",
                static_cast<unsigned long long>(r.storeRequests), static_cast<unsigned long long>(r.storeReplyWrites),
                r.storeCpuSeconds);
  std::fflush(stdout);
  return 0;
}

}  // namespace

void addBenchRdzv(CLI::App& bench, Action& action) {
  auto args = std::make_shared<BenchRdzvArgs>();
  auto* sub = bench.add_subcommand(
      "rdzv", "Rendezvous at scale: N simulated agents (threads) join one round, then heartbeat and read members");
  sub->add_option("--store", args->store, "HOST:PORT of a running store (default: start one in this process)");
  sub->add_option("--agents", args->agents, "Simulated agents, one thread and connection each")->capture_default_str();
  sub->add_option("--nproc-per-node", args->nproc, "Workers each agent declares")->capture_default_str();
  sub->add_option("--beats", args->beats, "Heartbeats per agent after the round formed")->capture_default_str();
  sub->add_option("--heartbeat-interval", args->interval, "Heartbeat interval")->capture_default_str();
  sub->add_option("--connect-timeout", args->connectTimeout, "How long each agent retries connecting")
      ->capture_default_str();
  sub->add_option("--rdzv-timeout", args->joinTimeout, "How long the round may take to form")->capture_default_str();
  sub->footer(exitCodesHelp({{"0", ""}, {"1", ""}, {"3", ""}, {"4", ""}, {"5", ""}, {"6", ""}}));
  sub->callback([&action, args] { action = [args] { return runBenchRdzv(*args); }; });
}

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
  sub->footer(exitCodesHelp({{"0", ""}, {"1", ""}, {"3", ""}, {"4", ""}, {"5", ""}, {"6", ""}}));
  sub->callback([&action, args] { action = [args] { return runBench(*args); }; });
}

}  // namespace dtrain::app
