// The worker runtime behind `dtrain train`: builds the model and data from a Job, joins the collective group
// (under `dtrain run`, through DTRAIN_STORE), and runs the data-parallel training loop.
//
// One process is one rank. World size 1 runs the same code with no communication. Rank 0 prints progress,
// writes metrics.jsonl and model.safetensors into the job's output folder.
#pragma once

#include <optional>
#include <string>

#include "lib/train/job.h"

namespace dtrain::train {

// The launcher's environment contract as the worker sees it (defaults: a one-process job).
struct WorkerInfo {
  int rank = 0;
  int worldSize = 1;
  int localRank = 0;
  int localWorldSize = 1;
  int nodeRank = 0;
  std::string store;  // DTRAIN_STORE host:port; empty when alone
  std::string runId;  // DTRAIN_RUN_ID
  int round = 0;      // DTRAIN_ROUND
  int restartCount = 0;
  static WorkerInfo fromEnv();  // throws UsageError on malformed values
};

struct TrainResult {
  int64_t steps = 0;
  int64_t samples = 0;  // all ranks
  double wallSec = 0;
  double trainSec = 0;  // time in the training loop (evaluation excluded)
  double peakRssMb = 0; // largest peak resident set size over the ranks
  double samplesPerSec = 0;  // training samples per second over the group
  std::optional<double> evalLoss;
  std::optional<double> evalAccuracy;
  int stoppedBySignal = 0;  // SIGTERM/SIGINT/SIGUSR1 stopped the run early (after a checkpoint)
};

TrainResult runTraining(const Job& job, const WorkerInfo& worker);

}  // namespace dtrain::train
