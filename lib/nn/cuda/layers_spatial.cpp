// CUDA conv2d, maxpool2d and dropout (CPU twins: layers_spatial.cpp, layers_dense.cpp): same layouts (NCHW), same
// parameter layout in the arena (conv weight [out, in, kh, kw] then bias), same padding/stride semantics, so
// checkpoints move between devices. Everything on the legacy default stream, as the other CUDA layers.
//
// conv2d is im2col + cuBLAS, the simple correct form (a cuDNN-style implicit GEMM or Winograd would be faster):
// forward im2cols the whole batch into one scratch [batch, c*kh*kw, oh*ow] and multiplies W by every sample's
// columns in one strided batched GEMM; backward im2cols again (as the CPU), adds dW += dY_n cols_n^T sample by
// sample (fixed order: deterministic), then reuses the scratch for dcols = W^T dY (one batched GEMM) and gathers
// it back into dx (col2im). Scratch: maxBatch * c*kh*kw * oh*ow floats per conv layer.
//
// dropout computes its mask on the device from the CPU layer's counter-based generator (lib/gpu/philox.h:
// Philox4x32-10 keyed by mixSeed(seed, index), element e of a forward's draw at counter offset + e, the same reseed
// and pinned-seed rules through the same DropoutStream): the GPU's masks are the CPU's bit for bit, so CPU <-> GPU
// parity and a bitwise-identical resume both hold, with no host loop, no copy and no mask in memory (backward
// computes it again from the forward's draw).
#include <cstdint>
#include <cstring>

#include "lib/common/error.h"
#include "lib/gpu/blas.h"
#include "lib/gpu/kernels.h"
#include "lib/gpu/window_kernels.h"
#include "lib/nn/cuda_impl.h"
#include "lib/nn/device.h"
#include "lib/nn/layer.h"
#include "lib/nn/dropout_mask.h"

namespace dtrain::nn::cuda {
namespace {

namespace k = gpu::kernels;

size_t sz(int64_t n) { return static_cast<size_t>(n); }

// conv2d's GEMMs (alpha 1) from their arguments in lib/gpu/window_kernels.h, which tests/gpu/test_gpu_window.cpp
// runs through a reference GEMM against the CPU layer.
void gemmOf(const gpu::RowMajorGemm& a, const float* lhs, const float* rhs, float beta, float* out) {
  gpu::gemm(a.transA, a.transB, a.m, a.n, a.k, 1.0f, lhs, a.lda, rhs, a.ldb, beta, out, a.ldc);
}
void gemmBatchedOf(const gpu::RowMajorGemm& a, const float* lhs, const float* rhs, float beta, float* out) {
  gpu::gemmBatched(a.transA, a.transB, a.m, a.n, a.k, 1.0f, lhs, a.lda, a.strideA, rhs, a.ldb, a.strideB, beta, out,
                   a.ldc, a.strideC, a.batch);
}

k::Window2d windowOf(const LayerSpec& s) {
  return {.c = s.input[0], .h = s.input[1], .w = s.input[2], .kh = s.kernelH, .kw = s.kernelW, .sh = s.strideH,
          .sw = s.strideW, .ph = s.padH, .pw = s.padW, .oh = s.output[1], .ow = s.output[2]};
}

class Conv2d final : public Layer {
 public:
  Conv2d(const LayerSpec& spec, const LayerBuild& build)
      : Layer(spec, build.device), g_(windowOf(spec)), out_(spec.out), k_(g_.c * g_.kh * g_.kw), p_(g_.oh * g_.ow),
        cols_(sz(build.maxBatch) * sz(k_) * sz(p_), build.device) {}

  void bind(float* params, float* grads) override {
    w_ = params, gw_ = grads;
    if (spec().bias) b_ = params + out_ * k_, gb_ = grads + out_ * k_;
  }

  // Y_n [out, p] = W [out, k] cols_n [k, p] for every sample n.
  void forward(const float* x, float* y, int batch, bool) override {
    float* cols = cols_.data();
    k::im2col(x, cols, batch, g_);
    gemmBatchedOf(gpu::convForwardGemm(g_, out_, batch), w_, cols, 0.0f, y);
    if (b_ != nullptr) k::addChannelBias(y, b_, batch, out_, p_);
  }

