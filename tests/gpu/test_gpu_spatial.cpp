// CPU <-> GPU parity of conv2d, maxpool2d, dropout and attention dropout (TF32 off): forward, input and parameter
// gradients within float32 rounding; dropout's masks are the CPU's bit for bit (the GPU kernels compute them from
// the CPU's counter-based generator, lib/gpu/philox.h), so its outputs match exactly.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "lib/nn/device.h"
#include "lib/nn/layer.h"
#include "lib/nn/loss.h"
#include "lib/nn/model.h"
#include "lib/nn/optimizer.h"
#include "lib/nn/spec.h"
#include "tests/gpu/gpu_parity.h"

using namespace dtrain;
using namespace dtrain::nn;
using namespace dtrain::nn::parity;
using nlohmann::json;

TEST_CASE("conv2d and maxpool2d match their CPU twins: strides, padding, several channels, no bias") {
  const std::vector<Case> cases = {
      {R"({"type": "conv2d", "out": 2, "kernel": [3, 2], "padding": 1})", {2, 5, 4}},  // the registry's example
      {R"({"type": "conv2d", "out": 4, "kernel": 3})", {1, 8, 8}},
      {R"({"type": "conv2d", "out": 3, "kernel": [3, 3], "stride": [2, 1], "padding": [1, 2]})", {3, 9, 7}},
      {R"({"type": "conv2d", "out": 5, "kernel": 2, "stride": 2, "bias": false})", {4, 6, 6}},
      {R"({"type": "conv2d", "out": 300, "kernel": 1})", {2, 3, 3}},  // more channels than a block's threads
      {R"({"type": "maxpool2d", "kernel": 2})", {2, 4, 6}},
      {R"({"type": "maxpool2d", "kernel": 3, "stride": 1})", {3, 5, 5}},  // overlapping windows: dx sums
      {R"({"type": "maxpool2d", "kernel": [3, 2], "stride": [2, 3], "padding": [1, 1]})", {2, 7, 8}},
  };
  for (const auto& c : cases) checkLayer(c);
}

TEST_CASE("maxpool2d on the GPU keeps PyTorch's rules: first maximum on ties, NaN propagates, exact gradients") {
  LayerSpec spec = parseModelSpec(json::parse(R"({"input": [1, 4, 4], "layers": [{"type": "maxpool2d", "kernel": 2,
                                                  "stride": 1, "padding": 1}]})"),
                                  "", "/model")
                       .layers[0];
  auto cpu = makeLayer(spec, {.device = Device::cpu(), .maxBatch = 2});
  auto gpu = makeLayer(spec, {.device = kGpu, .maxBatch = 2});
  std::vector<float> x(32, 1.0f);  // sample 0: all ties
  for (int i = 16; i < 32; ++i) x[i] = static_cast<float>(i % 3);
  x[21] = std::numeric_limits<float>::quiet_NaN();
  x[26] = -std::numeric_limits<float>::infinity();
  const size_t ny = static_cast<size_t>(2 * spec.output.numel());
  std::vector<float> y(ny), dy = randomVector(ny, 3), dx(32);
  DeviceFloats dX = toDevice(x), dY(ny, kGpu), dDy = toDevice(dy), dDx(32, kGpu);
  cpu->forward(x.data(), y.data(), 2, true);
  gpu->forward(dX.data(), dY.data(), 2, true);
  const auto gy = toHost(dY.data(), ny);
  for (size_t i = 0; i < ny; ++i) {
    CAPTURE(i);
    CHECK((std::isnan(y[i]) ? std::isnan(gy[i]) : y[i] == gy[i]));
  }
  cpu->backward(x.data(), y.data(), dy.data(), dx.data(), 2, false);
  gpu->backward(dX.data(), dY.data(), dDy.data(), dDx.data(), 2, false);
  CHECK(toHost(dDx.data(), 32) == dx);  // the same argmaxes, summed in the same order: bit-identical
}

