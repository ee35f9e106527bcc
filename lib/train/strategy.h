// How ranks cooperate on one model: the trainer loop talks to a Strategy and never to a Backend directly.
//
// The loop, per run and per optimizer step:
//   strategy->prepare(model);                          // after resume: replicas/stages start consistent
//   for each step:
//     for each micro-batch: forward, loss,
//       model.backward(..., last micro-batch ? strategy->gradReadyHook() : {});
//     strategy->finishStep();                          // gradients ready for the optimizer
//     optimizer.step(params, grads);
//   strategy->reduceMetrics(...), agreeOnStop(...), barrier() at log/eval/checkpoint boundaries.
// A checkpoint is layout-free (DESIGN.md): names are the full model's, and checkpointShard() says which named
// buffers this rank loads and which it writes, so every layout writes the same files.
//
// Strategies: LocalStrategy (one process: nothing to communicate) and DdpStrategy (lib/train/ddp.h: replicas,
// bucketed gradient averaging through a communication hook). makeStrategy() picks one from the job's
// `parallel.strategy` ("ddp"; job_parallel.cpp rejects names that have no strategy yet) and the world size.
//
// ProcessGroups: the communicators a strategy may talk in. The trainer creates them with makeProcessGroups (one
// Backend per group, Backend::newGroup for sub-groups) from the rank grid of lib/train/layout.h: without model
// parallelism the data group is the world; with it every rank gets its data, pipeline and tensor groups and the
// point-to-point communicators to its pipeline neighbours.
// Threading: one thread (the trainer's) drives a strategy; every collective method blocks until done and must be
// called by every rank of the group in the same order (the Backend contract). Errors: CommError from the groups.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "lib/comm/backend.h"
#include "lib/nn/model.h"
#include "lib/nn/optimizer.h"
#include "lib/train/callbacks.h"
#include "lib/train/comm_hook.h"
#include "lib/train/job.h"
#include "lib/train/layout.h"
#include "rendezvous/store.h"

namespace dtrain::train {

class SparseTables;  // lib/train/sparse_tables.h

struct ProcessGroups {
  int rank = 0;       // in the world
  int worldSize = 1;
  int dataRank = 0;   // among the ranks that split the data (the sampler's rank): coords.data
  int dataSize = 1;   // layout.data
  LayoutDims layout;  // the grid (data = world without model parallelism)
  RankCoords coords;  // this rank's place in it
  comm::BackendPtr world;     // every rank; null when worldSize == 1 (nobody to talk to)
  comm::BackendPtr data;      // the replicas of this rank's (stage, tensor) shard, group rank = coords.data
                              // (== world without model parallelism; null when layout.data == 1)
  comm::BackendPtr pipeline;  // the stages of this replica, group rank = coords.stage (null when 1 stage)
  comm::BackendPtr tensor;    // the tensor shards of this stage, group rank = coords.tensor (null when tensor 1)
  // Pipeline neighbours: 2-rank communicators (group rank 0 = the lower stage), one per direction, so that a
  // send never waits on the same communication thread behind a receive (Backend runs a communicator's async
  // operations strictly in order). Null at the ends of the pipeline.
  comm::BackendPtr actPrev;   // activations from stage - 1 (this rank receives; the peer is group rank 0)
  comm::BackendPtr actNext;   // activations to stage + 1 (this rank sends; the peer is group rank 1)
  comm::BackendPtr gradNext;  // gradients from stage + 1 (receives; peer 1)
  comm::BackendPtr gradPrev;  // gradients to stage - 1 (sends; peer 0)
  comm::BackendPtr ends;      // first and last stage of this replica (group rank 0 / 1): a tied embedding and
                              // lm_head sum their gradients here; null unless stages > 1 and this rank is one end
};

// The groups of `rank` in `layout` over `world` (null when the world is one rank). Collective over the world:
// every rank calls it once, in the same order relative to its other newGroup calls (it makes every group of the
// grid, in one fixed order). Blocks until each group this rank belongs to has connected (the backend's timeout).
ProcessGroups makeProcessGroups(const LayoutDims& layout, int rank, comm::BackendPtr world);

// What a rank reads from and writes to a checkpoint, as indices into Model::paramTable() (full-model names).
// Optimizer state is per element of the parameter arena, stored under the optimizer's buffer names.
struct CheckpointShard {
  std::vector<size_t> loadParams;  // parameters this rank holds and restores on resume
  bool loadOptimizer = false;      // restores the optimizer's state buffers
  bool saveModel = false;          // writes model.safetensors, holding saveParams
  std::vector<size_t> saveParams;
  bool saveOptimizer = false;      // writes optimizer.safetensors (the whole state arena)
  // Empty: the unsharded files above (one process, DDP). Else this rank writes its pieces as
  // model-<shardTag>.safetensors and optimizer-<shardTag>.safetensors (saveParams and their optimizer state,
  // per parameter, slices described: lib/ckpt/sharded.h); shardTag is "p<stage>-t<tensor>", unique per writer.
  std::string shardTag;
  // Whether the commit waits for every rank's rank-<r>.json; false: rank 0's only (async parameter-server workers,
  // of which some may have left the job, lib/train/ps_strategy.h).
  bool everyRankFile = true;
};

class Strategy {
 public:
  virtual ~Strategy() = default;
  virtual std::string name() const = 0;     // "local", "ddp"
  // For the start-up line: "tcp backend"; empty when there is nothing to say.
  virtual std::string summary() const = 0;
  const ProcessGroups& groups() const { return groups_; }

