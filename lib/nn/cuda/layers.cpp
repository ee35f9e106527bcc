// CUDA layers: linear, the elementwise activations, flatten and layernorm (the CPU twins: layers_dense.cpp,
// layers_spatial.cpp). A linear with a bias followed by an activation fuses the bias into it (fuseWithNext). GEMMs
// through cuBLAS (lib/gpu/blas.h), the rest through lib/gpu/kernels.h; everything on the legacy default stream of
// the layer's GPU, asynchronous. Parameters are initialised on the host by the CPU layers (Model::build), so these
// classes have no initParams. bf16 activation storage (Layer::setBf16Storage, "precision": "bf16"): a linear may
// read its input as stored bf16, a layernorm or gelu may write its output as bf16.
#include <cstdint>

#include "lib/common/error.h"
#include "lib/gpu/blas.h"
#include "lib/gpu/kernels.h"
#include "lib/nn/cuda_impl.h"
#include "lib/nn/device.h"
#include "lib/nn/layer.h"

namespace dtrain::nn::cuda {
namespace {

namespace k = gpu::kernels;

// The x of a layer whose input is stored as bf16 (setBf16Storage) or float32, as a GEMM operand.
gpu::GemmOperand inputOperand(const float* x, bool bf16) {
  return bf16 ? gpu::GemmOperand::bf16(x) : gpu::GemmOperand(x);
}
// The y of a layer whose output is stored as bf16: its 2-byte values.
uint16_t* bf16Out(float* y) { return reinterpret_cast<uint16_t*>(y); }

class Linear;

// y = f(x) elementwise. Fused after a linear (Linear::fuseWithNext): x is then the linear's x W^T without its bias,
// and forward/backward apply the bias and produce its gradient in the same pass (kernels::biasActivation*).
class Activation final : public Layer {
 public:
  Activation(const LayerSpec& spec, const LayerBuild& build, k::Activation f)
      : Layer(spec, build.device), f_(f), numel_(static_cast<size_t>(spec.input.numel())) {}
  void forward(const float* x, float* y, int batch, bool) override;
  void backward(const float* x, const float* y, const float* dy, float* dx, int batch, bool accumulate) override;
  void fuseAfter(const Linear* producer) { producer_ = producer; }
  // Only gelu's kind offers bf16 output (its derivative needs x, not y; relu, tanh and sigmoid read y).
  void setBf16Storage(bool input, bool output) override {
    DTRAIN_CHECK(!input && f_ == k::Activation::kGelu, "{}: bf16 storage is for a gelu's output only", spec().path);
    bf16Output_ = output;
  }

 private:
  k::Activation f_;
  size_t numel_;
  const Linear* producer_ = nullptr;  // the linear whose bias this activation applies, when fused
  bool bf16Output_ = false;           // y is stored as bf16
};

// y = x W^T + b over the last dimension, W [out, in] (nn.Linear).
class Linear final : public Layer {
 public:
  Linear(const LayerSpec& spec, const LayerBuild& build)
      : Layer(spec, build.device), in_(spec.input.back()), out_(spec.out), rows_(spec.input.numel() / in_) {}

  void bind(float* params, float* grads) override {
    w_ = params, gw_ = grads;
    if (spec().bias) b_ = params + out_ * in_, gb_ = grads + out_ * in_;
  }

  // A following activation takes over the bias: forward leaves x W^T, the activation adds b as it applies f, and
  // its backward writes the bias gradient while it computes this layer's dy (one elementwise pass each way).
  bool fuseWithNext(Layer& next) override {
    auto* act = dynamic_cast<Activation*>(&next);
    if (act == nullptr || !spec().bias) return false;
    act->fuseAfter(this);
    fused_ = true;
    return true;
  }

  // x is read only by the two GEMMs below, so it may be stored as bf16 (the output never is: the kind has no
  // bf16Output).
  void setBf16Storage(bool input, bool output) override {
    DTRAIN_CHECK(!output, "{}: a linear's output is not stored as bf16", spec().path);
    bf16Input_ = input;
  }

  void forward(const float* x, float* y, int batch, bool) override {
    const int64_t rows = batch * rows_;
    gpu::gemm(false, true, rows, out_, in_, 1.0f, inputOperand(x, bf16Input_), in_, w_, in_, 0.0f, y, out_);
    if (b_ != nullptr && !fused_) k::addBias(y, b_, rows, out_);
  }

