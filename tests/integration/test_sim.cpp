// `dtrain sim` end to end (docs/sim.md): real agents in network namespaces (as root; on loopback otherwise), a
// fault schedule landed at fixed training steps (@stepN, so the machine's speed does not matter), the sim's own
// exactly-once verdict and an independent recount of the sample logs here.
#include <doctest/doctest.h>

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <set>

#include "tests/integration/launch_helpers.h"
#include "tests/integration/train_helpers.h"

using namespace dtrain::testing;
using namespace std::chrono_literals;
using nlohmann::json;

namespace {

// The final model's history from the sample logs (the definition in lib/launch/sim_report.h): per round, the
// steps at or after the next round's first step were redone and are dropped. Returns epoch -> sample -> times.
std::map<int64_t, std::map<int64_t, int>> finalHistory(const std::string& dir, int& rounds) {
  struct Entry {
    int round;
    int64_t epoch, step;
    std::vector<int64_t> idx;
  };
  std::vector<Entry> entries;
  for (auto& f : std::filesystem::directory_iterator(dir))
    for (auto& j : readJsonLines(f.path().string()))
      entries.push_back({j["round"], j["epoch"], j["step"], j["idx"].get<std::vector<int64_t>>()});
  std::map<int, int64_t> firstStep;
  for (auto& e : entries)
    if (!firstStep.count(e.round) || e.step < firstStep[e.round]) firstStep[e.round] = e.step;
  rounds = static_cast<int>(firstStep.size());
  std::map<int64_t, std::map<int64_t, int>> seen;
  for (auto& e : entries) {
    auto next = firstStep.upper_bound(e.round);
    if (next != firstStep.end() && e.step >= next->second) continue;
    for (auto i : e.idx) seen[e.epoch][i]++;
  }
  return seen;
}

std::vector<std::string> simArgs(std::vector<std::string> args) {
  args.insert(args.begin(), {dtrainBinary(), "sim"});
  return args;
}

// The job of the 2-stage pipeline cases: smallJob's MLP, `maxSteps` steps, a checkpoint every 4 steps, 2 stages
// of 2 micro-batches and a 20 s collective timeout, written to DIR/job.json.
void writePipelineSimJob(const std::string& dir, int maxSteps) {
  json job = smallJob(240, 5, 1000);
  job["train"]["max_steps"] = maxSteps;
  job["checkpoint"] = {{"every_steps", 4}, {"keep", 2}};
  job["parallel"] = {{"timeout", 20}, {"pipeline", {{"stages", 2}, {"micro_batches", 2}}}};
  writeFile(dir + "/job.json", job.dump());
}
}  // namespace

TEST_CASE("dtrain sim: 4 nodes, one killed and one joining: the job finishes and every sample is seen once") {
  std::string dir = tempDir("sim-kill-join");
  // 240 samples, batch 5: 20 samples per step on 4 ranks, 15 on 3: the kill and the join land mid-epoch, where the
  // rest of the epoch does not divide by the new world (the uneven shards of a resize, sampler.h).
  // Checkpoints every 5 steps and at each epoch's end (12 steps of 4 ranks): the kill at step 27 resumes from step
  // 25, one step into an epoch, and 220 samples left do not divide by 3 ranks.
  json job = smallJob(240, 5, 1000);
  job["train"]["max_steps"] = 120;
  job["checkpoint"] = {{"every_steps", 5}, {"keep", 3}};
  job["parallel"] = {{"timeout", 20}};
  writeFile(dir + "/job.json", job.dump());
  RunOptions opts{.timeout = 180s, .env = {{"DTRAIN_STEP_PAUSE", "25ms"}}};
  auto r = run(simArgs({"--nodes", "4", "--faults", "kill:node3@step27,join:node4@step60", "--report",
                        dir + "/report.svg", "--output-dir", dir + "/sim", dir + "/job.json"}),
               opts);
  INFO(r.out, r.err);
  REQUIRE(r.exitCode == 0);
  CHECK(r.out.find("samples: ") != std::string::npos);
  CHECK(r.out.find("OK: every sample seen once") != std::string::npos);
  CHECK(r.out.find("repeated 0, skipped 0") != std::string::npos);
  CHECK(r.out.find("kill:node3@step27") != std::string::npos);
  CHECK(r.out.find("join:node4@step60") != std::string::npos);
  CHECK(r.out.find("done: 120 steps") != std::string::npos);
  if (::geteuid() == 0) CHECK(r.out.find("network namespaces on a bridge") != std::string::npos);
  else CHECK(r.out.find("loopback 127.0.0.x") != std::string::npos);
  const std::string svg = readFile(dir + "/report.svg");
  CHECK(svg.find("<svg") != std::string::npos);
  CHECK(svg.find("throughput vs node count") != std::string::npos);

  int rounds = 0;
  auto seen = finalHistory(dir + "/sim/samples", rounds);
  CHECK(rounds >= 3);  // the first group, after the kill, after the join
  int64_t trained = 0;
  for (auto& [epoch, counts] : seen) {
    for (auto& [sample, times] : counts) {
      CHECK_MESSAGE(times == 1, "epoch ", epoch, " sample ", sample, " seen ", times);
      trained += times;
    }
    if (epoch != seen.rbegin()->first) CHECK_MESSAGE(counts.size() == 240, "epoch ", epoch);
  }
  CHECK(trained > 0);
  // Nothing the sim started is left: every worker carried the sample-log variable.
  CHECK(processesWithEnv("DTRAIN_SAMPLE_LOG", dir + "/sim/samples").empty());
}