TEST_CASE("dropout on the GPU computes the CPU's masks: same outputs and gradients, reseeds, p = 1, evaluation") {
  for (const char* layer : {R"({"type": "dropout", "p": 0.25})", R"({"type": "dropout", "p": 0.5, "seed": 3})",
                            R"({"type": "dropout", "p": 1})", R"({"type": "dropout", "p": 0})"})
    checkLayer({layer, {300}}, {.out = 1e-12, .dx = 1e-12, .grads = 1e-12});  // bit-identical
  // Reseeding (the trainer does it every micro-batch) restarts both streams alike; evaluation is the identity.
  LayerSpec spec =
      parseModelSpec(json::parse(R"({"input": [1000], "layers": [{"type": "dropout", "p": 0.3}]})"), "", "/model")
          .layers[0];
  auto cpu = makeLayer(spec, {.device = Device::cpu(), .maxBatch = 4, .seed = 1});
  auto gpu = makeLayer(spec, {.device = kGpu, .maxBatch = 4, .seed = 2});
  cpu->reseed(99, 0), gpu->reseed(99, 0);
  std::vector<float> x = randomVector(4000, 5), y(4000);
  DeviceFloats dX = toDevice(x), dY(4000, kGpu);
  cpu->forward(x.data(), y.data(), 4, true);
  gpu->forward(dX.data(), dY.data(), 4, true);
  const auto gy = toHost(dY.data(), 4000);
  CHECK(gy == y);
  // A second forward before the next reseed draws the stream's next elements on both, and backward drops what
  // that forward dropped.
  std::vector<float> y2(4000), dx(4000);
  const std::vector<float> dy = randomVector(4000, 6);
  DeviceFloats dDy = toDevice(dy), dDx(4000, kGpu);
  cpu->forward(x.data(), y2.data(), 4, true);
  gpu->forward(dX.data(), dY.data(), 4, true);
  CHECK(toHost(dY.data(), 4000) == y2);
  CHECK(y2 != y);
  cpu->backward(x.data(), y2.data(), dy.data(), dx.data(), 4, false);
  gpu->backward(dX.data(), dY.data(), dDy.data(), dDx.data(), 4, false);
  CHECK(toHost(dDx.data(), 4000) == dx);
  // Statistics of the mask: about 30% zeros, the rest scaled by 1 / 0.7.
  int zeros = 0;
  for (size_t i = 0; i < gy.size(); ++i) {
    if (gy[i] == 0.0f) ++zeros;
    else CHECK(std::fabs(gy[i] - x[i] / 0.7f) < 1e-5f * (1 + std::fabs(x[i])));
  }
  CHECK(zeros > 1000);
  CHECK(zeros < 1400);
  gpu->forward(dX.data(), dY.data(), 4, false);
  CHECK(toHost(dY.data(), 4000) == x);
  // A pinned "seed": both follow the reseed's position (the trainer's step and micro-batch), not its seed.
  LayerSpec pinnedSpec =
      parseModelSpec(json::parse(R"({"input": [1000], "layers": [{"type": "dropout", "p": 0.3, "seed": 3}]})"), "",
                     "/model")
          .layers[0];
  auto cpuPinned = makeLayer(pinnedSpec, {.device = Device::cpu(), .maxBatch = 4, .seed = 1});
  auto gpuPinned = makeLayer(pinnedSpec, {.device = kGpu, .maxBatch = 4, .seed = 2});
  cpuPinned->reseed(11, 7), gpuPinned->reseed(12, 7);
  cpuPinned->forward(x.data(), y.data(), 4, true);
  gpuPinned->forward(dX.data(), dY.data(), 4, true);
  CHECK(toHost(dY.data(), 4000) == y);
  gpuPinned->reseed(12, 8);
  gpuPinned->forward(dX.data(), dY.data(), 4, true);
  CHECK(toHost(dY.data(), 4000) != y);
}

