// The agent's timeline merge (lib/launch/timeline.h) and dashboard data (lib/launch/dashboard.h), without
// processes: worker files written by the real recorder (lib/common/timeline.h) or by hand, and a metrics hub whose
// block this test fills as a worker would.
#include <doctest/doctest.h>

#include <unistd.h>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "lib/common/timeline.h"
#include "lib/common/worker_metrics.h"
#include "lib/launch/dashboard.h"
#include "lib/launch/metrics_hub.h"
#include "lib/launch/timeline.h"

using namespace dtrain;
using namespace dtrain::launch;

namespace {

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::vector<nlohmann::json> completeEvents(const nlohmann::json& trace) {
  std::vector<nlohmann::json> out;
  for (const auto& e : trace["traceEvents"])
    if (e["ph"] == "X") out.push_back(e);
  return out;
}

}  // namespace

TEST_CASE("the recorder's file merges into a trace: nested, relative microseconds, named threads") {
  const std::string path = fmt::format("/tmp/dtrain-test-timeline-{}.jsonl", ::getpid());
  timeline::start(path, 3, 1);
  CHECK(timeline::enabled());
  const auto t0 = Clock::now();
  const auto step0 = t0 + std::chrono::microseconds(10);
  timeline::record("forward", "phase", step0, step0 + std::chrono::microseconds(5));
  timeline::record("step", "step", step0, step0 + std::chrono::microseconds(20), R"("step":1)");
  timeline::record("too-long", "x", t0, t0, std::string(200, 'a'));  // the detail is dropped, not cut
  std::thread([&] {
    timeline::nameThread("collectives (world)");
    timeline::record("allreduce", "comm", step0 + std::chrono::microseconds(2), step0 + std::chrono::microseconds(9),
                     R"("bytes":64,"group":"world")");
  }).join();
  timeline::setClockOffset(1000);  // this rank's clock is 1 us ahead of rank 0's
  timeline::stop();
  CHECK_FALSE(timeline::enabled());
  const std::string text = slurp(path);
  std::filesystem::remove(path);

  size_t count = 0;
  // Round 1 (a restart) gets threads of its own; the cut line at the end is skipped.
  auto trace = nlohmann::json::parse(mergeTimeline({{1, text + "{\"name\":\"cut"}}, "job", "run", &count));
  CHECK(count == 4);
  auto events = completeEvents(trace);
  REQUIRE(events.size() == 4);
  // Sorted by thread, then start, the longer first: the step precedes the forward that starts with it.
  CHECK(events[0]["name"] == "too-long");
  CHECK(events[1]["name"] == "step");
  CHECK(events[2]["name"] == "forward");
  CHECK(events[1]["ts"] == events[2]["ts"]);
  CHECK(events[1]["args"]["step"] == 1);
  CHECK(events[1]["args"]["round"] == 1);
  CHECK(events[0]["args"] == nlohmann::json{{"round", 1}});  // only what the merge adds
  CHECK(events[0]["ts"].get<double>() == 0);  // the first event is the origin
  CHECK(events[1]["ts"].get<double>() == doctest::Approx(10));
  CHECK(events[1]["dur"].get<double>() == doctest::Approx(20));
  CHECK(events[1]["pid"] == 3);
  CHECK(events[1]["tid"] == 100);
  CHECK(events[3]["name"] == "allreduce");
  CHECK(events[3]["tid"] == 101);
  CHECK(events[3]["args"]["bytes"] == 64);
  int named = 0;
  for (const auto& e : trace["traceEvents"]) {
    if (e["name"] == "process_name") CHECK(e["args"]["name"].get<std::string>().find("rank 3 (node 1, ") == 0);
    if (e["name"] == "thread_name" && e["tid"] == 101) {
      CHECK(e["args"]["name"] == "collectives (world) (round 1)");
      ++named;
    }
  }
  CHECK(named == 1);
}

TEST_CASE("the merge puts every rank on rank 0's clock") {
  const std::string rank0 = R"({"meta":"worker","rank":0,"node":0,"host":"a","pid":1}
{"clock_offset_ns":0}
{"name":"step","cat":"step","tid":0,"ts_ns":5000000,"dur_ns":1000}
)";
  // Rank 1's clock is 2 ms ahead: its event at 7 ms local happened at 5 ms on rank 0's clock.
  const std::string rank1 = R"({"meta":"worker","rank":1,"node":1,"host":"b","pid":2}
{"name":"step","cat":"step","tid":0,"ts_ns":7000000,"dur_ns":1000}
{"clock_offset_ns":2000000}
)";
  auto events = completeEvents(nlohmann::json::parse(mergeTimeline({{0, rank0 + rank1}}, "j", "r")));
  REQUIRE(events.size() == 2);
  CHECK(events[0]["ts"].get<double>() == 0);
  CHECK(events[1]["ts"].get<double>() == 0);
  CHECK(events[1]["pid"] == 1);
}

TEST_CASE("the dashboard samples the workers' blocks into per-rank curves and serves its page") {
  MetricsHub hub("job", "run");
  const std::string path = hub.prepareSlot(0);
  auto mapping = WorkerMetricsMapping::open(path);
  auto& b = mapping.block();
  Dashboard dashboard(hub, "job", "run", std::chrono::hours(1));  // sampled by hand below
  auto data = nlohmann::json::parse(dashboard.dataJson());
  CHECK(data["ranks"].empty());  // not attached yet

  b.rank.store(5);
  b.updatedUnixSeconds.store(1.0);
  for (int step : {1, 1, 2}) {
    b.step.store(step);
    b.loss.store(1.0 / step);
    b.samplesPerSecond.store(100.0 * step);
    dashboard.sample();
  }
  hub.setRound(2, 1, 0, 1, 1);
  hub.noteEvent("round 1: rank 0 failed; restarting the workers");
  data = nlohmann::json::parse(dashboard.dataJson());
  REQUIRE(data["ranks"].size() == 1);
  const auto& rank = data["ranks"][0];
  CHECK(rank["rank"] == 5);
  CHECK(rank["history"]["step"] == nlohmann::json::array({1.0, 2.0}));  // a step is sampled once
  CHECK(rank["history"]["loss"] == nlohmann::json::array({1.0, 0.5}));
  CHECK(rank["samples_per_second"] == 200.0);
  CHECK(data["round"] == 2);
  CHECK(data["restarts"] == 1);
  REQUIRE(data["events"].size() == 1);
  CHECK(data["events"][0]["text"] == "round 1: rank 0 failed; restarting the workers");

  auto page = dashboard.handle("/dashboard");
  REQUIRE(page);
  CHECK(page->contentType.find("text/html") == 0);
  CHECK(page->body.find("<canvas id=\"loss\">") != std::string::npos);
  CHECK(dashboard.handle("/dashboard/data.json")->contentType == "application/json");
  CHECK_FALSE(dashboard.handle("/metrics"));
  if (::access(kChartJsPath, R_OK) == 0) CHECK(dashboard.handle("/dashboard/chart.js")->status == 200);
  else CHECK(dashboard.handle("/dashboard/chart.js")->status == 404);
}
