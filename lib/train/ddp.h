// Data-parallel gradient synchronisation (PyTorch DDP's reducer, over dtrain's flat arenas).
//
// The gradient arena is cut into buckets at layer boundaries, in *reverse* layer order (the order backward
// produces gradients): the first bucket holds the last layers and is kept small (first_bucket_mb, as DDP does)
// so communication starts as early as possible; the others grow to bucket_mb. Because the arena is contiguous
// and in layer order, every bucket is one slice [offset, offset+count) of it: all-reducing it needs no copy.
//
// During the last micro-batch's backward, the model reports each layer whose gradients are final; when the
// lowest layer of a bucket is reported, every layer of the bucket is final (backward runs in reverse), and
// the bucket's average all-reduce is submitted asynchronously while backward continues with earlier layers.
// finish() waits for every bucket, so the optimizer sees averaged gradients.
// With world size 1 nothing is communicated. One thread drives a GradientSync (the trainer's).
#pragma once

#include <memory>
#include <vector>

#include "lib/comm/backend.h"
#include "lib/nn/model.h"

namespace dtrain::train {

struct Bucket {
  size_t offset = 0;  // in the gradient arena
  size_t count = 0;   // floats
  int lowestLayer = 0;
  std::vector<int> layers;
};

// Pure bucket planning (tested on its own): layers in reverse order, sizes in floats.
std::vector<Bucket> planBuckets(const nn::Model& model, size_t firstBucketFloats, size_t bucketFloats);

class GradientSync {
 public:
  // overlap=false: no buckets during backward; finish() all-reduces the whole arena in one synchronous call on
  // the caller's thread (the better choice when no core is free to run communication beside backward).
  GradientSync(nn::Model& model, std::shared_ptr<comm::Backend> backend, double firstBucketMb, double bucketMb,
               bool overlap = true);

  // The callback to pass to Model::backward on the micro-batch that ends an optimizer step (it refers to this
  // object, which outlives the backward call); empty when there is nothing to communicate.
  nn::LayerGradReady hook();
  // Layer `layer`'s gradients are final: submits its bucket when it is the bucket's lowest layer.
  void operator()(int layer);
  // Waits for all buckets (submitting any not yet started); gradients are then averaged over the world.
  void finish();
  const std::vector<Bucket>& buckets() const { return buckets_; }

 private:
  void submit(size_t bucket);

  nn::Model& model_;
  std::shared_ptr<comm::Backend> backend_;
  std::vector<Bucket> buckets_;
  std::vector<int> bucketOfLowestLayer_;  // layer -> bucket index when the layer is a bucket's lowest, else -1
  std::vector<comm::WorkPtr> pending_;
  bool overlap_ = true;
};

}  // namespace dtrain::train
