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

#include "lib/common/worker_contract.h"
#include "lib/train/callbacks.h"
#include "lib/train/job.h"

namespace dtrain::train {

// The launcher's environment contract as the worker sees it: lib/common/worker_contract.h (defaults: a
// one-process job; WorkerInfo::fromEnv() throws UsageError on malformed values).
using WorkerInfo = WorkerContract;

// Trains the job as this worker. `callbacks` are called after the built-in ones (progress, test aids) at every
// event of lib/train/callbacks.h. Throws ConfigError/UsageError/CommError/CheckpointError (exit codes in error.h);
// UsageError when worker.worldSize > 1 and no store is given (DTRAIN_STORE).
TrainResult runTraining(const Job& job, const WorkerInfo& worker, std::vector<TrainerCallbackPtr> callbacks = {});

}  // namespace dtrain::train
