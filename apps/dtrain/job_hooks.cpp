#include "apps/dtrain/job_hooks.h"

#include <unistd.h>

#include <climits>

#include "lib/common/error.h"

namespace dtrain::app {

void addJobOptions(CLI::App& app, train::JobArgs& args) {
  app.add_option("job", args.path, "Job file (JSON)")->required();
  app.add_option("--set", args.sets, "Override a job field: --set train.epochs=1 --set optimizer.lr=0.1 (repeatable)")
      ->take_all()
      ->allow_extra_args(false);
  app.add_option("--output-dir", args.outputDir, "Where the run writes metrics, weights and checkpoints "
                                                 "(default: runs/<job name>)");
}

train::Job validateJobForLaunch(const std::vector<std::string>& args) {
  CLI::App app{"dtrain train", "dtrain train"};
  train::JobArgs jobArgs;
  addJobOptions(app, jobArgs);
  std::vector<std::string> reversed(args.rbegin(), args.rend());
  try {
    app.parse(reversed);
  } catch (const CLI::ParseError& e) {
    DTRAIN_THROW(UsageError, "job options after {}: {}", args.empty() ? "" : args.front(), e.what());
  }
  return train::loadJob(jobArgs);
}

std::string selfExe() {
  char buf[PATH_MAX];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  DTRAIN_CHECK(n > 0, "cannot resolve /proc/self/exe");
  return std::string(buf, static_cast<size_t>(n));
}

}  // namespace dtrain::app
