// The monitoring endpoint's pieces: the text exposition (PromText, escaping), the worker -> agent shared block
// as the agent renders it, and the HTTP server that serves it. `promtool check metrics` (Debian's prometheus
// package) lints every exposition when it is installed.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "lib/common/error.h"
#include "lib/common/socket.h"
#include "lib/common/worker_metrics.h"
#include "lib/launch/dashboard.h"
#include "lib/launch/flight_report.h"
#include "lib/launch/http_server.h"
#include "lib/launch/metrics_hub.h"
#include "rendezvous/tcp_store_server.h"
#include "tests/support/http_get.h"
#include "tests/support/process.h"

using namespace dtrain;
using namespace dtrain::launch;

namespace {

bool havePromtool() { return ::access("/usr/bin/promtool", X_OK) == 0; }

// promtool's verdict on an exposition: "" when it passes, else what it printed.
std::string promtoolProblems(const std::string& text) {
  testing::RunOptions ro;
  ro.stdinData = text;
  auto r = testing::run({"/usr/bin/promtool", "check", "metrics"}, ro);
  return r.exitCode == 0 ? "" : r.out + r.err + " (exit " + std::to_string(r.exitCode) + ")";
}

}  // namespace

TEST_CASE("label values are escaped as the text format wants") {
  CHECK(escapeLabelValue("plain") == "plain");
  CHECK(escapeLabelValue("a\"b\\c\nd") == "a\\\"b\\\\c\\nd");
  PromText t;
  t.family("dtrain_x_total", "counter", "Help.");
  t.sample("dtrain_x_total", {{"job", "j\"1"}}, 3);
  t.sample("dtrain_x_total", {{"job", "k"}}, 0.5);
  CHECK(t.take() == "# HELP dtrain_x_total Help.\n# TYPE dtrain_x_total counter\n"
                    "dtrain_x_total{job=\"j\\\"1\"} 3\ndtrain_x_total{job=\"k\"} 0.5\n");
}

TEST_CASE("the hub renders what a worker writes into its block, with the agent's counters") {
  MetricsHub hub("my job", "run-1");
  std::string path = hub.prepareSlot(1);
  CHECK(hub.render().find("rank=") == std::string::npos);  // no worker attached yet: no per-rank samples
  {
    // The worker's side: map the block the agent named and write a step.
    auto worker = WorkerMetricsMapping::open(path);
    auto& b = worker.block();
    b.rank.store(5);
    b.step.store(42);
    b.loss.store(0.25);
    b.samplesTotal.store(1344);
    b.phaseSecondsTotal[static_cast<int>(StepPhase::kCommWait)].store(1.5);
    b.collectiveCallsTotal[1].store(84);
    b.collectiveBytesTotal[1].store(4096);
    b.checkpointSizeBytes.store(1 << 20);
    b.samplesPerSecond.store(900);
  }
  hub.setRound(2, 1, 0, 1, 8);
  hub.workerStarted();
  hub.workerExited(137, 1);  // the worker of slot 1 ended: it trains nothing any more
  hub.setHeartbeatAges({0.0, 1.25});
  std::string text = hub.render();
  const std::string rank = "job=\"my job\",run_id=\"run-1\",node=\"0\",rank=\"5\"";
  CHECK(text.find("dtrain_step{" + rank + "} 42\n") != std::string::npos);
  CHECK(text.find("dtrain_loss{" + rank + "} 0.25\n") != std::string::npos);
  CHECK(text.find("dtrain_samples_total{" + rank + "} 1344\n") != std::string::npos);
  CHECK(text.find("dtrain_samples_per_second{" + rank + "} 0\n") != std::string::npos);
  CHECK(hub.rankStates().at(0).samplesPerSecond == 0);
  CHECK(text.find("dtrain_step_phase_seconds_total{" + rank + ",phase=\"comm_wait\"} 1.5\n") != std::string::npos);
  CHECK(text.find("dtrain_collective_calls_total{" + rank + ",op=\"allreduce\"} 84\n") != std::string::npos);
  CHECK(text.find("dtrain_collective_bytes_total{" + rank + ",op=\"allreduce\"} 4096\n") != std::string::npos);
  CHECK(text.find("op=\"broadcast\"") == std::string::npos);  // kinds never used are left out
  CHECK(text.find("dtrain_checkpoint_size_bytes{" + rank + "} 1048576\n") != std::string::npos);
  const std::string agent = "job=\"my job\",run_id=\"run-1\",node=\"0\"";
  CHECK(text.find("dtrain_restarts_total{" + agent + "} 1\n") != std::string::npos);
  CHECK(text.find("dtrain_rounds_total{" + agent + "} 3\n") != std::string::npos);
  CHECK(text.find("dtrain_worker_exits_total{" + agent + ",code=\"137\"} 1\n") != std::string::npos);
  CHECK(text.find("dtrain_workers_running{" + agent + "} 0\n") != std::string::npos);
  CHECK(text.find("dtrain_heartbeat_age_seconds{" + agent + ",peer_node=\"1\"} 1.25\n") != std::string::npos);
  // A new worker on the slot starts from zero.
  hub.prepareSlot(1);
  CHECK(hub.render().find(rank) == std::string::npos);
  if (havePromtool()) CHECK(promtoolProblems(text).empty());
  else MESSAGE("promtool not installed (Debian package prometheus): lint skipped");
}

