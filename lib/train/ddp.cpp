#include "lib/train/ddp.h"

#include "lib/common/error.h"

namespace dtrain::train {

std::vector<Bucket> planBuckets(const nn::Model& model, size_t firstBucketFloats, size_t bucketFloats) {
  std::vector<Bucket> buckets;
  auto layers = model.paramLayers();
  Bucket current;
  size_t cap = firstBucketFloats;
  for (auto it = layers.rbegin(); it != layers.rend(); ++it) {
    auto range = model.layerParamRange(*it);
    if (range.count == 0) continue;
    // A layer never straddles buckets; a layer larger than the cap gets a bucket of its own.
    if (current.count > 0 && current.count + range.count > cap) {
      buckets.push_back(current);
      current = Bucket{};
      cap = bucketFloats;
    }
    current.offset = range.offset;  // layers come in reverse: each new one starts the bucket earlier
    current.count += range.count;
    current.lowestLayer = *it;
    current.layers.push_back(*it);
  }
  if (current.count > 0) buckets.push_back(current);
  return buckets;
}

GradientSync::GradientSync(nn::Model& model, std::shared_ptr<comm::Backend> backend, double firstBucketMb,
                           double bucketMb, bool overlap)
    : model_(model), backend_(std::move(backend)), overlap_(overlap) {
  auto floats = [](double mb) { return std::max<size_t>(1, static_cast<size_t>(mb * 1024 * 1024 / sizeof(float))); };
  buckets_ = planBuckets(model_, floats(firstBucketMb), floats(bucketMb));
  bucketOfLowestLayer_.assign(model_.numLayers(), -1);
  for (size_t b = 0; b < buckets_.size(); ++b) bucketOfLowestLayer_[buckets_[b].lowestLayer] = static_cast<int>(b);
  pending_.resize(buckets_.size());
}

nn::LayerGradReady GradientSync::hook() {
  if (!backend_ || backend_->size() == 1 || !overlap_) return {};
  return nn::LayerGradReady(*this);
}

void GradientSync::operator()(int layer) {
  int b = bucketOfLowestLayer_.at(static_cast<size_t>(layer));
  if (b >= 0) submit(static_cast<size_t>(b));
}

void GradientSync::submit(size_t b) {
  if (pending_[b]) return;
  auto grads = model_.grads();
  pending_[b] = backend_->allreduceAsync(TensorView::flat(grads.data() + buckets_[b].offset, buckets_[b].count),
                                         comm::ReduceOp::kAvg);
}

void GradientSync::finish() {
  if (!backend_ || backend_->size() == 1) return;
  if (!overlap_) {
    auto grads = model_.grads();
    backend_->allreduce(TensorView::flat(grads.data(), grads.size()), comm::ReduceOp::kAvg);
    return;
  }
  for (size_t b = 0; b < buckets_.size(); ++b) submit(b);
  for (auto& w : pending_) {
    w->wait();
    w.reset();
  }
}

}  // namespace dtrain::train
