#include "lib/train/batch_lookahead.h"

#include "lib/common/error.h"

namespace dtrain::train {

int DeviceBatchStager::stage(const data::Batch& b) {
  DTRAIN_CHECK(b.size <= maxBatch_, "batch of {} samples does not fit the GPU staging of {}", b.size, maxBatch_);
  const size_t features = static_cast<size_t>(b.size * dataset_.featureShape().numel()) * sizeof(float);
  static_assert(sizeof(int32_t) == sizeof(float));  // int32 class ids or float targets
  const size_t labels = static_cast<size_t>(b.size * dataset_.labelShape().numel()) * sizeof(float);
  const void* y = b.classLabels != nullptr ? static_cast<const void*>(b.classLabels) : b.targets;
  return staging_.stage(b.features, features, y, labels);
}

const data::Batch* EpochBatches::next() {
  if (!loaderDone_) {
    if (const data::Batch* b = loader_.next()) {
      ++taken_;
      return b;
    }
    loaderDone_ = true;
  }
  if (taken_ >= numBatches_) return nullptr;
  ++taken_;
  return &none_;
}

BatchLookahead::~BatchLookahead() {
  try {
    cancel();
  } catch (...) {  // NOLINT(bugprone-empty-catch): during unwinding the first error is the one to report
  }
}

bool BatchLookahead::pull(Held& into) {
  const data::Batch* b = source_();
  if (b == nullptr) return false;
  into.batch = *b;
  into.indices.assign(b->indices.begin(), b->indices.end());
  into.batch.indices = into.indices;
  into.classes = b->classLabels != nullptr;
  into.batch.features = nullptr;  // the host buffers are the source's, valid only until it moves on
  into.batch.classLabels = nullptr;
  into.batch.targets = nullptr;
  into.slot = -1;
  if (b->size > 0) into.slot = stager_->stage(*b);
  return true;
}

const data::Batch* BatchLookahead::next() {
  if (stager_ == nullptr) return source_();
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  if (!hasAhead_) {
    if (exhausted_) return nullptr;
    if (!pull(ahead_)) {
      exhausted_ = true;
      return nullptr;
    }
  }
  hasAhead_ = false;
  std::swap(current_, ahead_);
  current_.batch.indices = current_.indices;
  if (current_.slot >= 0) {
    const auto [x, y] = stager_->use(std::exchange(current_.slot, -1));
    current_.batch.features = static_cast<const float*>(x);
    if (current_.classes) current_.batch.classLabels = static_cast<const int32_t*>(y);
    else current_.batch.targets = static_cast<const float*>(y);
  }
  return &current_.batch;
}

void BatchLookahead::prefetch() {
  if (stager_ == nullptr || hasAhead_ || exhausted_ || error_) return;
  try {
    if (pull(ahead_)) hasAhead_ = true;
    else exhausted_ = true;
  } catch (...) {
    error_ = std::current_exception();
  }
}

void BatchLookahead::cancel() {
  if (stager_ == nullptr) return;
  exhausted_ = true;
  if (!hasAhead_) return;
  hasAhead_ = false;
  if (ahead_.slot >= 0) stager_->unstage(std::exchange(ahead_.slot, -1));
}

}  // namespace dtrain::train
