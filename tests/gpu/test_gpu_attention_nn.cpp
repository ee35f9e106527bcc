// The CUDA attention on a GPU (lib/nn/cuda/layers_gpt.cpp CausalSelfAttention), both implementations.
// Matmul ("attention": "matmul"): the probabilities are recomputed in backward into a scratch that every attention
// layer of a model shares, and attention dropout keeps no mask (the kernels compute it from the counter,
// lib/gpu/philox.h). Checked here: parity with the CPU layer over several batch sizes below maxBatch, with and
// without dropout, with another layer using the shared scratch between forward and backward; and that backward
// depends on nothing forward left in the scratch (filled with NaN in between: the same bits come out), so the
// recomputation is bit-identical to forward's P. The kernels' per-thread work and the layer's order are CPU-tested
// in test_gpu_attention.cpp.
// Fused (lib/gpu/flash_attention.h, CPU-tested thread by thread in test_gpu_flash.cpp; "auto" picks it only where the
// matmul path's score scratch would pass 256 MiB, so the tests ask for it by name): parity with
// the CPU layer and with the matmul path at head sizes 4, 64 and 128, T not a multiple of the tiles and T = 1,
// without and with attention dropout; no score scratch reserved; the same bits twice (also with the backward
// scratch filled with NaN in between); the layer parity check on both paths; a GPT model (with dropout and
// without) on the default choice ("auto": the matmul path at its size) against the CPU model.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "lib/common/error.h"
#include "lib/nn/attention_kernel.h"
#include "lib/nn/device.h"
#include "lib/nn/layer.h"
#include "lib/nn/loss.h"
#include "lib/nn/model.h"
#include "lib/nn/registry.h"
#include "lib/nn/spec.h"
#include "tests/gpu/gpu_parity.h"

using namespace dtrain;
using namespace dtrain::nn;
using namespace dtrain::nn::parity;
using nlohmann::json;

namespace {

void fillNan(SharedScratch& s, SharedScratch::Slot slot) {
  const std::vector<float> nan(s.size(slot), std::numeric_limits<float>::quiet_NaN());
  copyBytes(s.data(slot), kGpu, nan.data(), Device::cpu(), nan.size() * sizeof(float));
}

// The attention kernel choice for the layers built inside one scope (reset to "auto" on the way out).
struct AttentionScope {
  explicit AttentionScope(AttentionKernel k) { setAttentionKernel(k); }
  ~AttentionScope() { setAttentionKernel(AttentionKernel::kAuto); }
};

}  // namespace

