#include "rendezvous/rdzv_bench.h"

#include <dirent.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <latch>
#include <memory>
#include <sstream>
#include <thread>

#include "lib/common/clock.h"
#include "lib/common/error.h"
#include "rendezvous/prefix_store.h"
#include "rendezvous/rendezvous.h"
#include "rendezvous/tcp_store_client.h"
#include "rendezvous/tcp_store_server.h"

namespace dtrain::rendezvous {

namespace {

struct AgentResult {
  std::vector<uint64_t> beatNs;
  double joinMs = 0;
  Clock::time_point joined;
  int worldSize = 0;
  uint64_t joinRoundTrips = 0, beatRoundTrips = 0;
  std::exception_ptr error;
};

uint64_t nanosSince(Clock::time_point t) {
  auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t).count();
  return static_cast<uint64_t>(std::max<int64_t>(ns, 0));
}

// CPU seconds of this process's thread named `name` (the store's io thread is "dtrain-store"); -1 if none.
double threadCpuSeconds(const std::string& name) {
  DIR* dir = ::opendir("/proc/self/task");
  if (!dir) return -1;
  double total = -1;
  while (auto* e = ::readdir(dir)) {
    std::string tid = e->d_name;
    if (tid == "." || tid == "..") continue;
    std::ifstream comm("/proc/self/task/" + tid + "/comm");
    std::string c;
    std::getline(comm, c);
    if (c != name) continue;
    std::ifstream stat("/proc/self/task/" + tid + "/stat");
    std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
    auto close = text.rfind(')');
    if (close == std::string::npos) continue;
    std::istringstream fields(text.substr(close + 2));
    std::string skip;
    for (int i = 0; i < 11; ++i) fields >> skip;  // state .. cmajflt: fields 3..13
    double utime = 0, stime = 0;
    fields >> utime >> stime;
    total = std::max(total, 0.0) + (utime + stime) / static_cast<double>(::sysconf(_SC_CLK_TCK));
  }
  ::closedir(dir);
  return total;
}

double processCpuSeconds() {
  timespec ts{};
  ::clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

double peakRssMiB() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::strtod(line.c_str() + 6, nullptr) / 1024.0;
  return 0;
}

double percentileMs(std::vector<double>& v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  auto i = static_cast<size_t>(p * static_cast<double>(v.size() - 1) + 0.5);
  return v[std::min(i, v.size() - 1)];
}

}  // namespace

