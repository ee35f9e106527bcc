// Trainer callbacks: a one-process run in this process, observed through a recording callback.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <thread>

#include "lib/train/fault.h"
#include "lib/train/progress.h"
#include "lib/train/trainer.h"
#include "tests/support/process.h"

using namespace dtrain;
using namespace dtrain::train;

namespace {

// 64 samples, batch 8, 2 micro-batches per step: 4 optimizer steps per epoch, 2 epochs, evaluation after each.
const char* kJob = R"({
  "model": {"input": [4], "layers": [{"type": "linear", "out": 8}, {"type": "relu"}, {"type": "linear", "out": 3}]},
  "loss": {"type": "cross_entropy"},
  "data": {"train": {"format": "synthetic", "task": "classification", "samples": 64, "features": 4, "num_classes": 3},
           "eval": {"format": "synthetic", "task": "classification", "samples": 16, "features": 4, "num_classes": 3,
                    "sample_seed": 5},
           "batch_size": 8, "shuffle": false},
  "optimizer": {"type": "sgd", "lr": 0.1},
  "train": {"epochs": 2, "seed": 3, "grad_accum": 2, "log_every": 1},
  "checkpoint": false
})";

// One letter per event: b onBatch, o onOptimizerStep, l onLog, e onStepEnd, v onEval, f onFinish.
struct Recorder : TrainerCallback {
  std::string events;
  std::vector<StepEvent> steps;  // onOptimizerStep
  std::vector<StepEvent> ends;   // onStepEnd
  std::vector<int64_t> batchSizes;
  std::vector<int64_t> loggedSteps;
  std::vector<StepStats> logged;  // onLog
  int64_t evalSamples = 0;
  TrainResult result;

  void onBatch(const data::Batch& b) override {
    events += 'b';
    batchSizes.push_back(static_cast<int64_t>(b.indices.size()));
  }
  void onOptimizerStep(const StepEvent& e) override {
    events += 'o';
    steps.push_back(e);
  }
  void onLog(const StepStats& s) override {
    events += 'l';
    loggedSteps.push_back(s.step);
    logged.push_back(s);
  }
  void onStepEnd(const StepEvent& e) override {
    events += 'e';
    ends.push_back(e);
  }
  void onEval(const StepStats&, const EvalResult& r) override {
    events += 'v';
    evalSamples += r.samples;
  }
  void onFinish(const StepStats&, const TrainResult& r) override {
    events += 'f';
    result = r;
  }
};

int countLines(const std::string& path) {
  std::ifstream in(path);
  int n = 0;
  for (std::string line; std::getline(in, line);) ++n;
  return n;
}

}  // namespace

TEST_CASE("callbacks see every micro-batch, step boundary, log, evaluation and the finish, in order") {
  auto dir = testing::tempDir("callbacks");
  testing::writeFile(dir + "/job.json", kJob);
  auto job = loadJob({dir + "/job.json", {}, dir + "/out"});
  auto recorder = std::make_shared<Recorder>();
  TrainResult result = runTraining(job, WorkerInfo{}, {recorder});

  const std::string step = "bbole";  // two micro-batches, the step, its log line, its end
  std::string epoch;
  for (int i = 0; i < 4; ++i) epoch += step;
  CHECK(recorder->events == epoch + "v" + epoch + "v" + "f");
  REQUIRE(recorder->steps.size() == 8);
  REQUIRE(recorder->ends.size() == 8);
  for (size_t i = 0; i < 8; ++i) {
    CHECK(recorder->steps[i].step == static_cast<int64_t>(i) + 1);
    CHECK(recorder->steps[i].epoch == static_cast<int64_t>(i) / 4);
    CHECK(recorder->ends[i].step == recorder->steps[i].step);
    CHECK(recorder->loggedSteps[i] == recorder->steps[i].step);
  }
  CHECK(recorder->batchSizes == std::vector<int64_t>(16, 8));
  CHECK(recorder->evalSamples == 2 * 16);
  CHECK(recorder->result.steps == 8);
  CHECK(result.steps == 8);
  // Every micro-batch's samples count (2 epochs x 64), not only the last micro-batch of each step.
  CHECK(result.samples == 2 * 64);
  CHECK(recorder->result.samples == 2 * 64);
  // The built-in progress callback wrote metrics.jsonl: a line per log, per evaluation, and the final line.
  CHECK(countLines(dir + "/out/metrics.jsonl") == 8 + 2 + 1);
}

TEST_CASE("the ETA counts only this process's steps and time: not the set-up, not the steps a resume inherited") {
  // A run resumed at step 469 of 938, 0.5 s into its training (after 3 s of set-up), has taken 1 step: 469 steps
  // left at 0.5 s each. The old estimate (elapsed since start / steps done) said 3 s: "ETA 0:03".
  StepStats s{.step = 470, .totalSteps = 938, .startStep = 469, .elapsedSec = 3.5, .trainSec = 0.5};
  CHECK(etaSeconds(s) == doctest::Approx(0.5 * 468));
  // The first step of a fresh run: its own time, not the start-up's ("ETA 7:49" for a 4 s run).
  s = StepStats{.step = 1, .totalSteps = 469, .startStep = 0, .elapsedSec = 1.0, .trainSec = 0.01};
  CHECK(etaSeconds(s) == doctest::Approx(0.01 * 468));
  CHECK(formatDuration(etaSeconds(s)) == "0:05");
  // Nothing taken yet in this process: unknown, not 0.
  s = StepStats{.step = 469, .totalSteps = 938, .startStep = 469, .elapsedSec = 1.0, .trainSec = 0};
  CHECK(etaSeconds(s) < 0);
  CHECK(formatDuration(etaSeconds(s)) == "?");

  // What the trainer hands the progress line of a resumed run.
  auto dir = testing::tempDir("callbacks-eta");
  auto job = nlohmann::json::parse(kJob);
  job["checkpoint"] = {{"every_steps", 2}};
  job["train"]["max_steps"] = 4;
  testing::writeFile(dir + "/job.json", job.dump());
  runTraining(loadJob({dir + "/job.json", {}, dir + "/out"}), WorkerInfo{});
  job["train"]["max_steps"] = 0;
  testing::writeFile(dir + "/job.json", job.dump());
  auto recorder = std::make_shared<Recorder>();
  runTraining(loadJob({dir + "/job.json", {}, dir + "/out"}), WorkerInfo{}, {recorder});
  REQUIRE(!recorder->logged.empty());
  const StepStats& first = recorder->logged.front();
  CHECK(first.step == 5);
  CHECK(first.startStep == 4);
  CHECK(first.totalSteps == 8);
  CHECK(first.trainSec > 0);
  CHECK(first.trainSec <= first.elapsedSec);  // the set-up is not in it
  CHECK(etaSeconds(first) == doctest::Approx(first.trainSec * 3));
}

