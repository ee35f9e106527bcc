// `dtrain check JOB.json`: validate a job (every section, files, dataset contents against the model) and print
// the model summary; with --world N also the rank layout: parameter-server placement, or the data x pipeline x
// tensor grid (each rank's coordinates, layers and parameter count). Exit 0, or the precise error and exit 2.
#include <fmt/format.h>

#include "apps/dtrain/commands.h"
#include "apps/dtrain/job_hooks.h"
#include "lib/common/error.h"
#include "lib/launch/launch_options.h"
#include "lib/train/check.h"
#include "lib/train/ps_strategy.h"
#include "lib/train/layout.h"

namespace dtrain::app {

namespace {

// Everything `dtrain check` checks and prints once the job loaded.
int checkLoaded(const train::Job& job, int world) {
  for (const auto& w : job.parallel.warnings) fmt::print(stderr, "warning: {}\n", w);
  // A GPU job is often checked on a machine without one (a login node): say what `dtrain run` here would do
  // instead of a silent OK, without refusing a job that is fine for the machine it is meant for.
  if (job.device.isCuda()) {
    try {
      train::checkGpusForWorkers(job, 1, launch::visibleGpuCount());
    } catch (const ConfigError& e) {
      fmt::print(stderr, "warning: not on this machine: {} (dtrain run here would refuse it, exit 2)\n", e.what());
    }
  }
  // The layout is worked out before anything is printed: a world the layout rejects must not print "OK".
  std::string layout;
  if (world > 0 && job.parallel.strategy == "parameter_server") layout = train::describePsPlacement(job, world);
  else if (world > 0) layout = train::describeLayout(job, world);
  fmt::print("{}{}", train::checkJob(job), layout);
  return 0;
}

}  // namespace

void addCheckCommand(CLI::App& root, Action& action) {
  auto args = std::make_shared<train::JobArgs>();
  auto* sub = root.add_subcommand("check", "Validate a job file and print the model summary");
  addJobOptions(*sub, *args);
  sub->footer(exitCodesHelp({{"0", "the job is valid (its summary is printed)"},
                             {"1", ""},
                             {"2", ""},
                             {"3", ""},
                             {"8", "the checkpoint it would resume from, or its init weights, cannot be used"}}));
  auto world = std::make_shared<int>(0);
  sub->add_option("--world", *world, "Also print the rank layout for a world of N ranks (data x pipeline x tensor, or "
                                     "which ranks serve parameters)")
      ->check(CLI::Range(1, 1 << 20));
  sub->callback([&action, args, world] {
    action = [args, world] {
      const train::Job job = train::loadJob(*args);
      try {
        return checkLoaded(job, *world);
      } catch (const ConfigError& e) {
        throw train::withSetsNamed(e, job.sourceFile, job.sets);  // a --set behind a layout or memory error
      }
    };
  });
}

}  // namespace dtrain::app
