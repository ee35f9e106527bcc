// `dtrain check JOB.json`: validate a job (every section, files, dataset contents against the model) and print
// the model summary. Exit 0, or the precise error and exit 2.
#include <fmt/format.h>

#include "apps/dtrain/commands.h"
#include "apps/dtrain/job_hooks.h"
#include "lib/train/check.h"

namespace dtrain::app {

void addCheckCommand(CLI::App& root, Action& action) {
  auto args = std::make_shared<train::JobArgs>();
  auto* sub = root.add_subcommand("check", "Validate a job file and print the model summary");
  addJobOptions(*sub, *args);
  sub->callback([&action, args] {
    action = [args] {
      fmt::print("{}", train::checkJob(train::loadJob(*args)));
      return 0;
    };
  });
}

}  // namespace dtrain::app
