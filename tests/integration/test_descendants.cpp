// No process outlives its job (issue 10, section 3): not only the workers, every descendant of a worker is gone
// within --shutdown-timeout after the job ends or the agent dies, even when it left the worker's process group
// (setsid) and ignores SIGTERM. See lib/launch/process_tree.h and docs/fault-tolerance.md. Nor does a killed
// agent's metrics folder in /dev/shm outlive the next agent's start (lib/launch/metrics_hub.h).
#include <doctest/doctest.h>

#include <signal.h>
#include <sys/stat.h>

#include <filesystem>

#include "tests/integration/launch_helpers.h"

using namespace dtrain::testing;
using namespace std::chrono_literals;

namespace {

// Whatever happens in a test case, nothing it started survives it: every process carrying the run's marker is
// SIGKILLed when the case ends.
struct KillByRunId {
  std::string id;
  ~KillByRunId() {
    for (pid_t pid : processesWithRunId(id)) ::kill(pid, SIGKILL);
  }
};

pid_t pidAfter(const std::string& text, const std::string& key) {
  auto lines = linesWith(text, key);
  if (lines.empty()) return -1;
  return static_cast<pid_t>(std::stol(lines.front().substr(lines.front().find(key) + key.size())));
}

// The agent's watchdog (a child running `dtrain __watchdog`), or -1.
pid_t watchdogOf(pid_t agent) {
  std::istringstream children(readFile(fmt::format("/proc/{}/task/{}/children", agent, agent)));
  pid_t child;
  while (children >> child)
    if (readFile(fmt::format("/proc/{}/cmdline", child)).find("__watchdog") != std::string::npos) return child;
  return -1;
}

// A --standalone agent with --metrics-port whose one worker prints its metrics block's path ("block=PATH") and
// sleeps.
std::vector<std::string> metricsAgent(const std::string& id) {
  return runArgs({"--standalone", "--rdzv-id", id, "--metrics-port", "0", "--shutdown-timeout", "2s", "--", "sh",
                  "-c", "echo block=$DTRAIN_METRICS_SHM; exec sleep 1000"});
}

// The folder of the block named in a "block=PATH" line.
std::string blockFolder(const std::string& line) {
  return std::filesystem::path(line.substr(line.find("block=") + 6)).parent_path().string();
}

}  // namespace

TEST_CASE("the metrics folder of an agent killed with SIGKILL is removed when the next agent starts; a live job's "
          "folder stays") {
  // SIGKILL runs no destructor: /dev/shm/dtrain-metrics-* stayed until reboot, one per killed agent.
  namespace fs = std::filesystem;
  const std::string liveId = uniqueRunId("shm-live"), deadId = uniqueRunId("shm-dead");
  const std::string nextId = uniqueRunId("shm-next");
  KillByRunId liveGuard{liveId}, deadGuard{deadId}, nextGuard{nextId};
  Background live(metricsAgent(liveId));
  const std::string liveDir = blockFolder(live.waitForLine("block=", 30s));
  std::string deadDir;
  {
    Background dead(metricsAgent(deadId));
    deadDir = blockFolder(dead.waitForLine("block=", 30s));
    dead.signalGroup(SIGKILL);  // the agent (its worker, in a group of its own, follows through PR_SET_PDEATHSIG)
    CHECK(dead.wait(10s).exitCode == 128 + SIGKILL);
  }
  REQUIRE(deadDir != liveDir);
  REQUIRE(fs::is_directory(deadDir));  // left behind: nothing of the killed agent ran
  Background next(metricsAgent(nextId));
  const std::string nextDir = blockFolder(next.waitForLine("block=", 30s));  // its hub (and its sweep) came first
  CHECK_FALSE(fs::exists(deadDir));
  CHECK(fs::exists(liveDir + "/local_rank_0"));
  CHECK(fs::exists(nextDir + "/local_rank_0"));
  next.signal(SIGTERM);
  live.signal(SIGTERM);
  CHECK_FALSE(next.wait(30s).timedOut);
  CHECK_FALSE(live.wait(30s).timedOut);
  CHECK_FALSE(fs::exists(liveDir));  // a clean exit removes its own
  CHECK_FALSE(fs::exists(nextDir));
  CHECK(processesWithRunId(liveId).empty());
  CHECK(processesWithRunId(nextId).empty());
}

