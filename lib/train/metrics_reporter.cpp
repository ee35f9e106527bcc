#include "lib/train/metrics_reporter.h"

#include <unistd.h>

#include <chrono>
#include <cstdlib>

#include "lib/comm/backend.h"
#include "lib/common/log.h"

namespace dtrain::train {

namespace {
constexpr auto kRelaxed = std::memory_order_relaxed;

double unixSeconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}
}  // namespace

MetricsReporter::MetricsReporter(const std::string& path, int rank, bool countsSamples)
    : mapping_(new WorkerMetricsMapping(WorkerMetricsMapping::open(path))), windowStart_(Clock::now()), lastRss_(Clock::now()) {
  auto& b = mapping_->block();
  b.noSamples.store(countsSamples ? 0 : 1, kRelaxed);
  b.rank.store(rank, kRelaxed);
  b.pid.store(static_cast<int32_t>(::getpid()), kRelaxed);
  b.residentBytes.store(residentBytes(), kRelaxed);
  b.updatedUnixSeconds.store(unixSeconds(), kRelaxed);
  attachFlightRecorder(&b);
}

MetricsReporter::~MetricsReporter() { attachFlightRecorder(nullptr); }

void MetricsReporter::onOptimizerStep(const StepEvent& e) {
  auto& b = mapping_->block();
  const auto now = Clock::now();
  samples_ += static_cast<uint64_t>(e.samples);
  ++steps_;
  windowSamples_ += e.samples;
  const double window = std::chrono::duration<double>(now - windowStart_).count();
  if (window >= 1.0 || steps_ == 1) {
    b.samplesPerSecond.store(window > 0 ? static_cast<double>(windowSamples_) / window : 0, kRelaxed);
    windowSamples_ = 0;
    windowStart_ = now;
  }
  const double step[] = {e.times.data, e.times.forward, e.times.backward, e.times.commWait, e.times.optimizer};
  for (int p = 0; p < static_cast<int>(StepPhase::kCount); ++p) {
    phases_[p] += step[p];
    b.phaseSecondsTotal[p].store(phases_[p], kRelaxed);
  }
  b.step.store(e.step, kRelaxed);
  b.epoch.store(e.epoch, kRelaxed);
  b.loss.store(e.loss, kRelaxed);
  b.noLoss.store(e.hasLoss ? 0 : 1, kRelaxed);
  b.learningRate.store(e.lr, kRelaxed);
  b.samplesTotal.store(samples_, kRelaxed);
  b.stepsTotal.store(steps_, kRelaxed);
  for (int k = 0; k < WorkerMetricsBlock::kCollectiveKinds; ++k) {
    const comm::CommCounters& c = comm::commCounters(static_cast<comm::Operation::Kind>(k));
    b.collectiveCallsTotal[k].store(c.calls.load(kRelaxed), kRelaxed);
    b.collectiveBytesTotal[k].store(c.bytes.load(kRelaxed), kRelaxed);
    b.collectiveSecondsTotal[k].store(static_cast<double>(c.nanos.load(kRelaxed)) * 1e-9, kRelaxed);
  }
  if (now - lastRss_ >= std::chrono::seconds(1)) {
    b.residentBytes.store(residentBytes(), kRelaxed);
    lastRss_ = now;
  }
  b.updatedUnixSeconds.store(unixSeconds(), kRelaxed);
}

void MetricsReporter::onCheckpoint(const CheckpointEvent& e) {
  auto& b = mapping_->block();
  ++checkpoints_;
  checkpointSeconds_ += e.seconds;
  b.checkpointsTotal.store(checkpoints_, kRelaxed);
  b.checkpointSecondsTotal.store(checkpointSeconds_, kRelaxed);
  b.checkpointSizeBytes.store(e.bytes, kRelaxed);
}

TrainerCallbackPtr makeMetricsReporter(int rank, bool countsSamples) {
  const char* path = std::getenv(kMetricsShmEnv);
  if (!path || !*path) return nullptr;
  try {
    return std::make_shared<MetricsReporter>(path, rank, countsSamples);
  } catch (const std::exception& e) {
    log::warn("monitoring is off for rank {}: {}", rank, e.what());
    return nullptr;
  }
}

}  // namespace dtrain::train
