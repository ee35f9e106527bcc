// CPU <-> GPU parity of every layer, loss and optimizer with a CUDA implementation (TF32 off): the same spec,
// parameters and inputs on both devices give the same outputs and gradients within float32 rounding.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "lib/common/error.h"
#include "lib/nn/device.h"
#include "lib/nn/layer.h"
#include "lib/nn/loss.h"
#include "lib/nn/model.h"
#include "lib/nn/optimizer.h"
#include "lib/nn/registry.h"
#include "lib/nn/spec.h"
#include "tests/gpu/gpu_parity.h"

using namespace dtrain;
using namespace dtrain::nn;
using namespace dtrain::nn::parity;
using nlohmann::json;

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
  // Every registered layer type has a CUDA implementation (conv2d, maxpool2d, dropout: test_gpu_spatial.cpp).
  for (const LayerKind* kind : layerKinds()) {
    CAPTURE(kind->name);
    CHECK(static_cast<bool>(kind->cuda));
  }
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
  // The gradient is the diff scaled in place (no second output-sized buffer): one backward per forward.
  CHECK_THROWS_WITH(gpu->backward(), doctest::Contains("loss backward called twice for one forward"));
  gpu->forward(TensorView::of(dy.data(), Shape{4, 3}, kGpu), TensorView::of(dt.data(), Shape{4, 3}, kGpu));
  gg = gpu->backward();
  CHECK(maxDiff(std::vector<float>(gc.f32(), gc.f32() + 12), toHost(gg.f32(), 12)) < 1e-6);
}

TEST_CASE("bce_with_logits matches the CPU: loss, gradient, evaluation sums and AUC histograms, bad targets") {
  const int batch = 600;  // more than one block of 256 threads
  const Shape out{1};
  auto logits = randomVector(batch, 21, -6, 6);
  logits[5] = 0.0f;  // sigmoid 0.5: a bin edge
  std::vector<int32_t> l32(batch);
  std::vector<int64_t> l64(batch);
  std::vector<float> soft = randomVector(batch, 22, 0, 1);
  for (int i = 0; i < batch; ++i) l32[i] = static_cast<int32_t>(l64[i] = (i * 7) % 3 == 0 ? 1 : 0);
  auto cpu = Loss::create({LossType::kBceWithLogits}, out, batch, Device::cpu());
  auto gpu = Loss::create({LossType::kBceWithLogits}, out, batch, kGpu);
  DeviceFloats dLogits = toDevice(logits), d32 = toDevice(l32), dSoft = toDevice(soft), d64(2 * batch, kGpu);
  copyBytes(d64.data(), kGpu, l64.data(), Device::cpu(), l64.size() * sizeof(int64_t));
  const Shape ls{batch};
  const TensorView cpuOut = TensorView::of(logits.data(), Shape{batch, 1});
  const TensorView gpuOut = TensorView::of(dLogits.data(), Shape{batch, 1}, kGpu);
  const std::vector<std::pair<TensorView, TensorView>> targets = {
      {TensorView::of(l32.data(), ls), TensorView::of(reinterpret_cast<int32_t*>(d32.data()), ls, kGpu)},
      {TensorView::of(l64.data(), ls), TensorView::of(reinterpret_cast<int64_t*>(d64.data()), ls, kGpu)},
      {TensorView::of(soft.data(), ls), TensorView::of(dSoft.data(), ls, kGpu)}};
  for (size_t ti = 0; ti < targets.size(); ++ti) {
    CAPTURE(ti);
    const auto& [tc, tg] = targets[ti];
    CHECK(std::fabs(cpu->forward(cpuOut, tc) - gpu->forward(gpuOut, tg)) < 1e-6);
    TensorView gc = cpu->backward(0.5f), gg = gpu->backward(0.5f);
    CHECK(gg.shape == gc.shape);
    CHECK(maxDiff(std::vector<float>(gc.f32(), gc.f32() + batch), toHost(gg.f32(), batch)) < 1e-7);
    const EvalSums ec = cpu->evaluate(cpuOut, tc), eg = gpu->evaluate(gpuOut, tg);
    CHECK(std::fabs(ec.lossSum - eg.lossSum) < 1e-9 * batch);
    CHECK(ec.correct == eg.correct);
    CHECK(ec.lossCount == eg.lossCount);
    CHECK(ec.samples == eg.samples);
    REQUIRE(eg.aucHist.size() == ec.aucHist.size());
    // Bins come from double sigmoids on both sides; CUDA's exp may differ from glibc's in the last bit, which
    // could move a value sitting exactly on a bin edge: the AUCs agree to far better than a bin.
    CHECK(std::fabs(*aucFromHistogram(ec.aucHist) - *aucFromHistogram(eg.aucHist)) < 1e-3);
    double moved = 0;
    for (size_t b = 0; b < ec.aucHist.size(); ++b) moved += std::fabs(ec.aucHist[b] - eg.aucHist[b]);
    CHECK(moved <= 2);
  }
  // Bad targets are the CPU's ConfigErrors, naming the first bad value.
  l32[3] = 2, l32[9] = -1;
  DeviceFloats bad32 = toDevice(l32);
  CHECK_THROWS_WITH_AS(gpu->forward(gpuOut, TensorView::of(reinterpret_cast<int32_t*>(bad32.data()), ls, kGpu)),
                       doctest::Contains("bce_with_logits label 2 (expected 0 or 1)"), ConfigError);
  soft[4] = 1.5f;
  DeviceFloats badSoft = toDevice(soft);
  CHECK_THROWS_WITH_AS(gpu->evaluate(gpuOut, TensorView::of(badSoft.data(), ls, kGpu)),
                       doctest::Contains("bce_with_logits target 1.5 outside [0, 1]"), ConfigError);
  CHECK_THROWS_WITH_AS(Loss::create({LossType::kBceWithLogits}, Shape{2}, 4, kGpu),
                       doctest::Contains("bce_with_logits expects one logit per sample"), ConfigError);
}

