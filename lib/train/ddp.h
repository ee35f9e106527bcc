// Data parallelism (PyTorch DDP's reducer, over dtrain's flat arenas): every rank holds a whole replica, trains
// on its shard of the data, and the gradients are averaged over the data group before each optimizer step.
//
// The gradient arena is cut into buckets at layer boundaries, in *reverse* layer order (the order backward
// produces gradients): the first bucket holds the last layers and is kept small (first_bucket_mb, as DDP does)
// so communication starts as early as possible; the others grow to bucket_mb. Because the arena is contiguous
// and in layer order, every bucket is one slice [offset, offset+count) of it: reducing it needs no copy.
//
// During the last micro-batch's backward, the model reports each layer whose gradients are final; when the
// lowest layer of a bucket is reported, every layer of the bucket is final (backward runs in reverse), and the
// bucket goes to the communication hook (lib/train/comm_hook.h; default: an asynchronous averaging all-reduce)
// while backward continues with earlier layers. finishStep() hands any bucket not yet started to the hook, in
// bucket order, and waits for all of them, so the optimizer sees the hook's result.
// overlap=false: nothing happens during backward; finishStep() gives the hook one bucket spanning the whole
// arena and runs it synchronously (CommHook::run): the better choice when no core is free to run communication
// beside backward. prepare() also binds the hook to the arena's parameters (CommHook::bind) and gives every
// bucket its parameters' names, shapes and offsets (GradBucket::params). Replicas are kept identical: prepare() broadcasts rank 0's parameters, and each rank writes
// the checkpoint's parameters and optimizer state only from rank 0 (every rank loads all of them).
#pragma once

#include <memory>
#include <vector>

#include "lib/train/strategy.h"

namespace dtrain::train {

struct Bucket {
  size_t offset = 0;  // in the gradient arena
  size_t count = 0;   // floats
  int lowestLayer = 0;
  std::vector<int> layers;  // in the order backward reports them (descending)
};

// Pure bucket planning (tested on its own): layers in reverse order, sizes in floats.
std::vector<Bucket> planBuckets(const nn::Model& model, size_t firstBucketFloats, size_t bucketFloats);

struct DdpOptions {
  double firstBucketMb = 1;
  double bucketMb = 25;
  bool overlap = true;
  CommHookPtr hook;  // null: AllreduceAvgHook
};

class DdpStrategy final : public Strategy {
 public:
  // groups.world and groups.data must be set (a world of at least one rank).
  DdpStrategy(ProcessGroups groups, DdpOptions options);

  std::string name() const override { return "ddp"; }
  std::string summary() const override;
  void prepare(nn::Model& model) override;
  nn::LayerGradReady gradReadyHook() override;
  void finishStep() override;
  void reduceMetrics(std::span<double> values, comm::ReduceOp op) override;
  int agreeOnStop(int localSignal) override;
  int64_t stopCheckEvery() const override { return 8; }
  void barrier() override;
  CheckpointShard checkpointShard(const nn::Model& model) const override;
  // With a tensor group (tensor parallelism, lib/train/tensor_parallel.h): agreed over it, and the whole model's
  // norm from the slices (collectives over the tensor group); else local.
  bool agreeFinite(std::span<const float> values) override;
  double gradNorm(const nn::Model& model) override;

  // Layer `layer`'s gradients are final: starts its bucket when it is the bucket's lowest layer.
  void operator()(int layer);
  const std::vector<Bucket>& buckets() const { return buckets_; }
  const CommHook& hook() const { return *options_.hook; }

 private:
  void start(size_t bucket);

  DdpOptions options_;
  nn::Model* model_ = nullptr;
  std::vector<Bucket> buckets_;
  std::vector<GradBucket> views_;          // one per bucket, built once in prepare()
  std::vector<int> allLayers_;             // every parameter layer, descending (whole_.layers)
  GradBucket whole_;                       // the whole arena, for overlap=false
  std::vector<int> bucketOfLowestLayer_;   // layer -> bucket index when the layer is a bucket's lowest, else -1
  std::vector<GradParam> params_;          // every parameter, arena order (the buckets' params are slices)
  std::vector<comm::WorkPtr> pending_;
};

}  // namespace dtrain::train