  void backward(const float* x, const float*, const float* dy, float* dx, int batch, bool accumulate) override {
    float* cols = cols_.data();
    k::im2col(x, cols, batch, g_);
    // dW (+)= sum_n dY_n [out, p] cols_n^T [p, k], in sample order.
    const gpu::RowMajorGemm weightGrad = gpu::convWeightGradGemm(g_, out_);
    for (int n = 0; n < batch; ++n) {
      const float beta = accumulate || n > 0 ? 1.0f : 0.0f;
      gemmOf(weightGrad, dy + sz(n) * sz(out_ * p_), cols + sz(n) * sz(k_ * p_), beta, gw_);
    }
    if (gb_ != nullptr) k::channelBiasGrad(dy, gb_, batch, out_, p_, accumulate);
    if (dx == nullptr) return;
    // dcols_n [k, p] = W^T [k, out] dY_n [out, p] into the same scratch (the dW GEMMs before it on the stream are
    // done with cols), then gathered back into the input's layout.
    gemmBatchedOf(gpu::convColsGradGemm(g_, out_, batch), w_, dy, 0.0f, cols);
    k::col2im(cols, dx, batch, g_);
  }

 private:
  k::Window2d g_;
  int64_t out_, k_, p_;
  DeviceFloats cols_;  // im2col columns, then (backward) their gradient
  float* w_ = nullptr;
  float* b_ = nullptr;
  float* gw_ = nullptr;
  float* gb_ = nullptr;
};

class MaxPool2d final : public Layer {
 public:
  MaxPool2d(const LayerSpec& spec, const LayerBuild& build)
      : Layer(spec, build.device), g_(windowOf(spec)),
        argmax_(sz(build.maxBatch) * sz(spec.output.numel()), build.device) {}

  void forward(const float* x, float* y, int batch, bool) override {
    k::maxPoolForward(x, y, argmax(), batch, g_);
  }

  void backward(const float*, const float*, const float* dy, float* dx, int batch, bool) override {
    if (dx != nullptr) k::maxPoolBackward(dy, argmax(), dx, batch, g_);
  }

 private:
  int32_t* argmax() { return reinterpret_cast<int32_t*>(argmax_.data()); }

  k::Window2d g_;
  DeviceFloats argmax_;  // int32 per output: the argmax's index within its input plane
};

class Dropout final : public Layer {
 public:
  Dropout(const LayerSpec& spec, const LayerBuild& build)
      : Layer(spec, build.device), numel_(sz(spec.input.numel())), stream_(spec.seed, spec.index) {
    reseed(build.seed, 0);
  }

  // The CPU layer's rule (dropout_mask.h DropoutStream): a seed fixed in the spec wins over `seed`.
  void reseed(uint64_t seed, uint64_t position) override { stream_.reseed(seed, position); }

  void forward(const float* x, float* y, int batch, bool train) override {
    const size_t n = sz(batch) * numel_;
    masked_ = train && spec().p > 0.0;
    if (!masked_) {
      if (y != x) k::scale(x, y, n, 1.0f);
      return;
    }
    // The CPU's draw and scale exactly (layers_dense.cpp Dropout::forward); p == 1 gives zeros, as PyTorch.
    const float scale = spec().p >= 1.0 ? 0.0f : static_cast<float>(1.0 / (1.0 - spec().p));
    draw_ = stream_.next(n, spec().p, scale);
    k::dropout(x, draw_, y, n);
  }

  void backward(const float*, const float*, const float* dy, float* dx, int batch, bool) override {
    if (dx == nullptr) return;
    const size_t n = sz(batch) * numel_;
    if (masked_) {
      k::dropout(dy, draw_, dx, n);  // the forward's draw: the same elements dropped
    } else if (dx != dy) {
      k::scale(dy, dx, n, 1.0f);
    }
  }

 private:
  size_t numel_;
  detail::DropoutStream stream_;
  gpu::DropoutDraw draw_;  // the last training forward's
  bool masked_ = false;
};

}  // namespace

std::unique_ptr<Layer> makeConv2d(const LayerSpec& s, const LayerBuild& b) { return std::make_unique<Conv2d>(s, b); }
std::unique_ptr<Layer> makeMaxPool2d(const LayerSpec& s, const LayerBuild& b) {
  return std::make_unique<MaxPool2d>(s, b);
}
std::unique_ptr<Layer> makeDropout(const LayerSpec& s, const LayerBuild& b) { return std::make_unique<Dropout>(s, b); }

}  // namespace dtrain::nn::cuda
