// bf16 activation storage on a GPU ("precision": "bf16", docs/gpu.md "bf16"; needs a visible GPU, label `gpu`):
// the same model built with and without it (nn::setBf16Activations) runs the same training steps and must give the
// same losses, gradients and weights bit for bit, in less activation memory. The stored bf16 values are the ones
// each GEMM converted its float32 operand to before; what could differ is only the device itself (nvcc computing
// a float32 value differently in the bf16 instantiation of a kernel, or cuBLAS choosing another algorithm for an
// operand read in place instead of from the aligned conversion scratch): a failure here names that. The kernels'
// per-thread work is CPU-tested in test_gpu_bf16.cpp. On the fused attention path q, k, v are kept in bf16 too
// (the bf16 kernels read them as stored; emulated bit for bit in test_gpu_flash_tc_bf16.cpp): the GPT case below
// compares a fused step reading float32 q, k, v (storage off) with one reading bf16 (on), and the kernels are
// compared directly at GPT-2's head size.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "lib/gpu/bf16_store.h"
#include "lib/gpu/kernels.h"
#include "lib/gpu/kernels_attention.h"
#include "lib/gpu/memory.h"
#include "lib/nn/attention_kernel.h"
#include "lib/nn/dropout_mask.h"
#include "lib/nn/device.h"
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

namespace {

struct Run {
  std::vector<float> losses, grads, params;
  size_t activationBytes = 0;
  size_t lossBytes = 0;  // device memory the loss allocated
  DType gradType = DType::kFloat32;
  bool gradOverOutput = false;  // every step's gradient view pointed at the model's output (the logits)
  int64_t gradLd = -1;          // the gradient view's TensorView::ld (the last step's)
};

// Three AdamW steps of `spec` (batch 3 of `tokens`-style inputs and class labels) on a GPU model built with bf16
// activation storage on or off; "precision": "bf16" (bf16 GEMMs) in both. The loss gives its gradient as `gradType`
// (the model's outputGradType() when bf16Grad, else float32).
Run train(const json& spec, bool storage, bool tokens, int64_t classes, bool bf16Grad = false) {
  setBf16Activations(storage);
  const ModelSpec ms = parseModelSpec(spec, "", "/model");
  Model model = Model::build(ms, 3, 42, kGpu);
  setBf16Activations(true);
  const int batch = 3;
  const auto inputs = static_cast<size_t>(batch * ms.input.numel());
  std::vector<float> x = randomVector(inputs, 17, -2, 2);
  if (tokens)
    for (float& v : x) v = std::floor((v + 2.0f) * 0.25f * static_cast<float>(classes - 1));
  const Shape out = ms.output();
  const auto labelCount = static_cast<size_t>(batch * (out.rank() > 1 ? out[0] : 1));
  std::vector<int32_t> labels(labelCount);
  for (size_t i = 0; i < labels.size(); ++i)
    labels[i] = static_cast<int32_t>((i * 7 + 1) % static_cast<size_t>(classes));
  DeviceFloats dX = toDevice(x), dLabels = toDevice(labels);
  const Shape labelShape = out.rank() > 1 ? Shape{batch, out[0]} : Shape{batch};
  const size_t before = gpu::allocatedBytes().current;
  auto loss = Loss::create({LossType::kCrossEntropy}, out, batch, kGpu,
                           bf16Grad ? model.outputGradType() : DType::kFloat32);
  Run r;
  r.lossBytes = gpu::allocatedBytes().current - before;
  r.gradType = loss->gradType();
  auto opt = Optimizer::create({.type = OptimizerType::kAdamW, .lr = 0.01}, model.numParams(), kGpu);
  r.gradOverOutput = true;
  for (int step = 0; step < 3; ++step) {
    const TensorView y = model.forward(dX.data(), batch, true);
    r.losses.push_back(loss->forward(y, TensorView::of(reinterpret_cast<int32_t*>(dLabels.data()), labelShape, kGpu)));
    const TensorView g = loss->backward();
    r.gradOverOutput = r.gradOverOutput && g.data == y.data;
    r.gradLd = g.ld;
    model.backward(g, {}, GradMode::kOverwrite);
    opt->step(model.params(), model.grads());
  }
  r.grads = toHost(model.grads().data(), model.grads().size());
  auto host = model.hostParams();
  r.params.assign(host.begin(), host.end());
  r.activationBytes = model.activationBytes();
  return r;
}

bool sameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

struct AttentionScope {
  explicit AttentionScope(AttentionKernel k) { setAttentionKernel(k); }
  ~AttentionScope() { setAttentionKernel(AttentionKernel::kAuto); }
};

}  // namespace

