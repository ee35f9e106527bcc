// Internal to lib/train: the training loop behind runTraining (trainer.h), one object per worker process. Its
// definitions are split over trainer.cpp (the loop: steps, evaluation, checkpoints, the finish) and
// train_setup.cpp (set-up: device, process groups, data, model, optimizer, resume, sparse tables, the run's plan).
// Only those two files include this header. Not thread-safe: one thread drives a TrainLoop.
#pragma once

#include <sys/resource.h>
#include <unistd.h>

#include <csignal>
#include <fstream>
#include <cmath>
#include <limits>
#include <future>
#include <thread>

#include "lib/comm/registry.h"
#include "lib/common/clock.h"
#include "lib/common/error.h"
#include "lib/common/log.h"
#include "lib/common/timeline.h"
#include "lib/data/batch_loader.h"
#include "lib/data/sequence.h"
#include "lib/nn/device.h"
#include "lib/nn/loss.h"
#include "lib/nn/model.h"
#include "lib/train/baselines.h"
#include "lib/train/batch_lookahead.h"
#include "lib/train/check.h"
#include "lib/train/checkpointing.h"
#include "lib/train/compression.h"
#include "lib/train/compression_hooks.h"
#include "lib/train/fault.h"
#include "lib/train/generate.h"
#include "lib/train/metrics_reporter.h"
#include "lib/train/pipeline.h"
#include "lib/train/tensorboard.h"
#include "lib/train/progress.h"
#include "lib/train/ps_strategy.h"
#include "lib/common/ps_placement.h"
#include "lib/train/strategy.h"
#include "lib/train/tensor_parallel.h"
#include "lib/train/weights.h"
#include "rendezvous/prefix_store.h"
#include "rendezvous/tcp_store_client.h"
#include "lib/train/trainer.h"

namespace dtrain::train::detail {

class TrainLoop {
 public:
  // psServers > 0: this rank is a worker of the parameter-server strategy and `worker` its workers-only view
  // (lib/common/ps_placement.h); the servers publish their addresses in the round's store.
  TrainLoop(const Job& job, const WorkerInfo& worker, std::vector<TrainerCallbackPtr> extra, int psServers = 0)
      : job_(job), worker_(worker), start_(Clock::now()), extraCallbacks_(std::move(extra)), psServers_(psServers) {}
  TrainResult run();

 private:
  void setUp();    // data, group, model, optimizer, resume, sampler, plan
  void planRun();  // steps, schedule, log interval for this world
  int64_t largestBatch() const;  // the most samples one batch of this process holds (train_setup.cpp)
  ProcessGroups connect();
  void shardEpoch(int64_t epoch, int64_t startSample);  // padding or uneven shards, then sampler_->setEpoch
  // The samples every data rank together trains in the epoch's batch `index` (0-based), this rank's being `own`:
  // own x ranks, except in the uneven shards of an epoch resumed at another world, where a rank's last batch may
  // hold one sample fewer (or be empty) than rank 0's.
  int64_t groupSamplesOfBatch(int64_t index, int64_t own) const;
  void trainEpoch(int64_t epoch, int64_t startSample);
  [[noreturn]] void diverged(int64_t epoch, std::string_view what);
  // An epoch that takes no step (with data.drop_last, every rank's share is smaller than one batch: the rest of an
  // epoch resumed at a larger world): says so on rank 0, raises onEmptyEpoch with this rank's dropped samples, and
  // ends the epoch as its last step would (evaluation, the next epoch's checkpoint).
  void reportEmptyEpoch(int64_t epoch, std::span<const int64_t> dropped);
  void afterStep(int64_t epoch, int64_t position, bool epochEnd);  // log, stop, checkpoint, callbacks
  void saveCheckpoint(int64_t epoch, int64_t position);
  void evaluate(const StepStats& stats);
  // Reduces the interval's metrics over the ranks and logs them. `keepLoss`: this process's first step, logged alone
  // (the interval's steps so far are that one): its loss is the line's, and the regular interval's sums go on.
  void logInterval(StepStats& stats, bool force, bool keepLoss = false);
  void finish();   // final weights, the result over the ranks, onFinish
  void writeVocabulary();  // vocab.json beside the model, for `dtrain generate` (token datasets, rank 0)
  void setUpSparseTables();  // binds the model's sparse tables to their holder, restores them on resume
  // The rank dropout masks are drawn for: the ranks of a tensor group share masks (their replicated layers must
  // agree), so it is the world rank with the tensor coordinate taken out.
  int dropoutRank() const { return worker_.rank - strategy_->groups().coords.tensor; }
  Device workerDevice() const;  // cpu, or cuda:LOCAL_RANK after checking there are enough GPUs
  // GPU: what copies `ds`'s batches to the device (over staging_) for a BatchLookahead; null on the CPU, whose
  // layers read the loader's buffers.
  std::unique_ptr<BatchStager> stagerFor(const data::Dataset& ds);
  // Whether every value of an arena is finite, agreed over the ranks that hold other parts of the model. On a GPU
  // (DDP only, lib/train/job.cpp) every rank holds the whole, all-reduced arena: a device reduction suffices.
  bool agreeFinite(std::span<const float> values) {
    return device_.isCuda() ? nn::allFinite(values, device_) : strategy_->agreeFinite(values);
  }