TEST_CASE("matmul attention recomputes P in backward: shared scratch, batch < maxBatch, clobbered scratch, same bits") {
  const AttentionScope matmul(AttentionKernel::kMatmul);
  // H T T = 4 x 37 x 37 is odd: the samples' dropout elements start inside a Philox block (4 elements).
  const int64_t t = 37, c = 16, heads = 4;
  const int maxBatch = 5;
  for (const double p : {0.0, 0.3}) {
    CAPTURE(p);
    const LayerSpec spec = parseModelSpec(
        json{{"input", {t, c}},
             {"layers", json::array({json{{"type", "causal_self_attention"}, {"n_head", heads}, {"dropout", p}}})}},
        "", "/model").layers[0];
    auto cpu = makeLayer(spec, {.device = Device::cpu(), .maxBatch = maxBatch, .seed = 7});
    SharedScratch shared(kGpu);
    auto gpu = makeLayer(spec, {.device = kGpu, .maxBatch = maxBatch, .seed = 7, .scratch = &shared});
    auto other = makeLayer(spec, {.device = kGpu, .maxBatch = maxBatch, .seed = 8, .scratch = &shared});
    shared.allocate();
    REQUIRE(shared.size(SharedScratch::kAttentionScores) == static_cast<size_t>(2 * heads * t * t));
    const size_t count = static_cast<size_t>(spec.paramCount());
    std::vector<float> params(count), grads(count);
    cpu->bind(params.data(), grads.data());
    InitRng init(11);
    cpu->initParams(init);
    DeviceFloats dParams = toDevice(params), dGrads(count, kGpu), dOtherGrads(count, kGpu);
    gpu->bind(dParams.data(), dGrads.data());
    other->bind(dParams.data(), dOtherGrads.data());
    for (const int batch : {3, 5, 1}) {
      CAPTURE(batch);
      const size_t n = static_cast<size_t>(batch * t * c);
      std::vector<float> x = randomVector(n, 9 + static_cast<uint32_t>(batch), -2, 2), dy = randomVector(n, 13);
      std::vector<float> y(n), dx(n);
      cpu->reseed(100 + static_cast<uint64_t>(batch), 0);
      cpu->forward(x.data(), y.data(), batch, true);
      cpu->backward(x.data(), y.data(), dy.data(), dx.data(), batch, false);
      DeviceFloats dX = toDevice(x), dY(n, kGpu), dDy = toDevice(dy), dDx(n, kGpu);
      DeviceFloats oX = toDevice(randomVector(n, 21, -2, 2)), oY(n, kGpu), oDy = toDevice(randomVector(n, 22)),
                   oDx(n, kGpu);
      // Another attention layer runs forward and backward between this one's forward and backward, through the
      // same scratch (what a model's next layer does).
      gpu->reseed(100 + static_cast<uint64_t>(batch), 0);
      gpu->forward(dX.data(), dY.data(), batch, true);
      other->forward(oX.data(), oY.data(), batch, true);
      other->backward(oX.data(), oY.data(), oDy.data(), oDx.data(), batch, false);
      gpu->backward(dX.data(), dY.data(), dDy.data(), dDx.data(), batch, false);
      const auto y1 = toHost(dY.data(), n), dx1 = toHost(dDx.data(), n), g1 = toHost(dGrads.data(), count);
      CHECK(maxDiff(y, y1) < 1e-5);
      CHECK(maxDiff(dx, dx1) < 1e-5);
      CHECK(maxDiff(grads, g1) < 1e-4);
      // Again alone, the scratch filled with NaN between forward and backward: backward recomputes everything it
      // reads, so the very same bits come out (also the dropped P: the same bits, reseeded alike).
      gpu->reseed(100 + static_cast<uint64_t>(batch), 0);
      gpu->forward(dX.data(), dY.data(), batch, true);
      fillNan(shared, SharedScratch::kAttentionScores);
      fillNan(shared, SharedScratch::kAttention);
      gpu->backward(dX.data(), dY.data(), dDy.data(), dDx.data(), batch, false);
      CHECK(toHost(dY.data(), n) == y1);
      CHECK(toHost(dDx.data(), n) == dx1);
      CHECK(toHost(dGrads.data(), count) == g1);
      // A second forward before the next reseed: both layers draw the stream's next elements (another mask with
      // dropout), and backward drops what that forward dropped.
      cpu->forward(x.data(), y.data(), batch, true);
      cpu->backward(x.data(), y.data(), dy.data(), dx.data(), batch, false);
      gpu->forward(dX.data(), dY.data(), batch, true);
      gpu->backward(dX.data(), dY.data(), dDy.data(), dDx.data(), batch, false);
      CHECK(maxDiff(y, toHost(dY.data(), n)) < 1e-5);
      CHECK(maxDiff(dx, toHost(dDx.data(), n)) < 1e-5);
      CHECK(maxDiff(grads, toHost(dGrads.data(), count)) < 1e-4);
      if (p > 0) CHECK(maxDiff(y, y1) > 1e-3);
    }
  }
}

TEST_CASE("a GPT model's attention layers share one scratch: CPU parity at batch < maxBatch, repeatable bits") {
  // The default choice ("auto": the matmul path at T 6), with attention dropout (0.2) and without.
  for (const double dropout : {0.2, 0.0}) {
    CAPTURE(dropout);
    json spec = json::parse(R"({"preset": "gpt", "vocab_size": 13, "block_size": 6, "n_layer": 3, "n_head": 2,
                                "n_embd": 8})");
    spec["dropout"] = dropout;
    const ModelSpec ms = parseModelSpec(spec, "", "/model");
    const int maxBatch = 3;
    Model cpu = Model::build(ms, maxBatch, 42, Device::cpu());
    Model gpu = Model::build(ms, maxBatch, 42, kGpu);
    auto cpuLoss = Loss::create({LossType::kCrossEntropy}, ms.output(), maxBatch, Device::cpu());
    auto gpuLoss = Loss::create({LossType::kCrossEntropy}, ms.output(), maxBatch, kGpu);
    for (const int batch : {2, 3, 1}) {
      CAPTURE(batch);
      std::vector<float> tokens(static_cast<size_t>(batch * 6));
      for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<float>((i * 5 + 3) % 13);
      std::vector<int32_t> labels(tokens.size());
      for (size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<int32_t>((i * 7 + 1) % 13);
      DeviceFloats dTokens = toDevice(tokens), dLabels = toDevice(labels);
      const TensorView gpuLabels =
          TensorView::of(reinterpret_cast<int32_t*>(dLabels.data()), Shape{batch, 6}, kGpu);
      std::vector<float> first;
      for (int round = 0; round < 2; ++round) {
        CAPTURE(round);
        cpu.reseedDropout(500 + static_cast<uint64_t>(batch), 0), gpu.reseedDropout(500 + static_cast<uint64_t>(batch), 0);
        const float lc =
            cpuLoss->forward(cpu.forward(tokens.data(), batch, true), TensorView::i32(labels.data(), Shape{batch, 6}));
        const float lg = gpuLoss->forward(gpu.forward(dTokens.data(), batch, true), gpuLabels);
        CHECK(std::fabs(lc - lg) < 1e-5);
        cpu.backward(cpuLoss->backward(), {}, GradMode::kOverwrite);
        gpu.backward(gpuLoss->backward(), {}, GradMode::kOverwrite);
        CHECK(std::fabs(gradNorm(cpu.grads(), Device::cpu()) - gradNorm(gpu.grads(), kGpu)) < 1e-4);
        const auto g = toHost(gpu.grads().data(), gpu.grads().size());
        if (round == 0) first = g;
        else CHECK(g == first);  // the same step again: bit-identical gradients
      }
    }
  }
}

