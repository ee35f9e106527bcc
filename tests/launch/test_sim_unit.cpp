// dtrain sim's pure pieces: the fault schedule grammar and the report's arithmetic (sim_faults.h, sim_report.h).
#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include "lib/common/error.h"
#include "lib/launch/sim_faults.h"
#include "lib/launch/sim_net.h"
#include "lib/launch/sim_report.h"

#include <unistd.h>

#include <filesystem>
#include <set>
#include <fstream>

using namespace dtrain;
using namespace dtrain::launch;
using namespace std::chrono_literals;

TEST_CASE("the fault schedule: every kind, times, steps and durations") {
  auto f = parseSimFaults("kill:node3@5s, freeze:node2@10s+5s;partition:node1@step8+3s,slow:node0=10mbit,"
                          "join:node4@12s,slow:node4=1gbit@step40", 4);
  REQUIRE(f.size() == 6);
  CHECK(f[0].kind == SimFaultKind::kKill);
  CHECK(f[0].node == 3);
  CHECK(f[0].at == 5000ms);
  CHECK(f[1].kind == SimFaultKind::kFreeze);
  CHECK(f[1].duration == 5000ms);
  CHECK(f[2].kind == SimFaultKind::kPartition);
  CHECK(f[2].atStep == 8);
  CHECK(f[2].duration == 3000ms);
  CHECK(f[3].rate == "10mbit");
  CHECK(f[3].at == 0ms);
  CHECK(f[4].kind == SimFaultKind::kJoin);
  CHECK(f[4].node == 4);
  CHECK(f[5].atStep == 40);
  CHECK(simTotalNodes(f, 4) == 5);
  CHECK(parseSimFaults("", 2).empty());
  CHECK(tcRateBits("10mbit") == doctest::Approx(1e7));
  CHECK(tcRateBits("1gbit") == doctest::Approx(1e9));
  CHECK(tcRateBits("100mbps") == doctest::Approx(8e8));
}

TEST_CASE("the fault schedule: delay (dtrain's transport) and loss (iptables) entries") {
  auto f = parseSimFaults("delay:node1=20ms,loss:node2=1.5%,loss:node0=5%@step30", 3);
  REQUIRE(f.size() == 3);
  CHECK(f[0].kind == SimFaultKind::kDelay);
  CHECK(f[0].node == 1);
  CHECK(f[0].delay == 20ms);
  CHECK(f[1].kind == SimFaultKind::kLoss);
  CHECK(f[1].lossPercent == doctest::Approx(1.5));
  CHECK(f[1].at == 0ms);
  CHECK(f[2].atStep == 30);
  CHECK(simLinkDelay(f, 1) == 20ms);
  CHECK(simLinkDelay(f, 0) == 0ms);
  CHECK(std::string(simFaultName(SimFaultKind::kDelay)) == "delay");
  CHECK(std::string(simFaultName(SimFaultKind::kLoss)) == "loss");
}

TEST_CASE("the fault schedule: each mistake is a usage error naming the entry") {
  auto fails = [](const std::string& text, const std::string& needle) {
    CHECK_THROWS_WITH_AS(parseSimFaults(text, 4), doctest::Contains(needle.c_str()), UsageError);
  };
  fails("explode:node1@1s", "unknown fault 'explode'");
  fails("kill:node9@1s", "there is no node9");
  fails("kill:nodeX@1s", "'nodeX' is not a node");
  fails("kill:node1", "expected kill:nodeK@T");
  fails("kill:node1@soon", "'soon' is not a time");
  fails("kill:node1@1s+2s", "kill takes no duration");
  fails("freeze:node1@1s", "freeze needs a duration");
  fails("join:node6@1s", "the next node to join is node4");
  fails("slow:node1=fast", "expected a rate such as 10mbit");
  fails("kill:node1@1s,kill:node1@2s", "node1 is killed twice");
  fails("kill:node1@step0", "'step0' is not a step");
  fails("delay:node1=20ms@5s", "a delay holds from the start");
  fails("delay:node1", "expected delay:nodeK=D");
  fails("delay:node1=0ms", "between 1ms and 10s");
  fails("delay:node1=1s,delay:node1=2s", "node1 is given two delays");
  fails("loss:node1=0%", "'0%' is not a loss");
  fails("loss:node1=100%", "'100%' is not a loss");
  fails("loss:node1=5", "'5' is not a loss");
  fails("loss:node1", "expected loss:nodeK=P%");
}

