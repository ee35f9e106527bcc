// Making sure no process outlives its job: every descendant of every worker, not only the workers.
//
// PR_SET_PDEATHSIG (spawn.h) and the worker's process group reach only the worker and what stays in its group.
// A wrapper script's children outlive an agent that was SIGKILLed (they are re-parented to init), and a
// grandchild that calls setsid() leaves the group. Three mechanisms close these gaps (docs/fault-tolerance.md,
// "No process outlives its job", says why not a cgroup):
//  - a marker: every worker's environment carries DTRAIN_AGENT_TOKEN=<random token of this agent>, which its
//    descendants inherit; /proc/PID/environ tells who carries it (processes that exec with a cleared
//    environment lose it: the two other mechanisms still see them while the agent lives);
//  - the agent is a child subreaper (PR_SET_CHILD_SUBREAPER): orphans of a worker's tree are re-parented to the
//    agent instead of init, so they stay its descendants (and stay in Slurm's parentage-based tracking);
//  - a watchdog: a tiny process (this binary's hidden `__watchdog` command) started before any worker, outside
//    the workers' groups, holding the read end of a pipe whose write end only the agent holds. When the agent
//    ends, however it ends (SIGKILL included), the pipe reaches EOF and the watchdog stops every process carrying
//    the marker, then exits itself.
// Stopping is SIGTERM, then SIGKILL for what is left after the grace period, so everything is gone within the
// shutdown timeout (plus the moment SIGKILL takes). Signals go through pidfds opened *before* the marker is
// checked, so a recycled pid is never signalled.
//
// Thread-safety: a ProcessTree is used from the agent's main thread only. Blocking: stopLeftovers() waits up to
// its grace period (pidfd poll, no fixed sleeps).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <string>
#include <vector>

namespace dtrain::launch {

inline constexpr const char* kAgentTokenVar = "DTRAIN_AGENT_TOKEN";
// The hidden command line: <exe> __watchdog <read fd> <marker "NAME=value"> <grace in ms>.
inline constexpr const char* kWatchdogCommand = "__watchdog";

class ProcessTree {
 public:
  // Makes this process a child subreaper and starts the watchdog from `exe` (normally /proc/self/exe; "" starts
  // none). A watchdog that cannot start is a warning, not an error: the round-end sweeps still work.
  ProcessTree(std::chrono::milliseconds grace, const std::string& exe);
  // Stops what is left (stopLeftovers), then closes the watchdog's pipe and reaps the watchdog.
  ~ProcessTree();
  ProcessTree(const ProcessTree&) = delete;
  ProcessTree& operator=(const ProcessTree&) = delete;

  // "DTRAIN_AGENT_TOKEN=<token>".
  const std::string& marker() const { return marker_; }
  // Puts the marker into a worker's environment (replacing an outer agent's token, when dtrain runs dtrain).
  void mark(std::vector<std::string>& env) const;
  // Stops every process that carries the marker or descends from this process (except the watchdog): SIGTERM,
  // then SIGKILL after `grace`. Call it only when no worker of this agent should be running. Reaps the zombies
  // re-parented to this process. Returns how many processes it signalled.
  size_t stopLeftovers(std::chrono::milliseconds grace);
  pid_t watchdogPid() const { return watchdog_; }

 private:
  std::string marker_;
  std::chrono::milliseconds grace_;
  pid_t watchdog_ = -1;
  int pipeWrite_ = -1;
};

// Stops every live process other than the caller that carries `marker` in its environment (exact "NAME=value"
// entry) or, when `descendantsOf` > 0, descends from that pid; never `spare` or its descendants. SIGTERM, then
// SIGKILL for what is left after `grace`; returns how many processes it signalled. Used by ProcessTree and the
// watchdog; exposed for tests.
size_t stopMarkedProcesses(const std::string& marker, pid_t descendantsOf, pid_t spare,
                           std::chrono::milliseconds grace);

// The body of `dtrain __watchdog FD MARKER GRACE_MS`: returns the process exit code.
int watchdogMain(int argc, char** argv);

}  // namespace dtrain::launch
