#include "rendezvous/store_bench.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <latch>
#include <memory>
#include <thread>

#include "lib/common/clock.h"
#include "lib/common/error.h"
#include "rendezvous/tcp_store_client.h"
#include "rendezvous/tcp_store_server.h"

namespace dtrain::rendezvous {

namespace {

struct ClientResult {
  std::vector<uint64_t> setNs, getNs;  // one latency per op
  std::exception_ptr error;
};

double percentileUs(const std::vector<uint64_t>& sorted, double p) {
  if (sorted.empty()) return 0.0;
  auto i = static_cast<size_t>(p * static_cast<double>(sorted.size() - 1) + 0.5);
  return sorted[std::min(i, sorted.size() - 1)] / 1000.0;
}

uint64_t nanosSince(Clock::time_point t) {
  auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t).count();
  return static_cast<uint64_t>(std::max<int64_t>(ns, 0));
}

// One client's loop: set then get its own key until `stop`, timing each call.
void runClient(StorePtr store, const std::string& key, const std::string& value, const std::atomic<bool>& stop,
               ClientResult& r) {
  r.setNs.reserve(1 << 16);
  r.getNs.reserve(1 << 16);
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
}

}  // namespace

OpFigures summarizeLatencies(std::vector<uint64_t>& latenciesNs, double seconds) {
  std::sort(latenciesNs.begin(), latenciesNs.end());
  OpFigures f;
  f.ops = latenciesNs.size();
  f.opsPerSecond = static_cast<double>(latenciesNs.size()) / seconds;
  f.p50Us = percentileUs(latenciesNs, 0.5);
  f.p90Us = percentileUs(latenciesNs, 0.9);
  f.p99Us = percentileUs(latenciesNs, 0.99);
  f.p999Us = percentileUs(latenciesNs, 0.999);
  f.maxUs = latenciesNs.empty() ? 0.0 : latenciesNs.back() / 1000.0;
  return f;
}

StoreBenchResult runStoreBenchmark(const StoreBenchOptions& options) {
  DTRAIN_CHECK(options.clients > 0, "store bench: {} clients; expected at least 1", options.clients);
  DTRAIN_CHECK(options.valueBytes <= kMaxValueBytes, "store bench: {}-byte values exceed the store's limit of {}",
               options.valueBytes, kMaxValueBytes);
  std::unique_ptr<TcpStoreServer> server;
  StoreBenchResult result;
  result.address = options.address;
  if (result.address.empty()) {
    TcpStoreServerOptions o;
    o.host = "127.0.0.1";
    server = TcpStoreServer::start(o);
    result.address = server->address();
    result.inProcess = true;
  }

  const auto n = static_cast<size_t>(options.clients);
  const std::string value(options.valueBytes, 'v');
  const std::string prefix = fmt::format("/dtrain-bench/{}/", ::getpid());
  std::vector<ClientResult> results(n);
  std::vector<std::thread> threads;
  std::latch ready(static_cast<std::ptrdiff_t>(n) + 1);
  std::latch go(1);
  std::atomic<bool> stop{false};
  for (size_t i = 0; i < n; ++i)
    threads.emplace_back([&, i] {
      auto& r = results[i];
      StorePtr store;
      try {
        store = connectStore(result.address, options.connectTimeout);
      } catch (...) {
        r.error = std::current_exception();
      }
      ready.count_down();
      go.wait();
      if (!store) return;
      try {
        runClient(store, prefix + std::to_string(i), value, stop, r);
      } catch (...) {
        r.error = std::current_exception();
        stop = true;
      }
    });
  ready.arrive_and_wait();
  auto start = Clock::now();
  go.count_down();
  std::this_thread::sleep_for(options.duration);  // the measured interval
  stop = true;
  for (auto& t : threads) t.join();
  result.elapsedSeconds = secondsSince(start);
  for (auto& r : results)
    if (r.error) std::rethrow_exception(r.error);

  std::vector<uint64_t> sets, gets;
  for (auto& r : results) {
    sets.insert(sets.end(), r.setNs.begin(), r.setNs.end());
    gets.insert(gets.end(), r.getNs.begin(), r.getNs.end());
  }
  result.set = summarizeLatencies(sets, result.elapsedSeconds);
  result.get = summarizeLatencies(gets, result.elapsedSeconds);
  return result;
}

}  // namespace dtrain::rendezvous