TEST_CASE("dtrain sim: a pipeline job (2 stages per replica) resized by a kill: every sample seen once") {
  // Each replica's stages read the same batches; all of them used to write the sample log, so the sim counted
  // every sample of a pipeline job twice ("repeated 160 -> FAIL", exit 1) even without a fault.
  std::string dir = tempDir("sim-pipeline");
  writePipelineSimJob(dir, 24);
  RunOptions opts{.timeout = 180s, .env = {{"DTRAIN_STEP_PAUSE", "25ms"}}};
  auto r = run(simArgs({"--nodes", "3", "--nproc-per-node", "2", "--faults", "kill:node2@step6", "--output-dir",
                        dir + "/sim", dir + "/job.json"}),
               opts);
  INFO(r.out, r.err);
  CHECK(r.out.find("repeated 0, skipped 0") != std::string::npos);
  CHECK(r.out.find("done: 24 steps") != std::string::npos);
  REQUIRE(r.exitCode == 0);
  int rounds = 0;
  auto seen = finalHistory(dir + "/sim/samples", rounds);
  CHECK(rounds >= 2);  // 3 replicas, then 2 after the kill
  int64_t trained = 0;
  for (auto& [epoch, counts] : seen)
    for (auto& [sample, times] : counts) {
      CHECK_MESSAGE(times == 1, "epoch ", epoch, " sample ", sample, " seen ", times);
      trained += times;
    }
  CHECK(trained > 0);
  CHECK(processesWithEnv("DTRAIN_SAMPLE_LOG", dir + "/sim/samples").empty());
}

TEST_CASE("dtrain sim: a 2-stage pipeline on one rank per node: a joining third node waits as a spare, and says so") {
  // --nnodes 1:3 (2 nodes, a join, a kill): 1 and 3 nodes cannot run the job, so node2 waits as a spare until the
  // kill. The sim's output showed nothing of it: the join looked detected only at the kill's re-formation.
  std::string dir = tempDir("sim-spare");
  writePipelineSimJob(dir, 40);
  RunOptions opts{.timeout = 180s, .env = {{"DTRAIN_STEP_PAUSE", "25ms"}}};
  auto r = run(simArgs({"--nodes", "2", "--faults", "join:node2@step4,kill:node1@step16", "--output-dir",
                        dir + "/sim", dir + "/job.json"}),
               opts);
  INFO(r.out, r.err);
  CHECK(r.exitCode == 0);
  CHECK(r.out.find("repeated 0, skipped 0") != std::string::npos);
  CHECK(r.out.find("done: 40 steps") != std::string::npos);
  CHECK(r.out.find("[node2] dtrain: rendezvous: round 0 runs 2 node(s); 3 node(s) cannot run this job, so this "
                   "node waits as a spare") != std::string::npos);
  CHECK(processesWithEnv("DTRAIN_SAMPLE_LOG", dir + "/sim/samples").empty());
}

