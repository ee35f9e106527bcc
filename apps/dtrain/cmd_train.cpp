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
  sub->footer(exitCodesHelp({{"0", "the training completed"},
                             {"1", ""},
                             {"2", ""},
                             {"3", "invalid command line, or a malformed worker environment variable (RANK, ...)"},
                             {"4", "the rendezvous store (DTRAIN_STORE) is unreachable or refuses the token"},
                             {"5", "cannot listen for the collectives' connections"},
                             {"6", ""},
                             {"7", ""},
                             {"8", ""},
                             {"9", ""},
                             {"128+N", "stopped by signal N (after writing a checkpoint)"}}));
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
