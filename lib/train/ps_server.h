// A parameter server rank (docs/parameter_server.md): holds its partitions of the parameter arena (ps_protocol.h)
// with their optimizer state, and answers the workers' push/pull requests.
//
// Modes (the consistency models of ps-lite / TensorFlow's ParameterServerStrategy / the SSP paper, Ho et al. 2013):
//  - kSync: a partition's step t completes when every worker pushed its gradient for t; the server applies the
//    average (sum in worker-rank order, times 1/workers: PyTorch DDP's averaging) with one optimizer step and
//    answers every waiting push with the new parameters. Equal to DDP up to float summation order.
//  - kAsync: each push is applied on arrival (one optimizer step with that worker's gradient) and answered at once.
//  - kSsp: applied on arrival like kAsync, but the answer to a worker's push for step t waits until the slowest live
//    worker has pushed step t + 1 - staleness, so no worker runs more than `staleness` steps ahead of the slowest.
// A worker whose connection drops: kAsync/kSsp go on without it (it no longer holds back SSP); kSync cannot finish
// a step without it, so every waiting and later push fails with an error (the launcher then re-forms the group).
//
// Sparse tables (ps_sparse.h) follow the same modes: kSync averages every worker's row gradients of a step (rows
// a worker did not touch count as zero, as in DDP's dense average) and applies one sparse optimizer step;
// kAsync/kSsp apply each push on arrival (the staleness bound is the dense partitions' pushes').
//
// Threading: serve() runs an accept loop and one thread per connection; partitions and clocks are guarded by one
// mutex (the optimizer runs under it, which serialises updates as the modes require). stop() may be called from
// any thread. Errors: listen() throws ConfigError when it cannot listen; serve() throws CommError when no worker
// connects within the timeout; per-request errors go back to that request's worker (ps_protocol.h).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "lib/common/socket.h"
#include "lib/common/worker_metrics.h"
#include "lib/nn/optimizer.h"
#include "lib/train/ps_protocol.h"
#include "lib/train/ps_sparse.h"

namespace dtrain::train::ps {

enum class Mode : uint8_t { kSync, kAsync, kSsp };
const char* modeName(Mode mode);

// A sparse table (ps_sparse.h) the servers hold: each server creates its row range of it at start.
struct SparseTableOptions {
  int64_t rows = 0;
  int dim = 0;
  SparseOptimizerSpec optimizer;
  double initStd = 1.0;  // torch.nn.Embedding's N(0, 1)
  uint64_t seed = 0;
  std::string name;      // its parameter name ("0.wte.weight"), in the files the servers write (sparse_shards.h)
};

struct ServerOptions {
  int serverRank = 0;
  int servers = 1;
  int workers = 1;
  Mode mode = Mode::kSync;
  int staleness = 0;  // kSsp only
  nn::OptimizerSpec optimizer;
  std::chrono::milliseconds timeout{std::chrono::minutes(5)};  // per wait, and for the workers to connect
  std::string host = "127.0.0.1";                              // the address to listen on and publish
  std::vector<SparseTableOptions> tables;  // every server gets the same list (from the job file)
  int64_t killAfterPushes = 0;  // testing aid (DTRAIN_FAULT role=server): SIGKILL itself after this many pushes
  // The agent's monitoring block of this rank (lib/common/worker_metrics.h), or null: the server writes its
  // figures there (role kServer, PsServerMetrics) as it answers requests. Must outlive the Server.
  WorkerMetricsBlock* metrics = nullptr;
};

// What a server counted (for tests and its exit line).
struct ServerStats {
  int64_t pushes = 0;
  int64_t updates = 0;      // optimizer steps over all partitions
  int64_t errors = 0;       // requests answered with an error
  int64_t bytesIn = 0;      // payload bytes received
  int64_t bytesOut = 0;     // payload bytes sent
};

class Server {
 public:
  explicit Server(ServerOptions options);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds a port (0: any) and returns "host:port" for the workers. Call once, before serve().
  std::string listen();
  // Blocks until every worker said bye or went away (or stop()). Throws CommError when no worker connected within
  // the timeout.
  void serve();
  void stop();
  ServerStats stats() const;
  // Per worker: the steps of its kPushPullCounted pushes this server applied whole (all of this server's partitions
  // of the step) with their samples, the step it applied only in part (partialPartitions of `partitions`), and
  // whether the worker is live, finished, lost or never came (ps_protocol.h's WorkerTally; kBarrier's and kTally's
  // reply). Any thread.
  std::vector<WorkerTally> tallies() const;

