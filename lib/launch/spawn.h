// Starting and stopping worker processes.
//
// Workers are fork+exec'd (never fork-only: CUDA and threads do not survive fork). Each worker:
//  - runs in its own process group, so signals for the agent's terminal do not hit it and the agent can
//    stop everything the worker started with one killpg;
//  - gets PR_SET_PDEATHSIG=SIGKILL, so it dies with the agent even when the agent is SIGKILLed. The death
//    signal fires when the *thread* that forked exits, so spawn() must be called from the agent's main thread.
//    It reaches the worker only, not what the worker starts: process_tree.h stops every descendant;
//  - starts with a clean signal mask and default dispositions, stdin from /dev/null.
// An exec failure is reported to the parent through a close-on-exec pipe, so spawn() returns only after the
// exec succeeded or throws with the errno of the failed exec.
#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

namespace dtrain::launch {

struct SpawnSpec {
  std::string path;               // resolved executable
  std::vector<std::string> argv;  // argv[0] included
  std::vector<std::string> env;   // "NAME=value"
  int stdoutFd = -1;              // write end for the child's stdout (-1: inherit)
  int stderrFd = -1;
};

// Returns the child's pid (== its process group id). Throws Error (kNotFound/kNotExecutable/kInternal).
pid_t spawnProcess(const SpawnSpec& spec);

// Signals the process group `pgid`; ESRCH (already gone) is not an error.
void signalGroup(pid_t pgid, int sig);

// "exit code 3" / "signal 9 (SIGKILL)" for a waitpid status; exitCodeOf gives the shell convention.
std::string describeStatus(int status);
int exitCodeOf(int status);

}  // namespace dtrain::launch