TEST_CASE("fused attention: CPU and matmul parity, no score scratch, the same bits twice, with and without dropout") {
  struct Shape {
    int64_t t, c, heads;
  };
  // hs 4 (T 37: one partial tile), hs 64 (T 130: three tiles, the last partial), hs 128 (T 70: key tiles of 32
  // rows), and T = 1; without and with attention dropout (the kernels compute the CPU layer's mask).
  for (const double dropout : {0.0, 0.3}) {
    for (const Shape s : {Shape{37, 16, 4}, Shape{130, 128, 2}, Shape{70, 256, 2}, Shape{1, 64, 1}}) {
      CAPTURE(dropout);
      CAPTURE(s.t);
      CAPTURE(s.c);
      CAPTURE(s.heads);
      const int maxBatch = 3;
      const LayerSpec spec = parseModelSpec(
          json{{"input", {s.t, s.c}},
               {"layers", json::array({json{{"type", "causal_self_attention"}, {"n_head", s.heads},
                                            {"dropout", dropout}}})}},
          "", "/model").layers[0];
      auto cpu = makeLayer(spec, {.device = Device::cpu(), .maxBatch = maxBatch, .seed = 7});
      SharedScratch fusedScratch(kGpu), matmulScratch(kGpu);
      std::unique_ptr<Layer> fused, matmul;
      {
        const AttentionScope scope(AttentionKernel::kFused);
        fused = makeLayer(spec, {.device = kGpu, .maxBatch = maxBatch, .seed = 7, .scratch = &fusedScratch});
      }
      {
        const AttentionScope scope(AttentionKernel::kMatmul);
        matmul = makeLayer(spec, {.device = kGpu, .maxBatch = maxBatch, .seed = 7, .scratch = &matmulScratch});
      }
      fusedScratch.allocate();
      matmulScratch.allocate();
      // The fused layer never asks for the [2, H, T, T] score scratch; its backward scratch is dqkv + datt + D.
      CHECK(fusedScratch.size(SharedScratch::kAttentionScores) == 0);
      CHECK(fusedScratch.size(SharedScratch::kAttention) ==
            static_cast<size_t>(maxBatch * s.t * 4 * s.c + maxBatch * s.heads * s.t));
      CHECK(matmulScratch.size(SharedScratch::kAttentionScores) == static_cast<size_t>(2 * s.heads * s.t * s.t));
      const size_t count = static_cast<size_t>(spec.paramCount());
      std::vector<float> params(count), grads(count);
      cpu->bind(params.data(), grads.data());
      InitRng init(11);
      cpu->initParams(init);
      for (float& p : params) p *= 3.0f;  // a peaked softmax: the online rescaling matters
      DeviceFloats dParams = toDevice(params), dGrads(count, kGpu), mGrads(count, kGpu);
      fused->bind(dParams.data(), dGrads.data());
      matmul->bind(dParams.data(), mGrads.data());
      for (const int batch : {3, 1}) {
        CAPTURE(batch);
        const uint64_t seed = 100 + static_cast<uint64_t>(batch);
        const size_t n = static_cast<size_t>(batch * s.t * s.c);
        const std::vector<float> x = randomVector(n, 9 + static_cast<uint32_t>(batch), -2, 2),
                                 dy = randomVector(n, 13);
        std::vector<float> y(n), dx(n);
        cpu->reseed(seed, 0), fused->reseed(seed, 0), matmul->reseed(seed, 0);
        cpu->forward(x.data(), y.data(), batch, true);
        cpu->backward(x.data(), y.data(), dy.data(), dx.data(), batch, false);
        DeviceFloats dX = toDevice(x), dY(n, kGpu), dDy = toDevice(dy), dDx(n, kGpu), mY(n, kGpu), mDx(n, kGpu);
        fused->forward(dX.data(), dY.data(), batch, true);
        fused->backward(dX.data(), dY.data(), dDy.data(), dDx.data(), batch, false);
        matmul->forward(dX.data(), mY.data(), batch, true);
        matmul->backward(dX.data(), mY.data(), dDy.data(), mDx.data(), batch, false);
        const auto y1 = toHost(dY.data(), n), dx1 = toHost(dDx.data(), n), g1 = toHost(dGrads.data(), count);
        // The tolerances of test_gpu_flash.cpp's emulation (online softmax and exp2 round otherwise than the CPU;
        // with dropout the kept probabilities, and their rounding, are scaled by 1 / (1 - p)).
        MESSAGE("fused vs CPU: y " << maxDiff(y, y1) << ", dx " << maxDiff(dx, dx1) << ", grads "
                                   << maxDiff(grads, g1));
        const double keep = 1.0 / (1.0 - dropout);
        CHECK(maxDiff(y, y1) < 5e-5 * keep);
        CHECK(maxDiff(dx, dx1) < 1e-4 * keep);
        CHECK(maxDiff(grads, g1) < 5e-4 * keep);
        CHECK(maxDiff(toHost(mY.data(), n), y1) < 5e-5 * keep);
        CHECK(maxDiff(toHost(mDx.data(), n), dx1) < 1e-4 * keep);
        CHECK(maxDiff(toHost(mGrads.data(), count), g1) < 5e-4 * keep);
        // Again (reseeded alike: the same mask), the backward scratch filled with NaN between forward and
        // backward: the same bits (deterministic kernels; backward reads nothing forward left in the scratch, and
        // writes every element of dqkv).
        fused->reseed(seed, 0);
        fused->forward(dX.data(), dY.data(), batch, true);
        fillNan(fusedScratch, SharedScratch::kAttention);
        fused->backward(dX.data(), dY.data(), dDy.data(), dDx.data(), batch, false);
        CHECK(toHost(dY.data(), n) == y1);
        CHECK(toHost(dDx.data(), n) == dx1);
        CHECK(toHost(dGrads.data(), count) == g1);
      }
    }
  }
}

