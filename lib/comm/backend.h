// The collectives interface: one `Backend` is a communicator over `size` ranks, bootstrapped through the
// rendezvous Store (ranks publish addresses there; nobody uses fixed ports).
//
// Contract every implementation keeps:
//  - Collectives are issued in the same order, with the same counts, dtype, op and root, on every rank.
//    Buffers are the caller's, given as dtrain::TensorView (pointer, shape, dtype, device; only the element
//    count numel() matters, so a flat view is the usual form); operations are in place (allreduce, broadcast)
//    or in -> out. The view's device must be the communicator's (`device()`): cpu for tcp/shm/hier, the
//    communicator's GPU for nccl; anything else is a UsageError before anything is sent. Collectives take
//    the dtypes in kSupportedDTypes (types.h); send/recv move the view's bytes whatever its dtype.
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
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "lib/comm/types.h"
#include "lib/common/clock.h"
#include "lib/common/tensor.h"
#include "lib/common/worker_contract.h"
#include "rendezvous/store.h"

namespace dtrain::comm {

class Work {
 public:
  virtual ~Work() = default;
  // Blocks until the operation finished; throws CommError when it failed. May be called again (same outcome).
  virtual void wait() = 0;
  // Non-blocking: true once the operation finished, successfully or not.
  virtual bool done() = 0;
};
using WorkPtr = std::shared_ptr<Work>;

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
  // Set by newGroup: the world rank of each rank of this communicator (empty for the world itself). Errors name
  // this communicator's ranks ("rank 1 died"); they end with this map so that a user of a pipeline or tensor group
  // can tell which process that is (group rank 1 of [1,3] is world rank 3, not the world's rank 1).
  std::vector<int> worldRanks;
  // The job's shared secret (WorkerContract::storeToken, DTRAIN_RDZV_TOKEN): the tcp mesh (also hier's tcp
  // groups) admits only connections that prove they know it (lib/comm/tcp/mesh_auth.h). "": unauthenticated.
  std::string token;
  // Knobs of one backend's algorithms live with that backend (tcp::TcpOptions, shm::ShmOptions, given to its
  // constructor; createBackend uses their defaults and environment variables).
};

// The ranks from the worker contract (lib/common/worker_contract.h: RANK, WORLD_SIZE, LOCAL_RANK,
// LOCAL_WORLD_SIZE, GROUP_RANK; defaults: a one-process job), its store token and DTRAIN_COMM_TIMEOUT; the
// store is left to the caller. Throws UsageError on malformed values.
BackendOptions optionsFromEnv();
BackendOptions optionsFromContract(const WorkerContract& worker);

// What every rank publishes about itself when a backend is created.
struct PeerInfo {
  int nodeRank = 0;
  int localRank = 0;
  int64_t pid = 0;
  std::string hostname;
};

// Per-call options. Every field has a default that keeps the call's plain behaviour.
struct CallOptions {
  // An opaque stream handle for backends that run on one (nccl: a cudaStream_t, passed as void* so this header
  // needs no CUDA). The operation is enqueued on that stream instead of the communicator's own, so it is
  // ordered after the caller's work already issued there and the caller may order later work after it on
  // the same stream; Work::wait() (and a synchronous call) still waits for it to finish. nullptr: the
  // communicator's own stream. Operations on different streams are ordered only as the caller orders those
  // streams, and every rank must still issue collectives in the same order, so keep one communicator's
  // operations on one stream at a time. The CPU backends ignore it.
  void* stream = nullptr;
};

// One operation as the backends receive it: what to do, on which buffers. Built by the named calls below
// (or its factories); the counts are the views' element counts.
struct Operation {
  enum class Kind : uint8_t { kNone, kAllreduce, kBroadcast, kAllgather, kReduceScatter, kSend, kRecv, kBarrier };
  Kind kind = Kind::kNone;
  TensorView buf;  // allreduce/broadcast/send/recv: the buffer; allgather/reduceScatter: the input
  TensorView out;  // allgather: size() blocks of buf.numel(); reduceScatter: buf.numel() / size() elements
  ReduceOp op = ReduceOp::kSum;
  int peer = 0;  // broadcast: the root; send/recv: the other rank

