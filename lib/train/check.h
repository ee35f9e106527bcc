// Validation of a job against its data, shared by `dtrain check` and the trainer.
#pragma once

#include <string>

#include "lib/data/dataset.h"
#include "lib/nn/loss.h"
#include "lib/train/job.h"

namespace dtrain::train {

// The data must fit the model (feature count) and the loss (label kind and shape): ConfigError naming the
// job file, the data section (`which`, e.g. "/data/train") and both shapes otherwise.
void checkDataFitsModel(const Job& job, const data::Dataset& ds, const nn::Loss& loss, const std::string& which);

// Loads the datasets, builds the model and loss, checks that they fit, and returns the report `dtrain check`
// prints: the model summary table, the data, and the run's shape (steps per epoch at the job's batch size).
std::string checkJob(const Job& job);

}  // namespace dtrain::train