  void backward(const float* x, const float*, const float* dy, float* dx, int batch, bool accumulate) override {
    const int64_t rows = batch * rows_;
    gpu::gemm(true, false, out_, in_, rows, 1.0f, dy, out_, inputOperand(x, bf16Input_), in_,
              accumulate ? 1.0f : 0.0f, gw_, in_);
    if (gb_ != nullptr && !fused_) k::biasGrad(dy, gb_, rows, out_, accumulate);
    if (dx != nullptr) gpu::gemm(false, false, rows, in_, out_, 1.0f, dy, out_, w_, in_, 0.0f, dx, in_);
  }

  const float* bias() const { return b_; }
  float* biasGrad() const { return gb_; }
  int64_t width() const { return out_; }

 private:
  int64_t in_, out_, rows_;
  bool fused_ = false;
  bool bf16Input_ = false;  // x is stored as bf16
  float* w_ = nullptr;
  float* b_ = nullptr;
  float* gw_ = nullptr;
  float* gb_ = nullptr;
};

void Activation::forward(const float* x, float* y, int batch, bool) {
  const size_t n = static_cast<size_t>(batch) * numel_;
  if (producer_ == nullptr) {
    if (bf16Output_) return k::activationForwardBf16(f_, x, bf16Out(y), n);
    return k::activationForward(f_, x, y, n);
  }
  const int64_t cols = producer_->width();
  const int64_t rows = static_cast<int64_t>(n) / cols;
  if (bf16Output_) return k::biasActivationForwardBf16(f_, x, producer_->bias(), bf16Out(y), rows, cols);
  k::biasActivationForward(f_, x, producer_->bias(), y, rows, cols);
}

void Activation::backward(const float* x, const float* yStored, const float* dy, float* dx, int batch,
                          bool accumulate) {
  const size_t n = static_cast<size_t>(batch) * numel_;
  // gelu's derivative reads x only (reduce_index.h activationGrad); a bf16-stored y must not be read as floats, so
  // the kernels get x (same size, float32) in its place: the value is unused, the result the same.
  const float* y = bf16Output_ ? x : yStored;
  if (producer_ == nullptr) {
    if (dx != nullptr) k::activationBackward(f_, x, y, dy, dx, n);
    return;
  }
  // The linear below has parameters, so the sequence always asks for dx (its dy).
  DTRAIN_CHECK(dx != nullptr, "{}: a fused activation's backward needs dx", spec().path);
  const int64_t cols = producer_->width();
  k::biasActivationBackward(f_, x, producer_->bias(), y, dy, dx, producer_->biasGrad(),
                            static_cast<int64_t>(n) / cols, cols, accumulate);
}

// The output is the input (the model skips it); forward/backward copy only if ever asked to with other buffers.
class Flatten final : public Layer {
 public:
  Flatten(const LayerSpec& spec, const LayerBuild& build)
      : Layer(spec, build.device), numel_(static_cast<size_t>(spec.input.numel())) {}
  bool aliasesInput() const override { return true; }
  void forward(const float* x, float* y, int batch, bool) override {
    if (y != x) k::scale(x, y, static_cast<size_t>(batch) * numel_, 1.0f);
  }
  void backward(const float*, const float*, const float* dy, float* dx, int batch, bool) override {
    if (dx != nullptr && dx != dy) k::scale(dy, dx, static_cast<size_t>(batch) * numel_, 1.0f);
  }

 private:
  size_t numel_;
};

// Fused after an in-place block (ResidualAddTaker, cuda_impl.h; directly, or as the first child of the block after
// it): forward first adds that block's x into its own x (the block's output, holding f) in place, in the same kernel
// (kernels::residualLayerNormForward). As a block's first child its backward may add the block's residual gradient
// into dx as it stores it (ResidualGradTaker; kernels::residualLayerNormBackward).
class LayerNorm final : public Layer, public ResidualAddTaker, public ResidualGradTaker {
 public:
  LayerNorm(const LayerSpec& spec, const LayerBuild& build)
      : Layer(spec, build.device), d_(spec.input.back()), rowsPerSample_(spec.input.numel() / d_),
        mean_(static_cast<size_t>(build.maxBatch * rowsPerSample_), build.device),
        rstd_(static_cast<size_t>(build.maxBatch * rowsPerSample_), build.device) {}

