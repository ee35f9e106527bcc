// Model: PyTorch parameter names and arena layout, documented initialisation, whole-model gradients,
// the per-layer gradient-ready callback, partial batches, gradient modes and misuse errors.
#include <doctest/doctest.h>

#include <cmath>
#include <random>
#include <vector>

#include "lib/common/error.h"
#include "lib/nn/loss.h"
#include "lib/nn/model.h"
#include "lib/nn/registry.h"

using namespace dtrain;
using namespace dtrain::nn;
using nlohmann::json;

namespace {

ModelSpec spec(std::vector<int64_t> input, const char* layers) {
  return parseModelSpec(json{{"input", input}, {"layers", json::parse(layers)}}, "test.json", "/model");
}

const char* kCnn = R"([{"type": "conv2d", "out": 3, "kernel": 3, "padding": 1}, {"type": "relu"},
                      {"type": "maxpool2d", "kernel": 2}, {"type": "flatten"}, {"type": "linear", "out": 4}])";
const char* kMlp = R"([{"type": "linear", "out": 6}, {"type": "tanh"}, {"type": "layernorm"},
                      {"type": "linear", "out": 5}, {"type": "gelu"}, {"type": "linear", "out": 3}])";

std::vector<float> randomInput(size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> x(n);
  for (float& v : x) v = u(rng);
  return x;
}

}  // namespace

TEST_CASE("parameter names, shapes and offsets follow torch.nn.Sequential") {
  Model m = Model::build(spec({1, 8, 8}, kCnn), 4, 1);
  const auto& t = m.paramTable();
  REQUIRE(t.size() == 4);
  CHECK(t[0].name == "0.weight");
  CHECK(t[0].shape == Shape{3, 1, 3, 3});
  CHECK(t[1].name == "0.bias");
  CHECK(t[1].shape == Shape{3});
  CHECK(t[2].name == "4.weight");
  CHECK(t[2].shape == Shape{4, 48});
  CHECK(t[3].name == "4.bias");
  CHECK(t[3].layer == 4);
  size_t offset = 0;
  for (const auto& e : t) {
    CHECK(e.offset == offset);  // contiguous, no padding, in layer order
    CHECK(e.count == static_cast<size_t>(e.shape.numel()));
    offset += e.count;
  }
  CHECK(m.numParams() == offset);
  CHECK(m.grads().size() == offset);
  CHECK(static_cast<int64_t>(offset) == m.spec().paramCount());
  CHECK(m.paramLayers() == std::vector<int>{0, 4});
  CHECK(m.layerParamRange(0).offset == 0);
  CHECK(m.layerParamRange(0).count == 30);
  CHECK(m.layerParamRange(2).count == 0);
  CHECK(m.layerParamRange(4).offset == 30);
  CHECK(m.layerParamRange(4).count == 196);
  CHECK(m.outputShape() == Shape{4});
  CHECK(m.summary().size() == 5);
}

TEST_CASE("initialisation is the documented mt19937_64 stream with PyTorch's bounds") {
  Model m = Model::build(spec({5}, R"([{"type": "linear", "out": 3}, {"type": "layernorm"},
                                      {"type": "linear", "out": 2}])"), 2, 42);
  // docs/model-spec.md: one std::mt19937_64(seed); per layer in order, weight then bias, row-major; each value
  // is -b + 2b * ((next() >> 40) * 2^-24) with b = 1/sqrt(fan_in); LayerNorm weight 1, bias 0 (no draws).
  std::mt19937_64 engine(42);
  auto draw = [&](double bound) {
    return static_cast<float>(-bound + 2.0 * bound * static_cast<double>(engine() >> 40) * 0x1.0p-24);
  };
  std::vector<float> expected;
  for (int i = 0; i < 18; ++i) expected.push_back(draw(1.0 / std::sqrt(5.0)));
  for (int i = 0; i < 3; ++i) expected.push_back(1.0f);
  for (int i = 0; i < 3; ++i) expected.push_back(0.0f);
  for (int i = 0; i < 8; ++i) expected.push_back(draw(1.0 / std::sqrt(3.0)));
  CHECK(std::vector<float>(m.params().begin(), m.params().end()) == expected);

  Model same = Model::build(m.spec(), 2, 42);
  Model other = Model::build(m.spec(), 2, 43);
  CHECK(std::equal(same.params().begin(), same.params().end(), m.params().begin()));
  CHECK_FALSE(std::equal(other.params().begin(), other.params().end(), m.params().begin()));
}

