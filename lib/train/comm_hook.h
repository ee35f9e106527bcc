// Communication hooks: what data-parallel training does with a bucket of gradients (PyTorch DDP's `GradBucket`
// and `register_comm_hook`, torch/distributed/algorithms/ddp_comm_hooks).
//
// DdpStrategy hands every bucket of the gradient arena to its hook once per optimizer step, in the order the
// buckets become ready (bucket 0 first: it holds the last layers, whose gradients backward produces first). The
// hook starts whatever communication it wants over the data-parallel group and returns a Work handle; when that
// handle completes, the bucket's slice of the gradient arena must hold the gradient the optimizer is to use
// (for the default hook: the average over the group). The strategy waits for every handle before the optimizer
// step, so a hook never sees two steps' buckets overlap.
//
// The default, AllreduceAvgHook, all-reduces the slice in place (no copy) with ReduceOp::kAvg. Compression
// (PowerSGD, fp16/bf16 casts, top-k) plugs in as another hook: it may keep state across steps (error feedback),
// allocate its buffers once at the first step, and write the bucket's slice before its Work completes.
//
// Threading: start()/run() are called on the trainer's thread, while backward may still be computing gradients
// of *earlier* layers (below bucket.grads); a hook may read and write its bucket's slice from any thread until
// its Work completes, and must not touch the rest of the arena. Errors: CommError from the group, or any
// dtrain::Error the hook throws, ends the step (the trainer fails; the launcher restarts the round).
//
// Stateful hooks (lib/train/compression.h): bind() is called once by the strategy's prepare(), with every
// parameter of the gradient arena, before the first bucket; a hook allocates its state there. stateBuffers()
// names that state (per rank: error-feedback residuals differ between ranks) so the checkpoint saves and
// restores it and a resumed run continues bit for bit. traffic() counts what the hook sent, for metrics.jsonl.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "lib/comm/backend.h"
#include "lib/common/tensor.h"

namespace dtrain::train {

// One parameter of the gradient arena (PyTorch's GradBucket.parameters()): where its gradient lies and its shape.
struct GradParam {
  std::string name;  // the full model's name, "3.weight"
  Shape shape;       // PyTorch's shape ([out, in] for a linear weight, [out, in, kh, kw] for a conv)
  size_t offset = 0; // first element in the gradient arena
  size_t count = 0;  // elements (shape.numel())
};

struct GradBucket {
  size_t index = 0;            // 0 = the first bucket of the step to become ready (the last layers)
  TensorView grads;            // flat view of the gradient arena's slice [offset, offset + count)
  size_t offset = 0;           // of the slice in the arena, in elements
  std::span<const int> layers; // model layers whose gradients the slice holds, in the order backward reports them
  bool last = false;           // the last bucket of the step
  // The parameters whose gradients the slice holds, in arena order (arena offsets); empty when the strategy
  // does not know them (a hook then treats the slice as one vector).
  std::span<const GradParam> params;
};

// What bind() tells a hook: the whole gradient arena, every parameter in arena order, the group's size, and where
// the arena lives.
struct HookLayout {
  size_t arenaSize = 0;  // elements
  std::vector<GradParam> params;
  int groupSize = 1;
  Device device = Device::cpu();  // the gradient arena's (the buckets' views carry it too)
  // With a GPU arena: a CPU group (tcp/shm/hier) over the same ranks in the same order as the data group, for hooks
  // that compute on host copies of the buckets (top-k, PowerSGD: lib/train/compression_hooks.h). Null on the CPU,
  // where the data group is itself a CPU group. DdpStrategy passes the world's CPU group (a GPU job is data-parallel
  // only, so the data group is the world); the trainer issues nothing on it between a step's first bucket and the
  // end of its finishStep(), so the hook's collectives there keep the same order on every rank.
  comm::BackendPtr hostGroup;
};

// A piece of a hook's state as the checkpoint sees it: a stable name and a CPU view the hook owns (valid from
// bind() until the hook is destroyed). Written per rank; loaded back into the same view.
struct HookState {
  std::string name;
  TensorView view;
};

// Bytes a hook handed to the group since it was created, as this rank's share of the wire traffic of the
// collectives it used (ring algorithms: an all-reduce of B bytes sends 2(n-1)/n x B per rank, an all-gather of
// B bytes per rank sends (n-1) x B), beside what the plain float32 all-reduce of the same buckets would send.
struct HookTraffic {
  uint64_t bytesSent = 0;
  uint64_t bytesUncompressed = 0;
  int64_t steps = 0;  // optimizer steps the counts cover (buckets with `last` set)
};

class CommHook {
 public:
  virtual ~CommHook() = default;
  virtual std::string name() const = 0;
  // Starts reducing `bucket` over `group`; the returned Work completes when bucket.grads holds the result.
  virtual comm::WorkPtr start(const GradBucket& bucket, comm::Backend& group) = 0;
  // The same, returning when done. DdpStrategy calls it for the one whole-arena bucket when communication does
  // not overlap backward; the default waits on start(). AllreduceAvgHook overrides it with a synchronous
  // all-reduce on the caller's thread (no hand-off to the communication thread: faster for small steps).
  virtual void run(const GradBucket& bucket, comm::Backend& group);
  // Called once before the first bucket (DdpStrategy::prepare). Default: nothing to set up.
  virtual void bind(const HookLayout& /*layout*/) {}
  // This rank's state for checkpoints (after bind); empty: stateless.
  virtual std::vector<HookState> stateBuffers() { return {}; }
  // After a checkpoint's state was loaded into stateBuffers()' views (`sameWorld`: saved by a group of this
  // size, so per-rank state is this rank's own); a hook may reset what does not carry over. Default: nothing.
  virtual void stateLoaded(bool /*sameWorld*/) {}
  // Traffic counted so far; nullopt when the hook does not count.
  virtual std::optional<HookTraffic> traffic() const { return std::nullopt; }
};
using CommHookPtr = std::shared_ptr<CommHook>;

// Today's gradient averaging: an in-place all-reduce (ReduceOp::kAvg) of the bucket's slice.
class AllreduceAvgHook final : public CommHook {
 public:
  std::string name() const override { return "allreduce_avg"; }
  comm::WorkPtr start(const GradBucket& bucket, comm::Backend& group) override;
  void run(const GradBucket& bucket, comm::Backend& group) override;
  std::optional<HookTraffic> traffic() const override { return traffic_; }

 private:
  void count(const GradBucket& bucket, const comm::Backend& group);
  HookTraffic traffic_;
};

// This rank's share of a ring all-reduce of `bytes` over `n` ranks (2(n-1)/n x bytes), and of an all-gather
// of `bytes` per rank ((n-1) x bytes): the units of HookTraffic.
uint64_t allreduceWireBytes(uint64_t bytes, int n);
uint64_t allgatherWireBytes(uint64_t bytes, int n);

// A Work that completes when `inner` has and `then` ran: how a hook finishes a bucket after its collective
// (decompress into the slice, a second collective round...). wait() runs `then` once, on the waiting thread;
// done() is true only after that (it never runs `then`, which may submit collectives: only the submitting
// thread waits). A failure of `inner` or of `then` is rethrown by every wait().
comm::WorkPtr thenWork(comm::WorkPtr inner, std::function<void()> then);

// A hook from a callable (tests, quick experiments): `start` is the callable; `run` waits on it.
CommHookPtr makeCommHook(std::string name, std::function<comm::WorkPtr(const GradBucket&, comm::Backend&)> start);

}  // namespace dtrain::train
