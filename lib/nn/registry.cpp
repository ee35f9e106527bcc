#include "lib/nn/registry.h"

#include <fmt/format.h>

#include <limits>

#include "lib/common/error.h"
#include "lib/nn/layer.h"

namespace dtrain::nn {

// The entries, each defined beside its implementation (layers_dense.cpp, layers_spatial.cpp).
const LayerKind& linearKind();
const LayerKind& reluKind();
const LayerKind& geluKind();
const LayerKind& tanhKind();
const LayerKind& sigmoidKind();
const LayerKind& dropoutKind();
const LayerKind& layerNormKind();
const LayerKind& flattenKind();
const LayerKind& conv2dKind();
const LayerKind& maxPool2dKind();
const LayerKind& embeddingKind();
const LayerKind& attentionKind();
const LayerKind& lmHeadKind();
const LayerKind& blockKind();

std::span<const LayerKind* const> layerKinds() {
  // The order of the "unknown layer type" message and of docs/model-spec.md.
  static const LayerKind* const kKinds[] = {
      &linearKind(),  &reluKind(),      &geluKind(),    &tanhKind(),   &sigmoidKind(),
      &dropoutKind(), &layerNormKind(), &flattenKind(), &conv2dKind(), &maxPool2dKind(),
      &embeddingKind(), &attentionKind(), &blockKind(), &lmHeadKind(),
  };
  return kKinds;
}

const LayerKind* findLayerKind(std::string_view name) {
  for (const LayerKind* k : layerKinds())
    if (k->name == name) return k;
  return nullptr;
}

std::vector<std::string_view> layerTypeNames() {
  std::vector<std::string_view> names;
  for (const LayerKind* k : layerKinds()) names.push_back(k->name);
  return names;
}

namespace {

const LayerKind& kindOf(const LayerSpec& spec) {
  DTRAIN_CHECK(spec.kind != nullptr, "{}: layer spec was not parsed (no layer type)", spec.path);
  return *spec.kind;
}

}  // namespace

std::vector<ParamShape> paramShapesOf(const LayerSpec& spec) {
  const LayerKind& kind = kindOf(spec);
  return kind.paramShapes != nullptr ? kind.paramShapes(spec) : std::vector<ParamShape>{};
}

int64_t paramCountOf(const LayerSpec& spec) {
  int64_t n = 0;
  for (const auto& p : paramShapesOf(spec)) n += p.shape.numel();
  return n;
}

void Layer::setBf16Storage(bool input, bool output) {
  DTRAIN_THROW(Error, "{}: layer '{}' on {} has no bf16 activation storage (asked for its {})", spec().path,
               spec().type(), device().str(), input && output ? "input and output" : input ? "input" : "output");
}

bool storesBf16Between(const LayerSpec& producer, const LayerSpec& consumer) {
  return producer.kind != nullptr && consumer.kind != nullptr && producer.kind->bf16Output && consumer.kind->bf16Input;
}

bool takesBf16OutputGrad(const LayerSpec& last) {
  return last.kind != nullptr && last.kind->bf16OutputGrad && last.kind->backwardIgnoresOutput;
}

void Layer::setBf16OutputGrad(bool /*on*/, int64_t /*ld*/) {
  DTRAIN_THROW(Error, "{}: layer '{}' on {} cannot take its output's gradient as bf16", spec().path, spec().type(),
               device().str());
}

std::vector<char> bf16StoredOutputs(std::span<const LayerSpec> sequence) {
  std::vector<char> out(sequence.size(), 0);
  for (size_t i = 0; i + 1 < sequence.size(); ++i) out[i] = storesBf16Between(sequence[i], sequence[i + 1]) ? 1 : 0;
  return out;
}

void applyBf16Storage(std::span<const std::unique_ptr<Layer>> layers, const std::vector<char>& storedOutputs) {
  DTRAIN_CHECK(layers.size() == storedOutputs.size(), "applyBf16Storage: {} layers but {} flags", layers.size(),
               storedOutputs.size());
  for (size_t i = 0; i < layers.size(); ++i) {
    const bool input = i > 0 && storedOutputs[i - 1] != 0;
    const bool output = storedOutputs[i] != 0;
    if (input || output) layers[i]->setBf16Storage(input, output);
  }
}

bool blockAddsInPlace(const LayerSpec& block) {
  return !block.children.empty() && block.children.back().kind != nullptr &&
         block.children.back().kind->backwardIgnoresOutput;
}

bool residualAddFusesInto(const LayerSpec& producer, const LayerSpec& consumer) {
  if (producer.type() != "block" || !blockAddsInPlace(producer)) return false;
  if (consumer.type() == "layernorm") return true;
  return consumer.type() == "block" && !consumer.children.empty() && consumer.children.front().type() == "layernorm";
}

int residualLayerNormPairs(std::span<const LayerSpec> sequence) {
  int pairs = 0;
  for (size_t i = 0; i + 1 < sequence.size(); ++i) pairs += residualAddFusesInto(sequence[i], sequence[i + 1]) ? 1 : 0;
  return pairs;
}

int64_t keptFloatsOf(const LayerSpec& spec, const MemoryTarget& target) {
  return spec.kind != nullptr && spec.kind->keptFloats != nullptr ? spec.kind->keptFloats(spec, target) : 0;
}

std::optional<int64_t> checkedParamCountOf(const LayerSpec& spec) {
  int64_t n = 0;
  for (const auto& p : paramShapesOf(spec)) {
    auto c = p.shape.checkedNumel();
    if (!c || *c > std::numeric_limits<int64_t>::max() - n) return std::nullopt;
    n += *c;
  }
  return n;
}

std::unique_ptr<Layer> makeLayer(const LayerSpec& spec, const LayerBuild& build) {
  DTRAIN_CHECK(build.maxBatch >= 1, "maxBatch must be >= 1, got {}", build.maxBatch);
  const LayerKind& kind = kindOf(spec);
  LayerFactory factory = build.device.isCpu() ? kind.cpu : kind.cuda;
  if (factory == nullptr) {
    DTRAIN_THROW(NotBuiltError, "device {}: layer '{}' has no {} implementation in this build", build.device.str(),
                 kind.name, build.device.isCpu() ? "CPU" : "CUDA");
  }
  return factory(spec, build);
}

void SharedScratch::allocate() {
  size_t total = 0;
  for (size_t n : size_) total += (n + 15) / 16 * 16;  // each slot on a 64-byte boundary
  if (total == 0) return;
  memory_ = DeviceFloats(total, device_);
  size_t at = 0;
  for (int i = 0; i < kSlots; ++i) {
    slot_[i] = memory_.data() + at;
    at += (size_[i] + 15) / 16 * 16;
  }
}

void requireCpu(Device device, std::string_view what) {
  if (!device.isCpu())
    DTRAIN_THROW(NotBuiltError, "device {}: {} has no CUDA implementation in this build", device.str(), what);
}

}  // namespace dtrain::nn
