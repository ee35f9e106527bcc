#include "lib/train/progress.h"

#include <unistd.h>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "lib/common/error.h"

namespace dtrain::train {

double wallTime() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string formatDuration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  auto s = static_cast<int64_t>(seconds + 0.5);
  if (s >= 3600) return fmt::format("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60);
  return fmt::format("{}:{:02}", s / 60, s % 60);
}

Progress::Progress(bool enabled, const std::filesystem::path& metricsPath, bool append,
                   std::filesystem::path weightsPath)
    : enabled_(enabled), tty_(enabled && ::isatty(STDOUT_FILENO) == 1), weightsPath_(std::move(weightsPath)) {
  if (!enabled_ || metricsPath.empty()) return;
  std::error_code ec;
  std::filesystem::create_directories(metricsPath.parent_path(), ec);
  metrics_ = std::fopen(metricsPath.c_str(), append ? "a" : "w");
  DTRAIN_CHECK(metrics_ != nullptr, "cannot write {}: {}", metricsPath.string(), std::strerror(errno));
}

Progress::~Progress() {
  endLine();
  if (metrics_) std::fclose(metrics_);
}

void Progress::endLine() {
  if (lineOpen_) {
    std::fputc('\n', stdout);
    std::fflush(stdout);
    lineOpen_ = false;
  }
}

double etaSeconds(const StepStats& s) {
  // The steps this process took, over the time since its first step began: neither the set-up (data loading, the
  // rendezvous) nor the steps a resumed run inherited from its checkpoint count. Both did: the first line of a 4 s
  // run said "ETA 7:49" (one step over the start-up's 1 s), and a run resumed at step 469 of 938 said "ETA 0:00"
  // for its 469 steps left.
  const int64_t done = s.step - s.startStep;
  if (done <= 0 || s.trainSec <= 0) return -1;
  return s.trainSec / static_cast<double>(done) * static_cast<double>(std::max<int64_t>(0, s.totalSteps - s.step));
}

void Progress::step(const StepStats& s) {
  if (!enabled_) return;
  const double remaining = etaSeconds(s);
  std::string line = fmt::format("epoch {}/{} step {}/{} loss {:.4f} lr {:.4g} {:.0f} samples/s ETA {}", s.epoch + 1,
                                 s.epochs, s.stepInEpoch, s.stepsPerEpoch, s.loss, s.lr, s.samplesPerSec,
                                 formatDuration(remaining));
  if (tty_) {
    fmt::print("\r\033[K{}", line);
    lineOpen_ = true;
  } else {
    fmt::print("{}\n", line);
  }
  std::fflush(stdout);
  if (metrics_) {
    nlohmann::json j{{"step", s.step}, {"epoch", s.epoch}, {"loss", s.loss}, {"lr", s.lr},
                     {"samples_per_s", s.samplesPerSec}, {"time_s", s.elapsedSec}, {"wall_time", wallTime()}};
    if (s.commBytesPerStep) j["comm_bytes_per_step"] = *s.commBytesPerStep;
    if (s.compressionRatio) j["compression_ratio"] = *s.compressionRatio;
    if (s.stalenessMax) j["staleness"] = {{"min", *s.stalenessMin}, {"mean", *s.stalenessMean}, {"max", *s.stalenessMax}};
    if (s.psBytesPerStep) j["ps_bytes_per_step"] = *s.psBytesPerStep;
    fmt::print(metrics_, "{}\n", j.dump());
    std::fflush(metrics_);
  }
}

void Progress::eval(const StepStats& s, double evalLoss, std::optional<double> evalAccuracy, int64_t samples,
                    std::optional<double> auc, std::optional<double> baselineAuc) {
  if (!enabled_) return;
  endLine();
  if (auc)
    fmt::print("epoch {}/{} eval: loss {:.4f} accuracy {:.2f}% AUC {:.4f}{} ({} samples)\n", s.epoch + 1, s.epochs,
               evalLoss, evalAccuracy.value_or(0) * 100, *auc,
               baselineAuc ? fmt::format(" (popularity baseline AUC {:.4f})", *baselineAuc) : "", samples);
  else if (evalAccuracy)
    fmt::print("epoch {}/{} eval: loss {:.4f} accuracy {:.2f}% ({} samples)\n", s.epoch + 1, s.epochs, evalLoss,
               *evalAccuracy * 100, samples);
  else
    fmt::print("epoch {}/{} eval: loss {:.6f} ({} samples)\n", s.epoch + 1, s.epochs, evalLoss, samples);
  std::fflush(stdout);
  if (metrics_) {
    nlohmann::json j{{"step", s.step}, {"epoch", s.epoch},         {"loss", s.loss},
                     {"lr", s.lr},     {"samples_per_s", s.samplesPerSec}, {"time_s", s.elapsedSec},
                     {"eval_loss", evalLoss}, {"eval_samples", samples}};
    j["eval_accuracy"] = evalAccuracy ? nlohmann::json(*evalAccuracy) : nlohmann::json(nullptr);
    if (auc) j["eval_auc"] = *auc;
    if (baselineAuc) j["baseline_auc"] = *baselineAuc;
    fmt::print(metrics_, "{}\n", j.dump());
    std::fflush(metrics_);
  }
}

void Progress::final(const StepStats& s, const TrainResult& r) {
  if (!enabled_ || !metrics_) return;
  nlohmann::json j{{"step", s.step},          {"epoch", s.epoch},       {"loss", s.loss},
                   {"lr", s.lr},              {"samples_per_s", r.samplesPerSec},
                   {"final", true},           {"train_time_s", r.trainSec}, {"time_s", r.wallSec},
                   {"peak_rss_mb", r.peakRssMb}, {"wall_time", wallTime()}};
  if (r.peakGpuMb) j["peak_gpu_mb"] = *r.peakGpuMb;
  if (!r.workerSamples.empty()) {
    // Async/ssp parameter servers: the steps of each worker that every server applied whole, a step some applied in
    // part (null: none), and the workers they lost.
    nlohmann::json samples = nlohmann::json::array(), steps = nlohmann::json::array(), lost = nlohmann::json::array(),
                   partial = nlohmann::json::array();
    for (size_t w = 0; w < r.workerSamples.size(); ++w) {
      const WorkerSamples& ws = r.workerSamples[w];
      samples.push_back(ws.samples);
      steps.push_back(ws.steps);
      if (ws.state == WorkerSamples::State::kLost) lost.push_back(w);
      partial.push_back(ws.partialPartitions > 0 ? nlohmann::json{{"step", ws.steps + 1},
                                                                  {"partitions_applied", ws.partialPartitions},
                                                                  {"partitions", ws.partitions},
                                                                  {"samples", ws.partialSamples}}
                                                 : nlohmann::json());
    }
    j["samples_by_worker"] = samples;
    j["steps_by_worker"] = steps;
    j["lost_workers"] = lost;
    j["partial_steps_by_worker"] = partial;
  }
  fmt::print(metrics_, "{}\n", j.dump());
  std::fflush(metrics_);
}

void Progress::info(const std::string& line) {
  if (!enabled_) return;
  endLine();
  fmt::print("{}\n", line);
  std::fflush(stdout);
}

void Progress::summary(const std::string& line) { info(line); }

void Progress::onFinish(const StepStats& s, const TrainResult& r) {
  if (!enabled_) return;
  const int64_t trained = s.step - s.startStep;  // the steps this process took
  if (trained == 0 && s.startStep > 0 && !r.stoppedBySignal) {
    // Resumed at the run's end: nothing was trained, so there is no throughput to report and no final metrics line
    // (it used to append one of step 0, loss 0, 0 samples/s after the real one).
    summary(fmt::format("done: {} steps, all before this run (nothing left to train); wrote {}", s.step,
                        weightsPath_.string()));
    return;
  }
  std::string eval;
  if (r.evalAuc)
    eval = fmt::format(", eval AUC {:.4f}{}", *r.evalAuc,
                       r.baselineAuc ? fmt::format(" vs popularity baseline {:.4f}", *r.baselineAuc) : "");
  else if (r.baselineLoss && r.evalLoss)
    eval = fmt::format(", eval loss {:.4f} vs bigram baseline {:.4f}", *r.evalLoss, *r.baselineLoss);
  else if (r.evalAccuracy) eval = fmt::format(", eval accuracy {:.2f}%", *r.evalAccuracy * 100);
  else if (r.evalLoss) eval = fmt::format(", eval loss {:.6f}", *r.evalLoss);
  // After a resume the step count is the run's and the samples are this process's: say which steps those are.
  const std::string steps = s.startStep > 0 ? fmt::format("{} steps ({} in this run, resumed at step {})", s.step,
                                                          trained, s.startStep)
                                            : fmt::format("{} steps", s.step);
  const std::string gpu = r.peakGpuMb ? fmt::format(", peak GPU memory {:.0f} MiB", *r.peakGpuMb) : "";
  // async/ssp parameter servers: worker 0's throughput is its own (another may have died or be behind); the
  // samples are what server 0 applied of each worker's pushes (workerSamples), or worker 0's own without them.
  const std::string whose = r.ownSamples ? " on worker 0" : "";
  std::string samples = fmt::format("{} samples{}", r.samples, whose);
  std::string lost;
  if (!r.workerSamples.empty()) {
    int64_t total = 0;
    std::string each;
    for (size_t w = 0; w < r.workerSamples.size(); ++w) {
      const WorkerSamples& ws = r.workerSamples[w];
      total += ws.samples;
      each += fmt::format("{}{} on worker {}", w ? ", " : "", ws.samples, w);
      const std::string steps = fmt::format("{} step{}{}", ws.steps, ws.steps == 1 ? "" : "s",
                                            s.startStep > 0 ? " of this run" : "");
      // A step the servers applied in part (a worker killed in the middle of it): neither counted nor dropped
      // silently.
      const std::string partial =
          ws.partialPartitions > 0
              ? fmt::format("its step {}{} applied in part ({} of {} partitions, {} samples not counted)",
                            ws.steps + 1, s.startStep > 0 ? " of this run" : "", ws.partialPartitions, ws.partitions,
                            ws.partialSamples)
              : "";
      if (ws.state == WorkerSamples::State::kLost)
        lost += fmt::format("; lost worker {} after {} ({} of those samples){}", w, steps, ws.samples,
                            partial.empty() ? "" : ", " + partial);
      else if (ws.state == WorkerSamples::State::kAbsent)
        lost += fmt::format("; worker {} never reached the parameter servers", w);
      else if (!partial.empty())
        lost += fmt::format("; worker {}: {}", w, partial);
    }
    samples = fmt::format("{} samples from {} workers ({})", total, r.workerSamples.size(), each);
  }
  const std::string figures =
      fmt::format("{} in {} (training {:.0f} samples/s{}, peak RSS {:.0f} MiB{} per rank)", samples,
                  formatDuration(r.wallSec), r.samplesPerSec, whose, r.peakRssMb, gpu);
  if (r.stoppedBySignal) {
    // Not "done": the run stopped early, and what matters next is whether (and from where) it can resume.
    const std::string saved = r.checkpoint.empty()
                                  ? std::string("; checkpoints are off, so nothing was saved to resume from")
                                  : fmt::format("; saved {}: the same command resumes from it", r.checkpoint.string());
    summary(fmt::format("stopped by SIG{} after {}, {}{}{}", sigabbrev_np(r.stoppedBySignal), steps, figures, lost,
                        saved));
  } else {
    summary(fmt::format("done: {}, {}{}{}; wrote {}", steps, figures, eval, lost, weightsPath_.string()));
  }
  final(s, r);
}

}  // namespace dtrain::train