TEST_CASE("the report: redone steps are left out; repeats, skips, throughput, detection and recovery") {
  // Round 0: 2 ranks, steps 1-4 at t=1..4 (epoch 0: samples 0-7), a kill at t=4.5; round 1 resumes from step 2
  // (redoes 3 and 4) with 1 rank at t=8..11 and finishes epoch 0 and part of epoch 1.
  std::vector<SampleStep> steps;
  for (int s = 1; s <= 4; ++s)
    for (int r = 0; r < 2; ++r) steps.push_back({0, r, 2, 0, s, double(s), {int64_t((s - 1) * 2 + r)}});
  for (int s = 3; s <= 6; ++s) steps.push_back({1, 0, 1, s <= 6 ? 0 : 1, s, 5.0 + s, {int64_t(s + 1)}});
  steps.push_back({1, 0, 1, 1, 7, 12.5, {0}});
  std::vector<SimAgentEvent> events = {{4.6, 2, "re-form"}, {6.0, 0, "re-form"}};
  SimFault kill;
  kill.kind = SimFaultKind::kKill;
  kill.node = 2;
  kill.firedAt = 4.5;
  kill.text = "kill:node2@4s";
  SimReport report;
  report.audit.datasetSize = 8;
  analyseSim(report, steps, events, {kill}, 1);
  const auto& a = report.audit;
  CHECK(a.rounds == 2);
  CHECK(a.stepsRedone == 2);     // round 0's steps 3 and 4
  CHECK(a.stepsKept == 2 + 5);   // round 0's 1-2, round 1's 3-7
  CHECK(a.repeated == 0);
  CHECK(a.skipped == 0);         // epoch 0 holds samples 0..7 once each
  CHECK(a.epochsComplete == 1);
  REQUIRE(report.faults.size() == 1);
  REQUIRE(report.faults[0].detection.has_value());
  CHECK(*report.faults[0].detection == doctest::Approx(1.5));  // node2's own line does not count
  REQUIRE(report.faults[0].recovery.has_value());
  CHECK(*report.faults[0].recovery == doctest::Approx(3.5));   // round 1's first step at t=8
  CHECK(report.faults[0].stepsRedone == 2);
  REQUIRE(report.throughput.size() == 2);
  CHECK(report.throughput[0].nodes == 1);
  CHECK(report.throughput[1].nodes == 2);
  CHECK(report.throughput[1].samplesPerSec == doctest::Approx(6.0 / 3.0));  // steps 2-4: 6 samples over 3 s
  CHECK(formatSimReport(report).find("repeated 0, skipped 0") != std::string::npos);
  // Epoch 1 (the last) is checked for repeats only: the verdict says so instead of claiming every sample.
  CHECK(formatSimReport(report).find("OK: every sample seen once (the last epoch, which max_steps may cut short, is "
                                     "checked for repeats only)") != std::string::npos);

  // A last epoch that holds every sample is complete: "every sample seen once" without the qualification.
  std::vector<SampleStep> whole;
  for (int e = 0; e < 2; ++e)
    for (int s = 1; s <= 4; ++s)
      for (int r = 0; r < 2; ++r)
        whole.push_back({0, r, 2, e, e * 4 + s, double(e * 4 + s), {int64_t((s - 1) * 2 + r)}});
  SimReport finished;
  finished.audit.datasetSize = 8;
  analyseSim(finished, whole, {}, {}, 1);
  CHECK(finished.audit.epochsChecked == 2);
  CHECK(finished.audit.epochsComplete == 2);
  CHECK_MESSAGE(formatSimReport(finished).find("(2 epoch(s) checked, 2 complete, 8 samples each) -> OK: every sample "
                                               "seen once\n") != std::string::npos,
                formatSimReport(finished));

  // A sample trained twice in one epoch, and one never trained in a finished epoch.
  steps.push_back({1, 0, 1, 0, 6, 10.5, {3}});
  SimReport bad;
  bad.audit.datasetSize = 9;
  analyseSim(bad, steps, events, {kill}, 1);
  CHECK(bad.audit.repeated == 1);
  CHECK(bad.audit.skipped == 1);
  CHECK(formatSimReport(bad).find("FAIL") != std::string::npos);
}

