// CPU <-> GPU parity of every layer, loss and optimizer with a CUDA implementation (TF32 off): the same spec,
// parameters and inputs on both devices give the same outputs and gradients within float32 rounding.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "lib/common/error.h"
#include "lib/nn/device.h"
#include "lib/nn/layer.h"
#include "lib/nn/loss.h"
#include "lib/nn/model.h"
#include "lib/nn/optimizer.h"
#include "lib/nn/spec.h"

using namespace dtrain;
using namespace dtrain::nn;
using nlohmann::json;

namespace {

const Device kGpu = Device::cuda(0);

template <class T>
std::vector<T> toHost(const T* p, size_t n) {
  std::vector<T> out(n);
  copyBytes(out.data(), Device::cpu(), p, kGpu, n * sizeof(T));
  return out;
}

template <class T>
DeviceFloats toDevice(const std::vector<T>& v) {
  static_assert(sizeof(T) == sizeof(float));
  DeviceFloats d(v.size(), kGpu);
  copyBytes(d.data(), kGpu, v.data(), Device::cpu(), v.size() * sizeof(T));
  return d;
}

// max |a - b| / max(1, |a|): relative for large values, absolute near zero.
double maxDiff(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i)
    worst = std::max(worst, std::fabs(double(a[i]) - double(b[i])) / std::max(1.0, std::fabs(double(a[i]))));
  return worst;
}

std::vector<float> randomVector(size_t n, uint32_t seed, float lo = -1, float hi = 1) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng);
  return v;
}

struct Case {
  std::string layer;
  std::vector<int64_t> input;
  bool tokens = false;  // integer inputs in [0, 11) (embedding)
};

// Tolerances of checkLayer: float32 rounding by default; bf16 GEMM inputs round to 8 significant bits.
struct Tolerance {
  double out = 1e-5, dx = 1e-5, grads = 1e-4;
};

// bf16 GEMMs for the scope of one test (reset on the way out, also when a REQUIRE fails).
struct Bf16Scope {
  Bf16Scope() { setBf16(true); }
  ~Bf16Scope() { setBf16(false); }
};

void checkLayer(const Case& c, const Tolerance& tol = {}) {
  CAPTURE(c.layer);
  const int batch = 3;
  LayerSpec spec =
      parseModelSpec(json{{"input", c.input}, {"layers", json::array({json::parse(c.layer)})}}, "", "/model").layers[0];
  auto cpu = makeLayer(spec, {.device = Device::cpu(), .maxBatch = batch, .seed = 7});
  auto gpu = makeLayer(spec, {.device = kGpu, .maxBatch = batch, .seed = 7});
  size_t count = 0;
  for (const auto& p : cpu->paramShapes()) count += static_cast<size_t>(p.shape.numel());
  std::vector<float> params(count), grads(count, 0.0f);
  cpu->bind(params.data(), grads.data());
  InitRng init(11);
  cpu->initParams(init);
  auto noise = randomVector(count, 5, -0.3f, 0.3f);
  for (size_t i = 0; i < count; ++i) params[i] += noise[i];
  DeviceFloats dParams = toDevice(params), dGrads(count, kGpu);
  gpu->bind(dParams.data(), dGrads.data());

  const size_t nx = static_cast<size_t>(batch * spec.input.numel());
  const size_t ny = static_cast<size_t>(batch * spec.output.numel());
  std::vector<float> x = randomVector(nx, 9, -2, 2);
  if (c.tokens)
    for (float& v : x) v = std::floor((v + 2.0f) * 2.7f);  // 0..10
  std::vector<float> y(ny), dy = randomVector(ny, 13), dx(nx, 0.0f);
  DeviceFloats dX = toDevice(x), dY(ny, kGpu), dDy = toDevice(dy), dDx(nx, kGpu);

  for (bool accumulate : {false, true}) {
    CAPTURE(accumulate);
    cpu->forward(x.data(), y.data(), batch, true);
    gpu->forward(dX.data(), dY.data(), batch, true);
    CHECK(maxDiff(y, toHost(dY.data(), ny)) < tol.out);
    const bool wantDx = !c.tokens;
    cpu->backward(x.data(), y.data(), dy.data(), wantDx ? dx.data() : nullptr, batch, accumulate);
    gpu->backward(dX.data(), dY.data(), dDy.data(), wantDx ? dDx.data() : nullptr, batch, accumulate);
    if (wantDx) CHECK(maxDiff(dx, toHost(dDx.data(), nx)) < tol.dx);
    if (count > 0) CHECK(maxDiff(grads, toHost(dGrads.data(), count)) < tol.grads);
  }
}

}  // namespace

