#include "lib/common/worker_metrics.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <algorithm>
#include <chrono>
#include <cstring>
#include <new>

#include "lib/common/error.h"

namespace dtrain {

namespace {

constexpr size_t kMapBytes = 4096;

WorkerMetricsBlock* mapFile(const std::string& path, bool create) {
  int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC | (create ? O_CREAT | O_TRUNC : 0), 0600);
  DTRAIN_CHECK(fd >= 0, "metrics block {}: cannot open: {}", path, std::strerror(errno));
  struct stat st {};
  bool ok = ::fstat(fd, &st) == 0;
  if (ok && create) ok = ::ftruncate(fd, kMapBytes) == 0;
  else if (ok) ok = static_cast<size_t>(st.st_size) >= sizeof(WorkerMetricsBlock);
  int err = errno;
  if (!ok) {
    ::close(fd);
    DTRAIN_THROW(Error, "metrics block {}: {}", path, create ? std::strerror(err) : "too small (not a metrics block)");
  }
  void* p = ::mmap(nullptr, kMapBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  err = errno;
  ::close(fd);
  DTRAIN_CHECK(p != MAP_FAILED, "metrics block {}: mmap: {}", path, std::strerror(err));
  return static_cast<WorkerMetricsBlock*>(p);
}

}  // namespace

const char* stepPhaseName(StepPhase phase) {
  switch (phase) {
    case StepPhase::kData: return "data";
    case StepPhase::kForward: return "forward";
    case StepPhase::kBackward: return "backward";
    case StepPhase::kCommWait: return "comm_wait";
    case StepPhase::kOptimizer: return "optimizer";
    case StepPhase::kCount: break;
  }
  return "?";
}

WorkerMetricsMapping WorkerMetricsMapping::create(const std::string& path) {
  WorkerMetricsMapping m(mapFile(path, true));
  // A fresh (zero-filled) file: construct the atomics in place once.
  new (m.block_) WorkerMetricsBlock();
  m.reset();
  return m;
}

WorkerMetricsMapping WorkerMetricsMapping::open(const std::string& path) {
  WorkerMetricsMapping m(mapFile(path, false));
  DTRAIN_CHECK(m.block_->magic.load() == WorkerMetricsBlock::kMagic &&
                   m.block_->version.load() == WorkerMetricsBlock::kVersion,
               "metrics block {}: not a dtrain metrics block of version {}", path, WorkerMetricsBlock::kVersion);
  return m;
}

WorkerMetricsMapping::WorkerMetricsMapping(WorkerMetricsMapping&& other) noexcept : block_(other.block_) {
  other.block_ = nullptr;
}

WorkerMetricsMapping& WorkerMetricsMapping::operator=(WorkerMetricsMapping&& other) noexcept {
  if (this != &other) {
    if (block_) ::munmap(block_, kMapBytes);
    block_ = other.block_;
    other.block_ = nullptr;
  }
  return *this;
}

WorkerMetricsMapping::~WorkerMetricsMapping() {
  if (block_) ::munmap(block_, kMapBytes);
}

void WorkerMetricsMapping::reset() const {
  auto& b = *block_;
  constexpr auto r = std::memory_order_relaxed;
  b.rank.store(-1, r);
  b.pid.store(0, r);
  b.role.store(WorkerMetricsBlock::kWorker, r);
  b.noLoss.store(0, r);
  b.noSamples.store(0, r);
  b.step.store(0, r);
  b.epoch.store(0, r);
  b.loss.store(0, r);
  b.learningRate.store(0, r);
  b.samplesPerSecond.store(0, r);
  b.samplesTotal.store(0, r);
  b.stepsTotal.store(0, r);
  for (auto& v : b.phaseSecondsTotal) v.store(0, r);
  for (int k = 0; k < WorkerMetricsBlock::kCollectiveKinds; ++k) {
    b.collectiveCallsTotal[k].store(0, r);
    b.collectiveBytesTotal[k].store(0, r);
    b.collectiveSecondsTotal[k].store(0, r);
  }
  b.checkpointsTotal.store(0, r);
  b.checkpointSecondsTotal.store(0, r);
  b.checkpointSizeBytes.store(0, r);
  b.residentBytes.store(0, r);
  b.updatedUnixSeconds.store(0, r);
  b.flightSeq.store(0, r);
  for (auto& e : b.flight) {
    e.seq.store(0, r);
    e.kind.store(0, r);
    e.bytes.store(0, r);
    e.step.store(0, r);
    e.startNs.store(0, r);
    e.endNs.store(0, r);
    e.group[0].store(0, r);
    e.group[1].store(0, r);
  }
  PsServerMetrics& sv = b.server;
  sv.serverRank.store(0, r);
  sv.workers.store(0, r);
  for (auto& v : sv.requestsTotal) v.store(0, r);
  sv.errorsTotal.store(0, r);
  sv.updatesTotal.store(0, r);
  sv.receivedBytesTotal.store(0, r);
  sv.sentBytesTotal.store(0, r);
  sv.requestsPerSecond.store(0, r);
  sv.workersLive.store(0, r);
  sv.workersLost.store(0, r);
  sv.stalenessMax.store(0, r);
  for (auto& v : sv.stalenessBucket) v.store(0, r);
  sv.stalenessCount.store(0, r);
  sv.stalenessSum.store(0, r);
  b.version.store(WorkerMetricsBlock::kVersion, r);
  b.magic.store(WorkerMetricsBlock::kMagic, std::memory_order_release);
}

namespace {
std::atomic<WorkerMetricsBlock*> gFlightBlock{nullptr};

int64_t unixNanos() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}
}  // namespace