TEST_CASE("an agent killed with SIGKILL takes the children of a wrapper-script worker with it") {
  std::string id = uniqueRunId("wrapper");
  KillByRunId guard{id};
  // The worker is a wrapper; its child (the "real trainer") ignores SIGTERM and outlives its parent unless
  // someone SIGKILLs it.
  std::string script = "sh -c 'trap \"\" TERM; echo child=$$; exec sleep 1000' & wait";
  Background agent(runArgs({"--standalone", "--rdzv-id", id, "--shutdown-timeout", "2s", "--", "sh", "-c", script}));
  std::string line = agent.waitForLine("child=", 30s);
  pid_t child = pidAfter(line, "child=");
  REQUIRE(child > 0);
  REQUIRE(processAlive(child));
  pid_t watchdog = watchdogOf(agent.pid());
  REQUIRE(watchdog > 0);
  agent.signal(SIGKILL);
  agent.wait(10s);
  // Gone within the shutdown timeout (2 s) plus what SIGKILL and the scheduler take.
  CHECK(waitForExit(child, 5s));
  CHECK(processesWithRunId(id).empty());
  // The watchdog outlives the agent only as long as its sweep.
  CHECK(waitForExit(watchdog, 5s));
}

TEST_CASE("a grandchild that calls setsid and ignores SIGTERM is gone after a clean job end") {
  std::string id = uniqueRunId("setsid");
  KillByRunId guard{id};
  std::string dir = tempDir("setsid");
  std::string fifo = dir + "/ready";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  // The worker waits on the FIFO until the grandchild ignores SIGTERM and has left the worker's session, then
  // exits 0: the job succeeds with the grandchild still running.
  std::string script = fmt::format(
      "setsid sh -c 'trap \"\" TERM; echo $$ > {0}; exec sleep 1000' </dev/null >/dev/null 2>&1 & "
      "read pid < {0}; echo grandchild=$pid",
      fifo);
  auto r = run(runArgs({"--standalone", "--rdzv-id", id, "--shutdown-timeout", "2s", "--", "sh", "-c", script}),
               {.timeout = 60s});
  INFO(r.out, r.err);
  CHECK(r.exitCode == 0);
  pid_t grandchild = pidAfter(r.out, "grandchild=");
  REQUIRE(grandchild > 0);
  // The agent has exited: it must not have left the grandchild behind.
  CHECK_FALSE(processAlive(grandchild));
  CHECK(processesWithRunId(id).empty());
}

TEST_CASE("what a failed attempt left behind is gone before the restarted attempt starts") {
  std::string id = uniqueRunId("attempt");
  KillByRunId guard{id};
  std::string dir = tempDir("attempt");
  std::string fifo = dir + "/ready";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  // Attempt 0 leaves a setsid grandchild that ignores SIGTERM and fails; attempt 1 reports whether it still runs
  // (a zombie counts as gone).
  std::string script = fmt::format(
      "if [ \"$DTRAIN_RESTART_COUNT\" = 0 ]; then "
      "setsid sh -c 'trap \"\" TERM; echo $$ > {0}; exec sleep 1000' </dev/null >/dev/null 2>&1 & "
      "read pid < {0}; echo $pid > {1}/pid; exit 1; fi; "
      "pid=$(cat {1}/pid); state=$(cut -d' ' -f3 /proc/$pid/stat 2>/dev/null); "
      "if [ -n \"$state\" ] && [ \"$state\" != Z ]; then echo leftover=alive; else echo leftover=gone; fi",
      fifo, dir);
  auto r = run(runArgs({"--standalone", "--rdzv-id", id, "--max-restarts", "1", "--shutdown-timeout", "2s", "--",
                        "sh", "-c", script}),
               {.timeout = 60s});
  INFO(r.out, r.err);
  CHECK(r.exitCode == 0);
  CHECK(r.out.find("leftover=gone") != std::string::npos);
  CHECK(r.err.find("stopped 1 process(es) left behind by the workers") != std::string::npos);
  CHECK(processesWithRunId(id).empty());
}
