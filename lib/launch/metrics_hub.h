// The agent's metrics: what its workers report through their shared blocks (lib/common/worker_metrics.h) plus
// the agent's own state (round, restarts, worker exits by code, heartbeat ages of the other nodes), rendered
// in the Prometheus text exposition format 0.0.4 for `dtrain run --metrics-port` (served by http_server.h).
//
// Names and labels follow Prometheus' conventions: the dtrain_ prefix, base units (seconds, bytes), counters end
// in _total; every sample carries job (the job's name), run_id and node (this agent's node rank), and per-rank
// samples add rank; parameter-server ranks (role server in their block) get the dtrain_ps_* families instead of the
// training ones, with role="server" and server (its index). The catalogue is in docs/monitoring.md.
//
// Thread-safety: the agent's threads (its loop, its store thread) update the agent state under a mutex held only
// for the update; render() (the HTTP thread) copies that state under the same mutex and reads the workers'
// blocks without any lock. Nothing here blocks on a worker or the store.
#pragma once

#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "lib/common/worker_metrics.h"
#include "lib/launch/flight_report.h"

namespace dtrain::rendezvous {
struct TcpStoreServerStats;
}

namespace dtrain::launch {

// Builds a text-format exposition, one family at a time.
class PromText {
 public:
  using Labels = std::vector<std::pair<std::string, std::string>>;
  // Starts a family: "# HELP name help" and "# TYPE name type" (type: counter, gauge).
  void family(const std::string& name, const char* type, const std::string& help);
  // A sample of the current family (or of `name` when given: for a family with one sample).
  void sample(const std::string& name, const Labels& labels, double value);
  std::string take() { return std::move(out_); }

 private:
  std::string out_;
};

// Label values escaped as the format wants (backslash, double quote, newline).
std::string escapeLabelValue(const std::string& value);

class MetricsHub {
 public:
  // Creates a private directory for the workers' blocks, dtrain-metrics-XXXXXX under /dev/shm when it exists,
  // else $TMPDIR or /tmp, and holds an exclusive flock(2) on its `owner.lock` for the hub's lifetime (the fd is
  // close-on-exec: workers do not inherit it). First it removes the directories there that agents SIGKILLed
  // before their destructor ran left behind (removeStaleMetricsDirs). Throws dtrain::Error when it cannot create
  // its own.
  MetricsHub(std::string job, std::string runId);
  ~MetricsHub();  // removes the blocks and their directory, then releases the lock
  MetricsHub(const MetricsHub&) = delete;
  MetricsHub& operator=(const MetricsHub&) = delete;

  // The agent's loop, before it starts local worker `localRank`: zeroes (creating when new) its block and
  // returns the path to hand to the worker in DTRAIN_METRICS_SHM.
  std::string prepareSlot(int localRank);

  // The directory holding the blocks (for tests and diagnostics).
  const std::string& dir() const { return dir_; }

  // Agent state; any thread.
  void setRound(int round, int restartCount, int nodeRank, int numNodes, int worldSize);
  void workerStarted();
  // exit code in the shell's convention (128+signal when killed). The ended worker's block keeps its last values,
  // but its rates (samples/s; a server's requests/s) read 0 from then on: it trains and serves nothing, and its
  // last rate added into `dtrain top`'s and a sum()'s throughput for as long as the job ran on without it (an
  // async parameter-server worker that died). `localRank` < 0: no block to touch.
  void workerExited(int exitCode, int localRank = -1);
  void setHeartbeatAges(std::vector<double> secondsByNode);  // index: node rank; negative: not known

  // The exposition (text format 0.0.4). Any thread.
  std::string render() const;
  // The flight recorders of the local workers that attached (flight_report.h). Any thread.
  std::vector<RankFlight> flightRecords() const;