TEST_CASE("whole-model gradients match finite differences (MLP with layernorm, CNN)") {
  for (const char* layers : {kMlp, kCnn}) {
    const bool cnn = layers == kCnn;
    Model m = Model::build(cnn ? spec({1, 8, 8}, layers) : spec({4}, layers), 3, 5);
    auto loss = Loss::create({LossType::kCrossEntropy}, m.outputShape(), 3);
    std::vector<float> x = randomInput(static_cast<size_t>(3 * m.inputShape().numel()), 9);
    std::vector<int64_t> labels = {0, 2, 1};
    TensorView lab = TensorView::i64(labels.data(), Shape{3});
    auto objective = [&] { return static_cast<double>(loss->forward(m.forward(x.data(), 3, true), lab)); };
    objective();
    m.zeroGrad();
    m.backward(loss->backward());
    const std::vector<float> analytic(m.grads().begin(), m.grads().end());
    // A small step for the CNN: ReLU and max-pool kinks must not fall inside [p - h, p + h].
    const double h = cnn ? 1e-3 : 1e-2;
    int bad = 0;
    for (size_t i = 0; i < m.numParams(); ++i) {
      float& p = m.params()[i];
      const float saved = p;
      p = saved + static_cast<float>(h);
      const double plus = objective();
      p = saved - static_cast<float>(h);
      const double minus = objective();
      p = saved;
      const double num = (plus - minus) / (2 * h);
      if (std::fabs(num - analytic[i]) > 1e-3 + 2e-2 * std::fabs(analytic[i]) && bad++ < 5) {
        FAIL_CHECK(m.paramTable().size() << " params; index " << i << " numeric " << num << " analytic "
                                         << analytic[i]);
      }
    }
    CHECK(bad == 0);
  }
}

TEST_CASE("onLayerGradReady fires in reverse layer order once each layer's gradients are final") {
  Model m = Model::build(spec({6}, kMlp), 4, 2);
  auto loss = Loss::create({LossType::kCrossEntropy}, m.outputShape(), 4);
  std::vector<float> x = randomInput(24, 1);
  std::vector<int64_t> labels = {0, 1, 2, 0};
  loss->forward(m.forward(x.data(), 4, true), TensorView::i64(labels.data(), Shape{4}));
  // Sentinels show which slices backward has written when each callback fires.
  std::fill(m.grads().begin(), m.grads().end(), NAN);
  std::vector<int> order;
  std::vector<std::vector<float>> snapshots;
  m.backward(
      loss->backward(),
      [&](int layer) {
        order.push_back(layer);
        ParamRange r = m.layerParamRange(layer);
        snapshots.emplace_back(m.grads().begin() + static_cast<long>(r.offset),
                               m.grads().begin() + static_cast<long>(r.offset + r.count));
        for (float g : snapshots.back()) REQUIRE_FALSE(std::isnan(g));  // this layer: written
        for (size_t i = 0; i < r.offset; ++i) REQUIRE(std::isnan(m.grads()[i]));  // earlier layers: not yet
      },
      GradMode::kOverwrite);
  CHECK(order == std::vector<int>{5, 3, 2, 0});
  for (size_t k = 0; k < order.size(); ++k) {
    ParamRange r = m.layerParamRange(order[k]);
    CHECK(std::equal(snapshots[k].begin(), snapshots[k].end(), m.grads().begin() + static_cast<long>(r.offset)));
  }
}