TEST_CASE("dtrain sim: a 2-stage pipeline on 4 nodes, one killed: the 3 survivors run 2 nodes and a spare") {
  // The agents took --nnodes 3:4 (4 nodes less the kill), and 3 nodes cannot run 2 stages of 1 rank: the survivors
  // waited for a fourth node up to the sim's --timeout (10 minutes by default) and the sim failed, exit 4. MIN is
  // now the largest count at or below the survivors' that the job can run.
  std::string dir = tempDir("sim-pipeline-survivors");
  writePipelineSimJob(dir, 24);
  RunOptions opts{.timeout = 180s, .env = {{"DTRAIN_STEP_PAUSE", "25ms"}}};
  auto r = run(simArgs({"--nodes", "4", "--faults", "kill:node3@step6", "--timeout", "90s", "--output-dir",
                        dir + "/sim", dir + "/job.json"}),
               opts);
  INFO(r.out, r.err);
  CHECK(r.out.find("[sim] the faults may leave 3 node(s), a world this job cannot run (") != std::string::npos);
  CHECK(r.out.find("the agents take --nnodes 2:4, so the survivors form a round of 2 node(s)") != std::string::npos);
  CHECK(r.out.find("3 node(s) cannot run this job, so this node waits as a spare") != std::string::npos);
  CHECK(r.out.find("repeated 0, skipped 0") != std::string::npos);
  CHECK(r.out.find("done: 24 steps") != std::string::npos);
  CHECK(r.exitCode == 0);
  CHECK(processesWithEnv("DTRAIN_SAMPLE_LOG", dir + "/sim/samples").empty());
}

TEST_CASE("dtrain sim: a parameter-server job's throughput rows count its nodes, servers included") {
  // The sample log's world was the workers' (3 of 4 ranks here), so 2 nodes x 2 ranks read as "1 node, 2 ranks".
  std::string dir = tempDir("sim-ps");
  json job = smallJob(240, 5, 1000);
  job["train"]["max_steps"] = 12;
  job["checkpoint"] = false;
  job["parallel"] = {{"timeout", 20}, {"strategy", "parameter_server"}, {"servers", 1}};
  writeFile(dir + "/job.json", job.dump());
  RunOptions opts{.timeout = 180s, .env = {{"DTRAIN_STEP_PAUSE", "25ms"}}};
  auto r = run(simArgs({"--nodes", "2", "--nproc-per-node", "2", "--output-dir", dir + "/sim", dir + "/job.json"}),
               opts);
  INFO(r.out, r.err);
  REQUIRE(r.exitCode == 0);
  CHECK(r.out.find("repeated 0, skipped 0") != std::string::npos);
  CHECK(linesWith(r.out, "      2     4 ").size() == 1);  // nodes, ranks
}

TEST_CASE("dtrain sim: 3 nodes over 100 samples: the sampler's padding is not counted as repeated (exit 0)") {
  // A fixed world of 3 pads each 100-sample epoch to 102 with its first 2 samples (PyTorch's DistributedSampler):
  // the sim counted those as repeated and failed a run without any fault (exit 1, "repeated 4").
  std::string dir = tempDir("sim-padding");
  json job = smallJob(100, 5, 2);
  job["checkpoint"] = false;
  job["parallel"] = {{"timeout", 20}};
  writeFile(dir + "/job.json", job.dump());
  auto r = run(simArgs({"--nodes", "3", "--output-dir", dir + "/sim", dir + "/job.json"}), {.timeout = 180s});
  INFO(r.out, r.err);
  CHECK(r.exitCode == 0);
  CHECK(r.out.find("repeated 0 (and 4 padding: ") != std::string::npos);
  CHECK(r.out.find(", skipped 0 (2 epoch(s) checked, 2 complete, 100 samples each) -> OK") != std::string::npos);
  // The workers' logs mark exactly those: 2 per epoch, each a sample also trained in that epoch.
  std::map<int64_t, std::vector<int64_t>> pads;
  std::map<int64_t, std::map<int64_t, int>> real;
  for (auto& f : std::filesystem::directory_iterator(dir + "/sim/samples"))
    for (auto& j : readJsonLines(f.path().string())) {
      for (auto i : j["idx"].get<std::vector<int64_t>>()) real[j["epoch"].get<int64_t>()][i]++;
      if (j.contains("pad"))
        for (auto i : j["pad"].get<std::vector<int64_t>>()) pads[j["epoch"].get<int64_t>()].push_back(i);
    }
  REQUIRE(pads.size() == 2);
  for (const auto& [epoch, p] : pads) {
    CAPTURE(epoch);
    CHECK(p.size() == 2);
    CHECK(real[epoch].size() == 100);
    for (auto i : p) CHECK(real[epoch].count(i) == 1);
  }
}

