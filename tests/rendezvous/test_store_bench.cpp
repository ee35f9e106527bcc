// The store benchmark's library side (rendezvous/store_bench.h): it runs against an in-process or a given
// server and reports consistent figures. No assertion on speed.
#include <doctest/doctest.h>

#include "lib/common/error.h"
#include "rendezvous/rdzv_bench.h"
#include "rendezvous/store_bench.h"
#include "rendezvous/tcp_store_client.h"
#include "rendezvous/tcp_store_server.h"

using namespace dtrain;
using namespace dtrain::rendezvous;

namespace {

void checkFigures(const OpFigures& f) {
  CHECK(f.ops > 0);
  CHECK(f.opsPerSecond > 0);
  CHECK(f.p50Us <= f.p90Us);
  CHECK(f.p90Us <= f.p99Us);
  CHECK(f.p99Us <= f.p999Us);
  CHECK(f.p999Us <= f.maxUs);
}

}  // namespace

TEST_CASE("store bench: latency summary is nearest-rank over the sorted values") {
  std::vector<uint64_t> ns;
  for (uint32_t i = 100; i >= 1; --i) ns.push_back(i * 1000);  // 1..100 us, reversed
  auto f = summarizeLatencies(ns, 2.0);
  CHECK(f.ops == 100);
  CHECK(f.opsPerSecond == doctest::Approx(50.0));
  CHECK(f.p50Us == doctest::Approx(51.0));  // index round(0.5 * 99) = 50
  CHECK(f.p90Us == doctest::Approx(90.0));  // index round(0.9 * 99) = 89
  CHECK(f.p99Us == doctest::Approx(99.0));
  CHECK(f.maxUs == doctest::Approx(100.0));
  std::vector<uint64_t> none;
  auto z = summarizeLatencies(none, 1.0);
  CHECK(z.ops == 0);
  CHECK(z.p50Us == 0.0);
  CHECK(z.maxUs == 0.0);
}

TEST_CASE("store bench: in-process server") {
  StoreBenchOptions o;
  o.clients = 2;
  o.duration = std::chrono::duration<double>(0.1);
  o.valueBytes = 16;
  auto r = runStoreBenchmark(o);
  CHECK(r.inProcess);
  CHECK(r.address.rfind("127.0.0.1:", 0) == 0);
  CHECK(r.elapsedSeconds > 0);
  checkFigures(r.set);
  checkFigures(r.get);
}

TEST_CASE("store bench: a given server, whose keys it cleans up") {
  TcpStoreServerOptions so;
  so.host = "127.0.0.1";
  auto server = TcpStoreServer::start(so);
  StoreBenchOptions o;
  o.address = server->address();
  o.clients = 3;
  o.duration = std::chrono::duration<double>(0.05);
  auto r = runStoreBenchmark(o);
  CHECK_FALSE(r.inProcess);
  CHECK(r.address == server->address());
  checkFigures(r.set);
  CHECK(r.set.ops == r.get.ops);  // each round trip is a set and a get
  CHECK(connectStore(server->address(), std::chrono::seconds(5))->numKeys() == 0);
}

TEST_CASE("store bench: bad options and unreachable stores are errors") {
  StoreBenchOptions o;
  o.clients = 0;
  CHECK_THROWS_AS(runStoreBenchmark(o), Error);
  o.clients = 1;
  o.valueBytes = kMaxValueBytes + 1;
  CHECK_THROWS_AS(runStoreBenchmark(o), Error);
  o.valueBytes = 8;
  o.address = "127.0.0.1:1";  // nothing listens on port 1
  o.connectTimeout = std::chrono::milliseconds(200);
  CHECK_THROWS_AS(runStoreBenchmark(o), Error);
}

TEST_CASE("rdzv bench: agents form one round through the real rendezvous, then every agent beats") {
  RdzvBenchOptions o;
  o.agents = 80;  // past kFullMembershipNodes: the layout key and the heartbeat ring
  o.nprocPerAgent = 2;
  o.beats = 2;
  o.interval = std::chrono::milliseconds(20);
  o.joinTimeout = std::chrono::seconds(60);
  auto r = runRdzvBenchmark(o);
  CHECK(r.inProcess);
  CHECK(r.worldSize == 160);
  CHECK(r.heartbeat.ops == 160);
  // Round trips, counted by each agent's client: 3 per joiner (the last one also reads the records and writes
  // the assignments), and a heartbeat (our counter + the watched ones) is exactly one.
  CHECK(r.joinRoundTripsPerAgent >= 3.0);
  CHECK(r.joinRoundTripsPerAgent <= 3.1);
  CHECK(r.beatRoundTripsPerAgent == doctest::Approx(1.0));
  CHECK(r.storeReplyWrites > 0);
  CHECK(r.storeReplyWrites < r.storeRequests);  // pipelined batches: several requests per write
  CHECK(r.formSeconds >= 0);
  CHECK(r.joinMaxMs >= r.joinP50Ms);
  CHECK(r.storeRequests > 0);
  RdzvBenchOptions bad;
  bad.agents = 0;
  CHECK_THROWS_AS(runRdzvBenchmark(bad), Error);
}
