#include "lib/train/ddp.h"

#include <fmt/format.h>

#include <algorithm>

#include "lib/common/error.h"
#include "lib/train/tensor_parallel.h"

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

DdpStrategy::DdpStrategy(ProcessGroups groups, DdpOptions options)
    : Strategy(std::move(groups)), options_(std::move(options)) {
  // Under tensor parallelism with one replica there is no data group: nothing to average.
  DTRAIN_CHECK(groups_.world && (groups_.data || groups_.tensor),
               "ddp strategy: needs the world and data (or tensor) process groups");
  if (!options_.hook) options_.hook = std::make_shared<AllreduceAvgHook>();
}

std::string DdpStrategy::summary() const {
  if (!groups_.tensor) return fmt::format("{} backend", groups_.world->name());
  return fmt::format("{} backend, tensor {} x data {}", groups_.world->name(), groups_.tensor->size(),
                     groups_.data ? groups_.data->size() : 1);
}

void DdpStrategy::prepare(nn::Model& model) {
  model_ = &model;
  if (!groups_.data) return;
  // Rank 0's parameters for everyone: replicas start identical whatever each rank built or loaded.
  auto params = model.params();
  // Views carry the model's device: GPU arenas go over the data group's nccl communicator without a host copy.
  groups_.data->broadcast(TensorView::flat(params.data(), params.size(), model.device()), 0);

  auto floats = [](double mb) { return std::max<size_t>(1, static_cast<size_t>(mb * 1024 * 1024 / sizeof(float))); };
  buckets_ = planBuckets(model, floats(options_.firstBucketMb), floats(options_.bucketMb));
  bucketOfLowestLayer_.assign(static_cast<size_t>(model.numLayers()), -1);
  auto grads = model.grads();
  params_.clear();
  for (const auto& p : model.paramTable()) params_.push_back({p.name, p.shape, p.offset, p.count});
  // A bucket's parameters: the ones whose slice starts inside it (buckets are cut at layer boundaries).
  auto paramsIn = [&](size_t offset, size_t count) {
    auto inside = [&](const GradParam& p) { return p.offset >= offset && p.offset < offset + count; };
    auto first = std::find_if(params_.begin(), params_.end(), inside);
    auto last = std::find_if_not(first, params_.end(), inside);
    return std::span<const GradParam>(params_.data() + (first - params_.begin()), static_cast<size_t>(last - first));
  };
  views_.clear();
  for (size_t b = 0; b < buckets_.size(); ++b) {
    const Bucket& bk = buckets_[b];
    bucketOfLowestLayer_[static_cast<size_t>(bk.lowestLayer)] = static_cast<int>(b);
    views_.push_back(GradBucket{.index = b,
                                .grads = TensorView::flat(grads.data() + bk.offset, bk.count, model.device()),
                                .offset = bk.offset,
                                .layers = bk.layers,
                                .last = b + 1 == buckets_.size(),
                                .params = paramsIn(bk.offset, bk.count)});
  }
  pending_.assign(buckets_.size(), nullptr);
  // overlap=false: one bucket of every layer (in backward's order) over the whole arena.
  allLayers_.clear();
  for (const Bucket& bk : buckets_) allLayers_.insert(allLayers_.end(), bk.layers.begin(), bk.layers.end());
  whole_ = GradBucket{.index = 0,
                      .grads = TensorView::flat(grads.data(), grads.size(), model.device()),
                      .offset = 0,
                      .layers = allLayers_,
                      .last = true,
                      .params = params_};
  HookLayout layout{.arenaSize = grads.size(), .params = params_, .groupSize = groups_.data->size(),
                    .device = model.device()};
  if (!model.device().isCpu()) {
    // A GPU job: the data group is nccl, the world a CPU group beside it over the same ranks (train_setup.cpp).
    DTRAIN_CHECK(groups_.world->device().isCpu() && groups_.world->size() == groups_.data->size() &&
                     groups_.world->rank() == groups_.data->rank(),
                 "ddp strategy: a GPU data group needs a CPU world group of the same ranks beside it (world {} of {} "
                 "on {}, data {} of {})",
                 groups_.world->rank(), groups_.world->size(), groups_.world->device().str(), groups_.data->rank(),
                 groups_.data->size());
    layout.hostGroup = groups_.world;
  }
  options_.hook->bind(layout);
}