TEST_CASE("the report: the sampler's padding (logged as pad) is not a repeat; an unmarked duplicate still is") {
  // 3 ranks over 4 samples: PyTorch's DistributedSampler pads the epoch to 6 by repeating its first 2 samples. The
  // sim counted them as repeated and failed (exit 1) every fault-free run whose dataset the world does not divide.
  std::vector<SampleStep> steps;
  steps.push_back({0, 0, 3, 0, 1, 1.0, {2}});
  steps.push_back({0, 1, 3, 0, 1, 1.0, {0}});
  steps.push_back({0, 2, 3, 0, 1, 1.0, {3}});
  steps.push_back({0, 0, 3, 0, 2, 2.0, {1}});
  steps.push_back({0, 1, 3, 0, 2, 2.0, {}, {2}});
  steps.push_back({0, 2, 3, 0, 2, 2.0, {}, {0}});
  SimReport report;
  report.audit.datasetSize = 4;
  analyseSim(report, steps, {}, {}, 1);
  CHECK(report.audit.repeated == 0);
  CHECK(report.audit.padding == 2);
  CHECK(report.audit.skipped == 0);
  CHECK(report.audit.samplesTrained == 6);
  const std::string text = formatSimReport(report);
  CHECK_MESSAGE(text.find("repeated 0 (and 2 padding: the sampler repeats an epoch's first samples to fill the world's "
                          "last round, as PyTorch's DistributedSampler), skipped 0") != std::string::npos, text);
  CHECK(text.find("FAIL") == std::string::npos);
  CHECK(simReportJson(report).find("\"padding\": 2") != std::string::npos);
  // The same duplicates unmarked (a real repeat) still fail.
  steps[4] = {0, 1, 3, 0, 2, 2.0, {2}};
  SimReport bad;
  bad.audit.datasetSize = 4;
  analyseSim(bad, steps, {}, {}, 1);
  CHECK(bad.audit.repeated == 1);
  CHECK(formatSimReport(bad).find("FAIL") != std::string::npos);
}

TEST_CASE("the sample logs: a worker's pad entries are read apart from idx") {
  const std::string dir = "/tmp/dtrain-test-simlog-" + std::to_string(::getpid());
  std::filesystem::create_directories(dir);
  {
    std::ofstream f(dir + "/samples-a0-r1.jsonl");
    f << R"({"attempt":0,"round":0,"rank":1,"world":3,"epoch":0,"step":2,"t":101.5,"idx":[7],"pad":[0,4]})" << "\n";
    f << R"({"attempt":0,"round":0,"rank":1,"world":3,"epoch":0,"step":1,"t":101.0,"idx":[5,6]})" << "\n";
  }
  auto steps = readSampleLogs(dir, 100.0);
  std::filesystem::remove_all(dir);
  REQUIRE(steps.size() == 2);
  CHECK(steps[0].idx == std::vector<int64_t>{7});
  CHECK(steps[0].pad == std::vector<int64_t>{0, 4});
  CHECK(steps[0].t == doctest::Approx(1.5));
  CHECK(steps[1].pad.empty());
}


TEST_CASE("the report: an epoch that took no step under drop_last counts its samples as dropped, not as a step") {
  // 10 samples, batch 2, drop_last. Round 0 (2 ranks) trains 8 samples of epoch 0 in 2 steps and is re-formed with 4
  // ranks from step 2's checkpoint: the 2 samples left are half a sample per rank, no batch, so epoch 0 ends with 0
  // steps (the workers log one "steps": 0 line each). Epoch 1 runs 1 step of 4 x 2 and drops its tail of 2.
  const std::string dir = "/tmp/dtrain_test_sim_empty_epoch_" + std::to_string(::getpid());
  std::filesystem::create_directories(dir);
  {
    std::ofstream a(dir + "/samples-a0-r0.jsonl"), b(dir + "/samples-a0-r1.jsonl");
    a << R"({"attempt":0,"round":0,"rank":0,"world":2,"epoch":0,"step":1,"t":101.0,"idx":[0,1]})" "\n"
      << R"({"attempt":0,"round":0,"rank":0,"world":2,"epoch":0,"step":2,"t":102.0,"idx":[4,5]})" "\n";
    b << R"({"attempt":0,"round":0,"rank":1,"world":2,"epoch":0,"step":1,"t":101.0,"idx":[2,3]})" "\n"
      << R"({"attempt":0,"round":0,"rank":1,"world":2,"epoch":0,"step":2,"t":102.0,"idx":[6,7]})" "\n";
    for (int r = 0; r < 4; ++r) {
      std::ofstream f(dir + "/samples-a1-r" + std::to_string(r) + ".jsonl");
      const std::string drop = r < 2 ? std::to_string(8 + r) : "";
      f << R"({"attempt":1,"round":1,"rank":)" << r << R"(,"world":4,"epoch":0,"step":2,"t":105.0,"steps":0,"idx":[],"drop":[)"
        << drop << "]}\n";
      f << R"({"attempt":1,"round":1,"rank":)" << r << R"(,"world":4,"epoch":1,"step":3,"t":106.0,"idx":[)" << 2 * r
        << "," << 2 * r + 1 << "]" << (r < 2 ? ",\"drop\":[" + std::to_string(8 + r) + "]" : std::string()) << "}\n";
    }
  }
  const auto steps = readSampleLogs(dir, 100.0);
  std::filesystem::remove_all(dir);
  REQUIRE(steps.size() == 12);
  SimReport report;
  report.audit.datasetSize = 10;
  analyseSim(report, steps, {}, {}, 1);
  CHECK(report.audit.skipped == 0);
  CHECK(report.audit.repeated == 0);
  CHECK(report.audit.dropped == 4);
  CHECK(report.audit.stepsKept == 3);  // the empty epoch's lines are no step: round 0's step 2 is not redone
  CHECK(report.audit.stepsRedone == 0);
  CHECK(report.audit.samplesTrained == 16);
  CHECK(report.audit.epochsChecked == 2);
  CHECK(report.audit.epochsComplete == 2);
  CHECK(report.audit.emptyEpochs == std::set<int64_t>{0});
  const std::string text = formatSimReport(report);
  CHECK_MESSAGE(text.find("epoch(s) 1 took 0 steps: with data.drop_last every rank's share of what was left of them "
                          "made no whole batch") != std::string::npos,
                text);
  CHECK(text.find("-> OK") != std::string::npos);
  CHECK(nlohmann::json::parse(simReportJson(report))["samples"]["empty_epochs"] == nlohmann::json::array({0}));
}