  // Collective. Makes the ranks' models consistent after they were built and resumed (DDP: rank 0's parameters
  // for everyone) and sets up per-model state (buckets). `model` must outlive the strategy's use of it.
  virtual void prepare(nn::Model& model) = 0;
  // The callback for Model::backward on the micro-batch that ends an optimizer step (it refers to the
  // strategy); empty when the strategy does nothing during backward.
  virtual nn::LayerGradReady gradReadyHook() = 0;
  // Blocks until the step's gradient communication is done: grads() then holds what the optimizer uses.
  virtual void finishStep() = 0;

  // Collective over the world: `values` reduced in place (kSum or kMax) over the ranks; every rank gets the
  // result. Used for training/eval metrics and sample counts.
  virtual void reduceMetrics(std::span<double> values, comm::ReduceOp op) = 0;
  // Collective over the world: the largest stop signal any rank caught (0: none), so all stop at the same step.
  virtual int agreeOnStop(int localSignal) = 0;
  // Steps between agreeOnStop calls: agreeing costs a collective in a group, nothing alone.
  virtual int64_t stopCheckEvery() const = 0;
  // Collective over the world: returns when every rank called it (checkpoint commit protocol).
  virtual void barrier() = 0;
  // This rank's part of a checkpoint; the union over the ranks writes every buffer exactly once.
  virtual CheckpointShard checkpointShard(const nn::Model& model) const = 0;
  // Whether `values` (this rank's gradients or weights after finishStep/the update) are finite on every rank that
  // holds a part of the model: every rank gets the same answer, so all stop (or skip) at the same step. Replicas
  // are identical, so the default checks locally; model parallelism agrees over the world (a collective).
  virtual bool agreeFinite(std::span<const float> values) { return nn::allFinite(values); }
  // The global L2 norm of the model's gradients (the whole model's, each parameter once), for clipping and
  // logging; the default is the local arena's (on the model's device). Collective under model parallelism.
  virtual double gradNorm(const nn::Model& model) { return nn::gradNorm(model.grads(), model.device()); }