nn::LayerGradReady DdpStrategy::gradReadyHook() {
  if (!options_.overlap || !groups_.data) return {};
  return nn::LayerGradReady(*this);
}

void DdpStrategy::operator()(int layer) {
  int b = bucketOfLowestLayer_.at(static_cast<size_t>(layer));
  if (b >= 0) start(static_cast<size_t>(b));
}

void DdpStrategy::start(size_t b) {
  if (pending_[b]) return;
  pending_[b] = options_.hook->start(views_[b], *groups_.data);
  DTRAIN_CHECK(pending_[b] != nullptr, "communication hook '{}' returned no Work for bucket {}",
               options_.hook->name(), b);
}

void DdpStrategy::finishStep() {
  DTRAIN_CHECK(model_ != nullptr, "ddp strategy: finishStep() before prepare()");
  if (!groups_.data) return;
  if (!options_.overlap) {
    options_.hook->run(whole_, *groups_.data);
    return;
  }
  for (size_t b = 0; b < buckets_.size(); ++b) start(b);
  for (auto& w : pending_) {
    w->wait();
    w.reset();
  }
}

void DdpStrategy::reduceMetrics(std::span<double> values, comm::ReduceOp op) {
  groups_.world->allreduce(TensorView::flat(values.data(), values.size()), op);
}

int DdpStrategy::agreeOnStop(int localSignal) {
  double flag[1] = {static_cast<double>(localSignal)};
  groups_.world->allreduce(TensorView::flat(flag, 1), comm::ReduceOp::kMax);
  return static_cast<int>(flag[0]);
}

void DdpStrategy::barrier() { groups_.world->barrier(); }

bool DdpStrategy::agreeFinite(std::span<const float> values) {
  if (!groups_.tensor) return nn::allFinite(values);
  // Tensor ranks hold different slices: a non-finite value in one must stop them all.
  double bad[1] = {nn::allFinite(values) ? 0.0 : 1.0};
  groups_.tensor->allreduce(TensorView::flat(bad, 1), comm::ReduceOp::kMax);
  return bad[0] == 0.0;
}

double DdpStrategy::gradNorm(const nn::Model& model) {
  if (!groups_.tensor) return nn::gradNorm(model.grads(), model.device());
  const comm::BackendPtr groups[] = {groups_.tensor};
  return partsGradNorm(model, groups_.tensor->rank() == 0, groups);
}

CheckpointShard DdpStrategy::checkpointShard(const nn::Model& model) const {
  if (groups_.tensor) {
    // Tensor parallel: the first replica's tensor ranks write their slices (the replicated parameters once, from
    // tensor rank 0); every rank restores its own slices, whatever layout wrote them.
    const int t = groups_.tensor->rank();
    const bool writer = !groups_.data || groups_.data->rank() == 0;
    const auto mine = tensorSaveParams(model, t);
    return {.loadParams = allParams(model),
            .loadOptimizer = true,
            .saveModel = writer,
            .saveParams = writer ? mine : std::vector<size_t>{},
            .saveOptimizer = writer,
            .shardTag = fmt::format("p0-t{}", t)};
  }
  // Replicas are identical: rank 0 writes for everyone, every rank restores everything.
  const bool writer = groups_.rank == 0;
  return {.loadParams = allParams(model),
          .loadOptimizer = true,
          .saveModel = writer,
          .saveParams = writer ? allParams(model) : std::vector<size_t>{},
          .saveOptimizer = writer};
}

}  // namespace dtrain::train
