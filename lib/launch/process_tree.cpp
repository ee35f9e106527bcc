#include "lib/launch/process_tree.h"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>
#include <random>

#include "lib/common/error.h"
#include "lib/common/log.h"

namespace dtrain::launch {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

namespace {

constexpr int kWatchdogFd = 3;
constexpr auto kRescan = milliseconds(100);   // how often a sweep looks for processes forked meanwhile
constexpr auto kKillWait = milliseconds(2000);  // how long SIGKILLed processes may take to be gone
constexpr int kKillRounds = 5;

int pidfdOpen(pid_t pid) { return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)); }
int pidfdSignal(int fd, int sig) { return static_cast<int>(::syscall(SYS_pidfd_send_signal, fd, sig, nullptr, 0)); }

bool readWhole(const std::string& path, std::string& out) {
  out.clear();
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  char buf[8192];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return true;
}

struct ProcInfo {
  pid_t ppid = 0;
  char state = '?';
  unsigned long long startTime = 0;  // field 22 of /proc/PID/stat: with the pid, names one process
};

bool readStat(pid_t pid, ProcInfo& info) {
  std::string stat;
  if (!readWhole(fmt::format("/proc/{}/stat", pid), stat)) return false;
  size_t close = stat.rfind(')');  // the command name may hold spaces and parentheses
  if (close == std::string::npos) return false;
  // After ") ": state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt cmajflt utime stime cutime
  // cstime priority nice num_threads itrealvalue starttime.
  int ppid = 0;
  unsigned long long start = 0;
  char state = '?';
  if (std::sscanf(stat.c_str() + close + 1,
                  " %c %d %*d %*d %*d %*d %*u %*u %*u %*u %*u %*u %*u %*d %*d %*d %*d %*d %*d %llu", &state, &ppid,
                  &start) != 3)
    return false;
  info = {static_cast<pid_t>(ppid), state, start};
  return true;
}

bool hasEnvEntry(pid_t pid, const std::string& entry) {
  std::string env;
  if (entry.empty() || !readWhole(fmt::format("/proc/{}/environ", pid), env)) return false;
  size_t pos = 0;
  while (pos < env.size()) {
    size_t next = env.find('\0', pos);
    if (next == std::string::npos) next = env.size();
    if (env.compare(pos, next - pos, entry) == 0) return true;
    pos = next + 1;
  }
  return false;
}

struct Candidate {
  pid_t pid;
  unsigned long long startTime;
};

// One pass over /proc: live processes to stop. Reaps zombies that are this process's children (orphans
// re-parented to the subreaper), except `spare`.
std::vector<Candidate> scan(const std::string& marker, pid_t descendantsOf, pid_t spare) {
  const pid_t self = ::getpid();
  std::map<pid_t, ProcInfo> procs;
  if (DIR* d = ::opendir("/proc")) {
    while (dirent* e = ::readdir(d)) {
      char* end = nullptr;
      long pid = std::strtol(e->d_name, &end, 10);
      if (*end != '\0' || pid <= 0) continue;
      ProcInfo info;
      if (readStat(static_cast<pid_t>(pid), info)) procs[static_cast<pid_t>(pid)] = info;
    }
    ::closedir(d);
  }
  // Is `pid` below `root` in the parent chain? (Chains are short; a cycle cannot occur, the bound is a guard.)
  auto below = [&](pid_t pid, pid_t root) {
    for (int hops = 0; hops < 4096; ++hops) {
      auto it = procs.find(pid);
      if (it == procs.end() || it->second.ppid <= 0) return false;
      if (it->second.ppid == root) return true;
      pid = it->second.ppid;
    }
    return false;
  };
  std::vector<Candidate> out;
  for (const auto& [pid, info] : procs) {
    if (pid == self || pid == spare || (spare > 0 && below(pid, spare))) continue;
    if (info.state == 'Z' || info.state == 'X') {
      if (info.ppid == self) ::waitpid(pid, nullptr, WNOHANG);
      continue;
    }
    if ((descendantsOf > 0 && below(pid, descendantsOf)) || hasEnvEntry(pid, marker))
      out.push_back({pid, info.startTime});
  }
  return out;
}

}  // namespace

