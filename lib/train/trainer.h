// The worker runtime behind `dtrain train`: builds the model and data from a Job, joins the collective group
// (under `dtrain run`, through DTRAIN_STORE), and runs the training loop; how ranks cooperate is the Strategy's
// business (lib/train/strategy.h), what happens around the loop the callbacks' (lib/train/callbacks.h).
//
// One process is one rank. World size 1 runs the same code with no communication. Rank 0 prints progress,
// writes metrics.jsonl and model.safetensors into the job's output folder.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "lib/train/callbacks.h"
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

// Trains the job as this worker. `callbacks` are called after the built-in ones (progress, test aids) at every
// event of lib/train/callbacks.h. Throws ConfigError/UsageError/CommError/CheckpointError (exit codes in error.h).
TrainResult runTraining(const Job& job, const WorkerInfo& worker, std::vector<TrainerCallbackPtr> callbacks = {});

}  // namespace dtrain::train
