// What rank 0 shows and records while training: a progress line (one updating line on a terminal, periodic
// lines otherwise), metrics.jsonl (one JSON object per line: step, epoch, loss, lr, samples_per_s, and on
// evaluation lines eval_loss and eval_accuracy), and the final summary. Other ranks keep quiet.
// The loop reaches it as a TrainerCallback (onLog, onEval, onFinish); the trainer's set-up lines go to info().
#pragma once

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>

#include "lib/common/clock.h"
#include "lib/train/callbacks.h"

namespace dtrain::train {

class Progress final : public TrainerCallback {
 public:
  // Only `enabled` (rank 0) prints and writes; metricsPath empty: no file. `weightsPath`: where the run writes
  // its final weights (named in the summary line).
  Progress(bool enabled, const std::filesystem::path& metricsPath, bool append, std::filesystem::path weightsPath = {});
  ~Progress() override;

  void onLog(const StepStats& s) override { step(s); }
  void onEval(const StepStats& s, const EvalResult& e) override {
    eval(s, e.loss, e.accuracy, e.samples, e.auc, e.baselineAuc);
  }
  // The summary line ("done: ...") and the final metrics line.
  void onFinish(const StepStats& s, const TrainResult& r) override;

  void step(const StepStats& s);
  void eval(const StepStats& s, double evalLoss, std::optional<double> evalAccuracy, int64_t samples,
            std::optional<double> auc = {}, std::optional<double> baselineAuc = {});
  void info(const std::string& line);  // a plain line (ends an updating line first)
  void summary(const std::string& line);
  // The last metrics line ("final": true): training throughput, times, the peak RSS over the ranks, and on GPUs
  // (peakGpuMb set) the peak device memory the ranks' buffers held (MiB, the largest rank's); async/ssp parameter
  // servers add samples_by_worker, steps_by_worker, lost_workers and partial_steps_by_worker (per worker null or
  // {"step","partitions_applied","partitions","samples"}: a step the servers applied in part) (TrainResult::workerSamples).
  void final(const StepStats& s, const TrainResult& r);

 private:
  void endLine();
  bool enabled_;
  bool tty_;
  bool lineOpen_ = false;
  std::FILE* metrics_ = nullptr;
  std::filesystem::path weightsPath_;
};

std::string formatDuration(double seconds);  // "1:02:03" / "2:03"
// The progress line's ETA in seconds: the time per step this process has taken since its first step (set-up
// excluded) times the steps left to `totalSteps`; -1 (printed "?") before this process finished a step.
double etaSeconds(const StepStats& s);
double wallTime();                           // Unix time in seconds (metrics' wall_time)

}  // namespace dtrain::train
