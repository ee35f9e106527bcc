// The worker -> agent monitoring channel: one small shared-memory block per local worker.
//
// Design: the agent creates a 4 KiB file per local rank (under /dev/shm when it exists), maps it, and names it
// to the worker in DTRAIN_METRICS_SHM. The worker maps the same file and overwrites the block's fields at every
// optimizer step; the agent's metrics thread reads them whenever it is scraped. Neither side ever waits for the
// other: no socket, no lock, no syscall on the hot path (a few relaxed atomic stores per step, ~tens of ns
// against steps of milliseconds), and a worker that dies or freezes leaves its last values readable.
// Every field is its own lock-free atomic (static_asserts below), so the block is well defined across
// processes; a read may mix fields of two adjacent steps, which is fine for monitoring.
//
// Units are base units (seconds, bytes); "_total" fields are cumulative since the worker started (a restarted
// worker starts again from 0: Prometheus counters handle resets).
#pragma once

#include <atomic>
#include <cstdint>
#include <iterator>
#include <string>
#include <string_view>

namespace dtrain {

inline constexpr const char* kMetricsShmEnv = "DTRAIN_METRICS_SHM";

enum class StepPhase : int { kData, kForward, kBackward, kCommWait, kOptimizer, kCount };
// "data", "forward", "backward", "comm_wait", "optimizer".
const char* stepPhaseName(StepPhase phase);

// One collective call in the flight recorder (TORCH_NCCL's flight recorder, cut down): what it was, when it
// started and ended. Written by the process's collectives (Backend::runOp), read by the agent at any time, so a
// rank frozen inside or between collectives still shows where it is.
struct FlightEntry {
  std::atomic<uint64_t> seq;       // 1-based number of the call in this process; 0: empty slot
  std::atomic<int32_t> kind;       // comm::Operation::Kind
  std::atomic<int32_t> reserved;
  std::atomic<uint64_t> bytes;     // payload
  std::atomic<int64_t> step;       // the optimizer step in progress (steps done + 1)
  std::atomic<int64_t> startNs;    // Unix time, ns
  std::atomic<int64_t> endNs;      // 0 while in flight
  std::atomic<uint64_t> group[2];  // the communicator's group name, first 16 bytes, zero-padded
};

// What a parameter-server rank (role kServer) reports instead of training figures, written by the server
// (lib/train/ps_server.h) at every request it answers. Counters are cumulative since the server started.
struct PsServerMetrics {
  static constexpr int kOps = 16;  // ps::Op's values (lib/train/ps_protocol.h; lib/common does not link train)
  // Upper bounds of the staleness histogram's buckets (steps), 0 then powers of 2 to 4096; the last bucket is +Inf.
  // In async mode a fast worker runs thousands of steps ahead of the slowest one: bounds that stopped at 64 put every
  // such push in +Inf, and the p90 (histogram_quantile's, the dashboard's) read 64.
  static constexpr int64_t kStalenessBounds[] = {0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096};
  static constexpr int kStalenessBuckets = 15;  // the bounds above and +Inf

  std::atomic<int32_t> serverRank;           // ROLE_RANK: the server's index, 0..servers-1
  std::atomic<int32_t> workers;              // the job's worker count
  std::atomic<uint64_t> requestsTotal[kOps];  // requests answered, by op (error replies included)
  std::atomic<uint64_t> errorsTotal;         // requests answered with an error
  std::atomic<uint64_t> updatesTotal;        // optimizer steps applied (dense partitions and sparse tables)
  std::atomic<uint64_t> receivedBytesTotal;  // headers and payloads received
  std::atomic<uint64_t> sentBytesTotal;      // headers and payloads sent
  std::atomic<double> requestsPerSecond;     // over the last ~second of requests
  std::atomic<int32_t> workersLive;          // connected and not done
  std::atomic<int32_t> workersLost;          // left without saying bye (async/ssp go on without them)
  std::atomic<int64_t> stalenessMax;         // async/ssp: the largest staleness of a push it answered (steps)
  std::atomic<uint64_t> stalenessBucket[kStalenessBuckets];  // pushes by staleness, not cumulative (per bucket)
  std::atomic<uint64_t> stalenessCount;
  std::atomic<double> stalenessSum;
};
static_assert(std::size(PsServerMetrics::kStalenessBounds) + 1 == PsServerMetrics::kStalenessBuckets);

struct WorkerMetricsBlock {
  static constexpr uint32_t kMagic = 0x6d747264;  // "drtm"
  static constexpr uint32_t kVersion = 6;  // 3: noLoss; 4: noSamples; 5: role and the server's figures; 6: staleness to 4096
  static constexpr int kFlightEntries = 32;
  static constexpr int kCollectiveKinds = 8;  // comm::Operation::Kind's values
  enum Role : uint32_t { kWorker = 0, kServer = 1 };

