// The collectives interface: one `Backend` is a communicator over `size` ranks, bootstrapped through the
// rendezvous Store (ranks publish addresses there; nobody uses fixed ports).
//
// Contract every implementation keeps:
//  - Collectives are issued in the same order, with the same counts, dtype, op and root, on every rank.
//    Buffers are the caller's; operations are in place (allreduce, broadcast) or in -> out.
//  - Asynchronous calls (`...Async`) return a Work handle at once; the operation runs on a communication
//    thread owned by the backend, strictly in submission order, and the buffers must stay alive and
//    untouched until `wait()` returns. Synchronous calls run after every earlier async call (on the caller's
//    thread when nothing is queued, which keeps small-message latency free of a thread hand-off).
//  - One thread submits at a time (the trainer's main thread); `Work::wait/done` may be called from any thread.
//  - Every operation honours `BackendOptions::timeout`: a dead peer (EOF, ECONNRESET, process gone) is a
//    CommError at once, a stalled one a CommError when the timeout runs out. Never a hang.
//  - After a failure the communicator is unusable (ranks no longer agree on where they are): every later
//    call throws CommError naming the first failure. Build a new backend (the launcher restarts the round).
//  - Results are bitwise identical on every rank, so data-parallel replicas never drift apart.
// Thread-safety: see above; destruction must not race with submission.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "lib/comm/types.h"
#include "lib/common/clock.h"
#include "rendezvous/store.h"

namespace dtrain::comm {

namespace hier {
class HierBackend;
}

class Work {
 public:
  virtual ~Work() = default;
  // Blocks until the operation finished; throws CommError when it failed. May be called again (same outcome).
  virtual void wait() = 0;
  // Non-blocking: true once the operation finished, successfully or not.
  virtual bool done() = 0;
};
using WorkPtr = std::shared_ptr<Work>;

// Knobs for the algorithms; -1 keeps the measured default (docs/collectives.md lists them). Each can also be
// set through the environment variable named beside it, read when a backend is created.
struct Tuning {
  int64_t tcpSmallBytes = -1;  // DTRAIN_TCP_SMALL_BYTES: allreduce up to this size uses recursive doubling
  int64_t tcpChunkBytes = -1;  // DTRAIN_TCP_CHUNK_BYTES: ring pipeline unit (receive, reduce, forward)
  int64_t tcpBlockBytes = -1;  // DTRAIN_TCP_BLOCK_BYTES: ring all-reduce runs block by block (streamed)
  int64_t tcpBufferBytes = -1;  // DTRAIN_TCP_BUFFER_BYTES: SO_SNDBUF/SO_RCVBUF; 0 = kernel autotuning
  int64_t shmSmallBytes = -1;  // DTRAIN_SHM_SMALL_BYTES: allreduce up to this size: every rank reduces all
  int64_t shmSlotBytes = -1;   // DTRAIN_SHM_SLOT_BYTES: per-rank staging per round (rounded to 4 KiB)
  int64_t spinMicros = -1;     // DTRAIN_COMM_SPIN_US: busy-wait this long before sleeping on a peer
};

struct BackendOptions {
  int rank = 0;
  int size = 1;
  int localRank = 0;  // rank among the processes on this node (LOCAL_RANK)
  int localSize = 1;  // processes on this node (LOCAL_WORLD_SIZE)
  int nodeRank = 0;   // which node (GROUP_RANK); ranks with the same nodeRank share memory
  // Where ranks meet; required when size > 1. Give each group/attempt its own PrefixStore or groupName.
  rendezvous::StorePtr store;
  std::chrono::milliseconds timeout{std::chrono::minutes(5)};  // per operation, and for the bootstrap
  std::string device = "cpu";     // "cpu", "cuda" or "cuda:N" (nccl; default device = localRank)
  std::string groupName = "comm";  // key namespace inside `store`
  // tcp: the address to listen on and publish. Empty: DTRAIN_COMM_HOST, else 127.0.0.1 when every rank is on
  // one node, else the first non-loopback IPv4 address of this host.
  std::string host;
  Tuning tuning;
};

// RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK (defaults: a one-process job) and
// DTRAIN_COMM_TIMEOUT; the store is left to the caller. Throws UsageError on malformed values.
BackendOptions optionsFromEnv();

// What every rank publishes about itself when a backend is created.
struct PeerInfo {
  int nodeRank = 0;
  int localRank = 0;
  int64_t pid = 0;
  std::string hostname;
};

class Backend : public std::enable_shared_from_this<Backend> {
 public:
  virtual ~Backend();
  Backend(const Backend&) = delete;
  Backend& operator=(const Backend&) = delete;

  int rank() const { return options_.rank; }
  int size() const { return options_.size; }
  virtual std::string name() const = 0;
  const BackendOptions& options() const { return options_; }
  const std::vector<PeerInfo>& peers() const { return peers_; }