TEST_CASE("checkpoint saves are not training time: the interval's samples/s and the run's throughput leave them out") {
  // A save that takes 300 ms (a callback on it stands in for a slow disk) after each step of 8 samples: counted as
  // training, each interval read at most 8 / 0.3 = 27 samples/s; the steps themselves take microseconds.
  struct SlowSave : TrainerCallback {
    std::vector<StepStats> logged;
    void onCheckpoint(const CheckpointEvent&) override { std::this_thread::sleep_for(std::chrono::milliseconds(300)); }
    void onLog(const StepStats& s) override { logged.push_back(s); }
  };
  auto dir = testing::tempDir("callbacks-save");
  auto job = nlohmann::json::parse(kJob);
  job["checkpoint"] = {{"every_steps", 1}};
  job["train"]["max_steps"] = 3;
  job["train"].erase("grad_accum");
  testing::writeFile(dir + "/job.json", job.dump());
  auto slow = std::make_shared<SlowSave>();
  const TrainResult r = runTraining(loadJob({dir + "/job.json", {}, dir + "/out"}), WorkerInfo{}, {slow});
  REQUIRE(slow->logged.size() == 3);
  for (const StepStats& s : slow->logged) {
    CAPTURE(s.step);
    CHECK(s.samplesPerSec > 100);
  }
  CHECK(r.samples == 3 * 8);
  CHECK(r.samplesPerSec > 100);
}

TEST_CASE("the sample log (DTRAIN_SAMPLE_LOG) writes a batch's padding apart, as pad") {
  const std::string dir = "/tmp/dtrain-test-samplelog-" + std::to_string(::getpid());
  ::setenv("DTRAIN_SAMPLE_LOG", dir.c_str(), 1);
  {
    SampleLog log(1, 3, 0, 2);
    REQUIRE(log.enabled());
    const std::vector<int64_t> first = {5, 6}, second = {7, 0, 4};
    data::Batch a, b;
    a.indices = first;
    b.indices = second;
    b.padding = 2;  // 0 and 4 repeat the epoch's first samples
    log.onBatch(a);
    log.onBatch(b);
    log.commitStep(0, 9);
    log.onBatch(a);
    log.commitStep(0, 10);
  }
  ::unsetenv("DTRAIN_SAMPLE_LOG");
  std::ifstream in(dir + "/samples-a0-r1.jsonl");
  std::string line;
  std::vector<nlohmann::json> lines;
  while (std::getline(in, line)) lines.push_back(nlohmann::json::parse(line));
  std::filesystem::remove_all(dir);
  REQUIRE(lines.size() == 2);
  CHECK(lines[0]["idx"] == nlohmann::json::array({5, 6, 7}));
  CHECK(lines[0]["pad"] == nlohmann::json::array({0, 4}));
  CHECK(lines[0]["round"] == 2);
  CHECK(lines[1]["idx"] == nlohmann::json::array({5, 6}));
  CHECK(!lines[1].contains("pad"));
}


TEST_CASE("the sample log (DTRAIN_SAMPLE_LOG) writes what drop_last left out of the epoch, as drop") {
  const std::string dir = "/tmp/dtrain-test-samplelog-drop-" + std::to_string(::getpid());
  ::setenv("DTRAIN_SAMPLE_LOG", dir.c_str(), 1);
  {
    SampleLog log(0, 3, 1, 0);
    REQUIRE(log.enabled());
    const std::vector<int64_t> first = {5, 6}, last = {7, 8}, dropped = {9, 3};
    data::Batch a, b;
    a.indices = first;
    b.indices = last;
    b.dropped = dropped;  // the epoch's last batch: the sampler's tail share, then the partial batch
    log.onBatch(a);
    log.commitStep(0, 1);
    log.onBatch(b);
    log.commitStep(0, 2);
    log.onBatch(a);
    log.commitStep(1, 3);
  }
  ::unsetenv("DTRAIN_SAMPLE_LOG");
  std::ifstream in(dir + "/samples-a1-r0.jsonl");
  std::string line;
  std::vector<nlohmann::json> lines;
  while (std::getline(in, line)) lines.push_back(nlohmann::json::parse(line));
  std::filesystem::remove_all(dir);
  REQUIRE(lines.size() == 3);
  CHECK(!lines[0].contains("drop"));
  CHECK(lines[1]["idx"] == nlohmann::json::array({7, 8}));
  CHECK(lines[1]["drop"] == nlohmann::json::array({9, 3}));
  CHECK(!lines[1].contains("pad"));
  CHECK(!lines[2].contains("drop"));
}
