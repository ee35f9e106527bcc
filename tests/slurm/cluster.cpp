#include "tests/slurm/cluster.h"

#include <dirent.h>
#include <poll.h>
#include <sys/inotify.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <cstdlib>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "tests/support/process.h"

namespace dtrain::testing::slurm {

std::string unavailableReason() {
  if (std::getenv("SLURM_CONF") == nullptr)
    return "no Slurm cluster: SLURM_CONF is not set (scripts/slurm/test-tier starts a local cluster and sets it)";
  auto r = run({"sinfo", "-h", "-N", "-o", "%T"}, RunOptions{.timeout = 20s});
  if (r.exitCode != 0) return fmt::format("sinfo failed (exit {}): {}", r.exitCode, r.err);
  int idle = 0;
  std::istringstream in(r.out);
  for (std::string line; std::getline(in, line);)
    if (line == "idle") ++idle;
  if (idle < 2) return fmt::format("the Slurm cluster has {} idle nodes, the tier needs 2:\n{}", idle, r.out);
  return {};
}

std::string script(const std::string& name) { return sourceDir() + "/scripts/slurm/" + name; }
std::string workerScript() { return sourceDir() + "/tests/slurm/worker.sh"; }

std::string submit(const std::vector<std::string>& sbatchArgs, const std::string& scriptPath,
                   const std::vector<std::string>& scriptArgs, const std::map<std::string, std::string>& env) {
  std::vector<std::string> argv{"sbatch", "--parsable"};
  argv.insert(argv.end(), sbatchArgs.begin(), sbatchArgs.end());
  argv.push_back(scriptPath);
  argv.insert(argv.end(), scriptArgs.begin(), scriptArgs.end());
  auto r = run(argv, RunOptions{.timeout = 30s, .env = env});
  if (r.exitCode != 0) throw std::runtime_error(fmt::format("sbatch failed (exit {}): {}", r.exitCode, r.err));
  std::string id = r.out.substr(0, r.out.find_first_of(";\n"));
  if (id.empty()) throw std::runtime_error("sbatch printed no job id: " + r.out);
  return id;
}

std::map<std::string, std::string> jobInfo(const std::string& jobId) {
  std::map<std::string, std::string> info;
  auto r = run({"scontrol", "show", "job", "-o", jobId}, RunOptions{.timeout = 20s});
  if (r.exitCode != 0) return info;
  std::istringstream in(r.out);
  for (std::string word; in >> word;) {
    auto eq = word.find('=');
    if (eq != std::string::npos) info[word.substr(0, eq)] = word.substr(eq + 1);
  }
  return info;
}

bool isFinal(const std::map<std::string, std::string>& info) {
  static const std::vector<std::string> kFinal{"COMPLETED", "FAILED",      "CANCELLED", "TIMEOUT",
                                               "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"};
  auto it = info.find("JobState");
  return it != info.end() && std::find(kFinal.begin(), kFinal.end(), it->second) != kFinal.end();
}

std::map<std::string, std::string> waitForJob(const std::string& jobId,
                                              const std::function<bool(const std::map<std::string, std::string>&)>& done,
                                              std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    auto info = jobInfo(jobId);
    if (done(info) || std::chrono::steady_clock::now() >= deadline) return info;
    std::this_thread::sleep_for(200ms);  // no event to wait on: see the header
  }
}

bool waitInDir(const std::string& dir, const std::function<bool()>& ready, std::chrono::milliseconds timeout) {
  int fd = ::inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
  if (fd < 0) throw std::runtime_error("inotify_init1 failed");
  if (::inotify_add_watch(fd, dir.c_str(), IN_CREATE | IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO) < 0) {
    ::close(fd);
    throw std::runtime_error("inotify_add_watch failed on " + dir);
  }
  auto deadline = std::chrono::steady_clock::now() + timeout;
  bool ok = false;
  for (;;) {
    if (ready()) {  // checked after the watch exists, so no change can slip between check and wait
      ok = true;
      break;
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) break;
    pollfd p{fd, POLLIN, 0};
    ::poll(&p, 1, static_cast<int>(left.count()));
    char buf[4096];
    while (::read(fd, buf, sizeof(buf)) > 0) {
    }
  }
  ::close(fd);
  return ok;
}

std::vector<std::string> lines(const std::string& path) {
  std::vector<std::string> out;
  std::istringstream in(readFile(path));
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

size_t countLines(const std::string& path, const std::string& needle) {
  auto all = lines(path);
  return static_cast<size_t>(
      std::count_if(all.begin(), all.end(), [&](const std::string& l) { return l.find(needle) != std::string::npos; }));
}

std::vector<pid_t> processesOfJob(const std::string& jobId) { return processesWithEnv("SLURM_JOB_ID", jobId); }

std::string describeProcesses(const std::vector<pid_t>& pids) {
  std::string out;
  for (pid_t p : pids) {
    std::string cmd = readFile(fmt::format("/proc/{}/cmdline", p));
    std::replace(cmd.begin(), cmd.end(), '\0', ' ');
    out += fmt::format("  pid {}: {}\n", p, cmd);
  }
  return out;
}

}  // namespace dtrain::testing::slurm