void attachFlightRecorder(WorkerMetricsBlock* block) { gFlightBlock.store(block, std::memory_order_release); }

uint64_t flightBegin(int kind, uint64_t bytes, std::string_view group) {
  WorkerMetricsBlock* b = gFlightBlock.load(std::memory_order_acquire);
  if (!b) return 0;
  constexpr auto r = std::memory_order_relaxed;
  const uint64_t seq = b->flightSeq.load(r) + 1;
  FlightEntry& e = b->flight[(seq - 1) % WorkerMetricsBlock::kFlightEntries];
  e.seq.store(0, r);  // the slot is being rewritten
  e.kind.store(kind, r);
  e.bytes.store(bytes, r);
  e.step.store(b->step.load(r) + 1, r);
  e.startNs.store(unixNanos(), r);
  e.endNs.store(0, r);
  uint64_t packed[2] = {0, 0};
  std::memcpy(packed, group.data(), std::min(group.size(), sizeof(packed)));
  e.group[0].store(packed[0], r);
  e.group[1].store(packed[1], r);
  e.seq.store(seq, std::memory_order_release);
  b->flightSeq.store(seq, std::memory_order_release);
  return seq;
}

void flightEnd(uint64_t token) {
  WorkerMetricsBlock* b = gFlightBlock.load(std::memory_order_acquire);
  if (!b || token == 0) return;
  FlightEntry& e = b->flight[(token - 1) % WorkerMetricsBlock::kFlightEntries];
  if (e.seq.load(std::memory_order_relaxed) == token) e.endNs.store(unixNanos(), std::memory_order_release);
}

const char* psOpLabel(int op) {
  switch (op) {
    case 1: return "hello";
    case 2: return "init";
    case 3: return "push";
    case 4: return "pull";
    case 5: return "fetch";
    case 6: return "bye";
    case 7: return "sparse_pull";
    case 8: return "sparse_push";
    case 9: return "sparse_fetch";
    case 10: return "sparse_init";
    case 11: return "barrier";
    case 12: return "sparse_save";
    case 13: return "sparse_load";
    case 14: return "push";  // push-pull-counted: a push that carries the step's sample count
    case 15: return "tally";
    default: return "other";
  }
}

int stalenessBucket(int64_t staleness) {
  int k = 0;
  for (int64_t bound : PsServerMetrics::kStalenessBounds) {
    if (staleness <= bound) return k;
    ++k;
  }
  return PsServerMetrics::kStalenessBuckets - 1;
}

uint64_t residentBytes() {
  FILE* f = std::fopen("/proc/self/statm", "r");
  if (!f) return 0;
  unsigned long long size = 0, resident = 0;
  int n = std::fscanf(f, "%llu %llu", &size, &resident);
  std::fclose(f);
  if (n != 2) return 0;
  return static_cast<uint64_t>(resident) * static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
}

}  // namespace dtrain