TEST_CASE("dtrain sim: 3 nodes over 100 samples with drop_last: what it drops is not counted as skipped (exit 0)") {
  // drop_last leaves out 1 sample an epoch (99 fill 33 rounds of 3) and each rank's last 33 - 6 x 5 = 3: the sim
  // counted those as skipped and failed a run without any fault (exit 1, "skipped 10").
  std::string dir = tempDir("sim-droplast");
  json job = smallJob(100, 5, 2);
  job["data"]["drop_last"] = true;
  job["checkpoint"] = false;
  job["parallel"] = {{"timeout", 20}};
  writeFile(dir + "/job.json", job.dump());
  auto r = run(simArgs({"--nodes", "3", "--output-dir", dir + "/sim", dir + "/job.json"}), {.timeout = 180s});
  INFO(r.out, r.err);
  CHECK(r.exitCode == 0);
  CHECK(r.out.find("samples: 180 trained in 12 steps") != std::string::npos);
  CHECK(r.out.find("repeated 0, skipped 0 (and 20 dropped by data.drop_last: ") != std::string::npos);
  CHECK(r.out.find("2 epoch(s) checked, 2 complete, 100 samples each) -> OK: every sample seen once, except those "
                   "drop_last dropped\n") != std::string::npos);
  // The workers' logs list them on each epoch's last step: 10 per epoch, none trained in that epoch.
  std::map<int64_t, std::set<int64_t>> drops, real;
  for (auto& f : std::filesystem::directory_iterator(dir + "/sim/samples"))
    for (auto& j : readJsonLines(f.path().string())) {
      for (auto i : j["idx"].get<std::vector<int64_t>>()) real[j["epoch"].get<int64_t>()].insert(i);
      if (j.contains("drop")) {
        CHECK(j["step"].get<int64_t>() % 6 == 0);
        for (auto i : j["drop"].get<std::vector<int64_t>>()) drops[j["epoch"].get<int64_t>()].insert(i);
      }
    }
  REQUIRE(drops.size() == 2);
  for (const auto& [epoch, d] : drops) {
    CAPTURE(epoch);
    CHECK(d.size() == 10);
    CHECK(real[epoch].size() == 90);
    for (auto i : d) CHECK(real[epoch].count(i) == 0);
  }
}

TEST_CASE("dtrain sim: a node cut off by a partition; the others re-form and the job finishes") {
  if (::geteuid() != 0) {
    MESSAGE("skipped: partitions need network namespaces (root)");
    return;
  }
  std::string dir = tempDir("sim-partition");
  json job = smallJob(240, 5, 1000);
  job["train"]["max_steps"] = 120;
  job["checkpoint"] = {{"every_steps", 10}, {"keep", 3}};
  job["parallel"] = {{"timeout", 10}};
  writeFile(dir + "/job.json", job.dump());
  RunOptions opts{.timeout = 180s, .env = {{"DTRAIN_STEP_PAUSE", "25ms"}}};
  auto r = run(simArgs({"--nodes", "3", "--link", "1gbit", "--faults", "partition:node2@step20+6s", "--output-dir",
                        dir + "/sim", dir + "/job.json"}),
               opts);
  INFO(r.out, r.err);
  REQUIRE(r.exitCode == 0);
  CHECK(r.out.find("node2's link is down") != std::string::npos);
  CHECK(r.out.find("node2's link is up again") != std::string::npos);
  CHECK(r.out.find("done: 120 steps") != std::string::npos);
  CHECK(r.out.find("repeated 0, skipped 0") != std::string::npos);
  CHECK(r.out.find("links (bytes through each node's veth") != std::string::npos);
  CHECK(processesWithEnv("DTRAIN_SAMPLE_LOG", dir + "/sim/samples").empty());
}

