#include "tests/support/process.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <stdexcept>

#include "lib/common/clock.h"

extern char** environ;

namespace dtrain::testing {
namespace {

int pidfdOpen(pid_t pid) { return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)); }

std::vector<std::string> buildEnv(const RunOptions& o) {
  std::map<std::string, std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    std::string kv(*e);
    auto eq = kv.find('=');
    if (eq == std::string::npos) continue;
    env[kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  for (const auto& name : o.unsetEnv) env.erase(name);
  for (const auto& [k, v] : o.env) env[k] = v;
  std::vector<std::string> out;
  for (const auto& [k, v] : env) out.push_back(k + "=" + v);
  return out;
}

std::vector<std::string>& tempDirs() {
  static std::vector<std::string> dirs;
  return dirs;
}

void removeTempDirs() {
  if (std::getenv("DTRAIN_KEEP_TEST_DIRS") != nullptr) return;
  for (const auto& d : tempDirs()) {
    std::error_code ec;
    std::filesystem::remove_all(d, ec);
  }
}

}  // namespace

Background::Background(const std::vector<std::string>& argv, const RunOptions& options) {
  int outPipe[2], errPipe[2], inPipe[2];
  if (::pipe2(outPipe, O_CLOEXEC) != 0 || ::pipe2(errPipe, O_CLOEXEC) != 0 || ::pipe2(inPipe, O_CLOEXEC) != 0)
    throw std::runtime_error("pipe2 failed");
  auto env = buildEnv(options);
  std::vector<char*> cargv, cenv;
  for (const auto& a : argv) cargv.push_back(const_cast<char*>(a.c_str()));
  cargv.push_back(nullptr);
  for (const auto& e : env) cenv.push_back(const_cast<char*>(e.c_str()));
  cenv.push_back(nullptr);
  pid_ = ::fork();
  if (pid_ < 0) throw std::runtime_error("fork failed");
  if (pid_ == 0) {
    ::setpgid(0, 0);
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    ::dup2(inPipe[0], 0);
    ::dup2(outPipe[1], 1);
    ::dup2(errPipe[1], 2);
    if (!options.cwd.empty() && ::chdir(options.cwd.c_str()) != 0) ::_exit(125);
    ::execvpe(cargv[0], cargv.data(), cenv.data());
    ::_exit(127);
  }
  ::setpgid(pid_, pid_);
  ::close(outPipe[1]);
  ::close(errPipe[1]);
  ::close(inPipe[0]);
  if (!options.stdinData.empty()) {
    ssize_t ignored = ::write(inPipe[1], options.stdinData.data(), options.stdinData.size());
    (void)ignored;
  }
  ::close(inPipe[1]);
  outFd_ = outPipe[0];
  errFd_ = errPipe[0];
}

Background::~Background() {
  if (!exited_ && pid_ > 0) {
    ::kill(-pid_, SIGKILL);
    ::kill(pid_, SIGKILL);
    int st;
    ::waitpid(pid_, &st, 0);
  }
  if (outFd_ >= 0) ::close(outFd_);
  if (errFd_ >= 0) ::close(errFd_);
}

void Background::pump(int timeoutMs) {
  pollfd fds[2] = {{outFd_, POLLIN, 0}, {errFd_, POLLIN, 0}};
  int n = ::poll(fds, 2, timeoutMs);
  if (n <= 0) return;
  char buf[65536];
  for (int i = 0; i < 2; ++i) {
    if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
    ssize_t r = ::read(fds[i].fd, buf, sizeof(buf));
    if (r > 0) {
      (i == 0 ? out_ : err_).append(buf, static_cast<size_t>(r));
    } else if (r == 0) {
      ::close(fds[i].fd);
      (i == 0 ? outFd_ : errFd_) = -1;
    }
  }
}

std::string Background::waitForLine(const std::string& needle, std::chrono::milliseconds timeout, bool fromStderr) {
  Deadline deadline(timeout);
  size_t scanned = 0;
  for (;;) {
    const std::string& s = fromStderr ? err_ : out_;
    size_t pos = s.find(needle, scanned > needle.size() ? scanned - needle.size() : 0);
    if (pos != std::string::npos) {
      size_t start = s.rfind('\n', pos);
      start = start == std::string::npos ? 0 : start + 1;
      size_t end = s.find('\n', pos);
      if (end != std::string::npos) return s.substr(start, end - start);
    }
    scanned = s.size();
    int fd = fromStderr ? errFd_ : outFd_;
    if (deadline.expired() || fd < 0)
      throw std::runtime_error("timed out waiting for '" + needle + "'; stdout:\n" + out_ + "\nstderr:\n" + err_);
    pump(static_cast<int>(std::min<int64_t>(deadline.remaining().count(), 1000)));
  }
}

void Background::signal(int sig) {
  if (!exited_) ::kill(pid_, sig);
}
void Background::signalGroup(int sig) {
  if (!exited_) ::kill(-pid_, sig);
}

