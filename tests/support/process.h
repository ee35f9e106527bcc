// Test support: run real processes (the dtrain binary, shell commands) with a timeout and capture what a
// user would see. Used by integration tests; never sleeps to synchronise, it waits on pipes and exits.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <map>
#include <string>
#include <vector>

namespace dtrain::testing {

struct RunResult {
  int exitCode = -1;   // 128+signal when killed by a signal (as a shell reports it)
  bool timedOut = false;
  std::string out;
  std::string err;
};

struct RunOptions {
  std::chrono::milliseconds timeout{60'000};
  std::map<std::string, std::string> env;  // added to (or overriding) the test's environment
  std::vector<std::string> unsetEnv;
  std::string cwd;
  std::string stdinData;
};

// Runs argv to completion (killing its process group at the timeout) and captures stdout/stderr.
RunResult run(const std::vector<std::string>& argv, const RunOptions& options = {});

// A process running in the background, in its own process group; its stdout/stderr are captured.
class Background {
 public:
  Background(const std::vector<std::string>& argv, const RunOptions& options = {});
  ~Background();  // kills the process group if still running
  Background(const Background&) = delete;
  Background& operator=(const Background&) = delete;

  pid_t pid() const { return pid_; }
  // Blocks until stdout (or stderr when fromStderr) has a line containing `needle`; returns that line, or
  // throws after the timeout. The line is consumed from neither stream: out()/err() still hold everything.
  std::string waitForLine(const std::string& needle, std::chrono::milliseconds timeout, bool fromStderr = false);
  void signal(int sig);          // to the process only
  void signalGroup(int sig);     // to its whole process group
  // Waits for exit; returns the result (timedOut and a kill of the group when it overruns).
  RunResult wait(std::chrono::milliseconds timeout);
  bool running();

 private:
  void pump(int timeoutMs);  // reads what is available on the pipes
  pid_t pid_ = -1;
  int outFd_ = -1;
  int errFd_ = -1;
  bool exited_ = false;
  int status_ = 0;
  std::string out_;
  std::string err_;
};

// The dtrain binary under test and the source tree (from CMake).
std::string dtrainBinary();
std::string sourceDir();
// A fresh temporary directory, removed at process exit.
std::string tempDir(const std::string& tag);
std::string readFile(const std::string& path);
void writeFile(const std::string& path, const std::string& content);
// True when a process with this pid exists (and is not a zombie).
bool processAlive(pid_t pid);
// Waits (pidfd, no polling) until `pid` is gone; false after the timeout. Works for non-children too.
bool waitForExit(pid_t pid, std::chrono::milliseconds timeout);
// A TCP port free on 127.0.0.1 right now.
int freePort();
// Pids of live processes whose environment holds NAME=VALUE: to prove nothing was left behind.
std::vector<pid_t> processesWithEnv(const std::string& name, const std::string& value);
// processesWithEnv("DTRAIN_RUN_ID", runId).
std::vector<pid_t> processesWithRunId(const std::string& runId);

}  // namespace dtrain::testing