TEST_CASE("a smaller last batch uses the front of the buffers and gives the same rows") {
  Model m = Model::build(spec({1, 8, 8}, kCnn), 8, 3);
  std::vector<float> x = randomInput(8 * 64, 4);
  TensorView full = m.forward(x.data(), 8, false);
  CHECK(full.shape == Shape{8, 4});
  std::vector<float> first5(full.f32(), full.f32() + 20);
  TensorView part = m.forward(x.data(), 5, false);
  CHECK(part.shape == Shape{5, 4});
  // Eigen may block a 5-row GEMM differently from an 8-row one, so sums can round differently in the last bit.
  for (int i = 0; i < 20; ++i) CHECK(part.f32()[i] == doctest::Approx(first5[static_cast<size_t>(i)]).epsilon(1e-5));

  // Gradients of a 5-sample batch equal the sum of per-sample gradients.
  auto loss = Loss::create({LossType::kMse}, m.outputShape(), 8);
  std::vector<float> target(32, 0.5f);
  m.zeroGrad();
  for (int i = 0; i < 5; ++i) {
    loss->forward(m.forward(x.data() + i * 64, 1, true), TensorView::f32(target.data(), Shape{1, 4}));
    m.backward(loss->backward(1.0f / 5.0f));  // accumulate: mean over 5 = sum of per-sample / 5
  }
  const std::vector<float> accumulated(m.grads().begin(), m.grads().end());
  loss->forward(m.forward(x.data(), 5, true), TensorView::f32(target.data(), Shape{5, 4}));
  m.backward(loss->backward(), {}, GradMode::kOverwrite);
  for (size_t i = 0; i < accumulated.size(); ++i) {
    REQUIRE(m.grads()[i] == doctest::Approx(accumulated[i]).epsilon(1e-4).scale(1e-3));
  }
}

TEST_CASE("flatten aliases its input; a model whose first parameter layer follows it needs no input gradient") {
  Model only = Model::build(spec({2, 3}, R"([{"type": "flatten"}])"), 2, 1);
  std::vector<float> x = randomInput(12, 2);
  TensorView out = only.forward(x.data(), 2, false);
  CHECK(out.data == x.data());
  CHECK(out.shape == Shape{2, 6});

  Model m = Model::build(spec({2, 3}, R"([{"type": "flatten"}, {"type": "linear", "out": 2}])"), 2, 1);
  auto loss = Loss::create({LossType::kMse}, m.outputShape(), 2);
  std::vector<float> target = {1, 0, 0, 1};
  loss->forward(m.forward(x.data(), 2, true), TensorView::f32(target.data(), Shape{2, 2}));
  TensorView g = loss->backward();
  m.backward(g, {}, GradMode::kOverwrite);
  // dW = dY^T X by hand.
  for (int o = 0; o < 2; ++o) {
    for (int i = 0; i < 6; ++i) {
      double expect = g.f32()[o] * x[static_cast<size_t>(i)] + g.f32()[2 + o] * x[static_cast<size_t>(6 + i)];
      CHECK(m.grads()[static_cast<size_t>(o * 6 + i)] == doctest::Approx(expect));
    }
  }
}

TEST_CASE("dropout in a model: active only in training, reseedable") {
  Model m = Model::build(spec({50}, R"([{"type": "dropout", "p": 0.5}, {"type": "linear", "out": 2}])"), 1, 1);
  std::vector<float> x(50, 1.0f);
  auto run = [&](bool train) {
    TensorView y = m.forward(x.data(), 1, train);
    return std::vector<float>(y.f32(), y.f32() + 2);
  };
  const auto eval1 = run(false);
  CHECK(run(false) == eval1);
  CHECK(run(true) != eval1);
  m.reseedDropout(7, 0);
  const auto a = run(true);
  m.reseedDropout(7, 0);
  CHECK(run(true) == a);

  // A layer with its own "seed" ignores the seeds (build and reseed: every rank, any job seed draws the same
  // masks) and follows the reseed's position (the trainer's step and micro-batch): the same position repeats its
  // masks, which is how a resumed run continues bit for bit.
  Model pinned = Model::build(spec({50}, R"([{"type": "dropout", "p": 0.5, "seed": 3}])"), 1, 1);
  Model twin = Model::build(pinned.spec(), 1, 99);  // another build seed: same masks
  auto mask = [&](Model& model) {
    TensorView y = model.forward(x.data(), 1, true);
    return std::vector<float>(y.f32(), y.f32() + 50);
  };
  const auto first = mask(pinned);
  CHECK(mask(twin) == first);
  const auto second = mask(pinned);
  CHECK(second != first);  // a second forward draws the stream's next elements
  CHECK(mask(twin) == second);
  pinned.reseedDropout(5, 8), twin.reseedDropout(6, 8);
  const auto at8 = mask(pinned);
  CHECK(mask(twin) == at8);
  CHECK(at8 != first);
  pinned.reseedDropout(5, 9);
  CHECK(mask(pinned) != at8);
  Model resumed = Model::build(pinned.spec(), 1, 7);  // a fresh build reseeded at position 8: position 8's masks
  resumed.reseedDropout(1, 8);
  CHECK(mask(resumed) == at8);
}

