// The parameter-server strategy as a user sees it: `dtrain run -n 3` with one server and two workers trains in
// every mode, the placement shows in --dry-run, a killed worker re-forms the group from the last checkpoint (sync)
// or leaves while the others finish (async and ssp; the final line counts what the servers applied of each worker's
// samples), and bad settings exit 2 before any rank starts.
#include <doctest/doctest.h>

#include <csignal>
#include <filesystem>

#include "tests/integration/launch_helpers.h"
#include "tests/integration/train_helpers.h"

using namespace dtrain::testing;
using namespace std::chrono_literals;
using nlohmann::json;

namespace {

std::vector<std::string> threeRanks(const std::string& job, const std::string& out, int maxRestarts = 0) {
  return runArgs({"--standalone", "--nproc-per-node", "3", "--max-restarts", std::to_string(maxRestarts),
                  "--shutdown-timeout", "2s", job, "--output-dir", out});
}

json psJob(const std::string& mode) {
  json job = smallJob(192, 8, 3);
  job["checkpoint"] = false;
  job["parallel"] = {{"strategy", "parameter_server"}, {"servers", 1}, {"mode", mode}};
  if (mode == "ssp") job["parallel"]["staleness"] = 2;
  return job;
}

double lastEvalAccuracy(const std::string& metrics) {
  double acc = -1;
  for (const auto& line : readJsonLines(metrics))
    if (line.contains("eval_accuracy") && line["eval_accuracy"].is_number()) acc = line["eval_accuracy"].get<double>();
  return acc;
}

// eval_samples of every evaluation line: the whole evaluation set (smallJob's has 50) in every mode. In async and
// ssp the workers do not reduce metrics, and worker 0 used to evaluate its own shard only: 25 samples.
std::vector<int64_t> evalSampleCounts(const std::string& metrics) {
  std::vector<int64_t> counts;
  for (const auto& line : readJsonLines(metrics))
    if (line.contains("eval_samples")) counts.push_back(line["eval_samples"].get<int64_t>());
  return counts;
}

}  // namespace

TEST_CASE("dtrain run -n 3 with one parameter server: every mode trains; traffic and staleness in metrics") {
  std::string dir = tempDir("ps");
  for (const std::string mode : {"sync", "async", "ssp"}) {
    CAPTURE(mode);
    writeFile(dir + "/job.json", psJob(mode).dump());
    auto r = run(threeRanks(dir + "/job.json", dir + "/" + mode), {.timeout = 120s});
    INFO(r.out, r.err);
    REQUIRE(r.exitCode == 0);
    // Rank 2 (the node's last) serves; the two workers report as a world of 2.
    CHECK(!linesWith(r.out + r.err, "[n0 r2] ").empty());
    CHECK((r.out + r.err).find("parameter server 0 of 1 listening") != std::string::npos);
    CHECK(r.out.find("2 worker(s) x batch 8") != std::string::npos);  // the server's rank takes no batch
    CHECK(r.out.find("parameter server: 1 server(s), 2 worker(s), " + mode) != std::string::npos);
    CHECK(lastEvalAccuracy(dir + "/" + mode + "/metrics.jsonl") > 0.5);
    CHECK(evalSampleCounts(dir + "/" + mode + "/metrics.jsonl") == std::vector<int64_t>{50, 50, 50});
    CHECK(r.out.find("(50 samples)") != std::string::npos);
    CHECK(std::filesystem::exists(dir + "/" + mode + "/model.safetensors"));
    // Both workers' samples: server 0's tally in async/ssp, the group's count in sync.
    if (mode == "sync") CHECK(r.out.find("done: 36 steps, 576 samples in ") != std::string::npos);
    else CHECK(r.out.find("done: 36 steps, 576 samples from 2 workers (288 on worker 0, 288 on worker 1) in ") !=
               std::string::npos);
    CHECK(r.out.find("lost worker") == std::string::npos);
    int lines = 0;
    for (const auto& line : readJsonLines(dir + "/" + mode + "/metrics.jsonl")) {
      if (!line.contains("loss") || line.contains("eval_loss") || line.contains("final")) continue;
      ++lines;
      REQUIRE(line.contains("ps_bytes_per_step"));
      CHECK(line["ps_bytes_per_step"].get<double>() > 0);
      CHECK(line.contains("staleness") == (mode != "sync"));
      if (mode == "ssp") CHECK(line["staleness"]["max"].get<double>() <= 2);
    }
    CHECK(lines > 0);
  }
}