TEST_CASE("dtrain sim: a delayed link (dtrain's transport) holds every step for at least the delay") {
  std::string dir = tempDir("sim-delay");
  json job = smallJob(240, 5, 1000);
  job["train"]["max_steps"] = 12;
  job["parallel"] = {{"timeout", 30}};
  writeFile(dir + "/job.json", job.dump());
  RunOptions opts{.timeout = 180s};
  auto r = run(simArgs({"--nodes", "2", "--faults", "delay:node1=250ms", "--output-dir", dir + "/sim", dir + "/job.json"}),
               opts);
  INFO(r.out, r.err);
  REQUIRE(r.exitCode == 0);
  CHECK(r.out.find("node1's messages leave 250 ms late") != std::string::npos);
  CHECK(r.out.find("done: 12 steps") != std::string::npos);
  // Every step all-reduces through node 1, whose messages leave 250 ms late: consecutive steps of rank 0 are at
  // least that far apart (a lower bound: load only makes steps longer).
  std::vector<double> times;
  for (auto& f : std::filesystem::directory_iterator(dir + "/sim/samples"))
    for (auto& j : readJsonLines(f.path().string()))
      if (j["rank"] == 0) times.push_back(j["t"].get<double>());
  std::sort(times.begin(), times.end());
  REQUIRE(times.size() >= 10);
  for (size_t i = 1; i < times.size(); ++i) CHECK_MESSAGE(times[i] - times[i - 1] >= 0.25, "step ", i);
  CHECK(processesWithEnv("DTRAIN_SAMPLE_LOG", dir + "/sim/samples").empty());
}

TEST_CASE("dtrain sim: a lossy link (iptables statistic drops) is survived, every sample seen once") {
  if (::geteuid() != 0 || (::access("/usr/sbin/iptables-legacy", X_OK) != 0 && ::access("/usr/sbin/iptables", X_OK) != 0)) {
    MESSAGE("skipped: packet loss needs network namespaces (root) and iptables (scripts/setup installs it)");
    return;
  }
  std::string dir = tempDir("sim-loss");
  json job = smallJob(240, 5, 1000);
  job["train"]["max_steps"] = 60;
  job["checkpoint"] = {{"every_steps", 10}, {"keep", 3}};
  job["parallel"] = {{"timeout", 30}};
  writeFile(dir + "/job.json", job.dump());
  RunOptions opts{.timeout = 180s};
  auto r = run(simArgs({"--nodes", "2", "--link", "1gbit", "--faults", "loss:node1=5%", "--output-dir", dir + "/sim",
                        dir + "/job.json"}),
               opts);
  INFO(r.out, r.err);
  REQUIRE(r.exitCode == 0);
  CHECK(r.out.find("node1 drops 5% of its packets each way") != std::string::npos);
  CHECK(r.out.find("done: 60 steps") != std::string::npos);
  CHECK(r.out.find("repeated 0, skipped 0") != std::string::npos);
  CHECK(processesWithEnv("DTRAIN_SAMPLE_LOG", dir + "/sim/samples").empty());
}

TEST_CASE("dtrain sim: a job that no round of the sim can run is exit 2 before any agent starts") {
  // 3 nodes of one rank and 2 pipeline stages, nothing joins: the agents started and each failed (exit 2).
  std::string dir = tempDir("sim-no-round");
  json job = smallJob(48, 4, 1);
  job["model"]["layers"][2] = {{"type", "tanh"}};
  job["parallel"] = {{"pipeline", {{"stages", 2}, {"micro_batches", 2}}}};
  writeFile(dir + "/job.json", job.dump());
  auto r = run(simArgs({"--nodes", "3", "--loopback", "--output-dir", dir + "/sim", dir + "/job.json"}), {.timeout = 60s});
  INFO(r.out, r.err);
  CHECK(r.exitCode == 2);
  CHECK(r.err.find("dtrain sim --nodes 3 --nproc-per-node 1: no round the sim may form (3 to 3 node(s)) gives a world "
                   "this job can use; e.g. 3 node(s): ") != std::string::npos);
  CHECK(r.err.find("a world of 3 rank(s) is not divisible by pipeline stages 2") != std::string::npos);
  CHECK(r.out.find("agent started") == std::string::npos);
  // A join at a step would make 4 nodes, but no round of the initial 3 takes a step: the sim waited out --timeout.
  r = run(simArgs({"--nodes", "3", "--loopback", "--faults", "join:node3@step5", "--timeout", "30s", "--output-dir",
                   dir + "/sim2", dir + "/job.json"}),
          {.timeout = 60s});
  CHECK(r.exitCode == 2);
  CHECK(r.err.find("dtrain sim --nodes 3 --nproc-per-node 1 --faults join:node3@step5: no count of the initial nodes "
                   "can run this job (e.g. 3 node(s): ") != std::string::npos);
  CHECK(r.err.find("give a join a time instead (join:node3@5s)") != std::string::npos);
  CHECK(r.out.find("agent started") == std::string::npos);
}

