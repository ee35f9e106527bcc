// Glue between `dtrain run JOB.json` and the trainer: validate the job (and its --set overrides) in the agent,
// before any worker starts, so a bad config costs no restart and no rendezvous.
#pragma once

#include <string>
#include <vector>

namespace dtrain::app {

// args: JOB.json followed by the `dtrain train` options given after it. Throws ConfigError/UsageError.
void validateJobForLaunch(const std::vector<std::string>& args);

}  // namespace dtrain::app