  void bind(float* params, float* grads) override {
    if (!spec().affine) return;
    w_ = params, gw_ = grads;
    if (spec().bias) b_ = params + d_, gb_ = grads + d_;  // "bias": false: weight only
  }

  // The output may be stored as bf16 (backward reads x, mean and rstd, never y).
  void setBf16Storage(bool input, bool output) override {
    DTRAIN_CHECK(!input, "{}: a layernorm's input is not stored as bf16", spec().path);
    bf16Output_ = output;
  }

  bool takeResidualAdd(const float* const* residual) override {
    residual_ = residual;
    return true;
  }

  void forward(const float* x, float* y, int batch, bool) override {
    const float eps = static_cast<float>(spec().eps);
    if (residual_ != nullptr) {
      // x is the block's output, f; the kernel makes it x_block + f (the block's result) as it normalises.
      auto* f = const_cast<float*>(x);
      if (bf16Output_) {
        k::residualLayerNormForwardBf16(*residual_, f, w_, b_, bf16Out(y), mean_.data(), rstd_.data(),
                                        batch * rowsPerSample_, d_, eps);
      } else {
        k::residualLayerNormForward(*residual_, f, w_, b_, y, mean_.data(), rstd_.data(), batch * rowsPerSample_,
                                    d_, eps);
      }
      return;
    }
    if (bf16Output_) {
      k::layerNormForwardBf16(x, w_, b_, bf16Out(y), mean_.data(), rstd_.data(), batch * rowsPerSample_, d_, eps);
    } else {
      k::layerNormForward(x, w_, b_, y, mean_.data(), rstd_.data(), batch * rowsPerSample_, d_, eps);
    }
  }

  void backward(const float* x, const float*, const float* dy, float* dx, int batch, bool accumulate) override {
    k::layerNormBackward(x, w_, mean_.data(), rstd_.data(), dy, dx, gw_, gb_, batch * rowsPerSample_, d_, accumulate);
  }

  void backwardAddingGrad(const float* x, const float*, const float* dy, const float* residualGrad, float* dx,
                          int batch, bool accumulate) override {
    DTRAIN_CHECK(dx != nullptr && residualGrad != nullptr && residualGrad != dx && residualGrad != dy,
                 "{}: the residual gradient must be a buffer of its own, added into a dx", spec().path);
    k::residualLayerNormBackward(x, w_, mean_.data(), rstd_.data(), dy, residualGrad, dx, gw_, gb_,
                                 batch * rowsPerSample_, d_, accumulate);
  }

 private:
  int64_t d_, rowsPerSample_;
  DeviceFloats mean_, rstd_;
  bool bf16Output_ = false;  // y is stored as bf16
  const float* const* residual_ = nullptr;  // the fused block's x (takeResidualAdd), or null
  float* w_ = nullptr;
  float* b_ = nullptr;
  float* gw_ = nullptr;
  float* gb_ = nullptr;
};

}  // namespace

std::unique_ptr<Layer> makeLinear(const LayerSpec& s, const LayerBuild& b) { return std::make_unique<Linear>(s, b); }
std::unique_ptr<Layer> makeRelu(const LayerSpec& s, const LayerBuild& b) {
  return std::make_unique<Activation>(s, b, k::Activation::kRelu);
}
std::unique_ptr<Layer> makeGelu(const LayerSpec& s, const LayerBuild& b) {
  return std::make_unique<Activation>(s, b, k::Activation::kGelu);
}
std::unique_ptr<Layer> makeTanh(const LayerSpec& s, const LayerBuild& b) {
  return std::make_unique<Activation>(s, b, k::Activation::kTanh);
}
std::unique_ptr<Layer> makeSigmoid(const LayerSpec& s, const LayerBuild& b) {
  return std::make_unique<Activation>(s, b, k::Activation::kSigmoid);
}
std::unique_ptr<Layer> makeFlatten(const LayerSpec& s, const LayerBuild& b) { return std::make_unique<Flatten>(s, b); }
std::unique_ptr<Layer> makeLayerNorm(const LayerSpec& s, const LayerBuild& b) {
  return std::make_unique<LayerNorm>(s, b);
}

}  // namespace dtrain::nn::cuda
