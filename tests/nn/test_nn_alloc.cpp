// A training step (forward, loss, backward with a capturing callback, optimizer step) allocates nothing: malloc
// is interposed and counted while steps run, for an MLP and a CNN, full and partial batches.
// Its own executable because replacing malloc must not affect other tests; skipped under sanitizers, which
// own malloc themselves.
#include <doctest/doctest.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "lib/nn/layer.h"
#include "lib/nn/loss.h"
#include "lib/nn/model.h"
#include "lib/nn/optimizer.h"

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define DTRAIN_NN_COUNT_MALLOC 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || __has_feature(memory_sanitizer)
#define DTRAIN_NN_COUNT_MALLOC 0
#endif
#endif
#ifndef DTRAIN_NN_COUNT_MALLOC
#define DTRAIN_NN_COUNT_MALLOC 1
#endif

#if DTRAIN_NN_COUNT_MALLOC
namespace {
bool gCounting = false;
long gMallocs = 0;
}  // namespace
extern "C" void* __libc_malloc(size_t size);
extern "C" void* malloc(size_t size) {
  if (gCounting) ++gMallocs;
  return __libc_malloc(size);
}
// AlignedBuffer's allocations (lib/common/aligned_buffer.h: std::aligned_alloc), counted in bytes.
namespace {
bool gCountingBytes = false;
size_t gAlignedBytes = 0;
}  // namespace
extern "C" void* __libc_memalign(size_t alignment, size_t size);
extern "C" void* aligned_alloc(size_t alignment, size_t size) {
  if (gCountingBytes) gAlignedBytes += size;
  return __libc_memalign(alignment, size);
}
#endif

using namespace dtrain;
using namespace dtrain::nn;

TEST_CASE("training steps do not allocate") {
#if !DTRAIN_NN_COUNT_MALLOC
  MESSAGE("malloc counting is off under sanitizers");
#else
  const char* models[] = {
      R"({"input": [784], "layers": [{"type": "linear", "out": 256}, {"type": "relu"},
          {"type": "linear", "out": 256}, {"type": "gelu"}, {"type": "dropout", "p": 0.1}, {"type": "layernorm"},
          {"type": "linear", "out": 10}]})",
      R"({"input": [1, 28, 28], "layers": [{"type": "conv2d", "out": 16, "kernel": 5, "padding": 2},
          {"type": "relu"}, {"type": "maxpool2d", "kernel": 2}, {"type": "conv2d", "out": 32, "kernel": 5},
          {"type": "tanh"}, {"type": "maxpool2d", "kernel": 2}, {"type": "flatten"}, {"type": "linear", "out": 10}]})"};
  for (const char* json : models) {
    INFO(json);
    Model m = Model::build(parseModelSpec(nlohmann::json::parse(json), "", "/model"), 64, 1);
    auto loss = Loss::create({LossType::kCrossEntropy}, m.outputShape(), 64);
    OptimizerSpec os;
    os.type = OptimizerType::kAdamW;
    auto opt = Optimizer::create(os, m.numParams());
    std::vector<float> x(static_cast<size_t>(64 * m.inputShape().numel()), 0.5f);
    std::vector<int64_t> y(64, 3);
    int a = 0, b = 0, c = 0;  // three captures: a std::function would have to allocate for this lambda
    for (int step = 0; step < 4; ++step) {
      const int batch = step == 3 ? 17 : 64;
      gMallocs = 0;
      gCounting = step > 0;  // the first step may warm up anything lazily initialised
      loss->forward(m.forward(x.data(), batch, true), TensorView::i64(y.data(), Shape{batch}));
      m.backward(loss->backward(), [&](int layer) { a += layer, b += 1, c = layer; }, GradMode::kOverwrite);
      clipGradNorm(m.grads(), 1.0);
      opt->step(m.params(), m.grads());
      gCounting = false;
      CHECK(gMallocs == 0);
    }
    CHECK(b > 0);
  }
#endif
}

// A block whose last child's backward never reads its output (blockAddsInPlace) keeps no buffer for that output:
// the child writes into the block's output. Built with a shared scratch (as in a model), the block allocates
// exactly its children's own buffers plus the outputs it keeps: ln's only for [layernorm, attention] (the attention
// output, one [T, C] per sample, was a second buffer before), both for [layernorm, relu] (relu reads its output).
TEST_CASE("an in-place block does not allocate its last child's output") {
#if !DTRAIN_NN_COUNT_MALLOC
  MESSAGE("allocation counting is off under sanitizers");
#else
  const int maxBatch = 8;
  const auto parse = [](const char* layer) {
    return parseModelSpec(nlohmann::json::parse(std::string(R"({"input": [16, 32], "layers": [)") + layer + "]}"),
                          "", "/model")
        .layers[0];
  };
  const auto bytesToBuild = [&](const LayerSpec& spec) {
    SharedScratch scratch;
    gAlignedBytes = 0;
    gCountingBytes = true;
    auto layer = makeLayer(spec, {.device = Device::cpu(), .maxBatch = maxBatch, .seed = 1, .scratch = &scratch});
    gCountingBytes = false;
    return gAlignedBytes;
  };
  const size_t rowBytes = size_t{maxBatch} * 16 * 32 * sizeof(float);  // one [N, T, C] float32 output
  const char* ln = R"({"type": "layernorm"})";
  const char* attn = R"({"type": "causal_self_attention", "n_head": 2})";
  const char* relu = R"({"type": "relu"})";
  const size_t lnBytes = bytesToBuild(parse(ln)), attnBytes = bytesToBuild(parse(attn)),
               reluBytes = bytesToBuild(parse(relu));
  const LayerSpec inPlace = parse((std::string(R"({"type": "block", "layers": [)") + ln + ", " + attn + "]}").c_str());
  const LayerSpec kept = parse((std::string(R"({"type": "block", "layers": [)") + ln + ", " + relu + "]}").c_str());
  CHECK(blockAddsInPlace(inPlace));
  CHECK_FALSE(blockAddsInPlace(kept));
  CHECK(bytesToBuild(inPlace) == lnBytes + attnBytes + rowBytes);
  CHECK(bytesToBuild(kept) == lnBytes + reluBytes + 2 * rowBytes);
  // The estimate (dtrain check) counts the same buffers.
  CHECK(keptFloatsOf(inPlace) == keptFloatsOf(inPlace.children[0]) + keptFloatsOf(inPlace.children[1]) + 16 * 32);
  CHECK(keptFloatsOf(kept) == keptFloatsOf(kept.children[0]) + 2 * 16 * 32);
#endif
}