TEST_CASE("with a GPU: bf16 activation storage leaves a bf16 GPT's steps bit-identical, in less memory") {
  const Bf16Scope bf16;
  for (AttentionKernel kernel : {AttentionKernel::kMatmul, AttentionKernel::kFused}) {
    for (double dropout : {0.0, 0.1}) {
      CAPTURE(static_cast<int>(kernel));
      CAPTURE(dropout);
      const AttentionScope scope(kernel);
      const json spec{{"preset", "gpt"}, {"vocab_size", 50}, {"block_size", 16}, {"n_layer", 2},
                      {"n_head", 4},     {"n_embd", 64},     {"dropout", dropout}};
      const Run off = train(spec, false, true, 50);
      const Run on = train(spec, true, true, 50);
      CHECK(sameBits(off.losses, on.losses));
      CHECK(sameBits(off.grads, on.grads));
      CHECK(sameBits(off.params, on.params));
      CHECK(on.activationBytes < off.activationBytes);  // ln_f's output in the model's arena
      MESSAGE("losses " << on.losses[0] << " " << on.losses[2] << "; model activations " << off.activationBytes
                        << " -> " << on.activationBytes << " bytes");
    }
  }
}

// The residual add fused into the LayerNorm after each block (docs/gpu.md "Fused residual + LayerNorm"): a GPT's
// three AdamW steps with the fusion and without it, bit for bit, in bf16 (with its activation storage: the
// LayerNorm's bf16 output) and float32, on both attention paths. Fused: all four blocks' adds (residualAddFusesInto),
// three by the next block's first child (ln_2, the next ln_1, ln_2: the block delegates to it) and the last by ln_f.
TEST_CASE("with a GPU: the residual add fused into the next LayerNorm leaves a GPT's steps bit-identical") {
  for (bool bf16 : {true, false}) {
    for (AttentionKernel kernel : {AttentionKernel::kMatmul, AttentionKernel::kFused}) {
      CAPTURE(bf16);
      CAPTURE(static_cast<int>(kernel));
      setBf16(bf16);
      const AttentionScope scope(kernel);
      const json spec{{"preset", "gpt"}, {"vocab_size", 50}, {"block_size", 16}, {"n_layer", 2},
                      {"n_head", 4},     {"n_embd", 64},     {"dropout", 0.1}};
      REQUIRE(residualLayerNormPairs(parseModelSpec(spec, "", "/model").layers) == 4);
      setResidualLayerNormFusion(false);
      const Run off = train(spec, true, true, 50);
      setResidualLayerNormFusion(true);
      const Run on = train(spec, true, true, 50);
      setBf16(false);
      CHECK(sameBits(off.losses, on.losses));
      CHECK(sameBits(off.grads, on.grads));
      CHECK(sameBits(off.params, on.params));
      CHECK(on.activationBytes == off.activationBytes);
    }
  }
}