TEST_CASE("the report: what drop_last left out (logged as drop) is not skipped; a sample missing besides still is") {
  // 2 ranks over 5 samples, batch 1, drop_last: the sampler drops 1 sample an epoch. The sim counted it as skipped
  // and failed (3 nodes over 100 samples, batch 5: 'skipped 10 -> FAIL', exit 1).
  auto epoch = [](int64_t e, int64_t step, std::vector<int64_t> order) {
    std::vector<SampleStep> s;
    s.push_back({0, 0, 2, e, step, 1.0 + step, {order[0]}});
    s.push_back({0, 1, 2, e, step, 1.0 + step, {order[1]}});
    s.push_back({0, 0, 2, e, step + 1, 2.0 + step, {order[2]}, {}, {order[4]}});
    s.push_back({0, 1, 2, e, step + 1, 2.0 + step, {order[3]}});
    return s;
  };
  std::vector<SampleStep> steps = epoch(0, 1, {3, 1, 4, 0, 2});
  auto second = epoch(1, 3, {2, 0, 1, 4, 3});
  steps.insert(steps.end(), second.begin(), second.end());
  SimReport report;
  report.audit.datasetSize = 5;
  analyseSim(report, steps, {}, {}, 1);
  CHECK(report.audit.skipped == 0);
  CHECK(report.audit.dropped == 2);
  CHECK(report.audit.repeated == 0);
  CHECK(report.audit.samplesTrained == 8);
  CHECK(report.audit.epochsComplete == 2);  // the last epoch too: its samples are all trained or dropped
  const std::string text = formatSimReport(report);
  CHECK_MESSAGE(text.find("skipped 0 (and 2 dropped by data.drop_last: what fills no whole round of the world or "
                          "whole batch, as PyTorch's DistributedSampler and DataLoader drop it; 2 epoch(s) checked, 2 "
                          "complete, 5 samples each) -> OK: every sample seen once, except those drop_last dropped\n") !=
                    std::string::npos,
                text);
  CHECK(simReportJson(report).find("\"dropped\": 2") != std::string::npos);
  // A sample trained in no step and not dropped either (here: epoch 0's sample 0) is still skipped.
  steps[3].idx.clear();
  SimReport bad;
  bad.audit.datasetSize = 5;
  analyseSim(bad, steps, {}, {}, 1);
  CHECK(bad.audit.skipped == 1);
  CHECK(bad.audit.dropped == 2);
  CHECK(formatSimReport(bad).find("FAIL") != std::string::npos);
  // Only the final model's history counts: a drop logged by a step that a later round redid does not (here the
  // redoing round trained the same samples but dropped none, so sample 2 is skipped).
  std::vector<SampleStep> redone = epoch(0, 1, {3, 1, 4, 0, 2});
  redone.push_back({1, 0, 2, 0, 2, 5.0, {4}});
  redone.push_back({1, 1, 2, 0, 2, 5.0, {0}});
  redone.push_back({1, 0, 2, 1, 3, 6.0, {1}});
  SimReport again;
  again.audit.datasetSize = 5;
  analyseSim(again, redone, {}, {}, 1);
  CHECK(again.audit.stepsRedone == 1);
  CHECK(again.audit.dropped == 0);
  CHECK(again.audit.skipped == 1);
}
