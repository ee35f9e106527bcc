#include "lib/data/batch_loader.h"

#include <algorithm>

#include "lib/common/error.h"

namespace dtrain::data {

BatchLoader::BatchLoader(const Dataset& dataset, const DistributedSampler& sampler, LoaderOptions options)
    : dataset_(dataset), sampler_(sampler), options_(options) {
  DTRAIN_CHECK_AS(ConfigError, options.batchSize >= 1, "batch size {} (expected >= 1)", options.batchSize);
  DTRAIN_CHECK_AS(ConfigError, sampler.datasetSize() == dataset.size(),
                  "sampler was built for {} samples, the dataset has {}", sampler.datasetSize(), dataset.size());
  const int64_t n = sampler.numSamplesThisRank();
  numBatches_ = options.dropLast ? n / options.batchSize : (n + options.batchSize - 1) / options.batchSize;
  const auto samplerDropped = sampler.dropped();
  const auto leftOver = sampler.indices().subspan(static_cast<size_t>(std::min(n, numBatches_ * options.batchSize)));
  dropped_.assign(samplerDropped.begin(), samplerDropped.end());
  dropped_.insert(dropped_.end(), leftOver.begin(), leftOver.end());
  // A batch never holds more than the rank's samples (PyTorch's last, short batch): no buffer for a batch_size above.
  const auto b = static_cast<size_t>(std::clamp<int64_t>(n, 1, options.batchSize));
  for (auto& slot : slots_) {
    slot.features.resize(b * static_cast<size_t>(dataset.featureSize()));
    // One class label per sample, or one per position for sequences (labelShape [T]).
    if (dataset.labelKind() == LabelKind::kClass) slot.classes.resize(b * static_cast<size_t>(dataset.labelSize()));
    else slot.targets.resize(b * static_cast<size_t>(dataset.labelSize()));
  }
  if (options.prefetch && numBatches_ > 0) thread_ = std::thread([this] { producer(); });
}

BatchLoader::~BatchLoader() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void BatchLoader::fill(Slot& slot, int64_t b) const {
  const auto all = sampler_.indices();
  const int64_t begin = b * options_.batchSize;
  const int64_t size = std::min(options_.batchSize, static_cast<int64_t>(all.size()) - begin);
  Batch& batch = slot.batch;
  batch.index = b;
  batch.size = size;
  batch.indices = all.subspan(static_cast<size_t>(begin), static_cast<size_t>(size));
  batch.features = slot.features.data();
  const bool classes = dataset_.labelKind() == LabelKind::kClass;
  batch.classLabels = classes ? slot.classes.data() : nullptr;
  batch.targets = classes ? nullptr : slot.targets.data();
  void* labels = classes ? static_cast<void*>(slot.classes.data()) : static_cast<void*>(slot.targets.data());
  dataset_.fetch(batch.indices, slot.features.data(), labels);
  batch.position = sampler_.position(begin + size);
  batch.padding = sampler_.paddingIn(begin, size);
  batch.dropped = b + 1 == numBatches_ ? std::span<const int64_t>(dropped_) : std::span<const int64_t>();
}

void BatchLoader::producer() {
  for (int64_t b = 0; b < numBatches_; ++b) {
    Slot& slot = slots_[b % 2];
    {
      std::unique_lock<std::mutex> lock(mutex_);
      cv_.wait(lock, [&] { return stop_ || !slot.ready; });
      if (stop_) return;
    }
    std::exception_ptr error;
    try {
      fill(slot, b);
    } catch (...) {
      error = std::current_exception();
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      slot.error = error;
      slot.ready = true;
    }
    cv_.notify_all();
    if (error) return;
  }
}

const Batch* BatchLoader::next() {
  if (!thread_.joinable()) {  // no prefetch: fill in the caller's thread
    if (nextBatch_ >= numBatches_) return nullptr;
    fill(slots_[0], nextBatch_++);
    return &slots_[0].batch;
  }
  std::unique_lock<std::mutex> lock(mutex_);
  if (nextBatch_ > 0) {  // the caller is done with the previous batch: its slot may be refilled
    slots_[(nextBatch_ - 1) % 2].ready = false;
    cv_.notify_all();
  }
  if (nextBatch_ >= numBatches_) return nullptr;
  Slot& slot = slots_[nextBatch_ % 2];
  cv_.wait(lock, [&] { return slot.ready; });
  if (slot.error) {
    nextBatch_ = numBatches_;
    std::rethrow_exception(slot.error);
  }
  ++nextBatch_;
  return &slot.batch;
}

}  // namespace dtrain::data
