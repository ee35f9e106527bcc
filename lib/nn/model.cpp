#include "lib/nn/model.h"

#include <Eigen/Core>

#include <fmt/format.h>

#include "lib/common/error.h"
#include "lib/nn/registry.h"
#include "lib/nn/tensor_parallel.h"

namespace dtrain::nn {
namespace {

// Activation slices start on a 64-byte boundary, so every layer's output is as aligned as the arena.
constexpr size_t kAlignFloats = 16;
size_t roundUp(size_t n) { return (n + kAlignFloats - 1) / kAlignFloats * kAlignFloats; }

}  // namespace

Model::Model(Model&&) noexcept = default;
Model& Model::operator=(Model&&) noexcept = default;
Model::~Model() = default;

Model Model::build(const ModelSpec& fullSpec, int maxBatch, uint64_t seed, Device device,
                   std::shared_ptr<TensorGroup> tensor) {
  DTRAIN_CHECK_AS(ConfigError, maxBatch >= 1, "maximum batch size must be >= 1, got {}", maxBatch);
  DTRAIN_CHECK_AS(ConfigError, !fullSpec.layers.empty(), "{}: the model has no layers", fullSpec.path);
  // dtrain runs one worker per core; Eigen must not start threads of its own (it only would with OpenMP).
  Eigen::setNbThreads(1);

  Model m;
  m.scratch_ = std::make_unique<SharedScratch>();
  m.spec_ = fullSpec;
  m.device_ = device;
  m.maxBatch_ = maxBatch;
  const size_t batch = static_cast<size_t>(maxBatch);
  // With a tensor group the layers are built from this rank's part of the spec (its shapes); spec_ stays the
  // full model's (the input and output are the same).
  if (tensor && tensor->size() > 1) m.tensor_ = std::move(tensor);
  const ModelSpec spec = m.tensor_ ? shardModelSpec(fullSpec, m.tensor_->size(), m.tensor_->rank()) : fullSpec;

  size_t offset = 0;
  for (const auto& ls : spec.layers) {
    m.layers_.push_back(makeLayer(ls, {.device = device, .maxBatch = maxBatch, .seed = seed,
                                       .scratch = m.scratch_.get(), .tensor = m.tensor_.get()}));
    m.hasRandomLayers_ = m.hasRandomLayers_ || drawsRandom(ls);
    ParamRange range{offset, 0};
    for (const auto& ps : m.layers_.back()->paramShapes()) {
      size_t count = static_cast<size_t>(ps.shape.numel());
      m.table_.push_back({fmt::format("{}.{}", ls.paramPrefix(), ps.suffix), ps.shape, offset, count, ls.index,
                          ps.full.empty() ? ps.shape : ps.full, ps.dim, ps.start});
      offset += count;
    }
    range.count = offset - range.offset;
    m.layerRanges_.push_back(range);
  }
  m.scratch_->allocate();
  // The arenas and activations below are host memory.
  requireCpu(device, "the model's parameter arenas");
  m.params_ = AlignedBuffer<float>(offset);
  m.grads_ = AlignedBuffer<float>(offset);
  InitRng rng(seed);
  bool seenParams = false;
  for (size_t i = 0; i < m.layers_.size(); ++i) {
    m.needsInputGrad_.push_back(seenParams);
    seenParams = seenParams || m.layerRanges_[i].count > 0;
    if (m.layerRanges_[i].count == 0) continue;
    m.layers_[i]->bind(m.params_.data() + m.layerRanges_[i].offset, m.grads_.data() + m.layerRanges_[i].offset);
    m.layers_[i]->initParams(rng);
  }
  // A tied lm_head shares its embedding's token table (the embedding's first parameter).
  for (size_t i = 0; i < m.layers_.size(); ++i) {
    const int tied = spec.layers[i].tiedTo;
    if (tied < 0) continue;
    const size_t at = m.layerRanges_[static_cast<size_t>(tied)].offset;
    m.layers_[i]->bindTied(m.params_.data() + at, m.grads_.data() + at);
  }

  // One arena for all outputs; gradients between layers ping-pong between two buffers as large as the
  // largest layer input.
  size_t actTotal = 0;
  size_t maxInput = 0;
  for (size_t i = 0; i < m.layers_.size(); ++i) {
    if (!m.layers_[i]->aliasesInput()) actTotal += roundUp(batch * static_cast<size_t>(spec.layers[i].output.numel()));
    if (m.needsInputGrad_[i]) maxInput = std::max(maxInput, batch * static_cast<size_t>(spec.layers[i].input.numel()));
  }
  m.activations_ = AlignedBuffer<float>(actTotal);
  size_t at = 0;
  for (size_t i = 0; i < m.layers_.size(); ++i) {
    if (m.layers_[i]->aliasesInput()) {
      m.ownOutput_.push_back(nullptr);
      continue;
    }
    m.ownOutput_.push_back(m.activations_.data() + at);
    at += roundUp(batch * static_cast<size_t>(spec.layers[i].output.numel()));
  }
  m.gradA_ = AlignedBuffer<float>(maxInput);
  m.gradB_ = AlignedBuffer<float>(maxInput);
  m.in_.assign(m.layers_.size(), nullptr);
  m.out_.assign(m.layers_.size(), nullptr);
  return m;
}

TensorView Model::forward(const float* x, int batch, bool train) {
  DTRAIN_CHECK(x != nullptr, "model input is null");
  DTRAIN_CHECK(batch >= 1 && batch <= maxBatch_, "batch of {} samples is outside [1, {}] (the model's maximum batch)",
               batch, maxBatch_);
  const float* in = x;
  for (size_t i = 0; i < layers_.size(); ++i) {
    float* out = ownOutput_[i] != nullptr ? ownOutput_[i] : const_cast<float*>(in);
    if (ownOutput_[i] != nullptr) layers_[i]->forward(in, out, batch, train);
    in_[i] = in;
    out_[i] = out;
    in = out;
  }
  lastBatch_ = batch;
  return TensorView::of(out_.back(), spec_.output().withBatch(batch), device_);
}

void Model::backward(const TensorView& gradOutput, LayerGradReady onLayerGradReady, GradMode mode) {
  DTRAIN_CHECK(lastBatch_ > 0, "backward called before forward");
  const Shape expected = spec_.output().withBatch(lastBatch_);
  DTRAIN_CHECK(gradOutput.dtype == DType::kFloat32 && gradOutput.shape == expected,
               "output gradient is {} {} but the last forward produced float32 {}", dtypeName(gradOutput.dtype),
               gradOutput.shape.str(), expected.str());
  const bool accumulate = mode == GradMode::kAccumulate;
  const float* dy = static_cast<const float*>(gradOutput.data);
  for (int i = static_cast<int>(layers_.size()) - 1; i >= 0; --i) {
    const auto k = static_cast<size_t>(i);
    const bool aliasing = ownOutput_[k] == nullptr;
    float* dx = nullptr;
    if (needsInputGrad_[k] && !aliasing) dx = dy == gradA_.data() ? gradB_.data() : gradA_.data();
    if (!aliasing) layers_[k]->backward(in_[k], out_[k], dy, dx, lastBatch_, accumulate);
    if (layerRanges_[k].count > 0 && onLayerGradReady) onLayerGradReady(i);
    // No earlier layer has parameters: nothing upstream needs a gradient.
    if (!needsInputGrad_[k]) break;
    if (!aliasing) dy = dx;
  }
}

ParamRange Model::layerParamRange(int layer) const {
  DTRAIN_CHECK(layer >= 0 && layer < numLayers(), "layer index {} out of range [0, {})", layer, numLayers());
  return layerRanges_[static_cast<size_t>(layer)];
}

std::vector<int> Model::paramLayers() const {
  std::vector<int> out;
  for (size_t i = 0; i < layerRanges_.size(); ++i) {
    if (layerRanges_[i].count > 0) out.push_back(static_cast<int>(i));
  }
  return out;
}

void Model::reseedDropout(uint64_t seed) {
  for (auto& layer : layers_) layer->reseed(seed);
}

}  // namespace dtrain::nn
