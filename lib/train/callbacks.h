// Trainer callbacks: what runs at the loop's boundaries without being part of training (progress lines and
// metrics.jsonl, the DTRAIN_SAMPLE_LOG and DTRAIN_FAULT test aids, and whatever monitoring comes next).
// They are registered once at set-up; the loop calls the list at fixed points and knows nothing of what they do
// (Keras' and PyTorch Lightning's Callback, cut down to the events dtrain has).
//
// Events, in the order the loop raises them:
//   onBatch           a micro-batch was drawn and its loss computed (every micro-batch; before its backward; on a
//                     GPU its features/labels point to device memory, batch_lookahead.h)
//   onEmptyEpoch      an epoch that takes no step on any rank: with data.drop_last every rank's share of it is smaller
//                     than one batch (the rest of an epoch resumed at a larger world); raised instead of its batches
//   onOptimizerStep   right after an optimizer step, before the trainer logs, agrees on a stop or checkpoints
//                     (so what a callback records of the step is durable before a checkpoint can cover it)
//   onLog             a progress interval, reduced over the ranks (all ranks; values are the group's)
//   onCheckpoint      a checkpoint was committed (every rank, at the step it covers)
//   onStepEnd         after everything the trainer does at a step boundary, checkpoint included
//   onEval            an evaluation ended (all ranks; values reduced over the group)
//   onFinish          once, after the final weights were written and the result reduced over the ranks
// Every rank raises every event; a callback that only rank 0 should act on checks the rank itself (Progress).
// Threading: all on the trainer's thread. Callbacks may throw (dtrain::Error ends the run with its exit code)
// and must not allocate per batch when they are registered unconditionally (the loop is allocation-free).
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <vector>

#include "lib/data/batch_loader.h"

