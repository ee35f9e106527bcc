#include "lib/common/dir_check.h"

#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
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
      // access(2) grants root everything, also where nothing can be made (/proc, /sys, a read-only bind mount
      // that reports the permission bits): try to make a folder there, and remove it at once.
      // mkdtemp picks a random name and makes it atomically, trying others while a name exists: a name made of the
      // pid alone collided across the nodes of a shared output folder (containers often give every node's agent the
      // same pid), and a probe left by a killed process made every later run with that pid fail ("File exists").
      std::string probe = (at / ".dtrain-write-check-XXXXXX").string();
      if (::mkdtemp(probe.data()) == nullptr)
        return DirProblem{at, false, fmt::format("cannot create a folder there: {}", std::strerror(errno))};
      ::rmdir(probe.c_str());
      return std::nullopt;
    }
    if (at == at.parent_path()) return std::nullopt;
    at = at.parent_path();
  }
  return std::nullopt;
}

}  // namespace dtrain
