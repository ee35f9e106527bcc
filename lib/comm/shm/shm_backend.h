// The `shm` backend: collectives through one shared-memory segment, for ranks on the same node.
//
// Protocol. Every rank owns one phase counter (segment.h) and bumps it exactly once per "round"; all ranks
// run the same rounds, so "rank j reached phase p" is a precise statement about where j is. Each rank has two
// staging slots (used alternately by consecutive rounds) plus two shared result slots; a rank rewrites a slot
// only after every rank's phase shows it finished reading that slot's previous contents, so slots are reused
// without any extra handshake. Large operations run as a sequence of slot-sized rounds, so the data a peer
// reads was written a moment ago by another core and is still in cache.
//
// Algorithms (thresholds measured, see ShmOptions and docs/collectives.md):
//  - allreduce, small: one round. Each rank copies its buffer into its slot, posts, waits for all, and reduces
//    all n inputs itself (in rank order, so every rank computes the identical expression): one
//    synchronisation, which is what latency at 1 KiB is made of.
//  - allreduce, large: two phases per round with the reduction split across ranks. A rank copies in only the
//    slices other ranks own, reduces its own slice from its buffer and the peers' slots straight into the
//    shared result slot and its own buffer (one pass), then copies the other slices' results out. Every core
//    reduces 1/n of the data and memory traffic per rank is about 4x the message for 2 ranks.
//  - broadcast: the root stages a round, the others copy it out. allgather: everybody stages, everybody
//    copies. reduce_scatter: each rank stages the blocks others own and reduces its own.
//  - barrier: one round. send/recv: a single-producer single-consumer byte ring per ordered pair.
// Failure: a dead peer (pidfd), the deadline or another rank's abort fails every waiting rank (sync.h).
// Thread-safety: as Backend.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "lib/comm/backend.h"
#include "lib/comm/shm/segment.h"
#include "lib/comm/shm/sync.h"

namespace dtrain::comm::shm {

// The shm backend's knobs. A negative value keeps the environment variable named beside it, else the
// measured default (docs/collectives.md). Read once, when the backend is created; malformed environment
// values are a UsageError. Every rank of a group must agree on slotBytes. Sub-groups (newGroup) inherit them.
struct ShmOptions {
  int64_t smallBytes = -1;  // DTRAIN_SHM_SMALL_BYTES: allreduce up to this size: every rank reduces all
  int64_t slotBytes = -1;   // DTRAIN_SHM_SLOT_BYTES: per-rank staging per round (rounded to 4 KiB)
  int64_t spinMicros = -1;  // DTRAIN_COMM_SPIN_US: busy-wait this long before sleeping on a peer
};

class ShmBackend : public Backend {
 public:
  // Collective: rank 0 creates the segment, the others map it. Every rank must be on this node.
  explicit ShmBackend(BackendOptions options, ShmOptions shm = {});
  ~ShmBackend() override;
  std::string name() const override { return "shm"; }

  // Reduces into `root`'s buffer only (others' buffers are left as they were): the first stage of hier.
  void reduceToRoot(void* buf, size_t count, DType dtype, ReduceOp op, int root, const Deadline& deadline);

 protected:
  void doAllreduce(void* buf, size_t count, DType dtype, ReduceOp op, const Deadline& deadline) override;
  void doBroadcast(void* buf, size_t count, DType dtype, int root, const Deadline& deadline) override;
  void doAllgather(const void* in, void* out, size_t countPerRank, DType dtype, const Deadline& deadline) override;
  void doReduceScatter(const void* in, void* out, size_t countPerRank, DType dtype, ReduceOp op,
                       const Deadline& deadline) override;
  void doSend(const void* buf, size_t bytes, int peer, const Deadline& deadline) override;
  void doRecv(void* buf, size_t bytes, int peer, const Deadline& deadline) override;
  void doBarrier(const Deadline& deadline) override;
  std::shared_ptr<Backend> makeGroup(BackendOptions options) override;

 private:
  Waiter waiter(const Deadline& deadline) {
    return Waiter(seg_->header().abort, flags_.data(), flags_.size(), *peersAlive_, rank(), deadline,
                  options_.timeout, spin_);
  }
  void post();                             // this rank finished its part of the current round
  void waitRank(Waiter& w, int r, uint32_t p);
  void waitAll(Waiter& w, uint32_t p);
  int beginRound(Waiter& w, bool writes);  // next slot; waits until it may be rewritten when `writes`
  // The slot may be rewritten once every rank's phase reached `freePhase` (all its readers are done).
  void endRound(int slot, uint32_t freePhase) { slotFree_[slot] = freePhase; }
  void allreduceOneShot(char* buf, size_t count, DType dtype, ReduceOp op, int root, Waiter& w);
  void allreduceSplit(char* buf, size_t count, DType dtype, ReduceOp op, int root, Waiter& w);
  void runAllreduce(void* buf, size_t count, DType dtype, ReduceOp op, int root, const Deadline& deadline);

  ShmOptions shm_;  // as given (unresolved), for sub-groups
  std::unique_ptr<Segment> seg_;
  std::unique_ptr<PeerWatch> peersAlive_;
  std::vector<Flag*> flags_;
  std::chrono::microseconds spin_;
  size_t smallBytes_;
  uint32_t phase_ = 0;       // this rank's posts so far
  uint32_t round_ = 0;       // rounds so far (slot parity)
  uint32_t slotFree_[2] = {0, 0};
};

}  // namespace dtrain::comm::shm
