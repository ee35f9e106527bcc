// Helpers for the Slurm test tier: talk to a running Slurm cluster (scripts/slurm/local-cluster, or any cluster
// SLURM_CONF points at) through its own commands, and watch what jobs leave behind. Not thread-safe; every call
// blocks for at most the timeout it is given.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace dtrain::testing::slurm {

using namespace std::chrono_literals;

// The line that makes ctest report a tier test as skipped (SKIP_REGULAR_EXPRESSION in CMakeLists.txt).
constexpr const char* kSkipMarker = "DTRAIN-SLURM-SKIP";

// Empty when a cluster with at least 2 idle nodes answers; else why not (printed with kSkipMarker).
std::string unavailableReason();

// The repository's scripts/slurm/<name>.
std::string script(const std::string& name);
// tests/slurm/worker.sh: the stand-in worker (see the script).
std::string workerScript();

// `sbatch --parsable [sbatchArgs] SCRIPT [scriptArgs]` with `env` added; returns the job id (throws on failure).
std::string submit(const std::vector<std::string>& sbatchArgs, const std::string& scriptPath,
                   const std::vector<std::string>& scriptArgs, const std::map<std::string, std::string>& env);

// `scontrol show job -o ID` as a map (JobState, Restarts, ExitCode, ...); empty when Slurm forgot the job.
std::map<std::string, std::string> jobInfo(const std::string& jobId);

// Waits until the job's state satisfies `done` (e.g. is final); returns the last info. Slurm has no event a
// client can wait on (sbatch --wait itself polls with a backoff of up to 30 s), so this asks every 200 ms.
std::map<std::string, std::string> waitForJob(const std::string& jobId,
                                              const std::function<bool(const std::map<std::string, std::string>&)>& done,
                                              std::chrono::milliseconds timeout);
bool isFinal(const std::map<std::string, std::string>& info);

// Waits (inotify on `dir`, no polling) until `ready()` is true; false after the timeout.
bool waitInDir(const std::string& dir, const std::function<bool()>& ready, std::chrono::milliseconds timeout);

// Lines of a file (empty when it does not exist).
std::vector<std::string> lines(const std::string& path);
size_t countLines(const std::string& path, const std::string& needle);

// Live processes whose environment has SLURM_JOB_ID=<jobId>: the batch shell, srun, agents, workers.
std::vector<pid_t> processesOfJob(const std::string& jobId);
// Command lines of those processes, for failure messages.
std::string describeProcesses(const std::vector<pid_t>& pids);

}  // namespace dtrain::testing::slurm