TEST_CASE("pinned-seed dropout at the same place in two blocks draws distinct masks, alike for any job seed") {
  // A block's children are numbered inside it, so the dropout of block 0 and of block 1 are both child 0: the
  // block mixes its own index into their key, or two blocks would drop exactly the same elements.
  const ModelSpec ms = spec({4, 25}, R"([{"type": "block", "layers": [{"type": "dropout", "p": 0.5, "seed": 3}]},
                                        {"type": "block", "layers": [{"type": "dropout", "p": 0.5, "seed": 3}]}])");
  const std::vector<float> x(100, 1.0f);
  auto masks = [&](const LayerSpec& layer, uint64_t buildSeed, uint64_t seed, uint64_t position) {
    auto impl = makeLayer(layer, {.device = Device::cpu(), .maxBatch = 1, .seed = buildSeed});
    std::vector<float> y(100);
    if (position != ~uint64_t{0}) impl->reseed(seed, position);
    impl->forward(x.data(), y.data(), 1, true);  // y = x + dropout(x): 1 where dropped, 3 where kept
    return y;
  };
  const uint64_t kBuild = ~uint64_t{0};
  for (uint64_t position : {kBuild, uint64_t{0}, uint64_t{8}}) {
    CAPTURE(position);
    const auto first = masks(ms.layers[0], 1, 5, position), second = masks(ms.layers[1], 1, 5, position);
    CHECK(first != second);
    // Still pinned: another job seed (build and reseed: every rank alike) repeats each block's masks, and a fresh
    // build reseeded at the same position (a resume) draws them again.
    CHECK(masks(ms.layers[0], 77, 6, position) == first);
    CHECK(masks(ms.layers[1], 78, 9, position) == second);
  }
  CHECK(masks(ms.layers[0], 1, 5, 8) != masks(ms.layers[0], 1, 5, 9));  // the position moves them
  // Reseeding at position 0 is the build's state (Model::reseedDropout(build seed, 0)).
  CHECK(masks(ms.layers[1], 1, 5, 0) == masks(ms.layers[1], 1, 5, kBuild));
}

TEST_CASE("gradient modes and zeroGrad") {
  Model m = Model::build(spec({4}, kMlp), 2, 1);
  auto loss = Loss::create({LossType::kCrossEntropy}, m.outputShape(), 2);
  std::vector<float> x = randomInput(8, 3);
  std::vector<int64_t> labels = {1, 2};
  auto step = [&](GradMode mode) {
    loss->forward(m.forward(x.data(), 2, true), TensorView::i64(labels.data(), Shape{2}));
    m.backward(loss->backward(), {}, mode);
  };
  step(GradMode::kOverwrite);
  const std::vector<float> once(m.grads().begin(), m.grads().end());
  step(GradMode::kAccumulate);
  for (size_t i = 0; i < once.size(); ++i) REQUIRE(m.grads()[i] == doctest::Approx(2 * once[i]));
  m.zeroGrad();
  CHECK(std::all_of(m.grads().begin(), m.grads().end(), [](float g) { return g == 0.0f; }));
  step(GradMode::kAccumulate);
  for (size_t i = 0; i < once.size(); ++i) REQUIRE(m.grads()[i] == doctest::Approx(once[i]));
}

TEST_CASE("misuse is reported") {
  Model m = Model::build(spec({4}, kMlp), 2, 1);
  std::vector<float> x(12, 0.0f), g(6, 0.0f);
  CHECK_THROWS_WITH_AS(m.backward(TensorView::f32(g.data(), Shape{2, 3})), "backward called before forward",
                       dtrain::Error);
  CHECK_THROWS_WITH_AS(m.forward(x.data(), 3, true),
                       "batch of 3 samples is outside [1, 2] (the model's maximum batch)", dtrain::Error);
  m.forward(x.data(), 1, true);
  CHECK_THROWS_WITH_AS(m.backward(TensorView::f32(g.data(), Shape{2, 3})),
                       "output gradient is float32 [2,3] but the last forward produced float32 [1,3]", dtrain::Error);
  CHECK_THROWS_AS(m.layerParamRange(6), dtrain::Error);
  CHECK_THROWS_WITH_AS(Model::build(m.spec(), 0, 1), "maximum batch size must be >= 1, got 0", dtrain::ConfigError);
}
