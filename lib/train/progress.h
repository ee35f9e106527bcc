// What rank 0 shows and records while training: a progress line (one updating line on a terminal, periodic
// lines otherwise), metrics.jsonl (one JSON object per line: step, epoch, loss, lr, samples_per_s, and on
// evaluation lines eval_loss and eval_accuracy), and the final summary. Other ranks keep quiet.
#pragma once

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>

#include "lib/common/clock.h"

namespace dtrain::train {

struct StepStats {
  int64_t step = 0;         // optimizer steps done
  int64_t totalSteps = 0;
  int64_t epoch = 0;        // 0-based
  int64_t epochs = 0;
  int64_t stepInEpoch = 0;
  int64_t stepsPerEpoch = 0;
  double loss = 0;          // mean training loss over the interval, all ranks
  double lr = 0;
  double samplesPerSec = 0; // all ranks, over the interval
  double elapsedSec = 0;    // since training started
};

class Progress {
 public:
  // Only `enabled` (rank 0) prints and writes; metricsPath empty: no file.
  Progress(bool enabled, const std::filesystem::path& metricsPath, bool append);
  ~Progress();

  void step(const StepStats& s);
  void eval(const StepStats& s, double evalLoss, std::optional<double> evalAccuracy, int64_t samples);
  void info(const std::string& line);  // a plain line (ends an updating line first)
  void summary(const std::string& line);
  // The last metrics line ("final": true): training throughput, times and the peak RSS over the ranks.
  void final(const StepStats& s, double trainSamplesPerSec, double trainSec, double wallSec, double peakRssMb);

 private:
  void endLine();
  bool enabled_;
  bool tty_;
  bool lineOpen_ = false;
  std::FILE* metrics_ = nullptr;
};

std::string formatDuration(double seconds);  // "1:02:03" / "2:03"
double wallTime();                           // Unix time in seconds (metrics' wall_time)

}  // namespace dtrain::train