TEST_CASE("parameter server: --dry-run shows the placement; bad settings exit 2 before any rank starts") {
  std::string dir = tempDir("psbad");
  json job = psJob("sync");
  job["parallel"]["servers"] = 2;
  writeFile(dir + "/job.json", job.dump());
  auto dry = run(runArgs({"--standalone", "--nproc-per-node", "4", "--dry-run", dir + "/job.json"}));
  INFO(dry.out, dry.err);
  REQUIRE(dry.exitCode == 0);
  CHECK(dry.out.find("node 0: ranks 0-1 workers 0-1, ranks 2-3 servers 0-1") != std::string::npos);
  auto check = run({dtrainBinary(), "check", dir + "/job.json", "--world", "5"});
  INFO(check.out, check.err);
  CHECK(check.exitCode == 0);
  CHECK(check.out.find("node 0: ranks 0-2 workers 0-2, ranks 3-4 servers 0-1") != std::string::npos);
  check = run({dtrainBinary(), "check", dir + "/job.json", "--world", "2"});
  CHECK(check.exitCode == 2);
  CHECK(check.err.find("/parallel/servers: 2 server(s) in a world of 2 rank(s)") != std::string::npos);
  // As many servers as ranks: nobody would train.
  job["parallel"]["servers"] = 3;
  writeFile(dir + "/job.json", job.dump());
  auto r = run(threeRanks(dir + "/job.json", dir + "/out"), {.timeout = 60s});
  INFO(r.out, r.err);
  CHECK(r.exitCode == 2);
  CHECK(r.err.find("/parallel/servers: 3 server(s) but this launch makes 3 rank(s)") != std::string::npos);
  CHECK(!std::filesystem::exists(dir + "/out/metrics.jsonl"));
  job["parallel"] = {{"strategy", "parameter_server"}, {"mode", "ssp"}, {"staleness", -1}};
  writeFile(dir + "/job.json", job.dump());
  r = run(threeRanks(dir + "/job.json", dir + "/out"), {.timeout = 60s});
  CHECK(r.exitCode == 2);
  CHECK(r.err.find("/parallel/staleness") != std::string::npos);
}

TEST_CASE("parameter server, sync: a killed worker re-forms the group, which resumes from the last checkpoint") {
  std::string dir = tempDir("pskill");
  json job = psJob("sync");
  job["checkpoint"] = {{"every_steps", 3}, {"keep", 2}};
  writeFile(dir + "/job.json", job.dump());
  auto r = run(threeRanks(dir + "/job.json", dir + "/out", 2),
               {.timeout = 180s, .env = {{"DTRAIN_FAULT", "rank=1,step=7,action=kill"}}});
  INFO(r.out, r.err);
  REQUIRE(r.exitCode == 0);
  CHECK(r.out.find("resumed from") != std::string::npos);
  CHECK(lastEvalAccuracy(dir + "/out/metrics.jsonl") > 0.5);
}

