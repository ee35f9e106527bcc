// The column reductions of kernels_reduce.cu on a GPU (label gpu; skipped without one): parity of the layers
// that use them with their CPU twins at sizes with several row chunks, and the device's own results against the
// CPU emulation of the same plan (reduce_index.h): bit for bit where the kernel only adds (biasGrad), and bit for
// bit from one run to the next everywhere (no float atomics).
#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <tuple>
#include <utility>
#include <vector>

#include "lib/gpu/kernels.h"
#include "lib/gpu/reduce_index.h"
#include "lib/nn/device.h"
#include "lib/nn/model.h"
#include "tests/gpu/gpu_parity.h"

using namespace dtrain;
using namespace dtrain::nn;
using namespace dtrain::nn::parity;
namespace k = dtrain::gpu::kernels;

namespace {

bool bitEqual(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// biasGrad's plan on the host (reduce_index.h): the cells in any order give the same result, each being independent.
std::vector<float> hostBiasGrad(const std::vector<float>& dy, std::vector<float> db, int64_t rows, int64_t cols,
                                bool accumulate) {
  const gpu::ColumnChunks p = gpu::columnChunks(rows);
  std::vector<float> partials(static_cast<size_t>(gpu::partialCount(p, cols)));
  for (int64_t kk = 0; kk < p.chunks; ++kk)
    for (int64_t c = 0; c < cols; ++c) gpu::columnSumChunk(p, kk, c, cols, dy.data(), db.data(), partials.data(), accumulate);
  if (p.chunks > 1)
    for (int64_t c = 0; c < cols; ++c) gpu::columnSumCombine(p, c, cols, partials.data(), db.data(), accumulate);
  return db;
}

// channelBiasGrad's plan on the host: each (channel, chunk) block's thread sums and tree, then pass 2.
std::vector<float> hostChannelBiasGrad(const std::vector<float>& dy, std::vector<float> db, int64_t batch,
                                       int64_t channels, int64_t positions, bool accumulate) {
  const gpu::ColumnChunks p = gpu::channelChunks(batch, positions);
  std::vector<float> partials(static_cast<size_t>(gpu::partialCount(p, channels)));
  for (int64_t ch = 0; ch < channels; ++ch) {
    for (int64_t kk = 0; kk < p.chunks; ++kk) {
      float sh[gpu::kChannelThreads];
      for (unsigned t = 0; t < gpu::kChannelThreads; ++t)
        sh[t] = gpu::channelThreadSum(p, kk, ch, t, dy.data(), channels, positions);
      const float sum = gpu::channelBlockSum(sh);
      if (p.chunks == 1) {
        db[static_cast<size_t>(ch)] = (accumulate ? db[static_cast<size_t>(ch)] : 0.0f) + sum;
      } else {
        partials[static_cast<size_t>(kk * channels + ch)] = sum;
      }
    }
  }
  if (p.chunks > 1)
    for (int64_t c = 0; c < channels; ++c) gpu::columnSumCombine(p, c, channels, partials.data(), db.data(), accumulate);
  return db;
}

}  // namespace

TEST_CASE("layers over many rows (several reduction chunks) match their CPU twins") {
  const std::vector<Case> cases = {
      {R"({"type": "linear", "out": 130})", {300, 7}},    // 900 rows: 15 chunks; 130 columns: two tiles
      {R"({"type": "layernorm"})", {100, 300}},           // 300 rows: 5 chunks of dw and db
      {R"({"type": "layernorm", "bias": false})", {70, 8}},
      {R"({"type": "embedding", "vocab_size": 11, "n_embd": 130})", {100}, true},
      {R"({"type": "conv2d", "out": 3, "kernel": 1})", {1, 60, 50}},  // 9000 values per channel: 3 chunks
  };
  for (const auto& c : cases) checkLayer(c, {.out = 1e-5, .dx = 1e-5, .grads = 2e-4});
}

TEST_CASE("biasGrad on the GPU equals its CPU emulation bit for bit and repeats bit for bit") {
  for (int64_t rows : {1, 64, 65, 8193}) {
    for (int64_t cols : {5, 300}) {
      for (bool accumulate : {false, true}) {
        CAPTURE(rows);
        CAPTURE(cols);
        CAPTURE(accumulate);
        const auto dy = randomVector(static_cast<size_t>(rows * cols), 31);
        const auto init = randomVector(static_cast<size_t>(cols), 32);
        const std::vector<float> want = hostBiasGrad(dy, init, rows, cols, accumulate);
        DeviceFloats dDy = toDevice(dy);
        for (int run = 0; run < 2; ++run) {
          DeviceFloats dDb = toDevice(init);
          k::biasGrad(dDy.data(), dDb.data(), rows, cols, accumulate);
          CHECK(bitEqual(toHost(dDb.data(), static_cast<size_t>(cols)), want));
        }
      }
    }
  }
}

TEST_CASE("channelBiasGrad on the GPU equals its CPU emulation bit for bit") {
  for (auto [batch, channels, positions] : {std::tuple<int64_t, int64_t, int64_t>{3, 2, 20}, {3, 3, 3000}, {64, 5, 784}}) {
    for (bool accumulate : {false, true}) {
      CAPTURE(batch);
      CAPTURE(positions);
      CAPTURE(accumulate);
      const auto dy = randomVector(static_cast<size_t>(batch * channels * positions), 33);
      const auto init = randomVector(static_cast<size_t>(channels), 34);
      DeviceFloats dDy = toDevice(dy), dDb = toDevice(init);
      k::channelBiasGrad(dDy.data(), dDb.data(), batch, channels, positions, accumulate);
      CHECK(bitEqual(toHost(dDb.data(), static_cast<size_t>(channels)),
                     hostChannelBiasGrad(dy, init, batch, channels, positions, accumulate)));
    }
  }
}

TEST_CASE("LayerNorm's weight and bias gradients repeat bit for bit on the GPU") {
  const int64_t rows = 8193, d = 300;
  const auto x = randomVector(static_cast<size_t>(rows * d), 41), dy = randomVector(static_cast<size_t>(rows * d), 42);
  const auto mean = randomVector(static_cast<size_t>(rows), 43), rstd = randomVector(static_cast<size_t>(rows), 44, 0.5f, 2);
  DeviceFloats dX = toDevice(x), dDy = toDevice(dy), dMean = toDevice(mean), dRstd = toDevice(rstd);
  std::vector<float> first;
  for (int run = 0; run < 3; ++run) {
    DeviceFloats g(static_cast<size_t>(2 * d), kGpu);
    k::layerNormParamGrad(dX.data(), dMean.data(), dRstd.data(), dDy.data(), g.data(), g.data() + d, rows, d, false);
    const auto got = toHost(g.data(), static_cast<size_t>(2 * d));
    if (run == 0) first = got;
    CHECK(bitEqual(got, first));
  }
}

TEST_CASE("the GPU embedding's table gradients equal the CPU's bit for bit; a bad token id is the CPU's error") {
  // 8 samples x 64 positions, 40 distinct tokens: repeated tokens, one chunk over the samples (bit for bit too).
  const int batch = 8;
  const int64_t t = 64, c = 130, vocab = 40;
  const LayerSpec spec = parseModelSpec(json{{"input", {t}},
                                             {"layers", json::array({{{"type", "embedding"}, {"vocab_size", vocab},
                                                                      {"n_embd", c}}})}},
                                        "", "/model")
                             .layers[0];
  auto cpu = makeLayer(spec, {.device = Device::cpu(), .maxBatch = batch, .seed = 7});
  auto gpu = makeLayer(spec, {.device = kGpu, .maxBatch = batch, .seed = 7});
  const size_t count = static_cast<size_t>((vocab + t) * c);
  std::vector<float> params = randomVector(count, 51), grads(count, 0.0f);
  cpu->bind(params.data(), grads.data());
  DeviceFloats dParams = toDevice(params), dGrads(count, kGpu);
  gpu->bind(dParams.data(), dGrads.data());
  std::vector<float> tokens(static_cast<size_t>(batch * t));
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<float>((i * i + 7 * i) % vocab);
  const auto dy = randomVector(static_cast<size_t>(batch * t * c), 52);
  DeviceFloats dTokens = toDevice(tokens), dDy = toDevice(dy), dY(dy.size(), kGpu);
  std::vector<float> y(dy.size());
  for (bool train : {true, false}) {  // false: the backward orders the rows itself
    for (bool accumulate : {false, true}) {
      CAPTURE(train);
      CAPTURE(accumulate);
      cpu->forward(tokens.data(), y.data(), batch, train);
      gpu->forward(dTokens.data(), dY.data(), batch, train);
      CHECK(bitEqual(toHost(dY.data(), y.size()), y));
      cpu->backward(tokens.data(), y.data(), dy.data(), nullptr, batch, accumulate);
      gpu->backward(dTokens.data(), dY.data(), dDy.data(), nullptr, batch, accumulate);
      CHECK(bitEqual(toHost(dGrads.data(), count), grads));
    }
  }
  tokens[77] = static_cast<float>(vocab);
  DeviceFloats bad = toDevice(tokens);
  CHECK_THROWS_WITH(gpu->forward(bad.data(), dY.data(), batch, true),
                    doctest::Contains("token id 40 at position 13 is outside [0, 40) (vocab_size)"));
}

namespace {

// Runs `layers` (built on the GPU one by one: no pairing, so unfused) forward and backward over the model's
// parameters, as Model would; returns the output and the gradient arena.
std::pair<std::vector<float>, std::vector<float>> runUnfused(const ModelSpec& ms, const std::vector<float>& params,
                                                             const DeviceFloats& x, const DeviceFloats& dy, int batch,
                                                             bool accumulateTwice) {
  std::vector<std::unique_ptr<Layer>> layers;
  DeviceFloats p = toDevice(params), g(params.size(), kGpu);
  std::vector<DeviceFloats> outs;
  size_t at = 0;
  for (const auto& ls : ms.layers) {
    layers.push_back(makeLayer(ls, {.device = kGpu, .maxBatch = batch, .seed = 1}));
    size_t count = 0;
    for (const auto& ps : layers.back()->paramShapes()) count += static_cast<size_t>(ps.shape.numel());
    if (count > 0) layers.back()->bind(p.data() + at, g.data() + at);
    at += count;
    outs.emplace_back(static_cast<size_t>(batch * ls.output.numel()), kGpu);
  }
  for (int pass = 0; pass < (accumulateTwice ? 2 : 1); ++pass) {
    const float* in = x.data();
    for (size_t i = 0; i < layers.size(); ++i) {
      layers[i]->forward(in, outs[i].data(), batch, true);
      in = outs[i].data();
    }
    const float* d = dy.data();
    std::vector<DeviceFloats> dxs;
    for (size_t i = layers.size(); i-- > 0;) {
      dxs.emplace_back(static_cast<size_t>(batch * ms.layers[i].input.numel()), kGpu);
      layers[i]->backward(i == 0 ? x.data() : outs[i - 1].data(), outs[i].data(), d, i == 0 ? nullptr : dxs.back().data(),
                          batch, pass > 0);
      d = dxs.back().data();
    }
  }
  return {toHost(outs.back().data(), outs.back().size()), toHost(g.data(), params.size())};
}

}  // namespace

TEST_CASE("fused bias + activation: a GPU model equals its layers run unfused bit for bit, and the CPU model") {
  const json spec = json::parse(R"({"input": [100, 7], "layers": [
      {"type": "linear", "out": 130}, {"type": "gelu"}, {"type": "linear", "out": 9}, {"type": "relu"},
      {"type": "linear", "out": 5, "bias": false}, {"type": "tanh"}, {"type": "linear", "out": 4}, {"type": "sigmoid"}]})");
  const ModelSpec ms = parseModelSpec(spec, "", "/model");
  const int batch = 3;  // 300 rows: 5 chunks
  for (bool accumulate : {false, true}) {
    CAPTURE(accumulate);
    Model cpu = Model::build(ms, batch, 42, Device::cpu());
    Model gpu = Model::build(ms, batch, 42, kGpu);
    const auto x = randomVector(static_cast<size_t>(batch * 700), 61);
    const auto dy = randomVector(static_cast<size_t>(batch * 100 * 4), 62);
    DeviceFloats dX = toDevice(x), dDy = toDevice(dy);
    const Shape outShape = ms.output().withBatch(batch);
    std::vector<float> yc, yg;
    for (int pass = 0; pass < (accumulate ? 2 : 1); ++pass) {
      const GradMode mode = pass > 0 ? GradMode::kAccumulate : GradMode::kOverwrite;
      TensorView oc = cpu.forward(x.data(), batch, true), og = gpu.forward(dX.data(), batch, true);
      yc.assign(oc.f32(), oc.f32() + dy.size());
      yg = toHost(og.f32(), dy.size());
      cpu.backward(TensorView::of(const_cast<float*>(dy.data()), outShape), {}, mode);
      gpu.backward(TensorView::of(dDy.data(), outShape, kGpu), {}, mode);
    }
    const std::vector<float> gc(cpu.grads().begin(), cpu.grads().end());
    const std::vector<float> gg = toHost(gpu.grads().data(), gpu.grads().size());
    CHECK(maxDiff(yc, yg) < 1e-5);
    CHECK(maxDiff(gc, gg) < 2e-4);
    const auto host = gpu.hostParams();
    const auto [yu, gu] = runUnfused(ms, std::vector<float>(host.begin(), host.end()), dX, dDy, batch, accumulate);
    CHECK(bitEqual(yu, yg));
    CHECK(bitEqual(gu, gg));
  }
}
