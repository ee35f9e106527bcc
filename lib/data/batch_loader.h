// BatchLoader: one epoch of one rank's samples as batches of float features and labels, filled by a
// background thread one batch ahead of the caller (double buffering), so conversion overlaps the training step.
//
//   DistributedSampler sampler({.datasetSize = ds->size(), .rank = r, .worldSize = w, .seed = 42});
//   for (int64_t epoch = e0; epoch < epochs; ++epoch) {
//     sampler.setEpoch(epoch, epoch == e0 ? resumePosition : 0);
//     BatchLoader loader(*ds, sampler, {.batchSize = 64});
//     for (const Batch& b : loader) { step(b.features, b.classLabels, b.size); checkpointAt(b.position); }
//   }
//
// Every rank has the same number of samples (the sampler pads or drops), so every rank yields the same number of
// batches of the same sizes: batchSize each, the last one partial unless dropLast. Batch::position is the epoch
// position (sampler.position()) once every rank has finished that batch: batchSize * world per step, less at the
// end of the epoch. When the loop ends the epoch is over (with dropLast the few samples not taken are dropped,
// as in PyTorch, and listed on the last batch, Batch::dropped): continue with the next epoch at position 0. The batch buffers hold min(batchSize, this rank's
// samples): a batchSize above the rank's share allocates for the share.
//
// Lifetime and threads: the loader reads the dataset and sampler it was given; both must outlive it and the
// sampler must not be changed (setEpoch) while it exists. A Batch (and its buffers) is valid until the next call
// to next() or the loader's destruction. next() and the iterator are for one consumer thread. The destructor
// stops and joins the prefetch thread. An exception thrown while filling a batch is rethrown by next().
#pragma once

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <span>
#include <thread>
#include <vector>

#include "lib/data/dataset.h"
#include "lib/data/sampler.h"

namespace dtrain::data {

struct LoaderOptions {
  int64_t batchSize = 64;
  bool dropLast = false;  // drop the last partial batch (PyTorch's DataLoader drop_last)
  bool prefetch = true;   // fill the next batch on a background thread
};

struct Batch {
  int64_t index = 0;  // batch number within this epoch on this rank
  int64_t size = 0;   // samples in the batch
  std::span<const int64_t> indices;
  const float* features = nullptr;        // size * featureSize floats
  const int32_t* classLabels = nullptr;   // size * labelSize labels when labelKind is kClass, else nullptr
  const float* targets = nullptr;         // size * labelSize floats when labelKind is kTarget, else nullptr
  int64_t position = 0;  // epoch position once every rank has finished this batch (store it in a checkpoint)
  int64_t padding = 0;   // the last `padding` of `indices` are the sampler's padding (repeats; sampler.h)
  // On the epoch's last batch only: this rank's samples that drop_last leaves out of the epoch, the sampler's share
  // of the world's incomplete round (DistributedSampler::dropped) then the loader's last partial batch (PyTorch's
  // DataLoader drop_last). Empty on the other batches and without drop_last. Valid as long as the loader.
  std::span<const int64_t> dropped;
};

class BatchLoader {
 public:
  BatchLoader(const Dataset& dataset, const DistributedSampler& sampler, LoaderOptions options);
  ~BatchLoader();
  BatchLoader(const BatchLoader&) = delete;
  BatchLoader& operator=(const BatchLoader&) = delete;

  int64_t numBatches() const { return numBatches_; }
  // What drop_last leaves out of this rank's epoch (Batch::dropped of the last batch); with no batch at all (a share
  // smaller than one batch) every sample of the share and the sampler's dropped tail. Valid as long as the loader.
  std::span<const int64_t> dropped() const { return dropped_; }
  // The next batch, or nullptr at the end of the epoch. Blocks until the prefetch thread has filled it.
  const Batch* next();

  class Iterator {
   public:
    using value_type = Batch;
    using difference_type = std::ptrdiff_t;
    Iterator() = default;
    explicit Iterator(BatchLoader* loader) : loader_(loader), batch_(loader->next()) {}
    const Batch& operator*() const { return *batch_; }
    const Batch* operator->() const { return batch_; }
    Iterator& operator++() {
      batch_ = loader_->next();
      return *this;
    }
    bool operator==(const Iterator& other) const { return batch_ == other.batch_; }

   private:
    BatchLoader* loader_ = nullptr;
    const Batch* batch_ = nullptr;
  };
  // Single pass: begin() may be called once.
  Iterator begin() { return Iterator(this); }
  Iterator end() { return Iterator(); }

 private:
  struct Slot {
    Batch batch;
    std::vector<float> features;
    std::vector<int32_t> classes;
    std::vector<float> targets;
    std::exception_ptr error;
    bool ready = false;
  };
  void fill(Slot& slot, int64_t b) const;
  void producer();

  const Dataset& dataset_;
  const DistributedSampler& sampler_;
  LoaderOptions options_;
  int64_t numBatches_ = 0;
  std::vector<int64_t> dropped_;  // Batch::dropped of the last batch
  Slot slots_[2];
  int64_t nextBatch_ = 0;  // consumer: the batch next() returns
  std::mutex mutex_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace dtrain::data