TEST_CASE("a parameter-server rank's block renders the dtrain_ps_* families, not the training ones, and is no rank "
          "of the flight records or the dashboard") {
  MetricsHub hub("ps", "run-2");
  auto worker = WorkerMetricsMapping::open(hub.prepareSlot(0));
  auto server = WorkerMetricsMapping::open(hub.prepareSlot(1));
  worker.block().rank.store(0);
  worker.block().step.store(9);
  auto& b = server.block();
  b.role.store(WorkerMetricsBlock::kServer);
  b.rank.store(2);
  PsServerMetrics& m = b.server;
  m.serverRank.store(0);
  m.requestsTotal[3].store(40);  // push-pull
  m.requestsTotal[14].store(20);  // push-pull-counted: also "push"
  m.requestsTotal[4].store(2);   // pull
  m.receivedBytesTotal.store(123456);
  m.sentBytesTotal.store(65432);
  m.workersLive.store(1);
  m.workersLost.store(1);
  m.stalenessMax.store(3);
  for (int64_t s : {0, 0, 1, 3, 3, 3000}) {  // six pushes: two at 0, one at 1, two at 3 (bucket le=4), one at 3000
    m.stalenessBucket[stalenessBucket(s)].fetch_add(1);
    m.stalenessSum.store(m.stalenessSum.load() + static_cast<double>(s));
  }
  const std::string text = hub.render();
  INFO(text);
  const std::string l = "job=\"ps\",run_id=\"run-2\",node=\"0\",rank=\"2\",role=\"server\",server=\"0\"";
  CHECK(text.find("dtrain_ps_server_requests_total{" + l + ",op=\"push\"} 60\n") != std::string::npos);
  CHECK(text.find("dtrain_ps_server_requests_total{" + l + ",op=\"pull\"} 2\n") != std::string::npos);
  CHECK(text.find("op=\"hello\"") == std::string::npos);  // ops never received are left out
  CHECK(text.find("dtrain_ps_server_received_bytes_total{" + l + "} 123456\n") != std::string::npos);
  CHECK(text.find("dtrain_ps_server_sent_bytes_total{" + l + "} 65432\n") != std::string::npos);
  CHECK(text.find("dtrain_ps_workers_live{" + l + "} 1\n") != std::string::npos);
  CHECK(text.find("dtrain_ps_workers_lost{" + l + "} 1\n") != std::string::npos);
  CHECK(text.find("dtrain_ps_staleness_max{" + l + "} 3\n") != std::string::npos);
  CHECK(text.find("# TYPE dtrain_ps_staleness histogram\n") != std::string::npos);
  CHECK(text.find("dtrain_ps_staleness_bucket{" + l + ",le=\"0\"} 2\n") != std::string::npos);
  CHECK(text.find("dtrain_ps_staleness_bucket{" + l + ",le=\"2\"} 3\n") != std::string::npos);
  CHECK(text.find("dtrain_ps_staleness_bucket{" + l + ",le=\"4\"} 5\n") != std::string::npos);
  CHECK(text.find("dtrain_ps_staleness_bucket{" + l + ",le=\"64\"} 5\n") != std::string::npos);
  CHECK(text.find("dtrain_ps_staleness_bucket{" + l + ",le=\"2048\"} 5\n") != std::string::npos);
  CHECK(text.find("dtrain_ps_staleness_bucket{" + l + ",le=\"4096\"} 6\n") != std::string::npos);
  CHECK(text.find("dtrain_ps_staleness_bucket{" + l + ",le=\"+Inf\"} 6\n") != std::string::npos);
  CHECK(text.find("dtrain_ps_staleness_sum{" + l + "} 3007\n") != std::string::npos);
  CHECK(text.find("dtrain_ps_staleness_count{" + l + "} 6\n") != std::string::npos);
  // The server is no training rank: no dtrain_step (a 0 that reads as a stuck rank), no flight record (0 calls
  // would read as a rank that is behind), no dashboard row.
  CHECK(text.find("dtrain_step{job=\"ps\",run_id=\"run-2\",node=\"0\",rank=\"0\"} 9\n") != std::string::npos);
  CHECK(text.find("rank=\"2\"}") == std::string::npos);
  CHECK(hub.flightRecords().size() == 1);
  REQUIRE(hub.rankStates().size() == 1);
  CHECK(hub.rankStates()[0].rank == 0);
  if (havePromtool()) CHECK(promtoolProblems(text).empty());
  // The dashboard's view of the same block (serverStates): the figures /metrics has.
  const auto servers = hub.serverStates();
  REQUIRE(servers.size() == 1);
  CHECK(servers[0].rank == 2);
  CHECK(servers[0].server == 0);
  CHECK(servers[0].requestsByOp == std::map<std::string, uint64_t>{{"push", 60}, {"pull", 2}});
  CHECK(servers[0].receivedBytes == 123456);
  CHECK(servers[0].sentBytes == 65432);
  CHECK(servers[0].workersLive == 1);
  CHECK(servers[0].workersLost == 1);
  CHECK(servers[0].stalenessMax == 3);
  CHECK(servers[0].stalenessSum == 3007);
  CHECK(servers[0].stalenessBuckets == std::vector<uint64_t>{2, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0});
  // Its quantiles as Prometheus' histogram_quantile reads the exposition above: rank q x 6 in the cumulative
  // counts 2, 3, 3, 5, ..., 5, 6, 6 (bounds 0, 1, 2, 4, ..., 2048, 4096, +Inf), linear inside the bucket.
  CHECK(histogramQuantile(0.25, servers[0].stalenessBuckets) == 0);  // rank 1.5 in le=0: its bound
  CHECK(histogramQuantile(0.5, servers[0].stalenessBuckets) == doctest::Approx(1.0));  // rank 3: le=1's top
  CHECK(histogramQuantile(0.75, servers[0].stalenessBuckets) == doctest::Approx(3.5));  // rank 4.5 in (2, 4]: 2 + 2 x 1.5/2
  // rank 5.4 in (2048, 4096]: 2048 + 2048 x 0.4 (the old bounds stopped at 64, and an async run's p90 read 64)
  CHECK(histogramQuantile(0.9, servers[0].stalenessBuckets) == doctest::Approx(2867.2));
  CHECK(stalenessBucket(4096) == PsServerMetrics::kStalenessBuckets - 2);
  CHECK(stalenessBucket(4097) == PsServerMetrics::kStalenessBuckets - 1);  // +Inf: the highest finite bound
  CHECK(std::isnan(histogramQuantile(0.9, std::vector<uint64_t>(PsServerMetrics::kStalenessBuckets, 0))));
  CHECK(std::isnan(histogramQuantile(0.9, {1, 2})));
  // Without a server on the node the families are not there at all.
  server.block().rank.store(-1);
  CHECK(hub.serverStates().empty());
  CHECK(hub.render().find("dtrain_ps_") == std::string::npos);
}