  static Operation allreduce(const TensorView& buf, ReduceOp op) { return {Kind::kAllreduce, buf, {}, op, 0}; }
  static Operation broadcast(const TensorView& buf, int root) { return {Kind::kBroadcast, buf, {}, {}, root}; }
  static Operation allgather(const TensorView& in, const TensorView& out) { return {Kind::kAllgather, in, out}; }
  static Operation reduceScatter(const TensorView& in, const TensorView& out, ReduceOp op) {
    return {Kind::kReduceScatter, in, out, op, 0};
  }
  static Operation send(const TensorView& buf, int peer) { return {Kind::kSend, buf, {}, {}, peer}; }
  static Operation recv(const TensorView& buf, int peer) { return {Kind::kRecv, buf, {}, {}, peer}; }
  static Operation barrier() { return {Kind::kBarrier}; }
};
// "allreduce", "broadcast", "allgather", "reduce_scatter", "send", "recv", "barrier", "no-op".
std::string_view operationName(Operation::Kind kind);

// Process-wide totals of the operations this process ran through the base's queue (Backend::start/run on every
// communicator of tcp, shm and hier; nccl's stream path is not counted), per kind: what the monitoring endpoint
// reports (lib/train/metrics_reporter.h). Relaxed atomics, readable at any time from any thread; one update per
// operation, so they cost nothing measurable.
struct CommCounters {
  std::atomic<uint64_t> calls{0};
  std::atomic<uint64_t> bytes{0};  // payload: the bytes of the caller's view (buf), not the bytes on the wire
  std::atomic<uint64_t> nanos{0};  // wall time inside the operation, waiting for peers included
};
inline constexpr int kNumOperationKinds = 8;  // Operation::Kind's values, kNone included
CommCounters& commCounters(Operation::Kind kind);

class Backend : public std::enable_shared_from_this<Backend> {
 public:
  virtual ~Backend();
  Backend(const Backend&) = delete;
  Backend& operator=(const Backend&) = delete;

  int rank() const { return options_.rank; }
  int size() const { return options_.size; }
  virtual std::string name() const = 0;
  // Where this communicator's buffers live: cpu, or the GPU an nccl communicator runs on.
  virtual Device device() const { return Device::cpu(); }
  const BackendOptions& options() const { return options_; }
  const std::vector<PeerInfo>& peers() const { return peers_; }

  // --- the operations, asynchronous (see the contract above) and synchronous (returning when done) ---
  // Every pair below is a one-line form of start()/run(); validation, the empty-operation shortcuts and the
  // queue live there, once.
  WorkPtr allreduceAsync(const TensorView& buf, ReduceOp op, const CallOptions& call = {}) {
    return start(Operation::allreduce(buf, op), call);
  }
  void allreduce(const TensorView& buf, ReduceOp op, const CallOptions& call = {}) {
    run(Operation::allreduce(buf, op), call);
  }
  WorkPtr broadcastAsync(const TensorView& buf, int root, const CallOptions& call = {}) {
    return start(Operation::broadcast(buf, root), call);
  }
  void broadcast(const TensorView& buf, int root, const CallOptions& call = {}) {
    run(Operation::broadcast(buf, root), call);
  }
  // `out` holds size() blocks of in.numel() elements, rank r's at r * in.numel(). `in` may be that block.
  WorkPtr allgatherAsync(const TensorView& in, const TensorView& out, const CallOptions& call = {}) {
    return start(Operation::allgather(in, out), call);
  }
  void allgather(const TensorView& in, const TensorView& out, const CallOptions& call = {}) {
    run(Operation::allgather(in, out), call);
  }
  // `in` holds size() blocks of out.numel() elements; `out` receives this rank's reduced block.
  WorkPtr reduceScatterAsync(const TensorView& in, const TensorView& out, ReduceOp op, const CallOptions& call = {}) {
    return start(Operation::reduceScatter(in, out, op), call);
  }
  void reduceScatter(const TensorView& in, const TensorView& out, ReduceOp op, const CallOptions& call = {}) {
    run(Operation::reduceScatter(in, out, op), call);
  }
  // Point to point: the view's bytes, matched in order per (sender, receiver) pair; sizes must agree. A send
  // may block until the receiver takes the bytes, so two ranks that both send large messages first can only
  // finish by timeout: order them (as with MPI_Send).
  WorkPtr sendAsync(const TensorView& buf, int peer, const CallOptions& call = {}) {
    return start(Operation::send(buf, peer), call);
  }
  void send(const TensorView& buf, int peer, const CallOptions& call = {}) { run(Operation::send(buf, peer), call); }
  WorkPtr recvAsync(const TensorView& buf, int peer, const CallOptions& call = {}) {
    return start(Operation::recv(buf, peer), call);
  }
  void recv(const TensorView& buf, int peer, const CallOptions& call = {}) { run(Operation::recv(buf, peer), call); }
  WorkPtr barrierAsync(const CallOptions& call = {}) { return start(Operation::barrier(), call); }
  void barrier(const CallOptions& call = {}) { run(Operation::barrier(), call); }

