// Dense and elementwise layers: linear, relu, gelu, tanh, sigmoid, dropout, flatten, with their registry entries.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "lib/common/aligned_buffer.h"
#include "lib/common/error.h"
#include "lib/common/json_fields.h"
#include "lib/nn/cuda_impl.h"
#include "lib/nn/dropout_mask.h"
#include "lib/nn/layers_impl.h"
#include "lib/nn/tensor_parallel.h"

#include <unsupported/Eigen/SpecialFunctions>

namespace dtrain::nn {
namespace detail {

uint64_t mixSeed(uint64_t seed, uint64_t salt) {
  uint64_t z = seed + 0x9E3779B97F4A7C15ULL * (salt + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

void checkSizes(const JsonFields& f, std::string_view key, const std::vector<int64_t>& values) {
  for (int64_t v : values) {
    if (v > kMaxSampleNumel) f.failAt(key, fmt::format("{} is more than the supported {}", v, kMaxSampleNumel));
  }
}

}  // namespace detail

namespace {

using detail::nonNegative;
using detail::positive;
using detail::checkSize;
using detail::ArrMap;
using detail::ConstArrMap;
using detail::ConstMatMap;
using detail::MatMap;

// y = x W^T + b with W [out, in] row-major: PyTorch's nn.Linear layout, so X * W.transpose() is a plain
// GEMM with a transposed operand and no copy.
// Tensor-parallel (spec().shard, lib/nn/tensor_parallel.h): a column linear holds rows of W and b and
// all-reduces dx in backward; a row linear holds columns of W, all-reduces its partial output before adding the
// whole bias in forward.
class Linear final : public Layer {
 public:
  // Over the last dimension, as nn.Linear: an input [T, in] is T rows per sample.
  Linear(const LayerSpec& spec, TensorGroup* group)
      : Layer(spec, Device::cpu()), in_(spec.input.back()), out_(spec.out), rows_(spec.input.numel() / in_),
        group_(spec.shard.kind == TensorShard::kNone ? nullptr : group) {
    DTRAIN_CHECK(spec.shard.kind == TensorShard::kNone || group_ != nullptr,
                 "{}: a tensor-parallel linear needs its tensor group", spec.path);
  }

  void bind(float* params, float* grads) override {
    w_ = params;
    gw_ = grads;
    if (spec().bias) {
      b_ = params + out_ * in_;
      gb_ = grads + out_ * in_;
    }
  }

  // PyTorch: kaiming_uniform_(a=sqrt(5)) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the bias uses the same bound.
  // With the spec's initStd (the gpt preset): normal(0, initStd) weights and zero biases, as nanoGPT.
  void initParams(InitRng& rng) override {
    if (group_ != nullptr) return initShard(rng);
    if (spec().initStd > 0) {
      for (int64_t i = 0; i < out_ * in_; ++i) w_[i] = rng.normal(spec().initStd);
      if (b_ != nullptr) std::fill(b_, b_ + out_, 0.0f);
      return;
    }
    double bound = 1.0 / std::sqrt(static_cast<double>(in_));
    for (int64_t i = 0; i < out_ * in_; ++i) w_[i] = rng.symmetric(bound);
    if (b_ != nullptr) {
      for (int64_t i = 0; i < out_; ++i) b_[i] = rng.symmetric(bound);
    }
  }

  void forward(const float* x, float* y, int batch, bool /*train*/) override {
    const Eigen::Index rows = batch * rows_;
    ConstMatMap X(x, rows, in_);
    ConstMatMap W(w_, out_, in_);
    MatMap Y(y, rows, out_);
    Y.noalias() = X * W.transpose();
    if (spec().shard.kind == TensorShard::kRow) group_->allReduceSum(y, static_cast<size_t>(rows * out_));
    if (b_ != nullptr) Y.rowwise() += Eigen::Map<const Eigen::RowVectorXf>(b_, out_);
  }

  void backward(const float* x, const float*, const float* dy, float* dx, int batch, bool accumulate) override {
    const Eigen::Index rows = batch * rows_;
    ConstMatMap X(x, rows, in_);
    ConstMatMap dY(dy, rows, out_);
    MatMap dW(gw_, out_, in_);
    if (accumulate) {
      dW.noalias() += dY.transpose() * X;
    } else {
      dW.noalias() = dY.transpose() * X;
    }
    if (gb_ != nullptr) {
      Eigen::Map<Eigen::RowVectorXf> db(gb_, out_);
      if (!accumulate) db.setZero();
      for (Eigen::Index r = 0; r < rows; ++r) db += dY.row(r);
    }
    if (dx != nullptr) {
      MatMap dX(dx, rows, in_);
      dX.noalias() = dY * ConstMatMap(w_, out_, in_);
      if (spec().shard.kind == TensorShard::kColumn) group_->allReduceSum(dx, static_cast<size_t>(rows * in_));
    }
  }

 private:
  // The full layer's initialisation (same draws, same order), keeping this rank's rows or columns.
  void initShard(InitRng& rng) {
    const TensorShard& t = spec().shard;
    const bool column = t.kind == TensorShard::kColumn;
    const int64_t fullOut = column ? out_ * t.size : out_, fullIn = column ? in_ : in_ * t.size;
    const int64_t r0 = column ? t.rank * out_ : 0, c0 = column ? 0 : t.rank * in_;
    const double std = spec().initStd;
    const double bound = 1.0 / std::sqrt(static_cast<double>(fullIn));
    auto draw = [&] { return std > 0 ? rng.normal(std) : rng.symmetric(bound); };
    detail::drawBlock(w_, fullOut, fullIn, r0, out_, c0, in_, draw);
    if (b_ == nullptr) return;
    if (std > 0) {
      std::fill(b_, b_ + out_, 0.0f);
    } else {
      detail::drawBlock(b_, 1, fullOut, 0, 1, r0, out_, draw);
    }
  }

  int64_t in_, out_, rows_;
  TensorGroup* group_;
  float* w_ = nullptr;
  float* b_ = nullptr;
  float* gw_ = nullptr;
  float* gb_ = nullptr;
};

// Elementwise activations share the plumbing; each supplies its forward and derivative.
class Elementwise : public Layer {
 public:
  explicit Elementwise(const LayerSpec& spec) : Layer(spec, Device::cpu()), numel_(spec.input.numel()) {}

 protected:
  Eigen::Index count(int batch) const { return static_cast<Eigen::Index>(batch) * numel_; }

 private:
  int64_t numel_;
};

class Relu final : public Elementwise {
 public:
  using Elementwise::Elementwise;
  void forward(const float* x, float* y, int batch, bool) override {
    ArrMap(y, count(batch)) = ConstArrMap(x, count(batch)).max(0.0f);
  }
  // As PyTorch's threshold_backward: the gradient passes where the output is positive.
  void backward(const float*, const float* y, const float* dy, float* dx, int batch, bool) override {
    if (dx == nullptr) return;
    auto n = count(batch);
    ArrMap(dx, n) = (ConstArrMap(y, n) > 0.0f).select(ConstArrMap(dy, n), 0.0f);
  }
};

// The exact (erf) GELU, PyTorch's default (approximate='none'), with PyTorch's formulas. erf and exp run through
// Eigen's vectorised float implementations (a few ulp from libm's, as PyTorch's own vectorised CPU kernel is):
// the scalar libm erf had cost ~18% of a GPT training step.
class Gelu final : public Elementwise {
 public:
  using Elementwise::Elementwise;
  void forward(const float* x, float* y, int batch, bool) override {
    constexpr float kAlpha = static_cast<float>(M_SQRT1_2);
    const auto n = count(batch);
    ConstArrMap X(x, n);
    ArrMap(y, n) = X * 0.5f * (1.0f + (X * kAlpha).erf());
  }
  void backward(const float* x, const float*, const float* dy, float* dx, int batch, bool) override {
    if (dx == nullptr) return;
    constexpr float kAlpha = static_cast<float>(M_SQRT1_2);
    constexpr float kBeta = static_cast<float>(M_2_SQRTPI * M_SQRT1_2 * 0.5);
    const auto n = count(batch);
    ConstArrMap X(x, n);
    ArrMap(dx, n) = ConstArrMap(dy, n) * (0.5f * (1.0f + (X * kAlpha).erf()) + X * ((-0.5f * X * X).exp() * kBeta));
  }
};

class Tanh final : public Elementwise {
 public:
  using Elementwise::Elementwise;
  void forward(const float* x, float* y, int batch, bool) override {
    for (Eigen::Index i = 0, n = count(batch); i < n; ++i) y[i] = std::tanh(x[i]);
  }
  void backward(const float*, const float* y, const float* dy, float* dx, int batch, bool) override {
    if (dx == nullptr) return;
    auto n = count(batch);
    ConstArrMap Y(y, n);
    ArrMap(dx, n) = ConstArrMap(dy, n) * (1.0f - Y * Y);
  }
};

class Sigmoid final : public Elementwise {
 public:
  using Elementwise::Elementwise;
  void forward(const float* x, float* y, int batch, bool) override {
    for (Eigen::Index i = 0, n = count(batch); i < n; ++i) y[i] = 1.0f / (1.0f + std::exp(-x[i]));
  }
  void backward(const float*, const float* y, const float* dy, float* dx, int batch, bool) override {
    if (dx == nullptr) return;
    auto n = count(batch);
    ConstArrMap Y(y, n);
    ArrMap(dx, n) = ConstArrMap(dy, n) * (1.0f - Y) * Y;
  }
};

// Inverted dropout: in training each value is kept with probability 1-p and scaled by 1/(1-p), so evaluation
// is the identity. The mask of the last training forward is kept for backward.
class Dropout final : public Elementwise {
 public:
  Dropout(const LayerSpec& spec, int maxBatch, uint64_t seed)
      : Elementwise(spec), mask_(static_cast<size_t>(maxBatch) * static_cast<size_t>(spec.input.numel())),
        stream_(spec.seed, spec.index) {
    reseed(seed, 0);
  }

  // A seed fixed in the spec wins over `seed`, so a user who pins it gets the same masks on every rank whatever the
  // job's seed: such a layer is keyed by its seed and `position` (dropout_mask.h DropoutStream).
  void reseed(uint64_t seed, uint64_t position) override { stream_.reseed(seed, position); }

  void forward(const float* x, float* y, int batch, bool train) override {
    auto n = count(batch);
    masked_ = train && spec().p > 0.0;
    if (!masked_) {
      if (y != x) std::memcpy(y, x, static_cast<size_t>(n) * sizeof(float));
      return;
    }
    // PyTorch returns zeros for p == 1 rather than dividing by zero.
    const float scale = spec().p >= 1.0 ? 0.0f : static_cast<float>(1.0 / (1.0 - spec().p));
    float* m = mask_.data();
    // Philox masks (lib/gpu/philox.h): the CUDA layer's kernel computes the same ones from the same draw.
    detail::drawDropoutMask(stream_.next(static_cast<uint64_t>(n), spec().p, scale), static_cast<size_t>(n), m);
    ArrMap(y, n) = ConstArrMap(x, n) * ConstArrMap(m, n);
  }

  void backward(const float*, const float*, const float* dy, float* dx, int batch, bool) override {
    if (dx == nullptr) return;
    auto n = count(batch);
    if (masked_) {
      ArrMap(dx, n) = ConstArrMap(dy, n) * ConstArrMap(mask_.data(), n);
    } else if (dx != dy) {
      std::memcpy(dx, dy, static_cast<size_t>(n) * sizeof(float));
    }
  }

 private:
  AlignedBuffer<float> mask_;
  detail::DropoutStream stream_;
  bool masked_ = false;
};

// Row-major memory is already flat: the model aliases the buffers and the copies below never run there.
class Flatten final : public Elementwise {
 public:
  using Elementwise::Elementwise;
  bool aliasesInput() const override { return true; }
  void forward(const float* x, float* y, int batch, bool) override {
    if (y != x) std::memcpy(y, x, static_cast<size_t>(count(batch)) * sizeof(float));
  }
  void backward(const float*, const float*, const float* dy, float* dx, int batch, bool) override {
    if (dx != nullptr && dx != dy) std::memcpy(dx, dy, static_cast<size_t>(count(batch)) * sizeof(float));
  }
};

// --- Registry entries: parsing, parameters and summary detail of each type (docs/model-spec.md). ---

void parseLinear(const JsonFields& f, LayerSpec& l) {
  f.allowOnly({"type", "out", "bias", "in", "init_std"});
  l.out = checkSize(f, "out", f.integer("out", "an integer >= 1", positive));
  l.bias = f.boolean("bias", true);
  l.initStd = f.number("init_std", 0.0, "a number >= 0 (0: PyTorch's default initialisation)",
                       [](double v) { return v >= 0; });
  // [N, F], or [N, T, F] (a sequence: applied to every position, as nn.Linear over the last dimension).
  if (l.input.rank() > 2) {
    f.fail(fmt::format("linear expects input [N, F] but gets {}; add a flatten layer", l.input.batchStr()));
  }
  if (f.has("in")) {
    int64_t in = f.integer("in", "an integer >= 1", positive);
    if (in != l.input.back()) {
      f.failAt("in", fmt::format("linear declares in {} but its input is {} ({} features)", in, l.input.batchStr(),
                                 l.input.back()));
    }
  }
  l.output = l.input.rank() == 2 ? Shape{l.input[0], l.out} : Shape{l.out};
}

std::vector<ParamShape> linearParams(const LayerSpec& l) {
  const int64_t out = l.out, in = l.input.back();
  std::vector<ParamShape> shapes{{"weight", Shape{out, in}}};
  if (l.bias) shapes.push_back({"bias", Shape{out}});
  const TensorShard& t = l.shard;
  if (t.kind == TensorShard::kColumn) {  // rows [rank * out, +out) of the full [out * size, in]
    shapes[0].full = Shape{out * t.size, in}, shapes[0].dim = 0, shapes[0].start = t.rank * out;
    if (l.bias) shapes[1].full = Shape{out * t.size}, shapes[1].dim = 0, shapes[1].start = t.rank * out;
  } else if (t.kind == TensorShard::kRow) {  // columns [rank * in, +in) of the full [out, in * size]; bias whole
    shapes[0].full = Shape{out, in * t.size}, shapes[0].dim = 1, shapes[0].start = t.rank * in;
  }
  return shapes;
}

std::string linearDetail(const LayerSpec& l) {
  return fmt::format("{} -> {}{}", l.input.back(), l.out, l.bias ? "" : ", no bias");
}

void parseDropout(const JsonFields& f, LayerSpec& l) {
  f.allowOnly({"type", "p", "seed"});
  l.p = f.number("p", 0.5, "a probability in [0, 1]", [](double v) { return v >= 0.0 && v <= 1.0; });
  if (f.has("seed")) l.seed = static_cast<uint64_t>(f.integer("seed", "an integer >= 0", nonNegative));
  l.output = l.input;
}

std::string dropoutDetail(const LayerSpec& l) { return fmt::format("p={}", l.p); }

// Activations: no fields, the output has the input's shape.
void parseElementwise(const JsonFields& f, LayerSpec& l) {
  f.allowOnly({"type"});
  l.output = l.input;
}

void parseFlatten(const JsonFields& f, LayerSpec& l) {
  f.allowOnly({"type"});
  l.output = Shape{l.input.numel()};
}

template <class L>
std::unique_ptr<Layer> make(const LayerSpec& spec, const LayerBuild&) {
  return std::make_unique<L>(spec);
}

std::unique_ptr<Layer> makeLinear(const LayerSpec& spec, const LayerBuild& build) {
  return std::make_unique<Linear>(spec, build.tensor);
}

std::unique_ptr<Layer> makeDropout(const LayerSpec& spec, const LayerBuild& build) {
  return std::make_unique<Dropout>(spec, build.maxBatch, build.seed);
}

}  // namespace

const LayerKind& linearKind() {
  static constexpr LayerKind kind{.name = "linear", .parse = parseLinear, .paramShapes = linearParams,
                                  .detail = linearDetail, .cpu = makeLinear, .cuda = DTRAIN_NN_CUDA(makeLinear),
                                  .bf16Input = true, .backwardIgnoresOutput = true, .exampleLayer = R"({"type": "linear", "out": 3})", .exampleInput = "[4]"};
  return kind;
}

const LayerKind& reluKind() {
  static constexpr LayerKind kind{.name = "relu", .parse = parseElementwise, .cpu = make<Relu>, .cuda = DTRAIN_NN_CUDA(makeRelu),
                                  .exampleLayer = R"({"type": "relu"})", .exampleInput = "[2, 3]"};
  return kind;
}

const LayerKind& geluKind() {
  static constexpr LayerKind kind{.name = "gelu", .parse = parseElementwise, .cpu = make<Gelu>, .cuda = DTRAIN_NN_CUDA(makeGelu),
                                  .bf16Output = true, .backwardIgnoresOutput = true, .exampleLayer = R"({"type": "gelu"})", .exampleInput = "[5]"};
  return kind;
}

const LayerKind& tanhKind() {
  static constexpr LayerKind kind{.name = "tanh", .parse = parseElementwise, .cpu = make<Tanh>, .cuda = DTRAIN_NN_CUDA(makeTanh),
                                  .exampleLayer = R"({"type": "tanh"})", .exampleInput = "[5]"};
  return kind;
}

const LayerKind& sigmoidKind() {
  static constexpr LayerKind kind{.name = "sigmoid", .parse = parseElementwise, .cpu = make<Sigmoid>, .cuda = DTRAIN_NN_CUDA(makeSigmoid),
                                  .exampleLayer = R"({"type": "sigmoid"})", .exampleInput = "[5]"};
  return kind;
}

const LayerKind& dropoutKind() {
  static constexpr LayerKind kind{.name = "dropout", .parse = parseDropout, .detail = dropoutDetail,
                                  .cpu = makeDropout, .cuda = DTRAIN_NN_CUDA(makeDropout), .random = true, .backwardIgnoresOutput = true,
                                  .exampleLayer = R"({"type": "dropout", "p": 0.25})", .exampleInput = "[6]"};
  return kind;
}

const LayerKind& flattenKind() {
  static constexpr LayerKind kind{.name = "flatten", .parse = parseFlatten, .cpu = make<Flatten>, .cuda = DTRAIN_NN_CUDA(makeFlatten),
                                  .exampleLayer = R"({"type": "flatten"})", .exampleInput = "[2, 3, 2]"};
  return kind;
}

}  // namespace dtrain::nn
