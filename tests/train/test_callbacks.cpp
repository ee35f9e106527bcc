// Trainer callbacks: a one-process run in this process, observed through a recording callback.
#include <doctest/doctest.h>

#include <fstream>

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