TEST_CASE("optimizers match the CPU update for update (sgd variants, adam, adamw: amsgrad, no-decay groups; adagrad)") {
  const size_t n = 1000;
  std::vector<OptimizerSpec> specs;
  specs.push_back({.type = OptimizerType::kSgd, .lr = 0.1});
  specs.push_back({.type = OptimizerType::kSgd, .lr = 0.1, .momentum = 0.9, .dampening = 0.1, .weightDecay = 0.01});
  specs.push_back({.type = OptimizerType::kSgd, .lr = 0.1, .momentum = 0.9, .nesterov = true});
  specs.push_back({.type = OptimizerType::kAdam, .lr = 0.01, .weightDecay = 0.01});
  specs.push_back({.type = OptimizerType::kAdamW, .lr = 0.01, .weightDecay = 0.1, .amsgrad = true});
  specs.push_back({.type = OptimizerType::kAdagrad, .lr = 0.1});
  specs.push_back({.type = OptimizerType::kAdagrad, .lr = 0.1, .weightDecay = 0.01, .eps = 1e-6, .lrDecay = 0.05,
                   .initialAccumulator = 0.1});
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

TEST_CASE("Adam/AdamW given the update (top-k's local_adam) match the CPU's: decoupled decay, then -lr x update") {
  const size_t n = 1000;
  for (const OptimizerSpec& spec : {OptimizerSpec{.type = OptimizerType::kAdamW, .lr = 0.01, .weightDecay = 0.1},
                                   OptimizerSpec{.type = OptimizerType::kAdam, .lr = 0.01}}) {
    CAPTURE(optimizerTypeName(spec.type));
    auto cpu = Optimizer::create(spec, n, Device::cpu());
    auto gpu = Optimizer::create(spec, n, kGpu);
    cpu->setNoDecayRanges({{100, 50}});
    gpu->setNoDecayRanges({{100, 50}});
    std::vector<float> p = randomVector(n, 3);
    DeviceFloats dp = toDevice(p);
    for (int step = 0; step < 4; ++step) {
      const bool given = step >= 2;  // two plain Adam steps, then the hook's update directions
      cpu->setUpdateGiven(given);
      gpu->setUpdateGiven(given);
      std::vector<float> g = randomVector(n, 200 + static_cast<uint32_t>(step));
      DeviceFloats dg = toDevice(g);
      cpu->step(p, g);
      gpu->step(dp.span(), dg.span());
    }
    CHECK(cpu->steps() == 4);
    CHECK(gpu->steps() == 4);
    // The same two roundings per element (scale kernel, SGD kernel without FMA): expected bit-identical.
    const auto back = toHost(dp.data(), n);
    MESSAGE("bit-identical: " << (back == p));
    CHECK(maxDiff(p, back) < 1e-6);
    auto cs = cpu->stateBuffers();
    auto gs = gpu->hostStateBuffers();
    REQUIRE(cs.size() == gs.size());
    for (size_t b = 0; b < cs.size(); ++b)  // given steps leave the moments as the plain steps left them
      CHECK(maxDiff(std::vector<float>(cs[b].data.begin(), cs[b].data.end()),
                    std::vector<float>(gs[b].data.begin(), gs[b].data.end())) < 1e-6);
  }
  CHECK_THROWS_WITH_AS(Optimizer::create({.type = OptimizerType::kSgd, .lr = 0.1}, n, kGpu)->setUpdateGiven(true),
                       doctest::Contains("cannot take an update direction (local_adam)"), Error);
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