TEST_CASE("the stale-folder sweep removes the folders whose owner.lock nobody holds, and only those") {
  namespace fs = std::filesystem;
  const std::string base = testing::tempDir("metrics-sweep");
  auto folder = [&](const std::string& name, bool withLock) {
    fs::create_directory(base + "/" + name);
    testing::writeFile(base + "/" + name + "/local_rank_0", "block");
    if (withLock) testing::writeFile(base + "/" + name + "/owner.lock", "");
    return base + "/" + name;
  };
  const std::string dead = folder("dtrain-metrics-dead01", true);     // its owner died: the lock is free
  const std::string live = folder("dtrain-metrics-live01", true);     // locked below, as a live hub holds it
  const std::string unlocked = folder("dtrain-metrics-new001", false);  // no lock published (yet): left alone
  const std::string other = folder("not-dtrain-metrics", true);        // not ours by name
  const int fd = ::open((live + "/owner.lock").c_str(), O_RDONLY | O_CLOEXEC);
  REQUIRE(fd >= 0);
  REQUIRE(::flock(fd, LOCK_EX) == 0);  // another open file description: conflicts even inside this process
  CHECK(removeStaleMetricsDirs(base) == 1);
  CHECK_FALSE(fs::exists(dead));
  CHECK(fs::exists(live + "/local_rank_0"));
  CHECK(fs::exists(unlocked + "/local_rank_0"));
  CHECK(fs::exists(other));
  ::close(fd);  // the "owner" dies
  CHECK(removeStaleMetricsDirs(base) == 1);
  CHECK_FALSE(fs::exists(live));
  CHECK(removeStaleMetricsDirs("/nonexistent-dtrain-base") == 0);
}