  std::atomic<uint32_t> magic;
  std::atomic<uint32_t> version;
  std::atomic<int32_t> rank;        // global rank, -1 until the worker attached
  std::atomic<int32_t> pid;
  std::atomic<uint32_t> role;       // kWorker (the training figures below) or kServer (`server`, a parameter
                                    // server rank: the training and collective fields stay 0)
  std::atomic<uint32_t> reserved;
  std::atomic<int64_t> step;        // optimizer steps done
  std::atomic<int64_t> epoch;       // 0-based
  std::atomic<double> loss;         // mean loss of the last step's micro-batches, this rank
  std::atomic<uint32_t> noLoss;     // 1: this rank computes no loss (a pipeline stage before the last): `loss`
                                    // means nothing and is not shown (it used to read 0 on those ranks)
  std::atomic<double> learningRate;
  std::atomic<double> samplesPerSecond;  // this rank, over the last ~second of steps
  std::atomic<uint64_t> samplesTotal;    // training samples this rank consumed
  std::atomic<uint32_t> noSamples;       // 1: another rank counts this rank's samples (model parallelism: the data
                                         // replica's stage 0, tensor rank 0); its samples are not shown, so that a
                                         // sum over ranks is the job's throughput (it counted each sample once per
                                         // stage and tensor rank)
  std::atomic<uint64_t> stepsTotal;      // optimizer steps this process ran (not the resumed ones)
  std::atomic<double> phaseSecondsTotal[static_cast<int>(StepPhase::kCount)];
  std::atomic<uint64_t> collectiveCallsTotal[kCollectiveKinds];
  std::atomic<uint64_t> collectiveBytesTotal[kCollectiveKinds];
  std::atomic<double> collectiveSecondsTotal[kCollectiveKinds];
  std::atomic<uint64_t> checkpointsTotal;
  std::atomic<double> checkpointSecondsTotal;
  std::atomic<uint64_t> checkpointSizeBytes;  // the last checkpoint's size on disk
  std::atomic<uint64_t> residentBytes;        // RSS, sampled at most once a second
  std::atomic<double> updatedUnixSeconds;     // wall clock of the last update
  std::atomic<uint64_t> flightSeq;            // number of collective calls begun
  FlightEntry flight[kFlightEntries];         // the last calls: call n is in flight[(n - 1) % kFlightEntries]
  PsServerMetrics server;                     // role kServer only
};
static_assert(std::atomic<double>::is_always_lock_free && std::atomic<uint64_t>::is_always_lock_free &&
                  std::atomic<int64_t>::is_always_lock_free && std::atomic<uint32_t>::is_always_lock_free,
              "the block is shared between processes: its atomics must be lock-free");
static_assert(sizeof(WorkerMetricsBlock) <= 4096);

// A mapping of one block file. create() (the agent) makes or truncates the file and zeroes the block; open()
// (the worker) maps an existing one. Both throw dtrain::Error naming the path on failure. Not copyable; the
// destructor unmaps (the file stays: its creator removes it).
class WorkerMetricsMapping {
 public:
  static WorkerMetricsMapping create(const std::string& path);
  static WorkerMetricsMapping open(const std::string& path);
  WorkerMetricsMapping(WorkerMetricsMapping&& other) noexcept;
  WorkerMetricsMapping& operator=(WorkerMetricsMapping&& other) noexcept;
  WorkerMetricsMapping(const WorkerMetricsMapping&) = delete;
  WorkerMetricsMapping& operator=(const WorkerMetricsMapping&) = delete;
  ~WorkerMetricsMapping();

  WorkerMetricsBlock& block() const { return *block_; }
  // Zeroes every field and stamps magic/version, rank -1 (the agent, before it starts a worker on the slot).
  void reset() const;

 private:
  explicit WorkerMetricsMapping(WorkerMetricsBlock* block) : block_(block) {}
  WorkerMetricsBlock* block_ = nullptr;
};

// The flight recorder of this process: collectives are recorded into `block` once attached (the worker does at
// start-up when the agent gave it a block; null detaches). flightBegin returns a token for flightEnd, 0 when no
// block is attached. Any thread; each call is a few relaxed atomic stores and a clock read.
void attachFlightRecorder(WorkerMetricsBlock* block);
uint64_t flightBegin(int kind, uint64_t bytes, std::string_view group);
void flightEnd(uint64_t token);

// The `op` label of a parameter-server request of op value `op` (ps::Op, lib/train/ps_protocol.h): "push" for
// push-pull and push-pull-counted, "pull", "sparse_push", ..., the protocol's names with '_' for '-'; "other" for a
// value outside the protocol.
const char* psOpLabel(int op);

// The staleness histogram's bucket of `staleness` steps (PsServerMetrics::kStalenessBounds; the last is +Inf).
int stalenessBucket(int64_t staleness);

// Resident set size of this process in bytes (/proc/self/statm), 0 when unreadable.
uint64_t residentBytes();

}  // namespace dtrain
