// `dtrain run --timeline FILE.json`: every rank's step phases and collective calls merged into one Chrome trace
// (the Trace Event Format that chrome://tracing, Perfetto and Horovod's timeline use), written by the agent that
// was given the flag when the job ends.
//
// Design: workers record into files of their own (lib/common/timeline.h: buffered, nothing sent while training).
// The agent given --timeline publishes `timeline/on` in the run's store before it joins, so every other agent of
// the run learns that it must collect too (whatever flags it was given). After each round, every other agent
// reads its workers' files of that round and ships them, as they are, through the store (`timeline/part/<round>/
// <node>`, in chunks below the store's value limit); the collecting agent reads its own files from disk, waits
// (bounded) for the other nodes' parts, and merges. Clocks: each worker wrote its offset to rank 0's clock
// (measured by the trainer at start, 0 on node 0), and the merge subtracts it, so ranks of different nodes line
// up to within one broadcast's latency.
//
// Output: {"traceEvents": [...], "displayTimeUnit": "ms", "otherData": {...}}. One process (pid) per rank, named
// "rank R (node N, host)"; thread 0 is the trainer (events "step" containing "data", "forward", "backward",
// "comm_wait", "optimizer"; "checkpoint"; "eval"), other threads are communicators' (one event per collective:
// "allreduce", "broadcast", ... with bytes and group). Complete events ("ph":"X"), ts/dur in microseconds from
// the first event, sorted by time within each thread. A later round (restart) of a rank gets its own threads
// (tid = round * 100 + thread), named with the round.
#pragma once

#include <chrono>
#include <string>
#include <vector>

#include "rendezvous/store.h"

namespace dtrain::launch {

inline constexpr const char* kTimelineOnKey = "timeline/on";

class TimelineCollector {
 public:
  // `outputFile` empty: this agent only ships its parts (another agent collects). Creates a private folder for
  // the workers' files (under $TMPDIR or /tmp); throws dtrain::Error when it cannot. `store` is the run's
  // (prefixed) store.
  TimelineCollector(std::string outputFile, rendezvous::StorePtr store);
  ~TimelineCollector();  // removes the workers' files and their folder
  TimelineCollector(const TimelineCollector&) = delete;
  TimelineCollector& operator=(const TimelineCollector&) = delete;

  bool collects() const { return !outputFile_.empty(); }
  // The file worker `rank` of `round` records into (DTRAIN_TIMELINE_FILE).
  std::string workerFile(int round, int rank) const;
  // After a round: a collecting agent remembers it (round, its node rank, the number of nodes); any other agent
  // ships its workers' files of the round through the store. Never throws (a failure is a warning).
  void afterRound(int round, int nodeRank, int numNodes);
  // The collecting agent, at the end of the job: gathers the other nodes' parts (waiting up to `wait` in all),
  // merges and writes the trace atomically. Returns the number of events written; never throws (a warning).
  size_t write(const std::string& job, const std::string& runId, std::chrono::milliseconds wait);

 private:
  struct Round {
    int round;
    int nodeRank;
    int numNodes;
  };
  std::string localPart(int round) const;  // this node's files of `round`, concatenated

  std::string outputFile_;
  rendezvous::StorePtr store_;
  std::string dir_;
  std::vector<Round> rounds_;
};

// The merge itself (tests): `parts` are worker files' contents (several may be concatenated in one string, each
// starting with its meta line), each with the round it belongs to. Returns the trace as JSON text and sets
// `events` to the number of complete events in it. Lines that are not JSON are skipped (a worker killed while
// writing leaves a cut line).
std::string mergeTimeline(const std::vector<std::pair<int, std::string>>& parts, const std::string& job,
                          const std::string& runId, size_t* events = nullptr);

}  // namespace dtrain::launch