TEST_CASE("every layer with a CUDA implementation matches its CPU twin: forward, input and parameter gradients") {
  const std::vector<Case> cases = {
      {R"({"type": "linear", "out": 5})", {7}},
      {R"({"type": "linear", "out": 5, "bias": false})", {3, 7}},
      {R"({"type": "relu"})", {6}},
      {R"({"type": "gelu"})", {6}},
      {R"({"type": "tanh"})", {6}},
      {R"({"type": "sigmoid"})", {6}},
      {R"({"type": "layernorm"})", {3, 300}},  // d > the kernel's 256 threads: strided rows
      {R"({"type": "layernorm", "bias": false})", {3, 8}},  // nanoGPT's bias=False: weight only
      {R"({"type": "embedding", "vocab_size": 11, "n_embd": 8})", {5}, true},
      {R"({"type": "embedding", "vocab_size": 11, "n_embd": 8, "position": false})", {5}, true},
      {R"({"type": "causal_self_attention", "n_head": 2})", {5, 8}},
      {R"({"type": "causal_self_attention", "n_head": 4, "bias": false})", {300, 16}},  // rows longer than a block
      {R"({"type": "lm_head", "vocab_size": 11, "tied": false})", {5, 8}},
      {R"({"type": "block", "layers": [{"type": "layernorm"}, {"type": "linear", "out": 8}, {"type": "gelu"}]})",
       {5, 8}},
  };
  for (const auto& c : cases) checkLayer(c);
  // Layers without a CUDA implementation say so when built for a GPU.
  LayerSpec conv =
      parseModelSpec(json::parse(R"({"input": [1, 4, 4], "layers": [{"type": "conv2d", "out": 2, "kernel": 3}]})"), "",
                     "/model")
          .layers[0];
  CHECK_THROWS_WITH_AS(makeLayer(conv, {.device = kGpu, .maxBatch = 1}), doctest::Contains("no CUDA implementation"),
                       NotBuiltError);
}

TEST_CASE("bf16 GEMMs (\"precision\": \"bf16\"): GEMM layers stay within bf16 rounding of the float32 CPU twin") {
  Bf16Scope bf16;
  // Inputs in [-2, 2] and sums over up to 16 products: bf16's relative 2^-8 per operand gives about 1e-2.
  const Tolerance loose{.out = 3e-2, .dx = 3e-2, .grads = 5e-2};
  for (const Case& c : std::vector<Case>{{R"({"type": "linear", "out": 5})", {7}},
                                         {R"({"type": "causal_self_attention", "n_head": 2})", {5, 8}},
                                         {R"({"type": "lm_head", "vocab_size": 11, "tied": false})", {5, 8}}})
    checkLayer(c, loose);
}

