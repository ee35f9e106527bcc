// `dtrain train JOB.json`: one worker of the built-in trainer (alone, or one rank under `dtrain run`).
#include "apps/dtrain/commands.h"
#include "apps/dtrain/job_hooks.h"
#include "lib/common/error.h"
#include "lib/train/trainer.h"

namespace dtrain::app {

void addTrainCommand(CLI::App& root, Action& action) {
  auto args = std::make_shared<train::JobArgs>();
  auto* sub = root.add_subcommand("train", "Train a model from a job file (one process, or one rank under dtrain run)");
  addJobOptions(*sub, *args);
  sub->callback([&action, args] {
    action = [args] {
      auto job = train::loadJob(*args);
      try {
        auto result = train::runTraining(job, train::WorkerInfo::fromEnv());
        return result.stoppedBySignal ? 128 + result.stoppedBySignal : 0;
      } catch (const ConfigError& e) {
        throw train::withSetsNamed(e, job.sourceFile, job.sets);  // a --set behind the world's or data's check
      }
    };
  });
}

}  // namespace dtrain::app
