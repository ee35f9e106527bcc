#include "apps/dtrain/job_hooks.h"

#include <filesystem>

#include "lib/common/error.h"

namespace dtrain::app {

void validateJobForLaunch(const std::vector<std::string>& args) {
  DTRAIN_CHECK_AS(ConfigError, !args.empty() && std::filesystem::exists(args.front()), "job file {} does not exist",
                  args.empty() ? std::string("?") : args.front());
}

}  // namespace dtrain::app
