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

// PyTorch's default initialisation drawn from InitRng(seed) in parameter order; a stage draws the stream through
// the layers before it, so its values are the whole model's. The draws are host code: on the CPU the layers draw
// straight into the arena; on a GPU CPU twins of the layers (one sample, bound to a host copy of the arena) draw
// and the result is copied over, so the same seed gives the same bits on every device.
void Model::initParams(const ModelSpec& full, int first, uint64_t seed) {
  const bool onHost = device_.isCpu();
  AlignedBuffer<float> hostArena, hostGrads;
  if (!onHost) {
    hostArena = AlignedBuffer<float>(params_.size());
    hostGrads = AlignedBuffer<float>(params_.size());
  }
  float* base = onHost ? params_.data() : hostArena.data();
  InitRng rng(seed);
  SharedScratch skipScratch;
  for (int i = 0; i < first; ++i) {
    const LayerSpec& ls = full.layers[static_cast<size_t>(i)];
    const auto count = static_cast<size_t>(ls.paramCount());
    if (count == 0) continue;
    auto layer = makeLayer(ls, {.device = Device::cpu(), .maxBatch = 1, .seed = seed, .scratch = &skipScratch});
    AlignedBuffer<float> p(count), g(count);
    layer->bind(p.data(), g.data());
    layer->initParams(rng);
    if (tiedReplica_ >= 0 && spec_.layers[static_cast<size_t>(tiedReplica_)].tiedTo == i) {
      const ParamRange slot = layerRanges_[static_cast<size_t>(tiedReplica_)];
      std::copy_n(p.data(), slot.count, base + slot.offset);
    }
  }
  for (size_t i = 0; i < layers_.size(); ++i) {
    const ParamRange range = layerRanges_[i];
    if (range.count == 0 || static_cast<int>(i) == tiedReplica_) continue;
    if (onHost) {
      layers_[i]->initParams(rng);
      continue;
    }
    auto twin = makeLayer(parts_.layers[i], {.device = Device::cpu(), .maxBatch = 1, .seed = seed,
                                             .scratch = &skipScratch, .tensor = tensor_.get()});
    twin->bind(base + range.offset, hostGrads.data() + range.offset);
    twin->initParams(rng);
  }
  if (!onHost) copyBytes(params_.data(), device_, base, Device::cpu(), params_.size() * sizeof(float));
}

void Model::zeroGrad() { zeroFloats(grads_.data(), grads_.size(), device_); }

std::span<float> Model::hostParams() const {
  if (device_.isCpu()) return {const_cast<float*>(params_.data()), params_.size()};
  if (hostParams_.size() != params_.size()) hostParams_ = AlignedBuffer<float>(params_.size());
  copyBytes(hostParams_.data(), Device::cpu(), params_.data(), device_, params_.size() * sizeof(float));
  return hostParams_.span();
}

TensorView Model::hostParamTensor(const ParamEntry& entry) const {
  const float* base = device_.isCpu() ? params_.data() : hostParams_.data();
  DTRAIN_CHECK(base != nullptr || entry.count == 0, "hostParamTensor before hostParams() on {}", device_.str());
  return TensorView::of(base + entry.offset, entry.shape);
}

void Model::uploadHostParams() {
  if (device_.isCpu()) return;
  DTRAIN_CHECK(hostParams_.size() == params_.size(), "uploadHostParams before hostParams() on {}", device_.str());
  copyBytes(params_.data(), device_, hostParams_.data(), Device::cpu(), params_.size() * sizeof(float));
}

Model::Model(Model&&) noexcept = default;
Model& Model::operator=(Model&&) noexcept = default;
Model::~Model() = default;

std::vector<ParamEntry> paramTableOf(const ModelSpec& spec) {
  std::vector<ParamEntry> table;
  size_t offset = 0;
  for (size_t i = 0; i < spec.layers.size(); ++i) {
    const auto& ls = spec.layers[i];
    for (const auto& ps : paramShapesOf(ls)) {
      const auto count = static_cast<size_t>(ps.shape.numel());
      table.push_back({.name = fmt::format("{}.{}", ls.paramPrefix(), ps.suffix), .shape = ps.shape, .offset = offset,
                       .count = count, .layer = static_cast<int>(i), .fullShape = ps.shape});
      offset += count;
    }
  }
  return table;
}

