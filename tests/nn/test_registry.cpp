// The layer registry: every registered type parses, reports its parameters and builds from one entry; devices
// without an implementation are refused with a clear error.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <set>
#include <string>
#include <vector>

#include "lib/common/error.h"
#include "lib/nn/layer.h"
#include "lib/nn/loss.h"
#include "lib/nn/model.h"
#include "lib/nn/optimizer.h"
#include "lib/nn/device.h"
#include "lib/nn/registry.h"
#include "lib/nn/spec.h"

using namespace dtrain;
using namespace dtrain::nn;
using nlohmann::json;

namespace {

ModelSpec exampleModel(const LayerKind& kind) {
  json model{{"input", json::parse(kind.exampleInput)}, {"layers", json::array({json::parse(kind.exampleLayer)})}};
  return parseModelSpec(model, "registry.json", "/model");
}

template <class F>
std::string messageOf(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

TEST_CASE("every registered type round-trips parse -> paramShapes -> make -> forward/backward") {
  REQUIRE(!layerKinds().empty());
  std::set<std::string_view> names;
  for (const LayerKind* kind : layerKinds()) {
    CAPTURE(kind->name);
    CHECK(names.insert(kind->name).second);
    CHECK(findLayerKind(kind->name) == kind);
    REQUIRE(bool(kind->parse));
    REQUIRE(bool(kind->cpu));
    // A CUDA build has a CUDA implementation of every layer; a CPU build has none.
    CHECK(bool(kind->cuda) == cudaBuilt());

    ModelSpec spec = exampleModel(*kind);
    const LayerSpec& ls = spec.layers.at(0);
    CHECK(ls.kind == kind);
    CHECK(ls.type() == kind->name);
    CHECK(ls.output.rank() >= 1);

    // One source of parameter counts: the entry's paramShapes.
    int64_t count = 0;
    for (const auto& p : paramShapesOf(ls)) count += p.shape.numel();
    CHECK(ls.paramCount() == count);
    CHECK(spec.paramCount() == count);
    CHECK(summarize(spec).at(0).params == count);

    auto layer = makeLayer(ls, {.device = Device::cpu(), .maxBatch = 2, .seed = 1});
    CHECK(layer->device() == Device::cpu());
    REQUIRE(layer->paramShapes().size() == paramShapesOf(ls).size());
    for (size_t i = 0; i < layer->paramShapes().size(); ++i) {
      CHECK(layer->paramShapes()[i].suffix == paramShapesOf(ls)[i].suffix);
      CHECK(layer->paramShapes()[i].shape == paramShapesOf(ls)[i].shape);
    }

    // The model built from it has exactly these parameters in its arena and table, and runs a step.
    Model m = Model::build(spec, 2, 3, Device::cpu());
    CHECK(m.device() == Device::cpu());
    CHECK(static_cast<int64_t>(m.numParams()) == count);
    CHECK(m.paramTable().size() == paramShapesOf(ls).size());
    CHECK(m.hasRandomLayers() == kind->random);
    std::vector<float> x(static_cast<size_t>(2 * spec.input.numel()), 0.25f);
    for (size_t i = 0; i < x.size(); ++i) x[i] += 0.01f * static_cast<float>(i % 7);
    TensorView y = m.forward(x.data(), 2, true);
    CHECK(y.shape == spec.output().withBatch(2));
    CHECK(y.device == Device::cpu());
    std::vector<float> dy(static_cast<size_t>(y.numel()), 1.0f);
    m.zeroGrad();
    CHECK_NOTHROW(m.backward(TensorView::f32(dy.data(), y.shape)));
  }
}

TEST_CASE("the unknown-type message lists the registered types in registry order") {
  std::string expected;
  for (std::string_view name : layerTypeNames()) expected += (expected.empty() ? "" : ", ") + std::string(name);
  CHECK(expected ==
        "linear, relu, gelu, tanh, sigmoid, dropout, layernorm, flatten, conv2d, maxpool2d, embedding, "
        "causal_self_attention, block, lm_head");
  json model{{"input", {4}}, {"layers", json::parse(R"([{"type": "swish"}])")}};
  CHECK(messageOf([&] { parseModelSpec(model, "job.json", "/model"); }) ==
        "job.json: /model/layers/0/type: unknown layer type 'swish' (expected " + expected + ")");
  CHECK(findLayerKind("swish") == nullptr);
}

TEST_CASE("a device without an implementation is refused with NotBuiltError, not a crash") {
  const Device gpu = Device::cuda(0);
  if (cudaBuilt()) {
    // CUDA build: every registered layer has a CUDA implementation; a type without one (here a copy of conv2d's
    // entry with its CUDA factory removed) is refused the same way, whatever GPUs are visible.
    ModelSpec conv = exampleModel(*findLayerKind("conv2d"));
    LayerKind cpuOnly = *findLayerKind("conv2d");
    cpuOnly.cuda = nullptr;
    conv.layers[0].kind = &cpuOnly;
    CHECK(messageOf([&] { makeLayer(conv.layers[0], {.device = gpu, .maxBatch = 2}); }) ==
          "device cuda:0: layer 'conv2d' has no CUDA implementation in this build");
    CHECK_THROWS_AS(makeLayer(conv.layers[0], {.device = gpu, .maxBatch = 2}), NotBuiltError);
    CHECK_NOTHROW(requireCpu(Device::cpu(), "the arenas"));
    return;
  }
  ModelSpec spec = exampleModel(*findLayerKind("linear"));
  CHECK_THROWS_AS(makeLayer(spec.layers[0], {.device = gpu, .maxBatch = 2}), NotBuiltError);
  CHECK(messageOf([&] { makeLayer(spec.layers[0], {.device = gpu, .maxBatch = 2}); }) ==
        "device cuda:0: layer 'linear' has no CUDA implementation in this build");
  CHECK(messageOf([&] { Model::build(spec, 2, 1, Device::cuda(1)); }) ==
        "device cuda:1: layer 'linear' has no CUDA implementation in this build");
  CHECK_THROWS_AS(Model::build(spec, 2, 1, gpu), NotBuiltError);
  CHECK(messageOf([&] { Loss::create({LossType::kMse}, spec.output(), 2, gpu); }) ==
        "device cuda:0: loss 'mse' has no CUDA implementation in this build");
  CHECK(messageOf([&] { Optimizer::create(OptimizerSpec{}, 10, gpu); }) ==
        "device cuda:0: optimizer 'sgd' has no CUDA implementation in this build");
  CHECK(messageOf([] { requireCpu(Device::cuda(2), "the arenas"); }) ==
        "device cuda:2: the arenas has no CUDA implementation in this build");
  CHECK_NOTHROW(requireCpu(Device::cpu(), "the arenas"));
  // An unparsed spec is a programming error, reported as such.
  CHECK_THROWS_AS(makeLayer(LayerSpec{}, {.device = Device::cpu(), .maxBatch = 1}), Error);
}