TEST_CASE("\"fused\" where the fused kernels cannot run the layer is an error naming it; \"auto\" takes matmul") {
  // Head size 129 (n_embd 258 / 2 heads): above the fused kernels' 128.
  const json wide{{"input", {4, 258}}, {"layers", json::array({json{{"type", "causal_self_attention"}, {"n_head", 2}}})}};
  const LayerSpec spec = parseModelSpec(wide, "", "/model").layers[0];
  {
    const AttentionScope scope(AttentionKernel::kFused);
    CHECK_THROWS_WITH_AS(makeLayer(spec, {.device = kGpu, .maxBatch = 2, .seed = 1}),
                         doctest::Contains("the fused attention kernels cannot run this layer: head size 129"),
                         UsageError);
  }
  SharedScratch shared(kGpu);
  auto layer = makeLayer(spec, {.device = kGpu, .maxBatch = 2, .seed = 1, .scratch = &shared});
  CHECK(shared.size(SharedScratch::kAttentionScores) == static_cast<size_t>(2 * 2 * 4 * 4));  // the matmul path
}

// test_gpu_nn's layer list runs "auto", which at these sizes is the matmul path: the fused kernels get the same
// shapes and tolerances here (their CPU emulation at these shapes passes them: test_gpu_flash.cpp).
TEST_CASE("both attention paths pass the layer parity check: matmul and fused") {
  for (const AttentionKernel k : {AttentionKernel::kMatmul, AttentionKernel::kFused}) {
    CAPTURE(attentionKernelName(k));
    const AttentionScope scope(k);
    checkLayer({R"({"type": "causal_self_attention", "n_head": 2})", {5, 8}});
    checkLayer({R"({"type": "causal_self_attention", "n_head": 4, "bias": false})", {300, 16}});  // rows > a block
  }
}