// The residual's gradient added in the LayerNorm backward (docs/gpu.md "Fused residual gradient + LayerNorm
// backward"): every block's first child (ln_1, ln_2) stores dx = dy + its dx in its kernel; a GPT's three AdamW steps
// with and without it (nn::setResidualLayerNormBackwardFusion), bit for bit, bf16 and float32, both attention paths.
TEST_CASE("with a GPU: the residual gradient added in the LayerNorm backward leaves a GPT's steps bit-identical") {
  for (bool bf16 : {true, false}) {
    for (AttentionKernel kernel : {AttentionKernel::kMatmul, AttentionKernel::kFused}) {
      CAPTURE(bf16);
      CAPTURE(static_cast<int>(kernel));
      setBf16(bf16);
      const AttentionScope scope(kernel);
      const json spec{{"preset", "gpt"}, {"vocab_size", 50}, {"block_size", 16}, {"n_layer", 2},
                      {"n_head", 4},     {"n_embd", 64},     {"dropout", 0.1}};
      setResidualLayerNormBackwardFusion(false);
      const Run off = train(spec, true, true, 50);
      setResidualLayerNormBackwardFusion(true);
      const Run on = train(spec, true, true, 50);
      setBf16(false);
      CHECK(sameBits(off.losses, on.losses));
      CHECK(sameBits(off.grads, on.grads));
      CHECK(sameBits(off.params, on.params));
      CHECK(on.activationBytes == off.activationBytes);
    }
  }
}

// The weight/bias gradients' first pass folded into the LayerNorm backward's dx kernel (docs/gpu.md "LayerNorm
// backward with its parameter gradients"): the kernels with and without it (gpu::kernels::setLayerNormParamsFusion),
// bit for bit: dx, dw, db, with and without the residual's gradient, onto zero and onto earlier gradients, over one
// chunk of rows, several, and the 128-chunk cap (8229 rows). test_gpu emulates both on the CPU; this is the device.
TEST_CASE("with a GPU: the LayerNorm backward with its parameter gradients' first pass gives the two launches' bits") {
  namespace k = gpu::kernels;
  struct Shape {
    int64_t rows, d;
  };
  for (const Shape s : {Shape{6, 768}, Shape{200, 257}, Shape{8229, 768}}) {
    for (const bool residual : {false, true}) {
      for (const bool accumulate : {false, true}) {
        CAPTURE(s.rows);
        CAPTURE(s.d);
        CAPTURE(residual);
        CAPTURE(accumulate);
        const auto n = static_cast<size_t>(s.rows * s.d), ds = static_cast<size_t>(s.d);
        const DeviceFloats x = toDevice(randomVector(n, 41, -3, 3)), dy = toDevice(randomVector(n, 42, -0.5f, 0.5f)),
                           res = toDevice(randomVector(n, 43)), w = toDevice(randomVector(ds, 44, 0.5f, 1.5f));
        DeviceFloats mean(static_cast<size_t>(s.rows), kGpu), rstd(static_cast<size_t>(s.rows), kGpu), y(n, kGpu);
        k::layerNormForward(x.data(), w.data(), nullptr, y.data(), mean.data(), rstd.data(), s.rows, s.d, 1e-5f);
        std::vector<float> out[2][3];
        for (const bool fused : {false, true}) {
          k::setLayerNormParamsFusion(fused);
          DeviceFloats dx(n, kGpu), dw = toDevice(randomVector(ds, 45)), db = toDevice(randomVector(ds, 46));
          if (residual)
            k::residualLayerNormBackward(x.data(), w.data(), mean.data(), rstd.data(), dy.data(), res.data(), dx.data(),
                                         dw.data(), db.data(), s.rows, s.d, accumulate);
          else
            k::layerNormBackward(x.data(), w.data(), mean.data(), rstd.data(), dy.data(), dx.data(), dw.data(),
                                 db.data(), s.rows, s.d, accumulate);
          out[fused][0] = toHost(dx.data(), n);
          out[fused][1] = toHost(dw.data(), ds);
          out[fused][2] = toHost(db.data(), ds);
        }
        k::setLayerNormParamsFusion(true);
        CHECK(sameBits(out[0][0], out[1][0]));
        CHECK(sameBits(out[0][1], out[1][1]));
        CHECK(sameBits(out[0][2], out[1][2]));
      }
    }
  }
}

