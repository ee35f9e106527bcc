// Whether a folder a run will write to can be used, checked before anything starts (the callers turn a problem
// into their own error: a job field is a ConfigError, a flag a UsageError).
#pragma once

#include <filesystem>
#include <optional>
#include <string>

namespace dtrain {

// Why `dir` cannot be used as a folder this process writes to (nullopt: it can).
struct DirProblem {
  std::filesystem::path at;  // the nearest existing path at or above `dir` (absolute when `dir` could be made so)
  bool notDirectory = false; // `at` exists and is not a directory; otherwise it is one this process cannot write
  std::string error;         // strerror of access(2) when the folder is not writable
};

// `dir` must be a directory with write and search permission, or not exist yet with its nearest existing ancestor
// such a directory (it is created later). Besides stat and access(2) (which grant root everything), a probe
// folder `.dtrain-write-check-XXXXXX` (mkdtemp(3): a random name, made atomically, another tried while one exists, so
// processes of several nodes on a shared folder never collide) is made in that directory and removed at once, so
// /proc, /sys and read-only mounts are caught also for root; nothing is left behind. Never throws for a missing path; thread-safe (reads
// errno of this thread only).
std::optional<DirProblem> findDirProblem(const std::filesystem::path& dir);

}  // namespace dtrain