TEST_CASE("a live hub's folder survives another hub's sweep; its destructor removes it") {
  namespace fs = std::filesystem;
  std::string dir;
  {
    MetricsHub first("job", "run-1");
    dir = first.dir();
    first.prepareSlot(0);
    REQUIRE(fs::exists(dir + "/owner.lock"));
    MetricsHub second("job", "run-2");  // sweeps the folder both live in
    CHECK(second.dir() != dir);
    CHECK(fs::exists(dir + "/local_rank_0"));
    removeStaleMetricsDirs(fs::path(dir).parent_path().string());  // (other stale folders there may go)
    CHECK(fs::exists(dir + "/local_rank_0"));
  }
  CHECK_FALSE(fs::exists(dir));
}

TEST_CASE("a block that is not a metrics block is refused by name") {
  std::string dir = testing::tempDir("metrics");
  testing::writeFile(dir + "/junk", std::string(4096, 'x'));
  CHECK_THROWS_WITH_AS(WorkerMetricsMapping::open(dir + "/junk"), doctest::Contains("not a dtrain metrics block"),
                       Error);
  CHECK_THROWS_WITH_AS(WorkerMetricsMapping::open(dir + "/missing"), doctest::Contains((dir + "/missing").c_str()), Error);
}

TEST_CASE("the HTTP server answers GET with the handler's reply, on a port of its own") {
  int calls = 0;
  HttpServer server("127.0.0.1", 0, [&](std::string_view target) {
    ++calls;
    if (target == "/metrics") return HttpResponse{200, "text/plain; version=0.0.4; charset=utf-8", "dtrain_up 1\n"};
    return HttpResponse{404, "text/plain; charset=utf-8", "not found\n"};
  }, "--metrics-port");
  REQUIRE(server.port() > 0);
  auto ok = testing::httpGet(server.port(), "/metrics");
  CHECK(ok.status == 200);
  CHECK(ok.body == "dtrain_up 1\n");
  CHECK(ok.headers.find("version=0.0.4") != std::string::npos);
  CHECK(testing::httpGet(server.port(), "/nothing").status == 404);
  CHECK(calls == 2);
  // The port is taken: a second server on it fails with the flag named and exit code 5.
  try {
    HttpServer second("127.0.0.1", server.port(), [](std::string_view) { return HttpResponse{}; }, "--metrics-port");
    FAIL("a second server bound the same port");
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("--metrics-port") != std::string::npos);
    CHECK(e.exitCode() == static_cast<int>(ExitCode::kAddressInUse));
  }
}

TEST_CASE("httpGet (dtrain top's probe) gives up at once on an endpoint nobody listens on, instead of retrying it") {
  // The agent listened before it published the endpoint: refused means gone. It was retried like a store that is
  // still starting, up to the whole timeout (5 s a frame in dtrain top for each endpoint a restart left behind).
  const uint16_t port = net::pickFreePort("127.0.0.1");
  try {
    httpGet("127.0.0.1", port, "/metrics", std::chrono::milliseconds(30000));
    FAIL("a reply from nobody");
  } catch (const net::ConnectError& e) {
    CHECK(std::string(e.what()) == fmt::format("cannot connect to 127.0.0.1:{}: Connection refused", port));
    CHECK(e.attempts() == 1);
    CHECK_FALSE(e.timedOut());
  }
}