void Model::makeLayers(uint64_t seed) {
  seed_ = seed;
  scratch_ = std::make_unique<SharedScratch>(device_);  // on the model's device: its layers' scratch
  layers_.clear();
  hasRandomLayers_ = false;
  const bool bf16 = !device_.isCpu() && bf16ActivationsOn();
  for (const auto& ls : parts_.layers) {
    layers_.push_back(makeLayer(ls, {.device = device_, .maxBatch = maxBatch_, .seed = seed, .scratch = scratch_.get(),
                                     .tensor = tensor_.get(), .bf16 = bf16}));
    hasRandomLayers_ = hasRandomLayers_ || drawsRandom(ls);
  }
  // Consecutive pairs may fuse (Layer::fuseWithNext; only CUDA layers do): forward and backward below run them in
  // order, an aliasing layer (flatten) between them prevents it.
  for (size_t i = 0; i + 1 < layers_.size(); ++i) {
    if (!layers_[i]->aliasesInput() && !layers_[i + 1]->aliasesInput()) layers_[i]->fuseWithNext(*layers_[i + 1]);
  }
  // bf16 activation storage: the outputs only bf16 GEMMs read are 2-byte values (allocateActivations sizes them).
  bf16Outputs_ = bf16 ? bf16StoredOutputs(parts_.layers) : std::vector<char>(layers_.size(), 0);
  if (bf16) applyBf16Storage(layers_, bf16Outputs_);
  // The loss may hand the last layer its dy in bf16 (Model::backward tells the layer which it got).
  bf16OutputGrad_ =
      bf16 && !layers_.empty() && !layers_.back()->aliasesInput() && takesBf16OutputGrad(parts_.layers.back());
  scratch_->allocate();
}

void Model::bindArenas() {
  for (size_t i = 0; i < layers_.size(); ++i) {
    if (layerRanges_[i].count == 0 || static_cast<int>(i) == tiedReplica_) continue;
    layers_[i]->bind(params_.data() + layerRanges_[i].offset, grads_.data() + layerRanges_[i].offset);
  }
  // A tied lm_head shares its embedding's token table (the embedding's first parameter), or its replica slot.
  for (size_t i = 0; i < layers_.size(); ++i) {
    const int tied = spec_.layers[i].tiedTo;
    if (tied < 0) continue;
    const size_t at = static_cast<int>(i) == tiedReplica_
                          ? layerRanges_[i].offset
                          : layerRanges_[static_cast<size_t>(tied - spec_.layers.front().index)].offset;
    layers_[i]->bindTied(params_.data() + at, grads_.data() + at);
  }
}