  // --- for strategies whose parameters are updated elsewhere (the parameter server, lib/train/ps_strategy.h);
  // the defaults do nothing, so DDP and local training are unchanged. ---
  // True when finishStep() already leaves the updated parameters in params(): the trainer then skips its own
  // optimizer step (its optimizer only holds the state that checkpoints save, see syncForSave).
  virtual bool updatesParameters() const { return false; }
  // Called with the trainer's optimizer (its state is what a resumed run starts from) and the step training
  // starts at, after resume and before prepare().
  virtual void bindOptimizer(nn::Optimizer& /*optimizer*/, int64_t /*startStep*/) {}
  // Called before the first micro-batch of optimizer step `step` (0-based) with that step's learning rate.
  virtual void beginStep(int64_t /*step*/, double /*lr*/) {}
  // Called with each micro-batch's training samples after its forward and before its backward (the
  // parameter server sends a step's count with its last push).
  virtual void countSamples(int64_t /*samples*/) {}
  // Async/ssp parameter servers: the samples and steps each worker trained as the servers applied them, by
  // worker rank, as of the last barrier (TrainResult::workerSamples); empty for every other strategy.
  virtual std::vector<WorkerSamples> workerSamples() const { return {}; }
  // Called before a checkpoint or the final weights are written: brings the current parameters and optimizer
  // state into the trainer's arenas on the ranks that write them (checkpointShard).
  virtual void syncForSave() {}
  // Adds the strategy's own figures for the last log interval (e.g. staleness) to the stats a log line reports.
  virtual void fillStats(StepStats& /*stats*/) {}
  // Called once when training ended normally, before the final metrics reduction.
  virtual void finishRun() {}
  // The holder of the model's sparse embedding tables when the strategy keeps them elsewhere (the parameter
  // servers), valid after prepare(); null: the trainer keeps them in this process (LocalSparseTables).
  virtual SparseTables* sparseTables() { return nullptr; }
  // True when reduceMetrics() does not reduce (async/ssp parameter servers: the workers do not wait for each other
  // at log lines): then data rank 0 evaluates the whole evaluation set alone and the other ranks skip evaluation,
  // so the figures cover the set rather than one rank's shard of it, and the final line counts data rank 0's own
  // samples (TrainResult::ownSamples). False: every rank evaluates its shard.
  virtual bool evaluatesAlone() const { return false; }

 protected:
  explicit Strategy(ProcessGroups groups) : groups_(std::move(groups)) {}
  ProcessGroups groups_;
};

// One process, nothing to communicate: every collective is the identity, the rank writes the whole checkpoint.
class LocalStrategy final : public Strategy {
 public:
  LocalStrategy() : Strategy(ProcessGroups{}) {}
  std::string name() const override { return "local"; }
  std::string summary() const override { return ""; }
  void prepare(nn::Model&) override {}
  nn::LayerGradReady gradReadyHook() override { return {}; }
  void finishStep() override {}
  void reduceMetrics(std::span<double>, comm::ReduceOp) override {}
  int agreeOnStop(int localSignal) override { return localSignal; }
  int64_t stopCheckEvery() const override { return 1; }
  void barrier() override {}
  CheckpointShard checkpointShard(const nn::Model& model) const override;
};

// The strategies' knobs that do not come from the job file.
struct StrategyOptions {
  bool overlapDefault = true;  // DDP overlap when parallel.overlap is unset (a core is free for communication)
  CommHookPtr commHook;        // DDP's hook; null: AllreduceAvgHook
  // parameter_server: the round's store (where servers publish their addresses) and this worker's view.
  rendezvous::StorePtr roundStore;
};

// LocalStrategy when the world has one rank; PipelineStrategy (lib/train/pipeline.h) when the layout has pipeline
// stages; else the job's parallel.strategy over `groups`. `job` must outlive the strategy.
std::unique_ptr<Strategy> makeStrategy(const Job& job, ProcessGroups groups, const StrategyOptions& options = {});

// Every parameter of the model (indices into paramTable()), in table order.
std::vector<size_t> allParams(const nn::Model& model);

}  // namespace dtrain::train