bool Background::running() {
  if (exited_) return false;
  int st;
  pid_t r = ::waitpid(pid_, &st, WNOHANG);
  if (r == pid_) {
    exited_ = true;
    status_ = st;
    return false;
  }
  return true;
}

RunResult Background::wait(std::chrono::milliseconds timeout) {
  RunResult result;
  Deadline deadline(timeout);
  int pidfd = exited_ ? -1 : pidfdOpen(pid_);
  while (!exited_) {
    pollfd fds[3] = {{outFd_, POLLIN, 0}, {errFd_, POLLIN, 0}, {pidfd, POLLIN, 0}};
    int wait = static_cast<int>(std::min<int64_t>(deadline.remaining().count(), 1000));
    int n = ::poll(fds, 3, wait);
    if (n > 0 && (fds[0].revents || fds[1].revents)) pump(0);
    if (!running()) break;
    if (deadline.expired()) {
      result.timedOut = true;
      ::kill(-pid_, SIGKILL);
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, &status_, 0);
      exited_ = true;
    }
  }
  if (pidfd >= 0) ::close(pidfd);
  // Drain what is left; a grandchild still holding the pipe must not stall us past a short grace.
  Deadline drain(std::chrono::milliseconds(2000));
  while ((outFd_ >= 0 || errFd_ >= 0) && !drain.expired()) pump(100);
  result.out = out_;
  result.err = err_;
  if (WIFEXITED(status_)) result.exitCode = WEXITSTATUS(status_);
  else if (WIFSIGNALED(status_)) result.exitCode = 128 + WTERMSIG(status_);
  return result;
}

RunResult run(const std::vector<std::string>& argv, const RunOptions& options) {
  Background p(argv, options);
  return p.wait(options.timeout);
}

std::string dtrainBinary() {
  // scripts/gpu-check runs prebuilt test binaries on another machine: the binary's path comes from there.
  if (const char* b = std::getenv("DTRAIN_TEST_BINARY"); b != nullptr && *b != '\0') return b;
#ifdef DTRAIN_BINARY
  return DTRAIN_BINARY;
#else
  return "dtrain";
#endif
}

std::string sourceDir() {
#ifdef DTRAIN_SOURCE_DIR
  return DTRAIN_SOURCE_DIR;
#else
  return ".";
#endif
}

std::string tempDir(const std::string& tag) {
  static std::once_flag once;
  // Construct the list before registering the handler, so it is destroyed after the handler ran.
  std::call_once(once, [] {
    tempDirs();
    std::atexit(removeTempDirs);
  });
  std::string pattern = (std::filesystem::temp_directory_path() / ("dtrain-test-" + tag + "-XXXXXX")).string();
  std::vector<char> buf(pattern.begin(), pattern.end());
  buf.push_back('\0');
  if (::mkdtemp(buf.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
  tempDirs().emplace_back(buf.data());
  return buf.data();
}

std::string readFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void writeFile(const std::string& path, const std::string& content) {
  std::ofstream out(path, std::ios::binary);
  out << content;
}

bool processAlive(pid_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  if (!stat) return false;
  std::string line;
  std::getline(stat, line);
  auto close = line.rfind(')');
  if (close == std::string::npos || close + 2 >= line.size()) return false;
  char state = line[close + 2];
  return state != 'Z' && state != 'X';
}

bool waitForExit(pid_t pid, std::chrono::milliseconds timeout) {
  int fd = pidfdOpen(pid);
  if (fd < 0) return !processAlive(pid);
  pollfd p{fd, POLLIN, 0};
  int n = ::poll(&p, 1, static_cast<int>(timeout.count()));
  ::close(fd);
  return n > 0 || !processAlive(pid);
}

int freePort() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

std::vector<pid_t> processesWithEnv(const std::string& name, const std::string& value) {
  std::vector<pid_t> out;
  const std::string needle = name + "=" + value;
  DIR* d = ::opendir("/proc");
  if (d == nullptr) return out;
  while (dirent* e = ::readdir(d)) {
    char* end = nullptr;
    long pid = std::strtol(e->d_name, &end, 10);
    if (*end != '\0' || pid <= 0) continue;
    std::string env = readFile(std::string("/proc/") + e->d_name + "/environ");
    size_t pos = 0;
    while (pos < env.size()) {
      size_t next = env.find('\0', pos);
      if (next == std::string::npos) next = env.size();
      if (env.compare(pos, next - pos, needle) == 0 && processAlive(static_cast<pid_t>(pid))) {
        out.push_back(static_cast<pid_t>(pid));
        break;
      }
      pos = next + 1;
    }
  }
  ::closedir(d);
  return out;
}

std::vector<pid_t> processesWithRunId(const std::string& runId) { return processesWithEnv("DTRAIN_RUN_ID", runId); }

}  // namespace dtrain::testing
