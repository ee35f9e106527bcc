// The worker's side of the monitoring channel (lib/common/worker_metrics.h): a trainer callback that writes
// this rank's step, epoch, loss, learning rate, throughput, step-time breakdown, collective totals, checkpoint
// time and size and RSS into the shared block the agent named in DTRAIN_METRICS_SHM. The agent serves them as
// Prometheus metrics (lib/launch/metrics_hub.h).
//
// Cost: per optimizer step, ~40 relaxed atomic stores and two clock reads; /proc/self/statm is read at most once
// a second. No allocation, no syscall, no lock: it never waits for the agent.
#pragma once

#include <string>

#include "lib/common/clock.h"
#include "lib/common/worker_metrics.h"
#include "lib/train/callbacks.h"

namespace dtrain::train {

class MetricsReporter : public TrainerCallback {
 public:
  // Maps the block at `path` (throws dtrain::Error naming it when that fails).
  // Also attaches the process's flight recorder to the block (detached again by the destructor).
  MetricsReporter(const std::string& path, int rank, bool countsSamples = true);
  ~MetricsReporter() override;
  void onOptimizerStep(const StepEvent& event) override;
  void onCheckpoint(const CheckpointEvent& event) override;

 private:
  // Never unmapped: a collective on another thread may still be recording into it when the trainer ends.
  WorkerMetricsMapping* mapping_;
  Clock::time_point windowStart_;
  Clock::time_point lastRss_;
  int64_t windowSamples_ = 0;
  uint64_t samples_ = 0;
  uint64_t steps_ = 0;
  double phases_[static_cast<int>(StepPhase::kCount)] = {};
  double checkpointSeconds_ = 0;
  uint64_t checkpoints_ = 0;
};

// The reporter when DTRAIN_METRICS_SHM is set (the agent runs with --metrics-port), else nullptr. A block that
// cannot be mapped is logged as a warning and monitoring is off: it never stops training. `countsSamples`: this
// rank reports its data replica's training samples (false on the replica's other pipeline stages and tensor
// ranks, which train on the same batches: WorkerMetricsBlock::noSamples).
TrainerCallbackPtr makeMetricsReporter(int rank, bool countsSamples = true);

}  // namespace dtrain::train