TEST_CASE("a GPU model starts bit-identical to the CPU model of the same seed and trains alike (a tied GPT)") {
  const json spec = json::parse(R"({"preset": "gpt", "vocab_size": 13, "block_size": 6, "n_layer": 2, "n_head": 2,
                                    "n_embd": 8})");
  const ModelSpec ms = parseModelSpec(spec, "", "/model");
  Model cpu = Model::build(ms, 2, 42, Device::cpu());
  Model gpu = Model::build(ms, 2, 42, kGpu);
  REQUIRE(cpu.numParams() == gpu.numParams());
  auto host = gpu.hostParams();
  CHECK(std::equal(host.begin(), host.end(), cpu.params().begin()));
  std::vector<float> tokens(12);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<float>((i * 5) % 13);
  std::vector<int32_t> labels(12);
  for (size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<int32_t>((i * 7 + 1) % 13);
  DeviceFloats dTokens = toDevice(tokens), dLabels = toDevice(labels);
  auto cpuLoss = Loss::create({LossType::kCrossEntropy}, ms.output(), 2, Device::cpu());
  auto gpuLoss = Loss::create({LossType::kCrossEntropy}, ms.output(), 2, kGpu);
  auto cpuOpt = Optimizer::create({.type = OptimizerType::kAdamW, .lr = 0.01}, cpu.numParams(), Device::cpu());
  auto gpuOpt = Optimizer::create({.type = OptimizerType::kAdamW, .lr = 0.01}, gpu.numParams(), kGpu);
  for (int step = 0; step < 3; ++step) {
    const float lc = cpuLoss->forward(cpu.forward(tokens.data(), 2, true), TensorView::i32(labels.data(), Shape{2, 6}));
    const float lg = gpuLoss->forward(gpu.forward(dTokens.data(), 2, true),
                                      TensorView::of(reinterpret_cast<int32_t*>(dLabels.data()), Shape{2, 6}, kGpu));
    CHECK(std::fabs(lc - lg) < 1e-5);
    cpu.backward(cpuLoss->backward(), {}, GradMode::kOverwrite);
    gpu.backward(gpuLoss->backward(), {}, GradMode::kOverwrite);
    CHECK(std::fabs(gradNorm(cpu.grads(), Device::cpu()) - gradNorm(gpu.grads(), kGpu)) < 1e-4);
    cpuOpt->step(cpu.params(), cpu.grads());
    gpuOpt->step(gpu.params(), gpu.grads());
  }
  auto after = gpu.hostParams();
  CHECK(maxDiff(std::vector<float>(cpu.params().begin(), cpu.params().end()),
                std::vector<float>(after.begin(), after.end())) < 1e-4);
}

TEST_CASE("losses match the CPU: cross_entropy per sample and per position (int32/int64 labels), mse") {
  const int batch = 4;
  for (int positions : {1, 5}) {
    const int64_t classes = 300;  // more than a block's 256 threads
    const Shape out = positions == 1 ? Shape{classes} : Shape{positions, classes};
    const size_t n = static_cast<size_t>(batch * out.numel()), rows = static_cast<size_t>(batch * positions);
    auto logits = randomVector(n, 3, -4, 4);
    std::vector<int64_t> l64(rows);
    std::vector<int32_t> l32(rows);
    for (size_t i = 0; i < rows; ++i) l64[i] = l32[i] = static_cast<int32_t>((i * 37) % classes);
    auto cpu = Loss::create({LossType::kCrossEntropy}, out, batch, Device::cpu());
    auto gpu = Loss::create({LossType::kCrossEntropy}, out, batch, kGpu);
    DeviceFloats dLogits = toDevice(logits), d32 = toDevice(l32);
    DeviceFloats d64(2 * rows, kGpu);
    copyBytes(d64.data(), kGpu, l64.data(), Device::cpu(), rows * sizeof(int64_t));
    const Shape ls = positions == 1 ? Shape{batch} : Shape{batch, positions};
    const TensorView cpuOut = TensorView::of(logits.data(), out.withBatch(batch));
    const TensorView gpuOut = TensorView::of(dLogits.data(), out.withBatch(batch), kGpu);
    const float lc = cpu->forward(cpuOut, TensorView::of(l64.data(), ls));
    for (bool wide : {false, true}) {
      const TensorView labels = wide ? TensorView::of(reinterpret_cast<int64_t*>(d64.data()), ls, kGpu)
                                     : TensorView::of(reinterpret_cast<int32_t*>(d32.data()), ls, kGpu);
      CHECK(std::fabs(lc - gpu->forward(gpuOut, labels)) < 1e-5);
      TensorView gc = cpu->backward(0.5f), gg = gpu->backward(0.5f);
      CHECK(maxDiff(std::vector<float>(gc.f32(), gc.f32() + n), toHost(gg.f32(), n)) < 1e-6);
      const EvalSums ec = cpu->evaluate(cpuOut, TensorView::of(l64.data(), ls)), eg = gpu->evaluate(gpuOut, labels);
      CHECK(std::fabs(ec.lossSum - eg.lossSum) < 1e-3);
      CHECK(ec.correct == eg.correct);
      CHECK(ec.lossCount == eg.lossCount);
    }
    // A label outside [0, C) is the CPU's ConfigError.
    l32[1] = static_cast<int32_t>(classes);
    DeviceFloats bad = toDevice(l32);
    CHECK_THROWS_WITH_AS(gpu->forward(gpuOut, TensorView::of(reinterpret_cast<int32_t*>(bad.data()), ls, kGpu)),
                         doctest::Contains("label 300 of batch row 1 is outside [0, 300)"), ConfigError);
  }
  const Shape out{3};
  auto y = randomVector(12, 4), t = randomVector(12, 5);
  auto cpu = Loss::create({LossType::kMse}, out, batch, Device::cpu());
  auto gpu = Loss::create({LossType::kMse}, out, batch, kGpu);
  DeviceFloats dy = toDevice(y), dt = toDevice(t);
  const float lc = cpu->forward(TensorView::of(y.data(), Shape{4, 3}), TensorView::of(t.data(), Shape{4, 3}));
  const float lg = gpu->forward(TensorView::of(dy.data(), Shape{4, 3}, kGpu), TensorView::of(dt.data(), Shape{4, 3}, kGpu));
  CHECK(std::fabs(lc - lg) < 1e-6);
  TensorView gc = cpu->backward(), gg = gpu->backward();
  CHECK(maxDiff(std::vector<float>(gc.f32(), gc.f32() + 12), toHost(gg.f32(), 12)) < 1e-6);
}