size_t stopMarkedProcesses(const std::string& marker, pid_t descendantsOf, pid_t spare, milliseconds grace) {
  struct Tracked {
    int fd;
    bool gone;
  };
  std::map<pid_t, Tracked> tracked;
  size_t signalled = 0;
  const pid_t self = ::getpid();
  // Signals what a fresh scan finds that is not tracked yet; true when it found something new.
  auto sweep = [&](int sig) {
    bool found = false;
    for (const auto& c : scan(marker, descendantsOf, spare)) {
      auto it = tracked.find(c.pid);
      if (it != tracked.end() && !it->second.gone) continue;
      int fd = pidfdOpen(c.pid);
      if (fd < 0) continue;  // gone already
      ProcInfo now;
      if (!readStat(c.pid, now) || now.startTime != c.startTime) {  // the pid was recycled meanwhile
        ::close(fd);
        continue;
      }
      if (it != tracked.end()) ::close(it->second.fd);
      tracked[c.pid] = {fd, false};
      if (pidfdSignal(fd, sig) == 0) ++signalled;
      found = true;
    }
    return found;
  };
  // Waits until every tracked process is gone or `until`; true when all are gone.
  auto waitGone = [&](Clock::time_point until) {
    for (;;) {
      std::vector<pollfd> fds;
      std::vector<pid_t> pids;
      for (auto& [pid, t] : tracked)
        if (!t.gone) fds.push_back({t.fd, POLLIN, 0}), pids.push_back(pid);
      if (fds.empty()) return true;
      auto left = std::chrono::duration_cast<milliseconds>(until - Clock::now());
      if (left.count() <= 0) return false;
      int n = ::poll(fds.data(), fds.size(), static_cast<int>(std::min(left, kRescan).count()));
      if (n < 0 && errno != EINTR) return false;
      for (size_t i = 0; i < fds.size(); ++i) {
        if (fds[i].revents == 0) continue;
        tracked[pids[i]].gone = true;
        ProcInfo info;
        if (readStat(pids[i], info) && info.ppid == self) ::waitpid(pids[i], nullptr, WNOHANG);
      }
      if (n == 0) return false;  // a rescan is due
    }
  };

  const auto deadline = Clock::now() + grace;
  sweep(SIGTERM);
  for (;;) {
    bool allGone = waitGone(deadline);
    bool fresh = sweep(SIGTERM);  // what was forked meanwhile
    if ((allGone && !fresh) || Clock::now() >= deadline) break;
  }
  for (int round = 0; round < kKillRounds; ++round) {
    bool live = false;
    for (auto& [pid, t] : tracked)
      if (!t.gone) {
        pidfdSignal(t.fd, SIGKILL);
        live = true;
      }
    bool fresh = sweep(SIGKILL);
    if (!live && !fresh) break;
    waitGone(Clock::now() + kKillWait);
  }
  for (auto& [pid, t] : tracked) ::close(t.fd);
  return signalled;
}

ProcessTree::ProcessTree(milliseconds grace, const std::string& exe) : grace_(grace) {
  std::random_device rd;
  marker_ = fmt::format("{}={:08x}{:08x}{:08x}", kAgentTokenVar, rd(), rd(), static_cast<unsigned>(::getpid()));
  if (::prctl(PR_SET_CHILD_SUBREAPER, 1) != 0)
    log::warn("cannot become a child subreaper ({}): orphaned worker descendants go to init", std::strerror(errno));
  if (exe.empty()) return;

  std::vector<std::string> args = {exe, kWatchdogCommand, std::to_string(kWatchdogFd), marker_,
                                   std::to_string(grace.count())};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  char* envp[] = {nullptr};  // the watchdog must not carry the marker (nor anything else of ours)
  int devNull = ::open("/dev/null", O_RDWR | O_CLOEXEC);
  int fds[2];
  if (devNull < 0 || ::pipe2(fds, O_CLOEXEC) != 0) {
    log::warn("cannot start the process watchdog: {}", std::strerror(errno));
    if (devNull >= 0) ::close(devNull);
    return;
  }
  pid_t pid = ::fork();
  if (pid == 0) {
    // Async-signal-safe calls only. Its own process group: the terminal's ^C and the workers' killpg miss it.
    ::setpgid(0, 0);
    ::dup2(devNull, STDIN_FILENO);
    ::dup2(devNull, STDOUT_FILENO);
    if (fds[0] == kWatchdogFd) ::fcntl(kWatchdogFd, F_SETFD, 0);
    else ::dup2(fds[0], kWatchdogFd);
    ::close_range(kWatchdogFd + 1, ~0U, 0);
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    ::execve(exe.c_str(), argv.data(), envp);
    ::_exit(127);
  }
  int err = errno;
  ::close(devNull);
  ::close(fds[0]);
  if (pid < 0) {
    ::close(fds[1]);
    log::warn("cannot start the process watchdog: fork: {}", std::strerror(err));
    return;
  }
  watchdog_ = pid;
  pipeWrite_ = fds[1];
  log::debug("process watchdog pid {} ({})", watchdog_, marker_);
}

ProcessTree::~ProcessTree() {
  try {
    stopLeftovers(grace_);
  } catch (...) {  // a destructor must not throw; the watchdog still sweeps
  }
  if (pipeWrite_ >= 0) ::close(pipeWrite_);
  if (watchdog_ > 0) {
    // It sweeps once more (nothing is left) and exits; waiting for it means nothing of ours outlives us.
    while (::waitpid(watchdog_, nullptr, 0) < 0 && errno == EINTR) {
    }
  }
}

void ProcessTree::mark(std::vector<std::string>& env) const {
  const std::string prefix = std::string(kAgentTokenVar) + "=";
  std::erase_if(env, [&](const std::string& e) { return e.compare(0, prefix.size(), prefix) == 0; });
  env.push_back(marker_);
}

size_t ProcessTree::stopLeftovers(milliseconds grace) {
  size_t n = stopMarkedProcesses(marker_, ::getpid(), watchdog_, grace);
  if (n > 0) log::warn("stopped {} process(es) left behind by the workers", n);
  return n;
}

int watchdogMain(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "dtrain %s: internal command, started by dtrain run\n", kWatchdogCommand);
    return static_cast<int>(ExitCode::kUsage);
  }
  // Only the end of the agent (EOF on the pipe) ends the watchdog: the signals that stop an agent must not
  // take its watchdog first.
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGPIPE}) ::signal(sig, SIG_IGN);
  int fd = std::atoi(argv[2]);
  std::string marker = argv[3];
  milliseconds grace(std::atoll(argv[4]));
  pid_t agent = ::getppid();
  char byte;
  for (;;) {
    ssize_t n = ::read(fd, &byte, 1);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
  }
  size_t n = stopMarkedProcesses(marker, 0, 0, grace);
  if (n > 0)
    std::fprintf(stderr, "dtrain: the agent (pid %d) ended; stopped %zu process(es) its workers left behind\n",
                 static_cast<int>(agent), n);
  return 0;
}

}  // namespace dtrain::launch