  // --- asynchronous (see the contract above) ---
  virtual WorkPtr allreduceAsync(void* buf, size_t count, DType dtype, ReduceOp op);
  virtual WorkPtr broadcastAsync(void* buf, size_t count, DType dtype, int root);
  // out holds size() * countPerRank elements, rank r's block at r * countPerRank. `in` may be that block.
  virtual WorkPtr allgatherAsync(const void* in, void* out, size_t countPerRank, DType dtype);
  // in holds size() * countPerRank elements; out receives this rank's reduced block.
  virtual WorkPtr reduceScatterAsync(const void* in, void* out, size_t countPerRank, DType dtype, ReduceOp op);
  // Point to point, matched in order per (sender, receiver) pair; sizes must agree. A send may block until
  // the receiver takes the bytes, so two ranks that both send large messages first can only finish by timeout:
  // order them (as with MPI_Send).
  virtual WorkPtr sendAsync(const void* buf, size_t bytes, int peer);
  virtual WorkPtr recvAsync(void* buf, size_t bytes, int peer);
  virtual WorkPtr barrierAsync();

  // --- synchronous: the same operations, returning when done ---
  void allreduce(void* buf, size_t count, DType dtype, ReduceOp op);
  void broadcast(void* buf, size_t count, DType dtype, int root);
  void allgather(const void* in, void* out, size_t countPerRank, DType dtype);
  void reduceScatter(const void* in, void* out, size_t countPerRank, DType dtype, ReduceOp op);
  void send(const void* buf, size_t bytes, int peer);
  void recv(void* buf, size_t bytes, int peer);
  void barrier();

  // A communicator over `ranks` (this group's ranks; new rank = position in the list), bootstrapped through
  // the same store and of the same kind. Collective over the members: each calls it with the same list, in
  // the same order relative to their other newGroup calls (non-members may call it too, as in
  // torch.distributed.new_group, and get nullptr). Blocks until the members connected (timeout).
  std::shared_ptr<Backend> newGroup(const std::vector<int>& ranks);

 protected:
  // hier composes shm and tcp communicators and runs their operations on its own thread, directly.
  friend class hier::HierBackend;

  // Validates the options and exchanges PeerInfo through the store (blocking, timeout).
  explicit Backend(BackendOptions options);

  // The operations, implemented by each backend. Synchronous; called one at a time, in submission order,
  // either on the submitting thread or on the communication thread. Counts are > 0 here (empty operations
  // complete without communicating). Throw dtrain::Error subclasses; the base turns them into CommError.
  virtual void doAllreduce(void* buf, size_t count, DType dtype, ReduceOp op, const Deadline& deadline) = 0;
  virtual void doBroadcast(void* buf, size_t count, DType dtype, int root, const Deadline& deadline) = 0;
  virtual void doAllgather(const void* in, void* out, size_t countPerRank, DType dtype,
                           const Deadline& deadline) = 0;
  virtual void doReduceScatter(const void* in, void* out, size_t countPerRank, DType dtype, ReduceOp op,
                               const Deadline& deadline) = 0;
  virtual void doSend(const void* buf, size_t bytes, int peer, const Deadline& deadline) = 0;
  virtual void doRecv(void* buf, size_t bytes, int peer, const Deadline& deadline) = 0;
  virtual void doBarrier(const Deadline& deadline) = 0;
  // Creates a backend of the same kind for newGroup (options already describe the sub-group).
  virtual std::shared_ptr<Backend> makeGroup(BackendOptions options) = 0;

  // Stops the communication thread after the queued operations finished. Every derived destructor calls it
  // first, so no operation runs on a half-destroyed object.
  void shutdown();
  // Fails the backend for good (later calls throw CommError naming `why`); backends call it when they abort.
  void markBroken(const std::string& why);
  // The store key for this group's `suffix`.
  std::string key(const std::string& suffix) const { return options_.groupName + "/" + suffix; }
  // True when every rank of this group has the same nodeRank.
  bool singleNode() const;
  Deadline newDeadline() const { return Deadline(options_.timeout); }
  // Throws CommError when the backend failed earlier (backends that bypass the queue call it themselves).
  void checkUsable();

  BackendOptions options_;
  std::vector<PeerInfo> peers_;

 private:
  class QueuedWork;
  using Op = std::function<void(const Deadline&)>;
  WorkPtr submit(Op op, bool sync);
  void runOp(const Op& op);  // runs one op, recording a failure
  void threadMain();
  void checkPeer(int peer, const char* what) const;

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<Op, std::shared_ptr<QueuedWork>>> queue_;
  std::atomic<int64_t> outstanding_{0};  // queued or running async operations
  bool stopping_ = false;
  std::thread thread_;
  std::mutex brokenMu_;
  std::string broken_;  // first failure; empty while usable
  std::atomic<bool> isBroken_{false};
  std::map<std::string, int> groupsMade_;  // newGroup calls per rank list (keys the sub-group's store prefix)
};

using BackendPtr = std::shared_ptr<Backend>;

}  // namespace dtrain::comm