TEST_CASE("attention dropout on the GPU drops what the CPU drops: forward and every gradient match") {
  checkLayer({R"({"type": "causal_self_attention", "n_head": 2, "dropout": 0.2})", {5, 8}});
  checkLayer({R"({"type": "causal_self_attention", "n_head": 4, "dropout": 0.5, "bias": false})", {40, 16}});
  // Inside a block (the gpt preset): the block reseeds its children as the CPU's does.
  const json spec = json::parse(R"({"preset": "gpt", "vocab_size": 13, "block_size": 6, "n_layer": 2, "n_head": 2,
                                    "n_embd": 8, "dropout": 0.2})");
  const ModelSpec ms = parseModelSpec(spec, "", "/model");
  Model cpu = Model::build(ms, 2, 42, Device::cpu());
  Model gpu = Model::build(ms, 2, 42, kGpu);
  std::vector<float> tokens(12);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<float>((i * 5) % 13);
  std::vector<int32_t> labels(12);
  for (size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<int32_t>((i * 7 + 1) % 13);
  DeviceFloats dTokens = toDevice(tokens), dLabels = toDevice(labels);
  auto cpuLoss = Loss::create({LossType::kCrossEntropy}, ms.output(), 2, Device::cpu());
  auto gpuLoss = Loss::create({LossType::kCrossEntropy}, ms.output(), 2, kGpu);
  for (uint64_t step = 0; step < 3; ++step) {
    cpu.reseedDropout(1000 + step, 0), gpu.reseedDropout(1000 + step, 0);
    const float lc = cpuLoss->forward(cpu.forward(tokens.data(), 2, true), TensorView::i32(labels.data(), Shape{2, 6}));
    const float lg = gpuLoss->forward(gpu.forward(dTokens.data(), 2, true),
                                      TensorView::of(reinterpret_cast<int32_t*>(dLabels.data()), Shape{2, 6}, kGpu));
    CHECK(std::fabs(lc - lg) < 1e-5);
    cpu.backward(cpuLoss->backward(), {}, GradMode::kOverwrite);
    gpu.backward(gpuLoss->backward(), {}, GradMode::kOverwrite);
    CHECK(std::fabs(gradNorm(cpu.grads(), Device::cpu()) - gradNorm(gpu.grads(), kGpu)) < 1e-4);
  }
}

TEST_CASE("a small CNN (conv, maxpool, dropout, linear) trains alike on both devices with adagrad") {
  const json spec = json::parse(R"({"input": [1, 8, 8], "layers": [{"type": "conv2d", "out": 4, "kernel": 3,
      "padding": 1}, {"type": "relu"}, {"type": "maxpool2d", "kernel": 2}, {"type": "dropout", "p": 0.25},
      {"type": "flatten"}, {"type": "linear", "out": 1}]})");
  const ModelSpec ms = parseModelSpec(spec, "", "/model");
  Model cpu = Model::build(ms, 4, 7, Device::cpu());
  Model gpu = Model::build(ms, 4, 7, kGpu);
  auto host = gpu.hostParams();
  REQUIRE(std::equal(host.begin(), host.end(), cpu.params().begin()));
  std::vector<float> x = randomVector(256, 17);
  std::vector<int64_t> labels = {1, 0, 0, 1};
  DeviceFloats dX = toDevice(x), dLabels(8, kGpu);
  copyBytes(dLabels.data(), kGpu, labels.data(), Device::cpu(), labels.size() * sizeof(int64_t));
  auto cpuLoss = Loss::create({LossType::kBceWithLogits}, ms.output(), 4, Device::cpu());
  auto gpuLoss = Loss::create({LossType::kBceWithLogits}, ms.output(), 4, kGpu);
  const OptimizerSpec os{.type = OptimizerType::kAdagrad, .lr = 0.05, .initialAccumulator = 0.1};
  auto cpuOpt = Optimizer::create(os, cpu.numParams(), Device::cpu());
  auto gpuOpt = Optimizer::create(os, gpu.numParams(), kGpu);
  for (uint64_t step = 0; step < 4; ++step) {
    cpu.reseedDropout(step, 0), gpu.reseedDropout(step, 0);
    const float lc = cpuLoss->forward(cpu.forward(x.data(), 4, true), TensorView::i64(labels.data(), Shape{4}));
    const float lg = gpuLoss->forward(gpu.forward(dX.data(), 4, true),
                                      TensorView::of(reinterpret_cast<int64_t*>(dLabels.data()), Shape{4}, kGpu));
    CHECK(std::fabs(lc - lg) < 1e-5);
    cpu.backward(cpuLoss->backward(), {}, GradMode::kOverwrite);
    gpu.backward(gpuLoss->backward(), {}, GradMode::kOverwrite);
    cpuOpt->step(cpu.params(), cpu.grads());
    gpuOpt->step(gpu.params(), gpu.grads());
  }
  auto after = gpu.hostParams();
  CHECK(maxDiff(std::vector<float>(cpu.params().begin(), cpu.params().end()),
                std::vector<float>(after.begin(), after.end())) < 1e-4);
}