TEST_CASE("with a GPU: bf16 activation storage leaves an MLP's steps bit-identical (layernorm, gelu fused or not)") {
  const Bf16Scope bf16;
  // layernorm -> linear, gelu (unfused: the linear has no bias) -> linear, gelu (fused with the linear's bias) ->
  // linear.
  const json spec = json::parse(R"({"input": [24], "layers": [
      {"type": "layernorm"}, {"type": "linear", "out": 40, "bias": false}, {"type": "gelu"},
      {"type": "linear", "out": 40}, {"type": "gelu"}, {"type": "linear", "out": 5}]})");
  const Run off = train(spec, false, false, 5);
  const Run on = train(spec, true, false, 5);
  CHECK(sameBits(off.losses, on.losses));
  CHECK(sameBits(off.grads, on.grads));
  CHECK(sameBits(off.params, on.params));
  // Three outputs of 24, 40 and 40 floats per sample stored in half: 3 x 52 floats less (rounded to 16-float slots).
  CHECK(on.activationBytes < off.activationBytes);
}

TEST_CASE("with a GPU: the bf16 fused kernels reading bf16-stored q, k, v give the float32-input kernels' bits") {
  namespace k = gpu::kernels;
  // GPT-2's head size (64, 12 heads) at T 300 (not a multiple of the tiles), and head size 48 (padded to 64).
  struct Shape {
    int64_t batch, t, heads, hs;
  };
  for (const Shape s : {Shape{2, 300, 12, 64}, Shape{2, 70, 2, 48}}) {
    for (const double p : {0.0, 0.1}) {
      CAPTURE(s.t);
      CAPTURE(s.hs);
      CAPTURE(p);
      const int64_t c = s.heads * s.hs, rows = s.batch * s.t;
      const auto nQkv = static_cast<size_t>(rows * 3 * c), nAtt = static_cast<size_t>(rows * c),
                 nLse = static_cast<size_t>(s.batch * s.heads * s.t);
      const std::vector<float> qkv = randomVector(nQkv, 5, -3, 3), datt = randomVector(nAtt, 6);
      std::vector<uint16_t> bits(nQkv + 1, 0);  // addBiasToBf16's rounding (bf16_store.h)
      for (size_t i = 0; i < nQkv; ++i) bits[i] = gpu::bf16Bits(qkv[i]);
      std::vector<float> packed((nQkv + 1) / 2);
      std::memcpy(packed.data(), bits.data(), packed.size() * sizeof(float));
      nn::detail::DropoutStream stream(std::nullopt, 0);
      stream.reseed(9, 0);
      const gpu::DropoutDraw draw =
          stream.next(static_cast<uint64_t>(s.batch * s.heads * s.t * s.t), p, 1.0f / static_cast<float>(1.0 - p));
      const gpu::DropoutDraw* d = p > 0 ? &draw : nullptr;
      DeviceFloats dQkv = toDevice(qkv), dBits = toDevice(packed), dDatt = toDevice(datt);
      struct Out {
        DeviceFloats att, lse, dsum, dqkv;
      };
      auto outs = [&] {
        return Out{DeviceFloats(nAtt, kGpu), DeviceFloats(nLse, kGpu), DeviceFloats(nLse, kGpu),
                   DeviceFloats(nQkv, kGpu)};
      };
      Out a = outs(), b = outs();
      k::flashAttentionForward(dQkv.data(), a.att.data(), a.lse.data(), s.batch, s.t, s.heads, s.hs, d,
                               k::FlashMath::kBf16);
      k::flashAttentionBackward(dQkv.data(), a.att.data(), a.lse.data(), dDatt.data(), a.dsum.data(), a.dqkv.data(),
                                s.batch, s.t, s.heads, s.hs, d, k::FlashMath::kBf16);
      const auto* q16 = reinterpret_cast<const uint16_t*>(dBits.data());
      k::flashAttentionForwardBf16(q16, b.att.data(), b.lse.data(), s.batch, s.t, s.heads, s.hs, d);
      k::flashAttentionBackwardBf16(q16, b.att.data(), b.lse.data(), dDatt.data(), b.dsum.data(), b.dqkv.data(),
                                    s.batch, s.t, s.heads, s.hs, d);
      CHECK(sameBits(toHost(a.att.data(), nAtt), toHost(b.att.data(), nAtt)));
      CHECK(sameBits(toHost(a.lse.data(), nLse), toHost(b.lse.data(), nLse)));
      CHECK(sameBits(toHost(a.dsum.data(), nLse), toHost(b.dsum.data(), nLse)));
      CHECK(sameBits(toHost(a.dqkv.data(), nQkv), toHost(b.dqkv.data(), nQkv)));
    }
  }
}