TEST_CASE("optimizers match the CPU update for update (sgd variants, adam, adamw with amsgrad and no-decay groups)") {
  const size_t n = 1000;
  std::vector<OptimizerSpec> specs;
  specs.push_back({.type = OptimizerType::kSgd, .lr = 0.1});
  specs.push_back({.type = OptimizerType::kSgd, .lr = 0.1, .momentum = 0.9, .dampening = 0.1, .weightDecay = 0.01});
  specs.push_back({.type = OptimizerType::kSgd, .lr = 0.1, .momentum = 0.9, .nesterov = true});
  specs.push_back({.type = OptimizerType::kAdam, .lr = 0.01, .weightDecay = 0.01});
  specs.push_back({.type = OptimizerType::kAdamW, .lr = 0.01, .weightDecay = 0.1, .amsgrad = true});
  for (size_t si = 0; si < specs.size(); ++si) {
    CAPTURE(si);
    auto cpu = Optimizer::create(specs[si], n, Device::cpu());
    auto gpu = Optimizer::create(specs[si], n, kGpu);
    cpu->setNoDecayRanges({{100, 50}, {900, 100}});
    gpu->setNoDecayRanges({{100, 50}, {900, 100}});
    std::vector<float> p = randomVector(n, 1);
    DeviceFloats dp = toDevice(p);
    for (int step = 0; step < 3; ++step) {
      std::vector<float> g = randomVector(n, 100 + static_cast<uint32_t>(step));
      DeviceFloats dg = toDevice(g);
      cpu->step(p, g);
      gpu->step(dp.span(), dg.span());
    }
    // Both round like PyTorch (no FMA): expected bit-identical; checked within float rounding.
    CHECK(maxDiff(p, toHost(dp.data(), n)) < 1e-6);
    auto cs = cpu->stateBuffers();
    auto gs = gpu->hostStateBuffers();
    REQUIRE(cs.size() == gs.size());
    for (size_t b = 0; b < cs.size(); ++b) {
      CHECK(cs[b].name == gs[b].name);
      CHECK(maxDiff(std::vector<float>(cs[b].data.begin(), cs[b].data.end()),
                    std::vector<float>(gs[b].data.begin(), gs[b].data.end())) < 1e-6);
    }
  }
}

TEST_CASE("arena operations on the GPU: norm, finiteness, clipping, a written NaN") {
  std::vector<float> g = randomVector(100000, 8);
  DeviceFloats dg = toDevice(g);
  CHECK(std::fabs(gradNorm(std::span<const float>(g), Device::cpu()) - gradNorm(dg.span(), kGpu)) < 1e-4);
  CHECK(allFinite(dg.span(), kGpu));
  const float before = clipGradNorm(std::span<float>(g), 1.0, Device::cpu());
  CHECK(std::fabs(before - clipGradNorm(dg.span(), 1.0, kGpu)) < 1e-4);
  CHECK(maxDiff(g, toHost(dg.data(), g.size())) < 1e-6);
  setFloat(dg.data() + 77777, std::nanf(""), kGpu);
  CHECK_FALSE(allFinite(dg.span(), kGpu));
}
