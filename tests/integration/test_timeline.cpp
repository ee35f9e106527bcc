// `dtrain run --timeline FILE.json` end to end: a real 2-rank job (one node, then two agents on loopback where only
// node 0 is given the flag) leaves a Chrome trace that is valid JSON, has every rank as a named process, the
// trainer's phases nested inside their steps, one event per collective on the communicator's thread, and
// timestamps that never go back within a thread.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <map>
#include <set>
#include <vector>

#include "tests/integration/launch_helpers.h"

using namespace dtrain::testing;
using namespace std::chrono_literals;

namespace {

std::string timelineJob(const std::string& dir) {
  writeFile(dir + "/job.json", R"({
    "name": "traced",
    "output_dir": ")" + dir + R"(/out",
    "model": {"input": [8], "layers": [{"type": "linear", "out": 16}, {"type": "relu"}, {"type": "linear", "out": 3}]},
    "loss": {"type": "cross_entropy"},
    "data": {"train": {"format": "synthetic", "task": "classification", "samples": 256, "features": 8, "num_classes": 3},
             "eval": {"format": "synthetic", "task": "classification", "samples": 64, "features": 8, "num_classes": 3,
                      "sample_seed": 1},
             "batch_size": 16},
    "optimizer": {"type": "sgd", "lr": 0.05},
    "parallel": {"bucket_mb": 0.0005, "first_bucket_mb": 0.0005},
    "train": {"epochs": 2, "seed": 3},
    "checkpoint": {"dir": "ck", "every_steps": 4, "keep": 1}
  })");
  return dir + "/job.json";
}

struct Interval {
  double ts, end;
  std::string name, cat;
};

// Checks the trace's structure and returns, per rank, the names of its events.
std::map<int, std::multiset<std::string>> checkTrace(const std::string& file, int ranks) {
  const auto trace = nlohmann::json::parse(readFile(file));  // throws (fails the test) when not JSON
  REQUIRE(trace.contains("traceEvents"));
  CHECK(trace["otherData"]["job"] == "traced");
  std::map<int, std::string> processNames;
  std::map<std::pair<int, int>, std::vector<Interval>> threads;
  std::map<int, std::multiset<std::string>> names;
  for (const auto& e : trace["traceEvents"]) {
    if (e["ph"] == "M") {
      if (e["name"] == "process_name") processNames[e["pid"].get<int>()] = e["args"]["name"];
      continue;
    }
    REQUIRE(e["ph"] == "X");
    const int pid = e["pid"].get<int>(), tid = e["tid"].get<int>();
    const double ts = e["ts"].get<double>(), dur = e["dur"].get<double>();
    CHECK(ts >= 0);
    CHECK(dur >= 0);
    threads[{pid, tid}].push_back({ts, ts + dur, e["name"].get<std::string>(), e["cat"].get<std::string>()});
    names[pid].insert(e["name"].get<std::string>());
  }
  CHECK(static_cast<int>(processNames.size()) == ranks);
  for (int r = 0; r < ranks; ++r) CHECK(processNames[r].find(fmt::format("rank {} (node", r)) == 0);
  constexpr double kSlack = 0.0011;  // us: the 3-decimal rounding of ts and dur
  for (const auto& [key, events] : threads) {
    std::vector<const Interval*> open;
    for (size_t i = 0; i < events.size(); ++i) {
      const Interval& e = events[i];
      if (i > 0) CHECK_MESSAGE(e.ts >= events[i - 1].ts, "pid ", key.first, " tid ", key.second, " goes back at ", e.name);
      while (!open.empty() && open.back()->end <= e.ts + kSlack) open.pop_back();
      // Properly nested: an event that starts inside another ends inside it.
      if (!open.empty())
        CHECK_MESSAGE(e.end <= open.back()->end + kSlack, e.name, " overlaps the end of ", open.back()->name);
      // The trainer's phases happen inside a step.
      if (e.cat == "phase") {
        REQUIRE_MESSAGE(!open.empty(), e.name, " at ", e.ts, " is outside any step");
        CHECK(open.back()->name == "step");
      }
      open.push_back(&e);
    }
  }
  return names;
}

void checkRank(const std::multiset<std::string>& names) {
  // 256 samples / 2 ranks / batch 16 = 8 steps per epoch, 2 epochs.
  CHECK(names.count("step") == 16);
  for (const char* phase : {"data", "forward", "backward", "comm_wait", "optimizer"}) CHECK(names.count(phase) == 16);
  CHECK(names.count("checkpoint") >= 4);
  CHECK(names.count("eval") == 2);
  // Several buckets per step (tiny bucket_mb): more all-reduces than steps.
  CHECK(names.count("allreduce") > 16);
  CHECK(names.count("broadcast") >= 1);  // the initial weights
}

}  // namespace

TEST_CASE("dtrain run --timeline writes a Chrome trace of every rank") {
  std::string dir = tempDir("timeline");
  const std::string out = dir + "/trace.json";
  auto r = run(runArgs({"--standalone", "-n", "2", "--timeline", out, timelineJob(dir)}), {.timeout = 120s});
  REQUIRE_MESSAGE(r.exitCode == 0, r.err);
  CHECK(r.err.find("wrote the timeline " + out) != std::string::npos);
  auto names = checkTrace(out, 2);
  checkRank(names[0]);
  checkRank(names[1]);

  auto bad = run(runArgs({"--standalone", "--timeline", dir + "/no/such/dir/t.json", timelineJob(dir)}), {.timeout = 60s});
  CHECK(bad.exitCode == 3);
  CHECK(bad.err.find("--timeline") != std::string::npos);
}

TEST_CASE("--timeline on node 0 only: the other node's agent ships its ranks through the store") {
  std::string dir = tempDir("timeline2");
  const std::string out = dir + "/trace.json";
  const std::string job = timelineJob(dir);
  int port = freePort();
  std::string id = uniqueRunId("timeline");
  auto args = [&](int nodeRank) {
    std::vector<std::string> a = {"--nnodes", "2", "-n", "1", "--node-rank", std::to_string(nodeRank), "--rdzv-endpoint",
                                  fmt::format("127.0.0.1:{}", port), "--rdzv-id", id, "--rdzv-timeout", "60s"};
    if (nodeRank == 0) a.insert(a.end(), {"--timeline", out});
    a.push_back(job);
    return runArgs(a);
  };
  Background node1(args(1));
  auto r0 = run(args(0), {.timeout = 120s});
  auto r1 = node1.wait(120s);
  INFO(r0.err, r1.err);
  REQUIRE(r0.exitCode == 0);
  REQUIRE(r1.exitCode == 0);
  auto names = checkTrace(out, 2);
  checkRank(names[0]);
  checkRank(names[1]);
  const auto trace = nlohmann::json::parse(readFile(out));
  bool node1Named = false;
  for (const auto& e : trace["traceEvents"])
    if (e["name"] == "process_name" && e["pid"] == 1) node1Named = e["args"]["name"].get<std::string>().find("node 1") != std::string::npos;
  CHECK(node1Named);
}