  // For the live dashboard (dashboard.h). Any thread.
  struct AgentState {
    int round = -1;
    int restartCount = 0;
    int nodeRank = 0;
    int numNodes = 0;
    int worldSize = 0;
    int running = 0;
    std::map<int, uint64_t> exitsByCode;
    std::vector<double> heartbeatAges;
    std::vector<std::pair<double, std::string>> events;  // (Unix seconds, what happened): the last kMaxEvents
  };
  static constexpr size_t kMaxEvents = 20;
  AgentState agentState() const;
  // Something the user should see on the dashboard (a failed round, a restart); the oldest beyond kMaxEvents go.
  void noteEvent(std::string text);
  struct RankState {
    int rank = -1;
    int64_t step = 0;
    int64_t epoch = 0;
    double loss = 0;
    bool hasLoss = true;  // false: the rank computes no loss (a pipeline stage before the last)
    double learningRate = 0;
    double samplesPerSecond = 0;
    bool hasSamples = true;  // false: another rank of its data replica counts its samples (model parallelism)
    double updatedUnixSeconds = 0;  // 0: never reported
  };
  // The local workers that attached, by local rank (parameter-server ranks are not workers: not listed).
  std::vector<RankState> rankStates() const;
  // A parameter-server rank's figures (PsServerMetrics, lib/common/worker_metrics.h): counters are cumulative since
  // the server started; staleness counts the pushes it answered in async/ssp (0 in sync).
  struct ServerState {
    int rank = -1;    // global rank
    int server = -1;  // its index among the servers
    std::map<std::string, uint64_t> requestsByOp;  // by the `op` label of /metrics (push, pull, barrier, ...)
    uint64_t errors = 0;
    uint64_t updates = 0;  // optimizer steps applied (dense partitions and sparse tables)
    uint64_t receivedBytes = 0;
    uint64_t sentBytes = 0;
    double requestsPerSecond = 0;
    int workers = 0;  // the job's worker count
    int workersLive = 0;
    int workersLost = 0;
    int64_t stalenessMax = 0;
    double stalenessSum = 0;
    std::vector<uint64_t> stalenessBuckets;  // per bucket (not cumulative), PsServerMetrics::kStalenessBounds, +Inf
  };
  // The local parameter-server ranks that attached, by local rank.
  std::vector<ServerState> serverStates() const;

 private:
  // The slots' blocks (taken under mu_) whose magic a worker has stamped, in slot order; the blocks stay mapped
  // as long as the hub (slots are never removed).
  std::vector<const WorkerMetricsBlock*> stampedBlocks() const;
  void renderWorkers(PromText& out, const std::vector<const WorkerMetricsBlock*>& blocks, int nodeRank) const;
  // The parameter-server ranks' families (dtrain_ps_*), labelled role="server" and server (its index); nothing
  // when no local rank is a server.
  void renderServers(PromText& out, const std::vector<const WorkerMetricsBlock*>& blocks, int nodeRank) const;

  std::string job_;
  std::string runId_;
  std::string dir_;
  int lockFd_ = -1;  // holds the flock on dir_/owner.lock while the hub lives
  mutable std::mutex mu_;
  AgentState state_;
  std::vector<WorkerMetricsMapping> slots_;  // grown by the agent's loop only, under mu_
};

// Removes the dtrain-metrics-* directories in `base` (a MetricsHub's parent: /dev/shm, $TMPDIR or /tmp) whose
// owner is gone: those whose `owner.lock` this call can flock (LOCK_EX | LOCK_NB). The kernel drops a flock when
// its holder dies however it dies, and the lock lives on the file, not on a pid, so the test holds across pid
// namespaces that share /dev/shm and cannot be fooled by a reused pid (a pid check could be either way). A
// directory without `owner.lock` is skipped: a hub between mkdtemp and publishing its lock (the lock file is
// flocked before it is renamed to `owner.lock`, so a sweep never sees it unlocked while its owner lives), or one
// left by a dtrain older than the lock. Only the caller's own directories are looked at. Returns how many were
// removed; never throws (a directory it cannot remove is left as it was).
size_t removeStaleMetricsDirs(const std::string& base);

// The exposition of a standalone `dtrain store` (dtrain store --metrics-port).
std::string renderStoreMetrics(const rendezvous::TcpStoreServerStats& stats);

}  // namespace dtrain::launch
