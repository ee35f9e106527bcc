// The trainer's batches one ahead of the step on a GPU: once step n's device work is enqueued, batch n+1 is taken
// from the loader and its host -> device copy started (lib/nn/device.h's BatchStaging: pinned memory, a copy
// stream, two slots ordered by events), so the loader's wait, the copy into pinned memory and the transfer overlap
// the GPU's work on batch n: PyTorch's DataLoader(pin_memory=True) with non_blocking copies on a side stream, as
// the CUDA-stream prefetchers of NVIDIA's examples (apex's data_prefetcher) do it.
//
// This file is the sequencing only (which batch is staged when, what is kept of it, epoch ends, early stops,
// errors); the device side is a BatchStager: DeviceBatchStager (the GPU's staging) in the trainer, a fake in the
// unit tests (tests/train/test_batch_lookahead.cpp). Without a stager (the CPU) batches pass through untouched.
//
//   EpochBatches epoch(loader, numBatches, endPosition);
//   BatchLookahead ahead([&] { return epoch.next(); }, stager);  // stager null: the CPU
//   while (const data::Batch* b = ahead.next()) {
//     ... forward and backward on b->features, b->classLabels / b->targets (enqueued on the GPU) ...
//     ahead.prefetch();  // batch n+1: taken from the source, its copy started while the GPU computes batch n
//     ... the step's host waits (all-reduce, finiteness checks), the optimizer, logging, checkpoints ...
//     if (stopping early) { ahead.cancel(); break; }
//   }
//
// Contract (with a stager):
// - next() returns the batch prefetch() staged ahead, or else takes the next one from the source and stages it
//   (staged and used at once: no overlap, still correct); then the stager's use() orders the device work that
//   follows after its copy. The returned Batch is the look-ahead's copy of the source's: index, size, position and
//   indices stay valid until the next next(), also after prefetch() moved the source on (a BatchLoader's batch is
//   valid only until its next next()); features and classLabels/targets point to the batch's DEVICE memory
//   (the kind of label kept from the source's batch). Empty batches (size 0: a rank whose uneven share ran out,
//   see EpochBatches) are passed on without being staged, with null buffers.
// - prefetch() stages at most one batch ahead: once staged, further calls do nothing until next() takes it. The
//   order it gives the stager is therefore stage(n+1) after use(n) and before use(n+1), never two staged ahead,
//   which is what gpu::BatchStaging's two slots need (the slot of batch n is refilled only after batch n+1 is used).
// - The end: once the source returned null (in next() or prefetch()), next() returns null without asking it again.
// - An exception from the source or the stager during prefetch() is kept and rethrown by the next next(): the step
//   in flight completes (and may checkpoint) exactly as it would without the look-ahead.
// - cancel() ends the look-ahead early (the loop stops before the epoch's end): a batch staged ahead is unstaged,
//   so its slot is free for the stager's next user (evaluation, the next epoch's look-ahead). The destructor
//   cancels too (errors swallowed: it runs during unwinding).
// Without a stager: next() returns the source's batch itself and prefetch()/cancel() do nothing, so the CPU loop
// is the loop without a look-ahead.
// Thread-safety: none (the trainer's thread). Errors: whatever the source and the stager throw.
#pragma once

#include <cstdint>
#include <exception>
#include <functional>
#include <utility>
#include <vector>

#include "lib/data/batch_loader.h"
#include "lib/nn/device.h"

namespace dtrain::train {

// Where a batch's buffers go before the model reads them. Slots are the stager's (gpu::BatchStaging's rules).
class BatchStager {
 public:
  virtual ~BatchStager() = default;
  // Starts the copy of b's features and labels (valid only during the call) to the device; returns the slot.
  virtual int stage(const data::Batch& b) = 0;
  // The slot's device buffers {features, labels}, ordered before the device work enqueued after this call. Once.
  virtual std::pair<const void*, const void*> use(int slot) = 0;
  // Drops a staged batch that will not be used; its slot is the one the next stage() takes.
  virtual void unstage(int slot) = 0;
};

// The GPU's stager: nn::BatchStaging (pinned memory, copy stream, two event-ordered slots) for one dataset's
// shapes (features float32, labels int32 class ids or float32 targets: 4 bytes each). Throws Error for a batch
// larger than the staging's `maxBatch` samples. Holds references: `staging` and `dataset` outlive it.
class DeviceBatchStager final : public BatchStager {
 public:
  DeviceBatchStager(nn::BatchStaging& staging, const data::Dataset& dataset, int64_t maxBatch)
      : staging_(staging), dataset_(dataset), maxBatch_(maxBatch) {}
  int stage(const data::Batch& b) override;
  std::pair<const void*, const void*> use(int slot) override { return staging_.use(slot); }
  void unstage(int slot) override { staging_.unstage(slot); }

 private:
  nn::BatchStaging& staging_;
  const data::Dataset& dataset_;
  int64_t maxBatch_;
};

// One epoch's batches as every rank of the group takes them: the loader's, then, when this rank's share ran out
// before the group's last step (uneven shards after a resize mid-epoch, sampler.h), empty batches at
// `endPosition` (the sampler's position once this rank took all its samples) up to `numBatches`, as PyTorch's
// Join joins the last steps with zero gradients. The loader is not asked again once it returned null. A
// returned batch is valid until the next call. Holds a reference to the loader.
class EpochBatches {
 public:
  EpochBatches(data::BatchLoader& loader, int64_t numBatches, int64_t endPosition)
      : loader_(loader), numBatches_(numBatches) {
    none_.position = endPosition;
  }
  const data::Batch* next();
  int64_t taken() const { return taken_; }  // batches returned so far (empty ones included)

 private:
  data::BatchLoader& loader_;
  int64_t numBatches_;
  int64_t taken_ = 0;
  bool loaderDone_ = false;
  data::Batch none_;
};

class BatchLookahead {
 public:
  using Source = std::function<const data::Batch*()>;
  // `stager` null: the CPU (batches pass through). Otherwise it outlives the look-ahead.
  BatchLookahead(Source source, BatchStager* stager) : source_(std::move(source)), stager_(stager) {}
  ~BatchLookahead();
  BatchLookahead(const BatchLookahead&) = delete;
  BatchLookahead& operator=(const BatchLookahead&) = delete;

  const data::Batch* next();
  void prefetch();
  void cancel();
  bool stagedAhead() const { return hasAhead_; }

 private:
  struct Held {
    data::Batch batch;
    std::vector<int64_t> indices;
    bool classes = false;  // the source's batch had class labels (else float targets)
    int slot = -1;         // staged, not used yet; -1 for an empty batch or once used
  };
  bool pull(Held& into);  // from the source, staged; false at its end

  Source source_;
  BatchStager* stager_;
  Held current_, ahead_;
  bool hasAhead_ = false, exhausted_ = false;
  std::exception_ptr error_;
};

}  // namespace dtrain::train
