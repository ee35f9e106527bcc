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
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <span>
#include <string>

#include "lib/comm/backend.h"
#include "lib/common/tensor.h"

namespace dtrain::train {

struct GradBucket {
  size_t index = 0;            // 0 = the first bucket of the step to become ready (the last layers)
  TensorView grads;            // flat view of the gradient arena's slice [offset, offset + count)
  size_t offset = 0;           // of the slice in the arena, in elements
  std::span<const int> layers; // model layers whose gradients the slice holds, in the order backward reports them
  bool last = false;           // the last bucket of the step
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
};
using CommHookPtr = std::shared_ptr<CommHook>;

// Today's gradient averaging: an in-place all-reduce (ReduceOp::kAvg) of the bucket's slice.
class AllreduceAvgHook final : public CommHook {
 public:
  std::string name() const override { return "allreduce_avg"; }
  comm::WorkPtr start(const GradBucket& bucket, comm::Backend& group) override;
  void run(const GradBucket& bucket, comm::Backend& group) override;
};

// A hook from a callable (tests, quick experiments): `start` is the callable; `run` waits on it.
CommHookPtr makeCommHook(std::string name, std::function<comm::WorkPtr(const GradBucket&, comm::Backend&)> start);

}  // namespace dtrain::train
