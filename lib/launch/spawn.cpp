#include "lib/launch/spawn.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "lib/common/error.h"

namespace dtrain::launch {

pid_t spawnProcess(const SpawnSpec& spec) {
  // Everything the child touches is prepared before fork: between fork and exec only async-signal-safe calls.
  std::vector<char*> argv, envp;
  for (const auto& a : spec.argv) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  for (const auto& e : spec.env) envp.push_back(const_cast<char*>(e.c_str()));
  envp.push_back(nullptr);
  int devNull = DTRAIN_SYSCALL(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  int errPipe[2];
  if (::pipe2(errPipe, O_CLOEXEC) != 0) {
    int err = errno;
    ::close(devNull);
    throw SystemError("pipe2 for worker start", err);
  }
  pid_t parent = ::getpid();
  pid_t pid = ::fork();
  if (pid < 0) {
    int err = errno;
    ::close(devNull);
    ::close(errPipe[0]);
    ::close(errPipe[1]);
    throw SystemError("fork of a worker", err);
  }
  if (pid == 0) {
    ::setpgid(0, 0);
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(127);  // the agent died between fork and prctl
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    for (int sig : {SIGPIPE, SIGINT, SIGTERM, SIGCHLD, SIGHUP, SIGUSR1, SIGUSR2}) ::signal(sig, SIG_DFL);
    ::dup2(devNull, STDIN_FILENO);
    if (spec.stdoutFd >= 0) ::dup2(spec.stdoutFd, STDOUT_FILENO);
    if (spec.stderrFd >= 0) ::dup2(spec.stderrFd, STDERR_FILENO);
    ::execve(spec.path.c_str(), argv.data(), envp.data());
    int err = errno;
    ssize_t ignored = ::write(errPipe[1], &err, sizeof(err));
    (void)ignored;
    ::_exit(127);
  }
  ::setpgid(pid, pid);  // also from the parent, so the group exists before we might signal it
  ::close(devNull);
  ::close(errPipe[1]);
  int childErr = 0;
  ssize_t n;
  do {
    n = ::read(errPipe[0], &childErr, sizeof(childErr));
  } while (n < 0 && errno == EINTR);
  ::close(errPipe[0]);
  if (n == static_cast<ssize_t>(sizeof(childErr))) {
    int status;
    ::waitpid(pid, &status, 0);
    ExitCode code = (childErr == ENOENT) ? ExitCode::kNotFound
                    : (childErr == EACCES || childErr == ENOEXEC) ? ExitCode::kNotExecutable
                                                                   : ExitCode::kInternal;
    throw Error(fmt::format("cannot execute '{}': {}", spec.path, std::strerror(childErr)), code);
  }
  return pid;
}

void signalGroup(pid_t pgid, int sig) {
  if (pgid <= 0) return;
  if (::kill(-pgid, sig) != 0 && errno == ESRCH) ::kill(pgid, sig);
}

std::string describeStatus(int status) {
  if (WIFEXITED(status)) return fmt::format("exit code {}", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    int sig = WTERMSIG(status);
    const char* abbrev = sigabbrev_np(sig);
    return fmt::format("signal {} (SIG{}){}", sig, abbrev ? abbrev : "?", WCOREDUMP(status) ? ", core dumped" : "");
  }
  return fmt::format("status {:#x}", status);
}

int exitCodeOf(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 1;
}

}  // namespace dtrain::launch