RdzvBenchResult runRdzvBenchmark(const RdzvBenchOptions& options) {
  DTRAIN_CHECK(options.agents > 0, "rdzv bench: {} agents; expected at least 1", options.agents);
  DTRAIN_CHECK(options.nprocPerAgent > 0, "rdzv bench: {} workers per agent; expected at least 1",
               options.nprocPerAgent);
  DTRAIN_CHECK(options.beats >= 0 && options.interval.count() > 0, "rdzv bench: bad heartbeat settings");
  raiseFileLimit();  // the clients' descriptors (and the in-process server's)
  std::unique_ptr<TcpStoreServer> server;
  RdzvBenchResult result;
  result.address = options.address;
  if (result.address.empty()) {
    TcpStoreServerOptions o;
    o.host = "127.0.0.1";
    o.backlog = 4096;
    server = TcpStoreServer::start(o);
    result.address = server->address();
    result.inProcess = true;
  }
  const double cpuBefore = server ? threadCpuSeconds("dtrain-store") : -1;

  const auto n = static_cast<size_t>(options.agents);
  const std::string runId = fmt::format("bench-rdzv-{}-{}", ::getpid(), Clock::now().time_since_epoch().count());
  std::vector<AgentResult> results(n);
  std::vector<std::thread> threads;
  threads.reserve(n);
  std::latch connected(static_cast<std::ptrdiff_t>(n) + 1);
  std::latch go(1);
  std::atomic<bool> failed{false};
  Clock::time_point joinStart{}, beatStart{};
  double cpuAtJoin = 0, cpuAtFormed = 0, storeCpuAtJoin = -1, storeCpuAtFormed = -1;
  // The last agent to finish joining fixes the beats' common origin (the completion runs before any agent is
  // released, so every agent reads it), and the CPU the round took.
  auto origin = [&]() noexcept {
    beatStart = Clock::now();
    cpuAtFormed = processCpuSeconds();
    if (server) storeCpuAtFormed = threadCpuSeconds("dtrain-store");
  };
  std::barrier allJoined(static_cast<std::ptrdiff_t>(n), origin);
  const auto connectStart = Clock::now();
  for (size_t i = 0; i < n; ++i)
    threads.emplace_back([&, i] {
      auto& r = results[i];
      StorePtr store;
      TcpStoreClient* client = nullptr;  // counts the round trips
      auto trips = [&] { return client ? client->roundTrips() : 0; };
      try {
        store = connectStore(result.address, options.connectTimeout);
        client = dynamic_cast<TcpStoreClient*>(store.get());
        store->setTimeout(options.joinTimeout);
      } catch (...) {
        r.error = std::current_exception();
        failed = true;
      }
      connected.count_down();
      go.wait();
      std::optional<Rendezvous> rdzv;
      std::optional<RoundInfo> info;
      if (store && !failed) {
        try {
          RendezvousOptions ro;
          ro.minNodes = ro.maxNodes = options.agents;
          ro.joinTimeout = options.joinTimeout;
          ro.endpoint = result.address;
          NodeInfo self;
          self.nproc = options.nprocPerAgent;
          self.host = "127.0.0.1";
          self.hostname = fmt::format("sim{}", i);
          self.pid = static_cast<int>(i);
          self.masterPort = static_cast<uint16_t>(30000 + i % 1000);
          rdzv.emplace(std::make_shared<PrefixStore>(runPrefix(runId), store), ro, self);
          auto t0 = Clock::now();
          const auto tripsBefore = trips();
          info = rdzv->join();
          r.joined = Clock::now();
          r.joinRoundTrips = trips() - tripsBefore;
          r.joinMs = std::chrono::duration<double, std::milli>(r.joined - t0).count();
          r.worldSize = info->worldSize;
        } catch (...) {
          r.error = std::current_exception();
          failed = true;
        }
      }
      allJoined.arrive_and_wait();
      if (!info || failed) return;
      try {
        // Spread this agent's beats over the interval, as independent agents' timers are.
        auto next = beatStart + options.interval * static_cast<int64_t>(i) / static_cast<int64_t>(n);
        r.beatNs.reserve(static_cast<size_t>(options.beats));
        const auto tripsBefore = trips();
        for (int b = 0; b < options.beats && !failed; ++b) {
          std::this_thread::sleep_until(next);
          next += options.interval;
          auto t0 = Clock::now();
          rdzv->beat(*info, std::chrono::hours(1));  // our counter and the watched ones: what an agent does
          r.beatNs.push_back(nanosSince(t0));
        }
        r.beatRoundTrips = trips() - tripsBefore;
      } catch (...) {
        r.error = std::current_exception();
        failed = true;
      }
    });
  connected.arrive_and_wait();
  result.connectSeconds = secondsSince(connectStart);
  joinStart = Clock::now();
  cpuAtJoin = processCpuSeconds();
  if (server) storeCpuAtJoin = threadCpuSeconds("dtrain-store");
  go.count_down();
  for (auto& t : threads) t.join();
  for (auto& r : results)
    if (r.error) std::rethrow_exception(r.error);

  Clock::time_point lastJoin = joinStart;
  std::vector<double> joins;
  std::vector<uint64_t> beats;
  uint64_t joinTrips = 0, beatTrips = 0;
  for (auto& r : results) {
    lastJoin = std::max(lastJoin, r.joined);
    joins.push_back(r.joinMs);
    beats.insert(beats.end(), r.beatNs.begin(), r.beatNs.end());
    joinTrips += r.joinRoundTrips;
    beatTrips += r.beatRoundTrips;
  }
  if (joinTrips > 0) {
    result.joinRoundTripsPerAgent = static_cast<double>(joinTrips) / static_cast<double>(n);
    if (options.beats > 0)
      result.beatRoundTripsPerAgent = static_cast<double>(beatTrips) / static_cast<double>(n) / options.beats;
  }
  result.formSeconds = std::chrono::duration<double>(lastJoin - joinStart).count();
  result.formCpuSeconds = cpuAtFormed - cpuAtJoin;
  if (storeCpuAtFormed >= 0) result.formStoreCpuSeconds = storeCpuAtFormed - std::max(storeCpuAtJoin, 0.0);
  result.peakRssMiB = peakRssMiB();
  result.worldSize = results.front().worldSize;
  result.joinP50Ms = percentileMs(joins, 0.5);
  result.joinP99Ms = percentileMs(joins, 0.99);
  result.joinMaxMs = joins.empty() ? 0 : joins.back();
  result.beatSeconds = std::chrono::duration<double>(options.interval).count() * options.beats;
  result.heartbeat = summarizeLatencies(beats, std::max(result.beatSeconds, 1e-9));
  if (server) {
    result.storeRequests = server->stats().requests;
    result.storeReplyWrites = server->stats().replyWrites;
    double after = threadCpuSeconds("dtrain-store");
    // The io thread may not have named itself yet when the run started: it had used ~no CPU then.
    if (after >= 0) result.storeCpuSeconds = after - std::max(cpuBefore, 0.0);
  }
  return result;
}

}  // namespace dtrain::rendezvous
