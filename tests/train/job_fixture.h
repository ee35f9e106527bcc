// Shared by the job-file tests (test_job.cpp, test_job_memory.cpp): a small valid job, writing a job file, and the
// ConfigError message of loading one ("" when it loads).
#pragma once

#include <string>

#include "lib/common/error.h"
#include "lib/train/job.h"
#include "tests/support/process.h"

namespace dtrain::train::test_job {

inline const char* kJob = R"({
  "model": {"input": [4], "layers": [{"type": "linear", "out": 8}, {"type": "relu"}, {"type": "linear", "out": 3}]},
  "loss": {"type": "cross_entropy"},
  "data": {"train": {"format": "synthetic", "task": "classification", "samples": 64, "features": 4, "num_classes": 3},
           "batch_size": 8},
  "optimizer": {"type": "sgd", "lr": 0.1},
  "train": {"epochs": 2, "seed": 3}
})";

inline std::string writeJob(const std::string& dir, const std::string& text, const std::string& name = "job.json") {
  std::string path = dir + "/" + name;
  testing::writeFile(path, text);
  return path;
}

inline std::string configErrorOf(const JobArgs& args) {
  try {
    loadJob(args);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

}  // namespace dtrain::train::test_job
