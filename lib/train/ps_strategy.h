// The parameter-server strategy on a worker rank (docs/parameter_server.md; server side: ps_server.h, wire
// protocol and partitioning: ps_protocol.h). Anchors: ps-lite (push/pull by key ranges), BytePS (4 MB partitions
// spread over servers), TensorFlow's ParameterServerStrategy (async), Ho et al. 2013 (stale synchronous parallel).
//
// Per optimizer step the workers never exchange gradients with each other: as backward finishes the layers of a
// partition (the partition's slice of the gradient arena is final, lib/nn/model.h), the partition's gradient is
// pushed to its server on that server's I/O thread, and the server's answer — the partition's parameters after
// the update — is written straight into the parameter arena. finishStep() waits for every partition, so the
// trainer then runs the next forward on the new parameters and skips its own optimizer step
// (updatesParameters()). The learning rate of the step travels with the push (beginStep), so schedules work.
//
// Start: worker 0 initialises every partition from its model and optimizer (which the trainer resumed from the
// newest checkpoint, if any), then every worker pulls the parameters: all start from worker 0's state, as DDP's
// broadcast gives. Checkpoints: before a save, worker 0 fetches every partition's parameters and optimizer state
// into its arenas and writes the layout-free checkpoint as DDP's rank 0 does, so a job resumes with any number of
// servers or workers (resharding is the next start's init).
//
// The workers still form a collective group among themselves (groups.world: the workers only). In sync mode it
// reduces metrics and agrees on stops as DDP's does. In async and ssp mode the workers must not wait for each other
// at log lines, so metrics and stop signals stay local (the progress line is worker 0's own, worker 0 evaluates the
// whole evaluation set alone while the others train on, each worker stops on the launcher's signal itself) and the group only meets at checkpoints and at the end (barrier
// before worker 0 fetches the servers' state, so every worker's pushes up to that step are in).
// Threading and errors: as Strategy; a server that fails or refuses a request is a CommError from finishStep().
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "lib/train/ps_client.h"
#include "lib/train/ps_server.h"
#include "lib/train/strategy.h"

namespace dtrain::train {

struct PsStrategyOptions {
  PsSettings settings;
  std::vector<std::string> serverAddresses;  // "host:port" of server 0, 1, ...
  std::chrono::milliseconds timeout{std::chrono::minutes(5)};
  size_t partitionFloats = ps::kMaxPartitionFloats;  // tests use smaller partitions
  std::vector<ps::SparseTableOptions> sparseTables;  // the model's sparse embeddings (sparseTableOptions(job))
};

class PsStrategy final : public Strategy {
 public:
  // groups.world: the workers (rank = worker index).
  PsStrategy(ProcessGroups groups, PsStrategyOptions options);
  ~PsStrategy() override;

  std::string name() const override { return "parameter_server"; }
  std::string summary() const override;
  void prepare(nn::Model& model) override;
  nn::LayerGradReady gradReadyHook() override { return nn::LayerGradReady(*this); }
  void finishStep() override;
  void reduceMetrics(std::span<double> values, comm::ReduceOp op) override;
  int agreeOnStop(int localSignal) override;
  int64_t stopCheckEvery() const override { return decoupled() ? 1 : 8; }
  void barrier() override;
  CheckpointShard checkpointShard(const nn::Model& model) const override;
  bool updatesParameters() const override { return true; }
  void bindOptimizer(nn::Optimizer& optimizer, int64_t startStep) override;
  void beginStep(int64_t step, double lr) override;
  void syncForSave() override;
  void fillStats(StepStats& stats) override;
  void finishRun() override;
  SparseTables* sparseTables() override;
  bool evaluatesAlone() const override { return decoupled(); }
  void countSamples(int64_t samples) override { stepSamples_ += samples; }
  std::vector<WorkerSamples> workerSamples() const override;

  // Layer `layer`'s gradients are final: pushes every partition that is now complete.
  void operator()(int layer);

 private:
  void pushReady(size_t readyFrom);
  bool decoupled() const { return options_.settings.mode != "sync"; }

  PsStrategyOptions options_;
  nn::Model* model_ = nullptr;
  nn::Optimizer* optimizer_ = nullptr;
  int64_t startStep_ = 0;
  std::unique_ptr<ps::Client> client_;
  std::unique_ptr<SparseTables> sparse_;  // the model's sparse tables on the servers (null: none)
  std::vector<ps::Partition> plan_;
  size_t nextPush_ = 0;  // partitions are pushed from the last one down
  int64_t step_ = 0;
  double lr_ = 0;
  int64_t stepsInInterval_ = 0;
  int64_t barriers_ = 0;  // async/ssp: barriers met through server 0
  int64_t stepSamples_ = 0;  // this step's training samples so far (countSamples)
  int64_t killMidStep_ = -1;  // DTRAIN_FAULT action=kill_mid_step for this worker: the steps done before it fires
  std::vector<ps::WorkerTally> tallies_;  // async/ssp: the servers' tallies at the last barrier (worker 0: every
                                         // server's, merged; the others: server 0's)
  ps::ClientTraffic loggedTraffic_;
};

// The server side of a rank whose role is "server": listens, publishes its address under the round's store as
// ps_protocol.h says, serves until every worker is done. Blocks; throws CommError when no worker comes.
// `attempt` (DTRAIN_RESTART_COUNT) selects the DTRAIN_FAULT items with role=server that apply. With the agent's
// DTRAIN_METRICS_SHM the server writes its figures into that block as rank `globalRank`, role server
// (lib/common/worker_metrics.h's PsServerMetrics).
void runPsServer(const Job& job, int serverRank, int workers, rendezvous::Store& roundStore, bool singleNode,
                 int attempt, int globalRank);

// What `dtrain check --world N` prints for a job on one node of N ranks: the parameter servers' placement
// ("parameter servers: ..." and one line per node), or "" when the job has none. ConfigError naming
// /parallel/servers when the servers leave no rank to train.
std::string describePsPlacement(const Job& job, int world);

// The servers' addresses, waiting for each to be published (CommError after `timeout`).
std::vector<std::string> psServerAddresses(rendezvous::Store& roundStore, int servers, std::chrono::milliseconds timeout);

}  // namespace dtrain::train
