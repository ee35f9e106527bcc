// Testing aids, documented for users who want to rehearse failures (docs/fault-tolerance.md):
//
// DTRAIN_FAULT="rank=1,step=50,action=kill[,attempt=0][,code=3]"
//   makes rank `rank` misbehave right after optimizer step `step` completes, in launcher attempt `attempt`
//   (DTRAIN_RESTART_COUNT, default 0, so a restarted group does not fail again): `kill` SIGKILLs itself,
//   `exit` ends with exit code `code` (default 1), `hang` stops making progress (ignoring SIGTERM) so that the
//   peers' collective timeout and the agent's SIGKILL must deal with it, `throw` raises an exception that is not
//   a dtrain::Error (a bug: "internal error", exit 1), `slow` (with ms=M) makes every step from `step` on M
//   milliseconds longer (a straggler, for the parameter server's sync/ssp/async comparison). Several faults:
//   separate with ';'. `role=server` aims at parameter server `rank` instead, which SIGKILLs itself (action=kill)
//   after serving its `step`-th push. `kill_mid_step` (parameter-server jobs, async/ssp) SIGKILLs worker `rank`
//   inside its step `step` + 1: once the servers answered the step's first push (its last partition, on server
//   (partitions - 1) % servers), before it sends the others, so that step is applied in part (one partition of
//   several) for certain (lib/train/ps_strategy.cpp; with a single partition the whole step is applied).
// DTRAIN_SAMPLE_LOG=DIR
//   every rank appends (under model parallelism one rank per data replica, see addTestAids), per optimizer step,
//   the sample indices it trained on to
//   DIR/samples-a<attempt>-r<rank>.jsonl ({"attempt","round","rank","world","epoch","step","t","idx"}, and "steps": 0
//   on the line of an epoch that took no step (SampleLog::onEmptyEpoch); t: Unix
//   seconds; world: every rank of the launch, parameter servers included), flushed per line: proof that an
//   elastic resize neither skips nor repeats samples.
// DTRAIN_STEP_PAUSE=DURATION ("20ms")
//   every rank sleeps this long after each optimizer step: a slower step, so that a rehearsal (`dtrain sim`, the
//   tests) gives faults and joins time to land whatever the machine's speed.
// They are trainer callbacks (lib/train/callbacks.h), registered by addTestAids only when their variable is set,
// so an ordinary run calls neither.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <span>
#include <string>
#include <vector>

#include "lib/train/callbacks.h"

namespace dtrain::train {

struct Fault {
  int rank = 0;
  int64_t step = 0;
  std::string action;  // kill | exit | hang | throw | slow | kill_mid_step
  int attempt = 0;
  int code = 1;
  int ms = 0;          // slow: added to every step from `step` on
  // "worker" (the trainer's ranks; with the parameter server, `rank` is the worker index) or "server": parameter
  // server `rank` kills itself after its `step`-th push (only action=kill; lib/train/ps_strategy.cpp).
  std::string role = "worker";
};

// Parses DTRAIN_FAULT (empty: no faults); UsageError naming the variable on bad syntax.
std::vector<Fault> parseFaults(const std::string& text);

class FaultInjector final : public TrainerCallback {
 public:
  FaultInjector(int rank, int attempt);  // reads DTRAIN_FAULT
  bool enabled() const { return !faults_.empty(); }
  // Called after each optimizer step. Does not return when a fault fires (kill/hang) or throws (exit).
  void afterStep(int64_t step) const;
  // After the step's checkpoint (if any), so a fault at a checkpoint step leaves that checkpoint behind.
  void onStepEnd(const StepEvent& e) override { afterStep(e.step); }

 private:
  std::vector<Fault> faults_;
  int rank_;
  int attempt_;
};

class SampleLog final : public TrainerCallback {
 public:
  SampleLog(int rank, int worldSize, int attempt, int round);  // reads DTRAIN_SAMPLE_LOG
  ~SampleLog() override;
  bool enabled() const { return file_ != nullptr; }
  // The last `padding` of `indices` are the sampler's padding (repeats of the epoch's first samples): logged apart,
  // as "pad", so that `dtrain sim` does not count PyTorch's padding as repeated samples. `dropped`: the samples
  // drop_last leaves out of the epoch (Batch::dropped, on its last batch), logged as "drop", so that `dtrain sim`
  // does not count them as skipped.
  void add(std::span<const int64_t> indices, int64_t padding = 0, std::span<const int64_t> dropped = {});
  void commitStep(int64_t epoch, int64_t step);  // writes the indices added since the last step

  void onBatch(const data::Batch& b) override { add(b.indices, b.padding, b.dropped); }
  // An epoch without a step: one line with no indices, its dropped samples and "steps": 0, so that `dtrain sim`
  // counts them as dropped (not skipped) and does not take the line for a step.
  void onEmptyEpoch(int64_t epoch, int64_t step, std::span<const int64_t> dropped) override;
  // Before the step can be checkpointed: a checkpoint never covers a step missing from the log.
  void onOptimizerStep(const StepEvent& e) override { commitStep(e.epoch, e.step); }

 private:
  std::FILE* file_ = nullptr;
  int rank_, world_, attempt_, round_;
  std::vector<int64_t> pending_, pendingPadding_, pendingDropped_;
};

class StepPause final : public TrainerCallback {
 public:
  StepPause();  // reads DTRAIN_STEP_PAUSE; UsageError naming it on a bad duration
  bool enabled() const { return pause_.count() > 0; }
  void onStepEnd(const StepEvent&) override;

 private:
  std::chrono::milliseconds pause_{0};
};

// Registers the SampleLog, the StepPause and the FaultInjector when DTRAIN_SAMPLE_LOG / DTRAIN_FAULT ask for them.
// `logsSamples`: this rank writes the sample log. Under model parallelism only one rank of each data replica does
// (stage 0, tensor rank 0): its other stages and tensor ranks train on the same batches, and logging them too made
// every sample look repeated (dtrain sim failed every pipeline job).
void addTestAids(CallbackList& callbacks, int rank, int worldSize, int attempt, int round, bool logsSamples = true);

}  // namespace dtrain::train