Model Model::build(const ModelSpec& full, int maxBatch, uint64_t seed, Device device,
                   std::shared_ptr<TensorGroup> tensor, const StageOptions& stage) {
  DTRAIN_CHECK_AS(ConfigError, maxBatch >= 1, "maximum batch size must be >= 1, got {}", maxBatch);
  DTRAIN_CHECK_AS(ConfigError, !full.layers.empty(), "{}: the model has no layers", full.path);
  const int n = static_cast<int>(full.layers.size());
  const int first = stage.first;
  const int last = stage.last < 0 ? n : stage.last;
  DTRAIN_CHECK(first >= 0 && first < last && last <= n, "stage layers [{}, {}) outside the model's {} layers", first,
               last, n);
  // dtrain runs one worker per core; Eigen must not start threads of its own (it only would with OpenMP).
  Eigen::setNbThreads(1);

  Model m;
  m.spec_ = full;
  if (first > 0 || last < n) {
    m.spec_.layers.assign(full.layers.begin() + first, full.layers.begin() + last);
    m.spec_.input = full.layers[static_cast<size_t>(first)].input;
  }
  // An embedding whose tied lm_head is in a later stage trains as an untied one (the pipeline sums the copies).
  for (auto& l : m.spec_.layers) {
    if (l.type() != "embedding" || !l.tied) continue;
    bool headHere = false;
    for (const auto& h : m.spec_.layers) headHere = headHere || h.tiedTo == l.index;
    if (!headHere) l.tied = false;
  }
  m.device_ = device;
  m.maxBatch_ = maxBatch;
  m.inputGradWanted_ = stage.inputGrad;
  // With a tensor group the layers are built from this rank's part of the spec (its shapes); spec_ stays the
  // full model's (the input and output are the same).
  if (tensor && tensor->size() > 1) m.tensor_ = std::move(tensor);
  if (m.tensor_ && !device.isCpu())
    DTRAIN_THROW(NotBuiltError, "device {}: tensor parallelism has no CUDA implementation in this build", device.str());
  m.parts_ = m.tensor_ ? shardModelSpec(m.spec_, m.tensor_->size(), m.tensor_->rank()) : m.spec_;
  m.makeLayers(seed);

  size_t offset = 0;
  for (size_t i = 0; i < m.spec_.layers.size(); ++i) {
    const auto& ls = m.parts_.layers[i];
    ParamRange range{offset, 0};
    if (ls.tiedTo >= 0 && ls.tiedTo < first) {
      // The token table lives in an earlier stage: this stage keeps a replica under the table's own name.
      const LayerSpec& emb = full.layers[static_cast<size_t>(ls.tiedTo)];
      const ParamShape table = paramShapesOf(emb).front();
      const auto count = static_cast<size_t>(table.shape.numel());
      m.table_.push_back({.name = fmt::format("{}.{}", emb.paramPrefix(), table.suffix), .shape = table.shape,
                          .offset = offset, .count = count, .layer = static_cast<int>(i), .fullShape = table.shape,
                          .replica = true});
      offset += count;
      m.tiedReplica_ = static_cast<int>(i);
    }
    for (const auto& ps : m.layers_[i]->paramShapes()) {
      const auto count = static_cast<size_t>(ps.shape.numel());
      m.table_.push_back({.name = fmt::format("{}.{}", ls.paramPrefix(), ps.suffix), .shape = ps.shape,
                          .offset = offset, .count = count, .layer = static_cast<int>(i),
                          .fullShape = ps.full.empty() ? ps.shape : ps.full, .sliceDim = ps.dim,
                          .sliceStart = ps.start});
      offset += count;
    }
    range.count = offset - range.offset;
    m.layerRanges_.push_back(range);
  }
  // Every layer has an implementation on the device (makeLayer threw otherwise): the GPU is the caller's from here.
  useDevice(device);
  m.paramArena_ = DeviceFloats(offset, device);
  m.gradArena_ = DeviceFloats(offset, device);
  m.params_ = m.paramArena_.span();
  m.grads_ = m.gradArena_.span();
  m.bindArenas();
  bool seenParams = false;
  for (size_t i = 0; i < m.layers_.size(); ++i) {
    m.needsInputGrad_.push_back(seenParams || stage.inputGrad);
    // A sparse embedding's table is outside the arena but still needs its gradient (lib/nn/sparse_rows.h).
    seenParams = seenParams || m.layerRanges_[i].count > 0 || m.parts_.layers[i].sparse;
  }
  m.initParams(full, first, seed);
  m.allocateActivations();
  return m;
}

Model Model::replica() const {
  Model r;
  r.spec_ = spec_;
  r.parts_ = parts_;
  r.tensor_ = tensor_;
  r.device_ = device_;
  r.maxBatch_ = maxBatch_;
  r.inputGradWanted_ = inputGradWanted_;
  r.tiedReplica_ = tiedReplica_;
  r.table_ = table_;
  r.layerRanges_ = layerRanges_;
  r.needsInputGrad_ = needsInputGrad_;
  r.params_ = params_;
  r.grads_ = grads_;
  r.makeLayers(seed_);
  r.bindArenas();
  r.allocateActivations();
  return r;
}

