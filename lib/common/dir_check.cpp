#include "lib/common/dir_check.h"

#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace dtrain {

std::optional<DirProblem> findDirProblem(const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path at = fs::absolute(dir, ec);
  if (ec) at = dir;
  while (!at.empty()) {
    const auto status = fs::status(at, ec);
    if (fs::exists(status)) {
      if (!fs::is_directory(status)) return DirProblem{at, true, {}};
      if (::access(at.c_str(), W_OK | X_OK) != 0) return DirProblem{at, false, std::strerror(errno)};
      return std::nullopt;
    }
    if (at == at.parent_path()) return std::nullopt;
    at = at.parent_path();
  }
  return std::nullopt;
}

}  // namespace dtrain