TEST_CASE("the HTTP server backs off while the process is out of descriptors, then answers the waiting client") {
  using namespace std::chrono_literals;
  HttpServer server("127.0.0.1", 0, [](std::string_view) { return HttpResponse{200, "text/plain", "ok\n"}; },
                    "--metrics-port");
  // The client's socket exists before the descriptors run out; its connection waits in the backlog.
  net::Socket client = net::connect({"127.0.0.1", static_cast<uint16_t>(server.port())}, Deadline(5s));
  const std::string get = "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
  REQUIRE(net::sendAll(client.fd(), get.data(), get.size()));
  struct Exhaust {  // every descriptor of this process in use, under a lowered soft limit; undone when gone
    rlimit saved{};
    std::vector<int> fds;
    Exhaust() {
      ::getrlimit(RLIMIT_NOFILE, &saved);
      rlimit low = saved;
      low.rlim_cur = 256;
      ::setrlimit(RLIMIT_NOFILE, &low);
      for (int fd; (fd = ::dup(0)) >= 0;) fds.push_back(fd);
    }
    void release() {
      for (int fd : fds) ::close(fd);
      fds.clear();
      ::setrlimit(RLIMIT_NOFILE, &saved);
    }
    ~Exhaust() { release(); }
  } exhaust;
  CHECK(errno == EMFILE);
  auto cpu = [] {
    rusage u{};
    ::getrusage(RUSAGE_SELF, &u);
    return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
           static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
  };
  const double before = cpu();
  std::this_thread::sleep_for(1s);  // measuring CPU over a duration, not waiting for an event
  const double used = cpu() - before;
  exhaust.release();
  // Re-arming accept at once on EMFILE spun a core here (the listening socket stays readable).
  CHECK_MESSAGE(used < 0.2, "the process used ", used, " s of CPU in 1 s while out of descriptors");
  char head[12] = {};
  CHECK(net::recvAll(client.fd(), head, sizeof(head), Deadline(5s)));
  CHECK(std::string(head, sizeof(head)) == "HTTP/1.1 200");
}

TEST_CASE("the store's exposition passes promtool") {
  rendezvous::TcpStoreServerStats st;
  st.connectionsAccepted = 3;
  st.keys = 7;
  std::string text = renderStoreMetrics(st);
  CHECK(text.find("dtrain_store_connections_accepted_total 3\n") != std::string::npos);
  CHECK(text.find("dtrain_store_keys 7\n") != std::string::npos);
  if (havePromtool()) CHECK(promtoolProblems(text).empty());
}

