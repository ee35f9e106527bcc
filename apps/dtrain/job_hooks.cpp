#include "apps/dtrain/job_hooks.h"

#include <unistd.h>

#include <algorithm>
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
    // `dtrain run job.json -n 2`: launcher options after the job file are the usual slip.
    DTRAIN_THROW(UsageError,
                 "job options after {}: {}; only --set PATH=VALUE and --output-dir DIR may follow the job file, "
                 "launcher options go before it (dtrain run [options] JOB.json [--set ...] [--output-dir DIR])",
                 args.empty() ? "" : args.front(), parseErrorText(e));
  }
  return train::loadJob(jobArgs);
}

std::string parseErrorText(const CLI::ParseError& e) {
  std::string text = e.what();
  if (dynamic_cast<const CLI::ExtrasError*>(&e) == nullptr) return text;
  const auto colon = text.find(": ");
  if (colon == std::string::npos) return text;
  std::vector<std::string> words;
  std::string rest = text.substr(colon + 2);
  for (size_t start = 0; start <= rest.size();) {
    const size_t space = std::min(rest.find(' ', start), rest.size());
    words.push_back(rest.substr(start, space - start));
    start = space + 1;
  }
  std::string out = text.substr(0, colon + 2);
  for (size_t i = words.size(); i-- > 0;) out += words[i] + (i > 0 ? " " : "");
  return out;
}

std::string selfExe() {
  char buf[PATH_MAX];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  DTRAIN_CHECK(n > 0, "cannot resolve /proc/self/exe");
  return std::string(buf, static_cast<size_t>(n));
}

}  // namespace dtrain::app
