#include "lib/common/error.h"

#include <cstring>

namespace dtrain {

SystemError::SystemError(const std::string& message, int err, ExitCode code)
    : Error(message, code), err_(err) {}

namespace detail {
void throwSystem(const char* file, int line, const char* expr, int err) {
  SystemError e(fmt::format("{} failed: {}", expr, std::strerror(err)), err);
  e.setWhere(fmt::format("{}:{}", file, line));
  throw e;
}
}  // namespace detail

}  // namespace dtrain
