// findDirProblem: whether a folder a run writes to can be used, probed by making a folder there.
#include <doctest/doctest.h>
#include <fmt/format.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "lib/common/dir_check.h"

namespace fs = std::filesystem;

namespace {

// "" when the folder can be used, else what findDirProblem says.
std::string findDirProblemOrNull(const fs::path& dir) {
  const auto p = dtrain::findDirProblem(dir);
  return p ? fmt::format("{}: {}", p->at.string(), p->error) : "";
}

}  // namespace

TEST_CASE("findDirProblem's probe never collides with another process's probe or a leftover one") {
  // The agents of several nodes check the same shared output folder at once, and containers often give each of them
  // the same pid; a probe killed between making and removing its folder leaves it behind. The probe was named
  // .dtrain-write-check-PID-N: such a folder made the check fail with "cannot create a folder there: File exists"
  // (for every later run with that pid). Here: this pid's names, as another node's agent or a leftover holds them.
  const fs::path dir = fs::temp_directory_path() / fmt::format("dtrain-dir-check-{}", ::getpid());
  fs::remove_all(dir);
  fs::create_directories(dir);
  for (int n = 0; n < 256; ++n) fs::create_directory(dir / fmt::format(".dtrain-write-check-{}-{}", ::getpid(), n));
  for (int i = 0; i < 4; ++i) {
    const auto problem = findDirProblemOrNull(dir);
    CHECK_MESSAGE(problem.empty(), problem);
  }
  // Nothing of its own is left: only the 256 folders made above.
  CHECK(std::distance(fs::directory_iterator(dir), fs::directory_iterator()) == 256);
  // A file is not a folder; /proc cannot take one (root's access(2) says it can).
  { std::ofstream(dir / "f") << "x"; }
  const auto file = dtrain::findDirProblem(dir / "f" / "sub");
  REQUIRE(file.has_value());
  CHECK(file->notDirectory);
  CHECK(file->at == dir / "f");
  const auto proc = dtrain::findDirProblem("/proc/x");
  REQUIRE(proc.has_value());
  CHECK(proc->error.find("cannot create a folder there") != std::string::npos);
  fs::remove_all(dir);
}