TEST_CASE("parameter server, async/ssp: a killed worker leaves; the others finish the job without a restart, exit 0; "
          "the final line says what each worker trained") {
  for (const std::string mode : {"async", "ssp"}) {
    CAPTURE(mode);
    std::string dir = tempDir("ps" + mode + "kill");
    json job = psJob(mode);
    job["checkpoint"] = {{"every_steps", 3}, {"keep", 2}};
    writeFile(dir + "/job.json", job.dump());
    // No restart allowed: only going on without worker 1 can finish the job.
    auto r = run(threeRanks(dir + "/job.json", dir + "/out", 0),
                 {.timeout = 180s, .env = {{"DTRAIN_FAULT", "rank=1,step=7,action=kill"}}});
    INFO(r.out, r.err);
    REQUIRE(r.exitCode == 0);
    CHECK((r.out + r.err).find("async training goes on with the other workers") != std::string::npos);
    CHECK((r.out + r.err).find("worker 1 left; training goes on with the others") != std::string::npos);
    CHECK(r.out.find("resumed from") == std::string::npos);
    CHECK(std::filesystem::exists(dir + "/out/model.safetensors"));
    // Worker 0 ran every one of its 36 steps and checkpointed after the kill (server 0 counts the live workers).
    CHECK(std::filesystem::exists(dir + "/out/checkpoints/step-000000036/COMMITTED"));
    CHECK(lastEvalAccuracy(dir + "/out/metrics.jsonl") > 0.5);
    // The dead worker's shard of the evaluation set is evaluated too: worker 0 evaluates the whole set.
    CHECK(evalSampleCounts(dir + "/out/metrics.jsonl") == std::vector<int64_t>{50, 50, 50});
    // The final line counts what the servers applied of each worker's pushes: worker 0's 36 steps x 8 and the killed
    // worker 1's 7 steps x 8, and names the lost worker (it said "288 samples on worker 0" and nothing of worker 1;
    // before that it counted 2 workers' worth, 576, the dead one's 29 steps it never took included). The throughput
    // is worker 0's own.
    CHECK(r.out.find("done: 36 steps, 344 samples from 2 workers (288 on worker 0, 56 on worker 1) in ") !=
          std::string::npos);
    CHECK(r.out.find(" samples/s on worker 0, peak RSS ") != std::string::npos);
    CHECK(r.out.find("; lost worker 1 after 7 steps (56 of those samples); wrote ") != std::string::npos);
    bool final = false;
    for (const auto& line : readJsonLines(dir + "/out/metrics.jsonl")) {
      if (!line.contains("final")) continue;
      final = true;
      CHECK(line["samples_by_worker"] == json::array({288, 56}));
      CHECK(line["steps_by_worker"] == json::array({36, 7}));
      CHECK(line["lost_workers"] == json::array({1}));
    }
    CHECK(final);
  }
}

TEST_CASE("parameter server, async with 2 servers: a worker killed in the middle of a step, one partition of that "
          "step applied, is reported with the partial step, not counted and not dropped silently") {
  std::string dir = tempDir("pspartial");
  json job = psJob("async");
  job["parallel"]["servers"] = 2;  // 163 parameters: partition 0 (96) on server 0, partition 1 (67) on server 1
  writeFile(dir + "/job.json", job.dump());
  // kill_mid_step (lib/train/fault.h): worker 1 trains 7 steps, then in its 8th pushes partition 1 (a step's first
  // push, on server 1), waits for the answer (so server 1 applied it) and SIGKILLs itself before pushing partition 0.
  auto r = run(runArgs({"--standalone", "--nproc-per-node", "4", "--max-restarts", "0", "--shutdown-timeout", "2s",
                        dir + "/job.json", "--output-dir", dir + "/out"}),
               {.timeout = 180s, .env = {{"DTRAIN_FAULT", "rank=1,step=7,action=kill_mid_step"}}});
  INFO(r.out, r.err);
  REQUIRE(r.exitCode == 0);
  CHECK((r.out + r.err).find("DTRAIN_FAULT: worker 1 kill_mid_step in step 8: partition 1 of 2 pushed and applied") !=
        std::string::npos);
  // What the servers applied, by their own exit lines: worker 0's 36 steps and worker 1's 7 on both servers, and
  // worker 1's 8th step on server 1 only.
  CHECK((r.out + r.err).find("parameter server 0 done: 43 pushes, 43 updates") != std::string::npos);
  CHECK((r.out + r.err).find("parameter server 1 done: 44 pushes, 44 updates") != std::string::npos);
  // The final line: worker 1's 7 whole steps are counted, its 8th is named as applied in part (it used to be
  // counted as nothing, as if server 1 had not applied it).
  CHECK(r.out.find("done: 36 steps, 344 samples from 2 workers (288 on worker 0, 56 on worker 1) in ") !=
        std::string::npos);
  CHECK(r.out.find("; lost worker 1 after 7 steps (56 of those samples), its step 8 applied in part (1 of 2 "
                   "partitions, 8 samples not counted); wrote ") != std::string::npos);
  bool final = false;
  for (const auto& line : readJsonLines(dir + "/out/metrics.jsonl")) {
    if (!line.contains("final")) continue;
    final = true;
    CHECK(line["samples_by_worker"] == json::array({288, 56}));
    CHECK(line["steps_by_worker"] == json::array({36, 7}));
    CHECK(line["lost_workers"] == json::array({1}));
    CHECK(line["partial_steps_by_worker"] ==
          json::parse(R"([null, {"step": 8, "partitions_applied": 1, "partitions": 2, "samples": 8}])"));
  }
  CHECK(final);
}