 private:
  struct PartitionState;
  struct TableState;
  struct Conn;
  void handle(Conn& conn);
  // One request: reads its payload, answers it. Throws ProtocolError/CommError to close the connection.
  void dispatch(Conn& conn, const RequestHeader& h);
  void reply(Conn& conn, const ReplyHeader& h, const void* payload, size_t bytes);
  void replyError(Conn& conn, uint32_t partition, const std::string& message);
  std::string hello(Conn& conn, const std::vector<uint8_t>& payload);
  std::string init(PartitionState& p, const std::vector<uint8_t>& payload, size_t count, int64_t step);
  // Under mu_: the slowest live worker's clock (INT64_MAX when none is live).
  int64_t minClockLocked() const;
  // Who a timed-out wait waited for, for its error (under mu_): "worker 1" / "workers 0, 2", in sync the workers
  // whose flag in `pushed` is 0, in ssp the live workers at the slowest clock.
  std::string notPushedLocked(const std::vector<uint8_t>& pushed) const;
  std::string slowestLocked() const;
  void workerGone(int worker, bool bye);
  // Under mu_: a counted push of `worker`'s step `step` (one partition) with `samples` was applied.
  void countApplied(size_t worker, int64_t step, int64_t samples);
  // Under mu_: this server's dense partitions (0 before the first hello).
  int64_t partitionsLocked() const;
  // Under mu_: the figures of options_.metrics that follow a request or a worker's leaving (no-op without a block).
  void publishLocked(bool request);
  // Under mu_: an async/ssp push answered `staleness` steps ahead of the slowest live worker.
  void noteStalenessLocked(int64_t staleness);
  // The kSparse* ops (ps_protocol.h); returns an error message for the worker, "" when it replied.
  std::string dispatchSparse(Conn& conn, const RequestHeader& h);
  // kSparseSave / kSparseLoad: this server's rows of every table to or from files (sparse_shards.h).
  std::string saveOrLoadTables(const Conn& conn, const RequestHeader& h);

  ServerOptions options_;
  net::Listener listener_;
  std::string address_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Partition> plan_;                         // set by the first hello
  size_t numParams_ = 0;
  std::vector<std::unique_ptr<PartitionState>> parts_;  // by partition index; null when not this server's
  std::vector<std::unique_ptr<TableState>> tables_;   // this server's row range of each sparse table
  std::vector<int64_t> clock_;                          // per worker: steps pushed
  std::vector<int64_t> barrier_;                        // per worker: barriers reached (kBarrier)
  std::vector<uint8_t> live_;                           // per worker: connected and not done
  std::vector<uint8_t> seen_;                           // per worker: said hello once
  std::vector<uint8_t> lost_;                           // per worker: left without bye
  std::vector<WorkerTally> tally_;                      // per worker: whole steps applied (samples, steps)
  struct StepInProgress {
    int64_t step = -1;  // the worker's step some (not all) of whose partitions here were applied; -1: none
    int64_t parts = 0;
    int64_t samples = 0;
  };
  std::vector<StepInProgress> current_;                 // per worker
  int done_ = 0;                                        // workers that said bye or left
  std::string syncBroken_;                              // kSync: why no step can complete any more
  ServerStats stats_;
  std::chrono::steady_clock::time_point rateStart_ = std::chrono::steady_clock::now();  // requestsPerSecond's window
  int64_t rateRequests_ = 0;
  std::chrono::steady_clock::time_point rssAt_{};  // residentBytes is read at most once a second
  std::atomic<bool> stopping_{false};
  std::vector<std::thread> threads_;
};

}  // namespace dtrain::train::ps