namespace dtrain::train {

struct StepStats {
  int64_t step = 0;         // optimizer steps done
  int64_t totalSteps = 0;
  int64_t startStep = 0;    // the step this process began at: the checkpoint it resumed from (0 on a fresh run)
  int64_t epoch = 0;        // 0-based
  int64_t epochs = 0;
  int64_t stepInEpoch = 0;
  int64_t stepsPerEpoch = 0;
  double loss = 0;          // mean training loss over the interval, all ranks
  double lr = 0;
  double samplesPerSec = 0; // all ranks, over the interval (checkpoint saves and evaluations excluded)
  double elapsedSec = 0;    // since the trainer started (set-up included: data loading, connecting, resuming)
  double trainSec = 0;      // since this process's first step began (set-up excluded; evaluations included)
  // Data-parallel gradient traffic over the interval (CommHook::traffic; unset alone): bytes this rank sent
  // per optimizer step, and the float32 all-reduce's bytes over those (1 without compression).
  std::optional<double> commBytesPerStep;
  std::optional<double> compressionRatio;
  // L2 norm of the gradients of the interval's last step, after reduction (and clipping); set only when
  // something reads it ("logging": {"tensorboard": true}), since it costs a pass over the gradients.
  std::optional<double> gradNorm;
  // Parameter server, async/ssp (docs/parameter_server.md): over the interval's pushes, how many steps this rank
  // was ahead of the slowest worker (min, mean, max); unset for other strategies.
  std::optional<double> stalenessMin, stalenessMean, stalenessMax;
  // Parameter server: payload + header bytes this rank sent to and received from the servers per step.
  std::optional<double> psBytesPerStep;
};

struct EvalResult {
  double loss = 0;                  // mean over the evaluation set, all ranks
  std::optional<double> accuracy;   // when the loss has one
  int64_t samples = 0;              // evaluated, all ranks
  std::optional<double> auc;        // bce_with_logits: ROC AUC over the evaluation set (nn::aucFromHistogram)
  std::optional<double> baselineAuc;  // the popularity baseline's AUC on the same set, when the data has one
};

// One worker of an async/ssp parameter-server job as the servers saw it (on worker 0: every server's tally of the
// pushes it applied, merged by ps_protocol.h's mergeTallies): its training samples and steps in this run that every
// server applied whole, the next step if the servers applied it in part, and whether it is still there.
struct WorkerSamples {
  enum class State { kLive, kFinished, kLost, kAbsent };  // kLost: left without saying bye; kAbsent: never came
  int64_t samples = 0;  // of the steps every server applied whole
  int64_t steps = 0;
  int64_t partitions = 0;         // a step's dense partitions over every server
  int64_t partialPartitions = 0;  // of step steps + 1: the partitions the servers applied, when not all (0: none)
  int64_t partialSamples = 0;     // that step's samples, not in `samples`
  State state = State::kLive;
};

struct TrainResult {
  int64_t steps = 0;
  int64_t samples = 0;  // all ranks (ownSamples: data rank 0's)
  bool ownSamples = false;  // samples and samplesPerSec are data rank 0's alone (Strategy::evaluatesAlone())
  // Async/ssp parameter servers: every worker's applied samples by worker rank (Strategy::workerSamples()), as of
  // the last barrier (the end, or the checkpoint of a stop); empty for every other strategy.
  std::vector<WorkerSamples> workerSamples;
  double wallSec = 0;
  double trainSec = 0;  // time in the training loop (evaluation and checkpoint saves excluded)
  double peakRssMb = 0; // largest peak resident set size over the ranks
  // "device": "cuda": the largest rank's peak of device memory held by its buffers (nn::peakDeviceBytes, MiB)
  std::optional<double> peakGpuMb;
  double samplesPerSec = 0;  // training samples per second over the group
  std::optional<double> evalLoss;
  std::optional<double> evalAccuracy;
  std::optional<double> baselineLoss;  // token datasets: the bigram baseline's eval loss on the same split
  std::optional<double> evalAuc;       // bce_with_logits
  std::optional<double> baselineAuc;   // recsys data: the popularity baseline's AUC on the eval set
  int stoppedBySignal = 0;  // SIGTERM/SIGINT/SIGUSR1 stopped the run early (after a checkpoint)
  std::filesystem::path checkpoint;  // rank 0: the last checkpoint this process committed (empty: none)
};

// Where this rank's time went during one optimizer step (all its micro-batches), in seconds: waiting for the
// data loader, forward + loss, backward (with the overlapped gradient communication it issues), waiting for the
// communication still in flight after the backward (Strategy::finishStep), and the optimizer update.
struct StepTimes {
  double data = 0;
  double forward = 0;
  double backward = 0;
  double commWait = 0;
  double optimizer = 0;
};

struct StepEvent {
  int64_t epoch = 0;  // 0-based
  int64_t step = 0;   // optimizer steps done, this one included
  // This rank's view of the step (monitoring): its own loss and samples, not the group's.
  double loss = 0;      // mean over the step's micro-batches
  bool hasLoss = true;  // false on a pipeline stage before the last: it computes no loss (`loss` is 0)
  double lr = 0;        // the learning rate the update used
  int64_t samples = 0;  // training samples of the step
  StepTimes times;
};

// A checkpoint this rank took part in was committed.
struct CheckpointEvent {
  int64_t step = 0;
  double seconds = 0;  // this rank's wall time in the save, commit included
  uint64_t bytes = 0;  // size of the committed checkpoint directory (0 when this rank cannot see it)
};

class TrainerCallback {
 public:
  virtual ~TrainerCallback() = default;
  virtual void onBatch(const data::Batch& /*batch*/) {}
  // `epoch` 0-based; `step`: optimizer steps done (none in this epoch); `dropped`: this rank's samples of the epoch
  // that drop_last left out (BatchLoader::dropped).
  virtual void onEmptyEpoch(int64_t /*epoch*/, int64_t /*step*/, std::span<const int64_t> /*dropped*/) {}
  virtual void onOptimizerStep(const StepEvent& /*event*/) {}
  virtual void onLog(const StepStats& /*stats*/) {}
  virtual void onCheckpoint(const CheckpointEvent& /*event*/) {}
  virtual void onStepEnd(const StepEvent& /*event*/) {}
  virtual void onEval(const StepStats& /*stats*/, const EvalResult& /*eval*/) {}
  virtual void onFinish(const StepStats& /*stats*/, const TrainResult& /*result*/) {}
};
using TrainerCallbackPtr = std::shared_ptr<TrainerCallback>;

// The registered callbacks, called in registration order.
class CallbackList {
 public:
  void add(TrainerCallbackPtr callback) { list_.push_back(std::move(callback)); }
  size_t size() const { return list_.size(); }

  void batch(const data::Batch& b) const {
    for (const auto& c : list_) c->onBatch(b);
  }
  void emptyEpoch(int64_t epoch, int64_t step, std::span<const int64_t> dropped) const {
    for (const auto& c : list_) c->onEmptyEpoch(epoch, step, dropped);
  }
  void optimizerStep(const StepEvent& e) const {
    for (const auto& c : list_) c->onOptimizerStep(e);
  }
  void log(const StepStats& s) const {
    for (const auto& c : list_) c->onLog(s);
  }
  void checkpoint(const CheckpointEvent& e) const {
    for (const auto& c : list_) c->onCheckpoint(e);
  }
  void stepEnd(const StepEvent& e) const {
    for (const auto& c : list_) c->onStepEnd(e);
  }
  void eval(const StepStats& s, const EvalResult& r) const {
    for (const auto& c : list_) c->onEval(s, r);
  }
  void finish(const StepStats& s, const TrainResult& r) const {
    for (const auto& c : list_) c->onFinish(s, r);
  }

 private:
  std::vector<TrainerCallbackPtr> list_;
};

}  // namespace dtrain::train
