// Pipeline stages of a model (Model::build with StageOptions, Model::replica): the whole model's names and
// initial values, chained stages computing what the whole model computes, a tied table split across stages.
#include <doctest/doctest.h>

#include <cmath>
#include <map>
#include <vector>

#include "lib/nn/model.h"
#include "lib/nn/spec.h"

using namespace dtrain;
using namespace dtrain::nn;
using nlohmann::json;

namespace {

std::map<std::string, std::vector<float>> byName(const Model& m, bool grads) {
  std::map<std::string, std::vector<float>> out;
  auto arena = grads ? m.grads() : m.params();
  for (const auto& p : m.paramTable())
    out[p.name + (p.replica ? "#replica" : "")] =
        std::vector<float>(arena.begin() + static_cast<long>(p.offset), arena.begin() + static_cast<long>(p.offset + p.count));
  return out;
}

void checkClose(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  for (size_t i = 0; i < a.size(); ++i) CHECK(a[i] == doctest::Approx(b[i]).epsilon(1e-5));
}

}  // namespace

TEST_CASE("stages of the gpt preset: full names and values, chained forward/backward equal the whole model") {
  const json preset{{"preset", "gpt"}, {"vocab_size", 11}, {"block_size", 5}, {"n_layer", 2},
                    {"n_head", 2}, {"n_embd", 8}};
  const ModelSpec spec = parseModelSpec(preset, "job.json", "/model");
  const int n = static_cast<int>(spec.layers.size());  // embedding, 4 blocks, ln_f, lm_head
  constexpr int kBatch = 2;
  Model whole = Model::build(spec, kBatch, 7);
  std::vector<Model> stages;
  const std::vector<int> cuts{0, 2, 4, n};
  for (size_t s = 0; s + 1 < cuts.size(); ++s)
    stages.push_back(Model::build(spec, kBatch, 7, Device::cpu(), nullptr, {.first = cuts[s], .last = cuts[s + 1],
                                                                   .inputGrad = s > 0}));
  auto full = byName(whole, false);
  size_t total = 0;
  for (const auto& st : stages)
    for (const auto& [name, values] : byName(st, false)) {
      const bool replica = name.ends_with("#replica");
      const std::string base = replica ? name.substr(0, name.size() - 8) : name;
      REQUIRE(full.count(base) == 1);
      CHECK(values == full[base]);
      if (!replica) total += values.size();
    }
  CHECK(total == whole.numParams());
  // The lm_head (the last layer) holds the table's replica, in its place in the arena.
  CHECK(stages.back().paramTable().back().replica);
  CHECK(stages.back().paramTable().back().name == "transformer.wte.weight");

  std::vector<float> tokens{1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
  TensorView out = whole.forward(tokens.data(), kBatch, true);
  const float* x = tokens.data();
  TensorView y;
  for (auto& st : stages) {
    y = st.forward(x, kBatch, true);
    x = static_cast<const float*>(y.data);
  }
  REQUIRE(y.shape == out.shape);
  std::vector<float> a(static_cast<const float*>(out.data), static_cast<const float*>(out.data) + out.numel());
  std::vector<float> b(x, x + y.numel());
  checkClose(b, a);

  std::vector<float> g(out.numel());
  for (size_t i = 0; i < g.size(); ++i) g[i] = static_cast<float>(std::sin(0.37 * static_cast<double>(i)));
  whole.backward(TensorView::of(g.data(), out.shape), {}, GradMode::kOverwrite);
  TensorView dy = TensorView::of(g.data(), out.shape);
  for (int s = static_cast<int>(stages.size()) - 1; s >= 0; --s) {
    stages[static_cast<size_t>(s)].backward(dy, {}, GradMode::kOverwrite);
    if (s > 0) dy = stages[static_cast<size_t>(s)].inputGrad();
  }
  auto fullGrads = byName(whole, true);
  auto first = byName(stages.front(), true);
  auto last = byName(stages.back(), true);
  std::vector<float> wte = first["transformer.wte.weight"];
  const auto& copy = last["transformer.wte.weight#replica"];
  for (size_t i = 0; i < wte.size(); ++i) wte[i] += copy[i];
  checkClose(wte, fullGrads["transformer.wte.weight"]);
  for (const auto& st : stages)
    for (const auto& [name, values] : byName(st, true))
      if (name != "transformer.wte.weight" && !name.ends_with("#replica")) checkClose(values, fullGrads[name]);
}

TEST_CASE("a replica shares the arenas: its backward adds into the same gradients") {
  const json mlp = json::parse(R"({"input": [3], "layers": [{"type": "linear", "out": 4}, {"type": "relu"},
                                   {"type": "linear", "out": 2}]})");
  const ModelSpec spec = parseModelSpec(mlp, "job.json", "/model");
  Model stage = Model::build(spec, 1, 3, Device::cpu(), nullptr, {.first = 2, .last = 3, .inputGrad = true});
  CHECK(stage.paramTable().front().name == "2.weight");
  Model twin = stage.replica();
  CHECK(twin.params().data() == stage.params().data());
  std::vector<float> x1{1, 2, 3, 4}, x2{-1, 0.5f, 2, 1}, g{1, -1};
  stage.forward(x1.data(), 1, true);
  twin.forward(x2.data(), 1, true);
  stage.backward(TensorView::of(g.data(), Shape{1, 2}), {}, GradMode::kOverwrite);
  const std::vector<float> one(stage.grads().begin(), stage.grads().end());
  twin.backward(TensorView::of(g.data(), Shape{1, 2}), {}, GradMode::kAccumulate);
  // d(2.weight)[o, i] = g[o] * x[i]: the two micro-batches' contributions add up.
  CHECK(stage.grads()[0] == doctest::Approx(one[0] + g[0] * x2[0]));
  CHECK(stage.inputGrad().shape == Shape({1, 4}));
  CHECK(twin.inputGrad().numel() == 4);
}