TEST_CASE("parameter server killed: the job restarts from the last checkpoint (with another server count too)") {
  std::string dir = tempDir("pssrv");
  json job = psJob("sync");
  job["checkpoint"] = {{"every_steps", 3}, {"keep", 2}};
  job["parallel"]["servers"] = 2;
  writeFile(dir + "/job.json", job.dump());
  // 4 ranks: 2 workers, 2 servers; server 1 dies after 20 pushes (its partitions' 10th step).
  auto r = run(runArgs({"--standalone", "--nproc-per-node", "4", "--max-restarts", "2", "--shutdown-timeout", "2s",
                        dir + "/job.json", "--output-dir", dir + "/out", "--set", "train.epochs=2"}),
               {.timeout = 180s, .env = {{"DTRAIN_FAULT", "role=server,rank=1,step=20,action=kill"}}});
  INFO(r.out, r.err);
  REQUIRE(r.exitCode == 0);
  CHECK((r.out + r.err).find("parameter server 1 kills itself") != std::string::npos);
  CHECK(r.out.find("resumed from") != std::string::npos);
  // Resharding: the finished run's checkpoint continues with one server and one more epoch.
  auto again = run(runArgs({"--standalone", "--nproc-per-node", "3", "--shutdown-timeout", "2s", dir + "/job.json",
                            "--output-dir", dir + "/out", "--set", "parallel.servers=1"}),
                   {.timeout = 120s});
  INFO(again.out, again.err);
  REQUIRE(again.exitCode == 0);
  CHECK(again.out.find("resumed from") != std::string::npos);
  CHECK(lastEvalAccuracy(dir + "/out/metrics.jsonl") > 0.5);
}

TEST_CASE("parameter server, SIGTERM to the agent: the servers outlive the stop, so the workers' checkpoint is written") {
  std::string dir = tempDir("psterm");
  json job = smallJob(4000, 4, 1000);  // far longer than the test lets it run
  job["checkpoint"] = {{"every_steps", 0}};
  job["parallel"] = {{"strategy", "parameter_server"}, {"servers", 1}};
  writeFile(dir + "/job.json", job.dump());
  Background agent(threeRanks(dir + "/job.json", dir + "/out"));
  agent.waitForLine("step 20/", 60s);
  agent.signal(SIGTERM);
  auto r = agent.wait(60s);
  INFO(r.out, r.err);
  CHECK(r.exitCode == 128 + SIGTERM);
  // every_steps is 0 and no epoch ended: only the stop could have written a checkpoint
  bool found = false;
  for (const auto& e : std::filesystem::directory_iterator(dir + "/out/checkpoints"))
    found = found || e.path().filename().string().rfind("step-", 0) == 0;
  CHECK(found);
}