// The logits' gradient in bf16 (docs/gpu.md "bf16"): cross-entropy writes it rounded over the logits themselves
// (lib/gpu/loss_grad.h, leading dimension 2 x vocabulary) and lm_head's GEMMs read it there as it is, instead of
// the loss writing it in float32 and the GEMMs rounding it into the conversion scratch. Same bits: a failure means
// the device computed softmax - onehot differently in crossEntropyGradBf16InPlaceKernel than in crossEntropyKernel
// (nvcc contracting the expression otherwise), or cuBLAS chose another algorithm for the operand read in place, at
// its leading dimension of 2 x vocabulary, than for the packed scratch.
TEST_CASE("with a GPU: the bf16 logits' gradient leaves a bf16 GPT's steps bit-identical, in less memory") {
  const Bf16Scope bf16;
  for (AttentionKernel kernel : {AttentionKernel::kMatmul, AttentionKernel::kFused}) {
    for (double dropout : {0.0, 0.1}) {
      CAPTURE(static_cast<int>(kernel));
      CAPTURE(dropout);
      const AttentionScope scope(kernel);
      const json spec{{"preset", "gpt"}, {"vocab_size", 300}, {"block_size", 16}, {"n_layer", 2},
                      {"n_head", 4},     {"n_embd", 64},      {"dropout", dropout}};
      const Run f32 = train(spec, true, true, 300, false);
      const Run b16 = train(spec, true, true, 300, true);
      CHECK(f32.gradType == DType::kFloat32);
      CHECK(b16.gradType == DType::kBFloat16);
      // In place: the gradient is the logits' memory, rows 2 x 300 bf16 values apart; the float32 one is packed.
      CHECK(b16.gradOverOutput);
      CHECK(b16.gradLd == 600);
      CHECK_FALSE(f32.gradOverOutput);
      CHECK(f32.gradLd == 0);
      CHECK(sameBits(f32.losses, b16.losses));
      CHECK(sameBits(f32.grads, b16.grads));
      CHECK(sameBits(f32.params, b16.params));
      // The loss's [3, 16, 300] gradient: no buffer instead of 4 bytes a value (2 floats of statistics a row).
      CHECK(f32.lossBytes - b16.lossBytes >= size_t{3 * 16 * 300 * 4 - 3 * 16 * 2 * 4});
      MESSAGE("loss buffers " << f32.lossBytes << " -> " << b16.lossBytes << " bytes");
    }
  }
  // With the storage off the model takes float32 only, and the loss is not asked for bf16.
  const json spec{{"preset", "gpt"}, {"vocab_size", 50}, {"block_size", 8}, {"n_layer", 1}, {"n_head", 2},
                  {"n_embd", 16}};
  setBf16Activations(false);
  Model plain = Model::build(parseModelSpec(spec, "", "/model"), 2, 42, kGpu);
  setBf16Activations(true);
  CHECK(plain.outputGradType() == DType::kFloat32);
}
