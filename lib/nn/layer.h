// The Layer interface: one step of a sequential model, computing on raw row-major float buffers.
//
// A layer never owns its inputs, outputs or parameters: the Model owns activation buffers and the flat
// parameter/gradient arenas and hands pointers in. A layer owns only what its backward needs beyond x and y
// (dropout mask, maxpool argmax, layernorm statistics, conv im2col scratch), sized once for maxBatch at
// construction, so forward/backward never allocate. CPU implementations compute through Eigen::Map over the
// buffers; a CUDA implementation would sit beside them behind this same interface (the registry's per-device
// factories choose; makeLayer in registry.h builds one).
// Not thread-safe: one model per thread.
#pragma once

#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "lib/common/tensor.h"
#include "lib/nn/registry.h"
#include "lib/nn/sparse_rows.h"
#include "lib/nn/spec.h"

namespace dtrain::nn {

// Parameter-initialisation stream (see docs/model-spec.md "Initialisation"). Uniform draws are made from
// std::mt19937_64 with our own float conversion, since std::uniform_real_distribution is
// implementation-defined and every rank (and every platform) must draw identical initial weights.
class InitRng {
 public:
  explicit InitRng(uint64_t seed) : engine_(seed) {}
  // A uniform value in [0, 1) with 24 random bits: (next() >> 40) * 2^-24.
  double unit() { return static_cast<double>(engine_() >> 40) * 0x1.0p-24; }
  // U(-bound, bound), rounded to float.
  float symmetric(double bound) { return static_cast<float>(-bound + 2.0 * bound * unit()); }
  // N(0, std^2) by Box-Muller from two unit() draws (the first mapped to (0, 1] so the log is finite), rounded to
  // float: the gpt preset's normal_(0, 0.02). Deterministic like unit(); not PyTorch's stream.
  float normal(double std) {
    const double u1 = 1.0 - unit();
    const double u2 = unit();
    return static_cast<float>(std * std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
  }

 private:
  std::mt19937_64 engine_;
};

class Layer {
 public:
  Layer(const LayerSpec& spec, Device device) : spec_(spec), device_(device) {}
  virtual ~Layer() = default;
  Layer(const Layer&) = delete;
  Layer& operator=(const Layer&) = delete;

  const LayerSpec& spec() const noexcept { return spec_; }
  // Where its buffers (inputs, outputs, parameters, scratch) live.
  Device device() const noexcept { return device_; }

  // The parameters in PyTorch order (weight, then bias); empty for parameterless layers. The registry entry's
  // paramShapes, so the arenas, the spec's counts and checkpoints agree by construction.
  std::vector<ParamShape> paramShapes() const { return paramShapesOf(spec_); }
  // Called once at build: where this layer's parameters and gradients live in the arenas (consecutive, in
  // paramShapes() order).
  virtual void bind(float* /*params*/, float* /*grads*/) {}
  // Called once at build, after bind, for a layer whose spec is tied to another layer's parameter (a tied lm_head:
  // the embedding's token table and its gradient, LayerSpec::tiedTo). Its backward adds into (or, when not
  // accumulating, overwrites) that gradient before the owner's backward runs, so the owner always adds.
  virtual void bindTied(const float* /*weight*/, float* /*grad*/) {}
  // Called for a layer whose spec is sparse (an embedding with "sparse": true; lib/nn/sparse_rows.h): where its
  // table's rows come from and go to, and the table's index among the model's sparse tables.
  virtual void bindSparse(SparseRows* /*rows*/, int /*table*/) {}
  // PyTorch's default initialisation for the layer, drawing from `rng` in parameter order.
  virtual void initParams(InitRng& /*rng*/) {}
  // True when the output is the input buffer itself (flatten): the model then skips the copy.
  virtual bool aliasesInput() const { return false; }
  // Reseeds a random layer (dropout); others ignore it. `seed` keys the layers without a "seed" of their own;
  // `position` (the trainer's step and micro-batch, the same on every rank) those with one (dropout_mask.h).
  virtual void reseed(uint64_t /*seed*/, uint64_t /*position*/) {}
  // Called once at build for each pair of consecutive layers of a sequence (Model, a block's children), this one
  // then `next`, where next's input is this layer's output and nothing else reads it. A layer may hand part of its
  // work to next and return true (the CUDA linear hands its bias to a following activation, which applies it in
  // the same pass: docs/gpu.md "Fused bias + activation"); the pair must then run as the sequence runs them
  // (forward: this, then next, with the same batch; backward: next, then this, with the same accumulate flag,
  // next given a dx), and this layer's output alone no longer holds the full result. Default: no fusion.
  virtual bool fuseWithNext(Layer& /*next*/) { return false; }
  // bf16 activation storage (a CUDA model with "precision": "bf16"; registry.h storesBf16Between): called once at
  // build, after fuseWithNext and before any forward, on a layer whose kind has bf16Input / bf16Output, when its
  // input (`input`) or its output (`output`) is stored as bf16. From then on that x (or y) pointer of forward and
  // backward points to 2-byte bfloat16 values (the floats' bit patterns rounded to nearest even), one per element,
  // typed float* only because the interface is: the layer reads x only as a bf16 GEMM operand and writes y rounded
  // (never reading it back). Default: throws dtrain::Error (the kind's flags promise an implementation).
  virtual void setBf16Storage(bool input, bool output);
  // bf16 gradient of the model's output (registry.h takesBf16OutputGrad; a kind with bf16OutputGrad and
  // backwardIgnoresOutput): Model::backward calls it on its last layer before each backward whose gradOutput is bf16
  // (on) or float32 (off), when the model's outputGradType() is bf16. While on, backward's dy points to 2-byte
  // bfloat16 values, typed float* only because the interface is, in rows `ld` elements apart (a row: the output's
  // last dimension; ld >= that size: the loss writes the gradient over the layer's own output, TensorView::ld), and
  // y (the layer's output) no longer holds the output: the layer reads dy only as a bf16 GEMM operand with that
  // leading dimension and never reads y. ld is ignored while off (float32 dy, packed). Default: throws
  // dtrain::Error (the kind's flag promises an implementation).
  virtual void setBf16OutputGrad(bool on, int64_t ld);

  // y[n, out...] = f(x[n, in...]). `train` switches dropout on.
  virtual void forward(const float* x, float* y, int batch, bool train) = 0;
  // Given x and y of the last forward and dy, writes dx (unless dx is null: nothing upstream needs it) and the
  // parameter gradients: overwrites them, or adds to them when `accumulate` (PyTorch's .grad semantics).
  virtual void backward(const float* x, const float* y, const float* dy, float* dx, int batch, bool accumulate) = 0;

 private:
  LayerSpec spec_;
  Device device_;
};

}  // namespace dtrain::nn