TEST_CASE("tensor-core fused attention (TF32, bf16): CPU parity within their rounding, the same bits twice, dropout") {
  // The kernels of lib/gpu/flash_attention_tc.h, which the layer runs while "tf32" is on (the jobs' default; this
  // binary's main turns it off) or under "precision": "bf16". test_gpu's emulation (test_gpu_flash_tc.cpp) bounds
  // them at the layer's default init by 6e-3 / 6e-3 / 5e-2 (y, dx, gradients; bf16) and 1e-3 / 1e-3 / 1e-2 (TF32),
  // times 1 / (1 - p) with dropout, two to three times its measured worst: the device's own MMA sums should land
  // there too. Shapes: hs 4 (T 37), hs 64 (T 130 and 200: several key tiles), hs 128 (T 70: 32-wide tiles), T 1.
  struct Shape {
    int64_t t, c, heads;
  };
  for (const bool bf16 : {false, true}) {
    struct MathScope {
      bool bf;
      explicit MathScope(bool b) : bf(b) { bf ? setBf16(true) : setTf32(true); }
      ~MathScope() { setBf16(false), setTf32(false); }
    } math(bf16);
    const double yTol = bf16 ? 6e-3 : 1e-3, dxTol = bf16 ? 6e-3 : 1e-3, gTol = bf16 ? 5e-2 : 1e-2;
    for (const double dropout : {0.0, 0.3}) {
      for (const Shape s : {Shape{37, 16, 4}, Shape{130, 128, 2}, Shape{200, 128, 2}, Shape{70, 256, 2},
                            Shape{1, 64, 1}}) {
        CAPTURE(bf16);
        CAPTURE(dropout);
        CAPTURE(s.t);
        CAPTURE(s.c);
        const int batch = 3;
        const LayerSpec spec = parseModelSpec(
            json{{"input", {s.t, s.c}},
                 {"layers", json::array({json{{"type", "causal_self_attention"}, {"n_head", s.heads},
                                              {"dropout", dropout}}})}},
            "", "/model").layers[0];
        auto cpu = makeLayer(spec, {.device = Device::cpu(), .maxBatch = batch, .seed = 7});
        std::unique_ptr<Layer> fused;
        {
          const AttentionScope scope(AttentionKernel::kFused);
          fused = makeLayer(spec, {.device = kGpu, .maxBatch = batch, .seed = 7});
        }
        const size_t count = static_cast<size_t>(spec.paramCount());
        std::vector<float> params(count), grads(count);
        cpu->bind(params.data(), grads.data());
        InitRng init(17);
        cpu->initParams(init);
        DeviceFloats dParams = toDevice(params), dGrads(count, kGpu);
        fused->bind(dParams.data(), dGrads.data());
        const size_t n = static_cast<size_t>(batch * s.t * s.c);
        const std::vector<float> x = randomVector(n, 41, -2, 2), dy = randomVector(n, 42);
        std::vector<float> y(n), dx(n);
        cpu->reseed(100, 0), fused->reseed(100, 0);
        cpu->forward(x.data(), y.data(), batch, true);
        cpu->backward(x.data(), y.data(), dy.data(), dx.data(), batch, false);
        DeviceFloats dX = toDevice(x), dY(n, kGpu), dDy = toDevice(dy), dDx(n, kGpu);
        fused->forward(dX.data(), dY.data(), batch, true);
        fused->backward(dX.data(), dY.data(), dDy.data(), dDx.data(), batch, false);
        const auto y1 = toHost(dY.data(), n), dx1 = toHost(dDx.data(), n), g1 = toHost(dGrads.data(), count);
        MESSAGE((bf16 ? "bf16" : "tf32") << " tensor-core fused vs CPU: y " << maxDiff(y, y1) << ", dx "
                                         << maxDiff(dx, dx1) << ", grads " << maxDiff(grads, g1));
        const double keep = 1.0 / (1.0 - dropout);
        CHECK(maxDiff(y, y1) < yTol * keep);
        CHECK(maxDiff(dx, dx1) < dxTol * keep);
        CHECK(maxDiff(grads, g1) < gTol * keep);
        // Deterministic: the same step again gives the same bits (no atomics; each element one warp's MMAs).
        fused->reseed(100, 0);
        fused->forward(dX.data(), dY.data(), batch, true);
        fused->backward(dX.data(), dY.data(), dDy.data(), dDx.data(), batch, false);
        CHECK(toHost(dY.data(), n) == y1);
        CHECK(toHost(dDx.data(), n) == dx1);
        CHECK(toHost(dGrads.data(), count) == g1);
      }
    }
  }
}