TEST_CASE("dtrain sim: a bad fault schedule is a usage error (exit 3) naming the entry, before anything starts") {
  std::string dir = tempDir("sim-bad");
  writeFile(dir + "/job.json", smallJob(48, 4, 1).dump());
  auto r = run(simArgs({"--nodes", "2", "--faults", "kill:node7@5s", dir + "/job.json"}));
  CHECK(r.exitCode == 3);
  CHECK(r.err.find("--faults 'kill:node7@5s': there is no node7") != std::string::npos);
  r = run(simArgs({"--nodes", "2", "--faults", "freeze:node1@5s", dir + "/job.json"}));
  CHECK(r.exitCode == 3);
  CHECK(r.err.find("freeze needs a duration") != std::string::npos);
  r = run(simArgs({"--nodes", "2", "--faults", "join:node3@5s", dir + "/job.json"}));
  CHECK(r.exitCode == 3);
  CHECK(r.err.find("the next node to join is node2") != std::string::npos);
  r = run(simArgs({"--nodes", "2", "--faults", "delay:node1=20ms@5s", dir + "/job.json"}));
  CHECK(r.exitCode == 3);
  CHECK(r.err.find("a delay holds from the start") != std::string::npos);
  r = run(simArgs({"--nodes", "2", "--faults", "loss:node1=150%", dir + "/job.json"}));
  CHECK(r.exitCode == 3);
  CHECK(r.err.find("'150%' is not a loss") != std::string::npos);
  r = run(simArgs({"--nodes", "2", "--link", "fast", dir + "/job.json"}));
  CHECK(r.exitCode == 3);
  CHECK(r.err.find("--link 'fast': expected a rate") != std::string::npos);
  // Where the report and the logs go is checked before anything starts too (was: exit 1 after the whole run,
  // or an internal error).
  r = run(simArgs({"--nodes", "2", "--report", dir + "/no-such-folder/sim.svg", dir + "/job.json"}));
  CHECK(r.exitCode == 3);
  CHECK(r.err.find("--report " + dir + "/no-such-folder/sim.svg: the folder " + dir + "/no-such-folder does not exist") !=
        std::string::npos);
  r = run(simArgs({"--nodes", "2", "--output-dir", dir + "/job.json", dir + "/job.json"}));
  CHECK(r.exitCode == 3);
  CHECK(r.err.find("--output-dir " + dir + "/job.json: " + dir + "/job.json exists and is not a folder") !=
        std::string::npos);
}

TEST_CASE("dtrain sim: SIGINT stops every node (exit 130); after a SIGKILL of the sim its watchdog leaves nothing") {
  std::string dir = tempDir("sim-stop");
  json job = smallJob(240, 5, 1000);
  job["train"]["max_steps"] = 100000;
  writeFile(dir + "/job.json", job.dump());
  RunOptions opts{.timeout = 120s, .env = {{"DTRAIN_STEP_PAUSE", "25ms"}}};
  {
    Background sim(simArgs({"--nodes", "2", "--verbose", "--output-dir", dir + "/a", dir + "/job.json"}), opts);
    sim.waitForLine("epoch 1/", 60s);  // rank 0's first progress line: both nodes train
    CHECK(!processesWithEnv("DTRAIN_SAMPLE_LOG", dir + "/a/samples").empty());
    sim.signal(SIGINT);
    auto r = sim.wait(60s);
    INFO(r.out, r.err);
    CHECK(r.exitCode == 130);
    CHECK(r.err.find("received SIGINT: stopping every node") != std::string::npos);
    CHECK(processesWithEnv("DTRAIN_SAMPLE_LOG", dir + "/a/samples").empty());
  }
  {
    Background sim(simArgs({"--nodes", "2", "--verbose", "--output-dir", dir + "/b", dir + "/job.json"}), opts);
    sim.waitForLine("epoch 1/", 60s);
    auto left = processesWithEnv("DTRAIN_SAMPLE_LOG", dir + "/b/samples");
    CHECK(left.size() >= 2);  // both agents and their workers
    sim.signal(SIGKILL);
    sim.wait(10s);
    for (pid_t p : left) CHECK_MESSAGE(waitForExit(p, 30s), "pid ", p, " outlived the sim");
    CHECK(processesWithEnv("DTRAIN_SAMPLE_LOG", dir + "/b/samples").empty());
  }
}