TEST_CASE("the flight recorder: a rank that has not reached the others' collective is named, with its step") {
  MetricsHub hub("job", "run");
  std::vector<WorkerMetricsMapping> workers;
  for (int lr = 0; lr < 3; ++lr) workers.push_back(WorkerMetricsMapping::open(hub.prepareSlot(lr)));
  // Each "worker" records calls as lib/comm does: ranks 0 and 2 reach call #3 and wait in it; rank 1 stops
  // after call #2, at step 2.
  for (int lr = 0; lr < 3; ++lr) {
    auto& b = workers[lr].block();
    b.rank.store(lr);
    b.pid.store(100 + lr);
    attachFlightRecorder(&b);
    b.step.store(0);
    flightEnd(flightBegin(1, 4096, "comm"));
    b.step.store(1);
    flightEnd(flightBegin(1, 4096, "comm"));
    if (lr != 1) flightBegin(1, 4096, "comm");  // step 2's all-reduce, never finished
  }
  attachFlightRecorder(nullptr);
  auto flights = hub.flightRecords();
  REQUIRE(flights.size() == 3);
  CHECK(flights[0].calls.size() == 3);
  CHECK(flights[0].calls.back().endNs == 0);
  CHECK(flights[0].calls.back().group == "comm");
  CHECK(flights[1].calls.back().seq == 2);
  CHECK(flights[1].calls.back().step == 2);
  std::string report = analyzeFlight(flights, unixNowNs());
  CHECK(report.find("rank 1 is behind: at step 2, it has not begun allreduce #3") != std::string::npos);
  CHECK(report.find("rank(s) 0, 2 wait in allreduce #3") != std::string::npos);
  // The JSON form (what `dtrain debug dump` gathers from every agent) round-trips.
  auto back = rankFlightFromJson(nlohmann::json::parse(toJson(flights[1]).dump()));
  CHECK(back.rank == 1);
  CHECK(back.pid == 101);
  CHECK(back.calls.size() == 2);
  CHECK(analyzeFlight({flights[0], flights[2]}, unixNowNs()).find("no rank is behind: every rank is inside") !=
        std::string::npos);
  // Nobody inside a call (a running job read at slightly different moments): nobody is accused.
  RankFlight done0{0, 0, 100, 5, {{9, "allreduce", 24, 6, 1, 2, "comm"}}};
  RankFlight done1{1, 0, 101, 5, {{8, "allreduce", 24, 6, 1, 2, "comm"}}};
  const std::string moving = analyzeFlight({done0, done1}, unixNowNs());
  CHECK_MESSAGE(moving.find("verdict: no rank waits in a collective") != std::string::npos, moving);
  CHECK(moving.find("is behind") == std::string::npos);
  // Two reads a second apart (`dtrain debug dump`): ranks caught inside one call, one of them a call ahead, are
  // not accused when both moved on in between; a rank that stood still is named as such before the usual verdict.
  RankFlight was0{0, 0, 100, 4, {{7, "allreduce", 24, 5, 1, 0, "comm"}}};  // a second earlier: inside #7
  RankFlight was1{1, 0, 101, 4, {{6, "allreduce", 24, 5, 1, 2, "comm"}}};  // finished #6
  RankFlight in0{0, 0, 100, 5, {{9, "allreduce", 24, 6, 1, 0, "comm"}}};   // now inside #9, a call ahead of
  const std::vector<RankFlight> earlier{was1, was0};
  const std::string running = analyzeFlight({in0, done1}, unixNowNs(), &earlier, 1.0);  // rank 1, done with #8
  CHECK_MESSAGE(running.find("verdict: no hang: every rank moved on in the last 1.0 s") != std::string::npos, running);
  CHECK(running.find("is behind") == std::string::npos);
  const std::vector<RankFlight> before{in0, done1};  // rank 1 finished #8 and has begun nothing since
  const std::string stuck = analyzeFlight({in0, done1}, unixNowNs(), &before, 1.0);
  CHECK_MESSAGE(stuck.find("no rank moved in the last 1.0 s\nverdict: rank 1 is behind") != std::string::npos, stuck);
  // More calls than the ring holds: the newest kFlightEntries are kept.
  attachFlightRecorder(&workers[1].block());
  for (int i = 0; i < 40; ++i) flightEnd(flightBegin(7, 0, "comm"));
  attachFlightRecorder(nullptr);
  auto ring = hub.flightRecords()[1].calls;
  CHECK(ring.size() == static_cast<size_t>(WorkerMetricsBlock::kFlightEntries));
  CHECK(ring.back().seq == 42);
  CHECK(ring.back().op == "barrier");
}

TEST_CASE("the flight recorder without collective calls (parameter-server workers): two reads still name a rank that "
          "stopped finishing steps, and a running job is said to run") {
  // Async parameter-server workers push and pull through their servers and record no collective call. `dtrain
  // debug dump` said "nothing recorded yet" for them after hundreds of steps, also with a worker frozen.
  RankFlight was0{0, 0, 100, 125, {}}, was1{1, 0, 101, 125, {}};
  RankFlight now0{0, 0, 100, 125, {}}, now1{1, 0, 101, 150, {}};  // rank 0 frozen, rank 1 moved on
  const std::vector<RankFlight> earlier{was0, was1};
  const std::string frozen = analyzeFlight({now0, now1}, unixNowNs(), &earlier, 1.0);
  CHECK_MESSAGE(frozen.find("nothing recorded yet") == std::string::npos, frozen);
  CHECK_MESSAGE(frozen.find("in the last 1.0 s rank(s) 1 moved on, rank(s) 0 did not") != std::string::npos, frozen);
  CHECK_MESSAGE(frozen.find("verdict: rank 0 finished no step in the last 1.0 s: it is stuck or frozen in step 126") !=
                    std::string::npos,
                frozen);
  CHECK(frozen.find("rank 1 finished no step") == std::string::npos);
  RankFlight moved0{0, 0, 100, 140, {}};
  const std::string running = analyzeFlight({moved0, now1}, unixNowNs(), &earlier, 1.0);
  CHECK_MESSAGE(running.find("verdict: no hang: every rank moved on in the last 1.0 s") != std::string::npos, running);
  // One read cannot tell: it says so instead of "nothing recorded yet".
  const std::string once = analyzeFlight({now0, now1}, unixNowNs());
  CHECK_MESSAGE(once.find("verdict: no collective call recorded, so none to compare") != std::string::npos, once);
  // A job that has done nothing yet still says so.
  CHECK(analyzeFlight({RankFlight{0, 0, 100, 0, {}}}, unixNowNs()).find("verdict: nothing recorded yet") !=
        std::string::npos);
}