  const Job& job_;
  const WorkerInfo& worker_;
  Clock::time_point start_;
  Clock::time_point trainStart_;  // the first step of this process began (the ETA's clock)
  std::shared_ptr<const data::Dataset> train_, eval_;
  std::optional<nn::Model> model_;
  std::unique_ptr<nn::Loss> loss_;
  std::vector<TrainerCallbackPtr> extraCallbacks_;
  CallbackList callbacks_;              // progress, test aids, then the caller's; see callbacks.h
  std::shared_ptr<Progress> progress_;  // also in callbacks_; set-up lines go to it directly
  // interval accounting for progress lines
  double intervalLoss_ = 0;
  int64_t intervalBatches_ = 0;
  // The regular interval's loss before the checkpoint this run resumed from (over every rank: IntervalLoss), added
  // to the first regular line's so that it covers the same steps as in an uninterrupted run.
  double carriedLoss_ = 0;
  int64_t carriedBatches_ = 0;
  int64_t intervalSamples_ = 0;
  // Micro-batches since the last line, empty ones included (a rank whose uneven share ran out): every rank takes the
  // same ones, so whether to reduce the interval's metrics (a collective) is decided alike everywhere.
  int64_t intervalSteps_ = 0;
  int64_t epochShare_ = 0;  // a rank's samples in a whole epoch at this world (planRun), for the start-up line
  Clock::time_point intervalStart_;
  double checkpointSecInEpoch_ = 0;  // saves during the current epoch: not training time
  std::unique_ptr<nn::Optimizer> optimizer_;
  CommHookPtr commHook_;                // DDP's (null alone); its traffic goes to metrics.jsonl
  std::shared_ptr<CompressionHook> localAdamHook_;  // commHook_ with top-k's local_adam: it says when the optimizer
                                                    // takes an update rather than a gradient
  HookTraffic loggedTraffic_;           // commHook_'s counts at the last progress interval
  std::unique_ptr<Strategy> strategy_;
  // The model's sparse embedding tables: the strategy's (the parameter servers) or localSparse_ (one process).
  SparseTables* sparse_ = nullptr;
  std::unique_ptr<LocalSparseTables> localSparse_;
  PipelineStrategy* pipeline_ = nullptr;  // strategy_ when it is one: it runs forward/backward for the loop
  bool countsMetrics_ = true;             // this rank's losses and samples count (a pipeline's last stage,
                                          // tensor rank 0)
  bool tensorParallel_ = false;           // the model is split over a tensor group
  std::unique_ptr<Checkpointer> checkpointer_;  // uses strategy_
  std::unique_ptr<data::DistributedSampler> sampler_;
  int epochWorld_ = 0;  // the world whose padding the current epoch follows; 0: uneven (resized mid-epoch)
  nn::Schedule schedule_;
  std::optional<ResumePoint> resumed_;
  StepStats stats_;
  int64_t step_ = 0;  // optimizer steps done
  bool stop_ = false;
  int64_t logEvery_ = 1;
  int64_t stopCheckEvery_ = 1;
  bool hasDropout_ = false;
  bool stepLossFinite_ = true;  // every micro-batch loss of the current step on this rank was finite
  int64_t skippedSteps_ = 0;    // train.on_nonfinite = skip
  int64_t skippedInARow_ = 0;   // ... consecutive, bounded by train.max_skipped_steps
  TrainResult result_;
  bool prefetch_ = true;
  int psServers_ = 0;
  rendezvous::StorePtr roundStore_;  // this round's keys (parameter-server addresses); null alone
  Device device_;                       // where the model, loss and optimizer compute
  nn::BatchStaging staging_;             // GPU: batches to the device (int32 labels or float targets)
  int64_t maxBatch_ = 1;                 // largestBatch(): what the model, loss and staging are sized for
};

}  // namespace dtrain::train::detail