// One arena for all outputs (a bf16-stored output takes half the floats); gradients between layers ping-pong
// between two buffers as large as the largest layer input.
void Model::allocateActivations() {
  const auto batch = static_cast<size_t>(maxBatch_);
  auto outputFloats = [&](size_t i) {
    const size_t n = batch * static_cast<size_t>(parts_.layers[i].output.numel());
    return roundUp(bf16Outputs_[i] != 0 ? (n + 1) / 2 : n);
  };
  size_t actTotal = 0;
  size_t maxInput = 0;
  for (size_t i = 0; i < layers_.size(); ++i) {
    if (!layers_[i]->aliasesInput()) actTotal += outputFloats(i);
    if (needsInputGrad_[i]) maxInput = std::max(maxInput, batch * static_cast<size_t>(parts_.layers[i].input.numel()));
  }
  activations_ = DeviceFloats(actTotal, device_);
  ownOutput_.clear();
  size_t at = 0;
  for (size_t i = 0; i < layers_.size(); ++i) {
    if (layers_[i]->aliasesInput()) {
      ownOutput_.push_back(nullptr);
      continue;
    }
    ownOutput_.push_back(activations_.data() + at);
    at += outputFloats(i);
  }
  gradA_ = DeviceFloats(maxInput, device_);
  gradB_ = DeviceFloats(maxInput, device_);
  in_.assign(layers_.size(), nullptr);
  out_.assign(layers_.size(), nullptr);
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
  const bool bf16Grad = gradOutput.dtype == DType::kBFloat16;
  DTRAIN_CHECK(gradOutput.dtype == DType::kFloat32 || (bf16Grad && bf16OutputGrad_),
               "output gradient is {} {} but the model takes its output's gradient as {}", dtypeName(gradOutput.dtype),
               gradOutput.shape.str(), bf16OutputGrad_ ? "float32 or bfloat16" : "float32");
  DTRAIN_CHECK(gradOutput.shape == expected, "output gradient is {} {} but the last forward produced float32 {}",
               dtypeName(gradOutput.dtype), gradOutput.shape.str(), expected.str());
  // A float32 gradient is packed; a bf16 one may have rows further apart (the loss wrote it over the logits: ld
  // 2 x classes, Loss::backward), which only the last layer reads (it ignores its output: takesBf16OutputGrad).
  DTRAIN_CHECK(gradOutput.packed() || (bf16Grad && gradOutput.ld > expected.back()),
               "output gradient is {} {} with rows {} elements apart, but the model takes it packed (rows of {}){}",
               dtypeName(gradOutput.dtype), gradOutput.shape.str(), gradOutput.ld, expected.back(),
               bf16OutputGrad_ ? fmt::format(", or as bfloat16 with rows at least {} elements apart", expected.back())
                               : std::string());
  if (bf16OutputGrad_) layers_.back()->setBf16OutputGrad(bf16Grad, gradOutput.rowStride());
  const bool accumulate = mode == GradMode::kAccumulate;
  // A bf16 gradOutput is 2-byte values, read as such by the last layer only (setBf16OutputGrad).
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
  inputGrad_ = inputGradWanted_ ? dy : nullptr;
}

TensorView Model::inputGrad() const {
  if (inputGrad_ == nullptr) return {};
  return TensorView::of(const_cast<float*>(inputGrad_), spec_.input.withBatch(lastBatch_), device_);
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

void Model::reseedDropout(uint64_t seed, uint64_t position) {
  for (auto& layer : layers_) layer->reseed(seed, position);
}

std::vector<SparseTableInfo> Model::sparseTables() const {
  std::vector<SparseTableInfo> out;
  for (size_t i = 0; i < spec_.layers.size(); ++i) {
    const LayerSpec& l = spec_.layers[i];
    if (!l.sparse) continue;
    out.push_back({.table = static_cast<int>(out.size()), .layer = static_cast<int>(i),
                   .name = fmt::format("{}.wte.weight", l.paramPrefix()), .rows = l.vocab,
                   .dim = static_cast<int>(l.output.back()), .initStd = l.initStd > 0 ? l.initStd : 1.0});
  }
  return out;
}

void Model::bindSparseRows(SparseRows* rows) {
  for (const SparseTableInfo& t : sparseTables()) layers_[static_cast<size_t>(t.layer)]->bindSparse(rows, t.table);
}

}  // namespace dtrain::nn