  // The generic forms. Both validate first (UsageError: a peer outside the group, a view on another device,
  // an unsupported dtype, mismatched allgather/reduceScatter sizes) and throw CommError when the
  // communicator failed earlier.
  WorkPtr start(const Operation& op, const CallOptions& call = {});
  void run(const Operation& op, const CallOptions& call = {});

  // Runs `op` at once on the calling thread, bypassing the queue, the validation, the empty-operation
  // shortcuts and the failure bookkeeping: the entry point for a backend composed of others (hier), which
  // drives its inner communicators from inside its own operations. The caller guarantees that nothing else
  // is submitted to this communicator meanwhile (only the composite uses it) and that `op` is valid and not
  // empty. Blocks until done or `deadline`; throws what the implementation throws (dtrain::Error subclasses).
  void runInline(const Operation& op, const Deadline& deadline);

  // A communicator over `ranks` (this group's ranks; new rank = position in the list), bootstrapped through
  // the same store and of the same kind. Collective over the members: each calls it with the same list, in
  // the same order relative to their other newGroup calls (non-members may call it too, as in
  // torch.distributed.new_group, and get nullptr). Blocks until the members connected (timeout).
  std::shared_ptr<Backend> newGroup(const std::vector<int>& ranks);

 protected:
  // Validates the options and exchanges PeerInfo through the store (blocking, timeout).
  explicit Backend(BackendOptions options);

  // Hands a validated operation to the backend. The default runs it on the communication thread in
  // submission order (a synchronous one on the caller's thread when nothing is queued) and turns failures
  // into CommError; an empty operation completes without communicating. A backend with its own execution
  // engine (nccl: a CUDA stream) overrides it; when `sync` it returns after the operation finished.
  virtual WorkPtr issue(const Operation& op, const CallOptions& call, bool sync);

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
  // `message` followed, in a communicator made by newGroup, by the world rank of each of its ranks.
  std::string withWorldRanks(const std::string& message) const;
  // The store key for this group's `suffix`.
  std::string key(const std::string& suffix) const { return options_.groupName + "/" + suffix; }
  // True when every rank of this group has the same nodeRank.
  bool singleNode() const;
  Deadline newDeadline() const { return Deadline(options_.timeout); }
  // Throws CommError when the backend failed earlier (backends that bypass the queue call it themselves).
  void checkUsable();
  // True when `op` has nothing to communicate (zero elements, or a broadcast/barrier in a group of one).
  bool isEmpty(const Operation& op) const;

  BackendOptions options_;
  std::vector<PeerInfo> peers_;

 private:
  class QueuedWork;
  void validate(const Operation& op) const;
  void dispatch(const Operation& op, const Deadline& deadline);  // to the do* implementation
  void runOp(const Operation& op);  // runs one op, recording a failure
  void recordOnTimeline(const Operation& op, Clock::time_point start, Clock::time_point end) const;
  void threadMain();
  void checkPeer(int peer, const char* what) const;
  void checkView(const TensorView& view, Operation::Kind kind, const char* which) const;

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<Operation, std::shared_ptr<QueuedWork>>> queue_;
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
