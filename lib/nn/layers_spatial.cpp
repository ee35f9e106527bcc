// Layers with structure inside a sample: conv2d, maxpool2d (NCHW) and layernorm (over the last dimension), with
// their registry entries.
#include <fmt/format.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "lib/common/aligned_buffer.h"
#include "lib/common/error.h"
#include "lib/common/json_fields.h"
#include "lib/nn/cuda_impl.h"
#include "lib/nn/layers_impl.h"

namespace dtrain::nn::detail {
namespace {

// Geometry shared by conv2d and maxpool2d.
struct Window {
  int64_t c, h, w, kh, kw, sh, sw, ph, pw, oh, ow;
  explicit Window(const LayerSpec& s)
      : c(s.input[0]), h(s.input[1]), w(s.input[2]), kh(s.kernelH), kw(s.kernelW), sh(s.strideH),
        sw(s.strideW), ph(s.padH), pw(s.padW), oh(s.output[1]), ow(s.output[2]) {}
};

// Convolution as im2col + GEMM, one sample at a time: cols[(c, i, j), (oy, ox)] holds the input value under
// kernel tap (i, j) of channel c for output position (oy, ox) (0 in the padding), so Y = W[out, c*kh*kw] * cols.
// Per-sample GEMMs keep the scratch to one sample's columns; the weight layout [out, in, kh, kw] is PyTorch's.
class Conv2d final : public Layer {
 public:
  explicit Conv2d(const LayerSpec& spec)
      : Layer(spec, Device::cpu()), g_(spec), k_(g_.c * g_.kh * g_.kw), p_(g_.oh * g_.ow),
        cols_(static_cast<size_t>(k_ * p_)), dcols_(static_cast<size_t>(k_ * p_)) {}

  void bind(float* params, float* grads) override {
    w_ = params;
    gw_ = grads;
    if (spec().bias) {
      b_ = params + spec().out * k_;
      gb_ = grads + spec().out * k_;
    }
  }

  // PyTorch: kaiming_uniform_(a=sqrt(5)) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in * kh * kw.
  void initParams(InitRng& rng) override {
    double bound = 1.0 / std::sqrt(static_cast<double>(k_));
    for (int64_t i = 0; i < spec().out * k_; ++i) w_[i] = rng.symmetric(bound);
    if (b_ != nullptr) {
      for (int64_t i = 0; i < spec().out; ++i) b_[i] = rng.symmetric(bound);
    }
  }

  void forward(const float* x, float* y, int batch, bool) override {
    const int64_t out = spec().out;
    ConstMatMap W(w_, out, k_);
    ConstMatMap cols(cols_.data(), k_, p_);
    for (int n = 0; n < batch; ++n) {
      im2col(x + n * g_.c * g_.h * g_.w);
      MatMap Y(y + n * out * p_, out, p_);
      Y.noalias() = W * cols;
      if (b_ != nullptr) Y.colwise() += Eigen::Map<const Eigen::VectorXf>(b_, out);
    }
  }

  void backward(const float* x, const float*, const float* dy, float* dx, int batch, bool accumulate) override {
    const int64_t out = spec().out;
    MatMap dW(gw_, out, k_);
    if (!accumulate) dW.setZero();
    if (gb_ != nullptr && !accumulate) std::memset(gb_, 0, static_cast<size_t>(out) * sizeof(float));
    ConstMatMap W(w_, out, k_);
    ConstMatMap cols(cols_.data(), k_, p_);
    MatMap dcols(dcols_.data(), k_, p_);
    for (int n = 0; n < batch; ++n) {
      ConstMatMap dY(dy + n * out * p_, out, p_);
      im2col(x + n * g_.c * g_.h * g_.w);
      dW.noalias() += dY * cols.transpose();
      if (gb_ != nullptr) Eigen::Map<Eigen::VectorXf>(gb_, out) += dY.rowwise().sum();
      if (dx != nullptr) {
        dcols.noalias() = W.transpose() * dY;
        col2im(dx + n * g_.c * g_.h * g_.w);
      }
    }
  }

 private:
  // Calls f(row, outIndex, inIndex) for every in-bounds (kernel tap, output position); padding is skipped.
  template <typename F>
  void forEachTap(F&& f) const {
    for (int64_t c = 0; c < g_.c; ++c) {
      for (int64_t i = 0; i < g_.kh; ++i) {
        for (int64_t j = 0; j < g_.kw; ++j) {
          const int64_t row = (c * g_.kh + i) * g_.kw + j;
          for (int64_t oy = 0; oy < g_.oh; ++oy) {
            const int64_t iy = oy * g_.sh - g_.ph + i;
            if (iy < 0 || iy >= g_.h) continue;
            for (int64_t ox = 0; ox < g_.ow; ++ox) {
              const int64_t ix = ox * g_.sw - g_.pw + j;
              if (ix >= 0 && ix < g_.w) f(row * p_ + oy * g_.ow + ox, (c * g_.h + iy) * g_.w + ix);
            }
          }
        }
      }
    }
  }

  void im2col(const float* x) {
    float* cols = cols_.data();
    if (g_.ph != 0 || g_.pw != 0) cols_.zero();
    forEachTap([&](int64_t colIndex, int64_t xIndex) { cols[colIndex] = x[xIndex]; });
  }

  void col2im(float* dx) {
    const float* dcols = dcols_.data();
    std::memset(dx, 0, static_cast<size_t>(g_.c * g_.h * g_.w) * sizeof(float));
    forEachTap([&](int64_t colIndex, int64_t xIndex) { dx[xIndex] += dcols[colIndex]; });
  }

  Window g_;
  int64_t k_, p_;
  AlignedBuffer<float> cols_, dcols_;
  float* w_ = nullptr;
  float* b_ = nullptr;
  float* gw_ = nullptr;
  float* gb_ = nullptr;
};

// Max pooling with implicit -inf padding; the argmax of every output is kept for backward. Ties and NaN follow
// PyTorch: the first maximum wins, and a NaN propagates.
class MaxPool2d final : public Layer {
 public:
  MaxPool2d(const LayerSpec& spec, int maxBatch)
      : Layer(spec, Device::cpu()), g_(spec), argmax_(static_cast<size_t>(maxBatch) * static_cast<size_t>(spec.output.numel())) {}

  void forward(const float* x, float* y, int batch, bool) override {
    const int64_t planes = batch * g_.c;
    for (int64_t pl = 0; pl < planes; ++pl) {
      const float* in = x + pl * g_.h * g_.w;
      float* out = y + pl * g_.oh * g_.ow;
      int32_t* arg = argmax_.data() + pl * g_.oh * g_.ow;
      for (int64_t oy = 0; oy < g_.oh; ++oy) {
        const int64_t y0 = std::max<int64_t>(oy * g_.sh - g_.ph, 0);
        const int64_t y1 = std::min<int64_t>(oy * g_.sh - g_.ph + g_.kh, g_.h);
        for (int64_t ox = 0; ox < g_.ow; ++ox) {
          const int64_t x0 = std::max<int64_t>(ox * g_.sw - g_.pw, 0);
          const int64_t x1 = std::min<int64_t>(ox * g_.sw - g_.pw + g_.kw, g_.w);
          int64_t best = y0 * g_.w + x0;
          float bestVal = -std::numeric_limits<float>::infinity();
          for (int64_t iy = y0; iy < y1; ++iy) {
            for (int64_t ix = x0; ix < x1; ++ix) {
              float v = in[iy * g_.w + ix];
              if (v > bestVal || std::isnan(v)) {
                bestVal = v;
                best = iy * g_.w + ix;
              }
            }
          }
          out[oy * g_.ow + ox] = bestVal;
          arg[oy * g_.ow + ox] = static_cast<int32_t>(best);
        }
      }
    }
  }

  void backward(const float*, const float*, const float* dy, float* dx, int batch, bool) override {
    if (dx == nullptr) return;
    const int64_t planes = batch * g_.c;
    std::memset(dx, 0, static_cast<size_t>(planes * g_.h * g_.w) * sizeof(float));
    for (int64_t pl = 0; pl < planes; ++pl) {
      float* in = dx + pl * g_.h * g_.w;
      const float* out = dy + pl * g_.oh * g_.ow;
      const int32_t* arg = argmax_.data() + pl * g_.oh * g_.ow;
      for (int64_t i = 0; i < g_.oh * g_.ow; ++i) in[arg[i]] += out[i];
    }
  }

 private:
  Window g_;
  std::vector<int32_t> argmax_;
};

// LayerNorm over the last dimension (PyTorch's nn.LayerNorm(input[-1])): biased variance, eps inside the
// square root, optional affine weight (init 1) and bias (init 0; "bias": false leaves it out, as PyTorch's
// LayerNorm(bias=False) and nanoGPT's bias=False). Row statistics are kept for backward.
class LayerNorm final : public Layer {
 public:
  LayerNorm(const LayerSpec& spec, int maxBatch)
      : Layer(spec, Device::cpu()), d_(spec.input.back()), rowsPerSample_(spec.input.numel() / d_),
        mean_(static_cast<size_t>(maxBatch * rowsPerSample_)),
        rstd_(static_cast<size_t>(maxBatch * rowsPerSample_)),
        xhatRow_(static_cast<size_t>(d_)),
        gradRow_(static_cast<size_t>(d_)) {}

  void bind(float* params, float* grads) override {
    if (!spec().affine) return;
    w_ = params, gw_ = grads;
    if (spec().bias) b_ = params + d_, gb_ = grads + d_;
  }

  void initParams(InitRng&) override {
    if (!spec().affine) return;
    std::fill(w_, w_ + d_, 1.0f);
    if (b_ != nullptr) std::fill(b_, b_ + d_, 0.0f);
  }

  void forward(const float* x, float* y, int batch, bool) override {
    const float eps = static_cast<float>(spec().eps);
    for (int64_t r = 0; r < batch * rowsPerSample_; ++r) {
      ConstArrMap X(x + r * d_, d_);
      ArrMap Y(y + r * d_, d_);
      const float mean = X.sum() / static_cast<float>(d_);
      const float var = (X - mean).square().sum() / static_cast<float>(d_);
      const float rstd = 1.0f / std::sqrt(var + eps);
      mean_.data()[r] = mean;
      rstd_.data()[r] = rstd;
      Y = (X - mean) * rstd;
      if (b_ != nullptr) {
        Y = Y * ConstArrMap(w_, d_) + ConstArrMap(b_, d_);
      } else if (w_ != nullptr) {
        Y = Y * ConstArrMap(w_, d_);
      }
    }
  }

  void backward(const float* x, const float*, const float* dy, float* dx, int batch, bool accumulate) override {
    if (w_ != nullptr && !accumulate) {
      std::memset(gw_, 0, static_cast<size_t>(d_) * sizeof(float));
      if (gb_ != nullptr) std::memset(gb_, 0, static_cast<size_t>(d_) * sizeof(float));
    }
    ArrMap xhat(xhatRow_.data(), d_);
    ArrMap g(gradRow_.data(), d_);
    for (int64_t r = 0; r < batch * rowsPerSample_; ++r) {
      xhat = (ConstArrMap(x + r * d_, d_) - mean_.data()[r]) * rstd_.data()[r];
      ConstArrMap dY(dy + r * d_, d_);
      if (w_ != nullptr) {
        ArrMap(gw_, d_) += dY * xhat;
        if (gb_ != nullptr) ArrMap(gb_, d_) += dY;
      }
      if (dx == nullptr) continue;
      // dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * weight.
      if (w_ != nullptr) {
        g = dY * ConstArrMap(w_, d_);
      } else {
        g = dY;
      }
      const float meanG = g.mean();
      const float meanGx = (g * xhat).mean();
      ArrMap(dx + r * d_, d_) = rstd_.data()[r] * (g - meanG - xhat * meanGx);
    }
  }

 private:
  int64_t d_, rowsPerSample_;
  AlignedBuffer<float> mean_, rstd_;
  AlignedBuffer<float> xhatRow_, gradRow_;  // backward scratch for one row
  float* w_ = nullptr;
  float* b_ = nullptr;
  float* gw_ = nullptr;
  float* gb_ = nullptr;
};

// --- Registry entries: parsing, parameters and summary detail of each type (docs/model-spec.md). ---

// Reads kernel/stride/padding, checks the input is [C, H, W] and sets the output [out, OH, OW].
void parseWindow(const JsonFields& f, LayerSpec& l, const char* name, bool strideDefaultsToKernel) {
  if (l.input.rank() != 3) {
    std::string hint = l.input.rank() == 1 ? "; set the model input to [C, H, W] (e.g. [1, 28, 28])"
                                           : "";
    f.fail(fmt::format("{} expects input [N, C, H, W] but gets {}{}", name, l.input.batchStr(), hint));
  }
  auto k = f.integers("kernel", 2, {}, "an integer >= 1", positive);
  std::vector<int64_t> sDefault = strideDefaultsToKernel ? k : std::vector<int64_t>{1, 1};
  auto s = f.integers("stride", 2, sDefault, "an integer >= 1", positive);
  auto p = f.integers("padding", 2, {0, 0}, "an integer >= 0", nonNegative);
  checkSizes(f, "kernel", k);
  checkSizes(f, "stride", s);
  checkSizes(f, "padding", p);
  l.kernelH = k[0], l.kernelW = k[1], l.strideH = s[0], l.strideW = s[1], l.padH = p[0], l.padW = p[1];
  int64_t h = l.input[1], w = l.input[2];
  int64_t oh = (h + 2 * l.padH - l.kernelH) / l.strideH + 1;
  int64_t ow = (w + 2 * l.padW - l.kernelW) / l.strideW + 1;
  if (h + 2 * l.padH < l.kernelH || w + 2 * l.padW < l.kernelW || oh < 1 || ow < 1) {
    f.fail(fmt::format("{} output would be empty: input {} with kernel {}x{}, stride {}x{}, padding {}x{}", name,
                       l.input.batchStr(), l.kernelH, l.kernelW, l.strideH, l.strideW, l.padH, l.padW));
  }
  l.output = Shape{l.out, oh, ow};
}

std::string windowDetail(const LayerSpec& l) {
  return fmt::format("k{}x{} s{}x{} p{}x{}", l.kernelH, l.kernelW, l.strideH, l.strideW, l.padH, l.padW);
}

void parseConv2d(const JsonFields& f, LayerSpec& l) {
  f.allowOnly({"type", "out", "kernel", "stride", "padding", "bias", "in"});
  l.out = checkSize(f, "out", f.integer("out", "an integer >= 1 (output channels)", positive));
  l.bias = f.boolean("bias", true);
  parseWindow(f, l, "conv2d", false);
  if (f.has("in")) {
    int64_t in = f.integer("in", "an integer >= 1", positive);
    if (in != l.input[0]) {
      f.failAt("in", fmt::format("conv2d declares in {} channels but its input is {} ({} channels)", in,
                                 l.input.batchStr(), l.input[0]));
    }
  }
}

std::vector<ParamShape> conv2dParams(const LayerSpec& l) {
  std::vector<ParamShape> shapes{{"weight", Shape{l.out, l.input[0], l.kernelH, l.kernelW}}};
  if (l.bias) shapes.push_back({"bias", Shape{l.out}});
  return shapes;
}

std::string conv2dDetail(const LayerSpec& l) {
  return fmt::format("{} -> {}, {}{}", l.input[0], l.out, windowDetail(l), l.bias ? "" : ", no bias");
}

void parseMaxPool2d(const JsonFields& f, LayerSpec& l) {
  f.allowOnly({"type", "kernel", "stride", "padding"});
  l.out = l.input.rank() == 3 ? l.input[0] : 0;
  parseWindow(f, l, "maxpool2d", true);
  // PyTorch's rule: a window must always contain at least one real input value.
  if (2 * l.padH > l.kernelH || 2 * l.padW > l.kernelW) {
    f.failAt("padding", fmt::format("maxpool2d padding {}x{} must be at most half the kernel {}x{}", l.padH, l.padW,
                                    l.kernelH, l.kernelW));
  }
}

void parseLayerNorm(const JsonFields& f, LayerSpec& l) {
  f.allowOnly({"type", "eps", "affine", "bias"});
  l.eps = f.number("eps", 1e-5, "a number > 0", [](double v) { return v > 0.0; });
  l.affine = f.boolean("affine", true);
  l.bias = f.boolean("bias", true);
  if (f.has("bias") && l.bias && !l.affine) f.failAt("bias", "needs \"affine\": true (the bias is part of the affine pair)");
  l.output = l.input;
}

std::vector<ParamShape> layerNormParams(const LayerSpec& l) {
  if (!l.affine) return {};
  if (!l.bias) return {{"weight", Shape{l.input.back()}}};
  return {{"weight", Shape{l.input.back()}}, {"bias", Shape{l.input.back()}}};
}

std::string layerNormDetail(const LayerSpec& l) {
  return fmt::format("[{}], eps={}{}", l.input.back(), l.eps, !l.affine ? ", no affine" : !l.bias ? ", no bias" : "");
}

std::unique_ptr<Layer> makeConv2d(const LayerSpec& spec, const LayerBuild&) { return std::make_unique<Conv2d>(spec); }
std::unique_ptr<Layer> makeMaxPool2d(const LayerSpec& spec, const LayerBuild& build) {
  return std::make_unique<MaxPool2d>(spec, build.maxBatch);
}
std::unique_ptr<Layer> makeLayerNorm(const LayerSpec& spec, const LayerBuild& build) {
  return std::make_unique<LayerNorm>(spec, build.maxBatch);
}

}  // namespace
}  // namespace dtrain::nn::detail

namespace dtrain::nn {

const LayerKind& conv2dKind() {
  static constexpr LayerKind kind{.name = "conv2d", .parse = detail::parseConv2d, .paramShapes = detail::conv2dParams,
                                  .detail = detail::conv2dDetail, .cpu = detail::makeConv2d,
                                  .cuda = DTRAIN_NN_CUDA(makeConv2d),
                                  .backwardIgnoresOutput = true, .exampleLayer = R"({"type": "conv2d", "out": 2, "kernel": [3, 2], "padding": 1})",
                                  .exampleInput = "[2, 5, 4]"};
  return kind;
}

const LayerKind& maxPool2dKind() {
  static constexpr LayerKind kind{.name = "maxpool2d", .parse = detail::parseMaxPool2d, .detail = detail::windowDetail,
                                  .cpu = detail::makeMaxPool2d, .cuda = DTRAIN_NN_CUDA(makeMaxPool2d),
                                  .backwardIgnoresOutput = true, .exampleLayer = R"({"type": "maxpool2d", "kernel": 2})", .exampleInput = "[2, 4, 6]"};
  return kind;
}

const LayerKind& layerNormKind() {
  static constexpr LayerKind kind{.name = "layernorm", .parse = detail::parseLayerNorm,
                                  .paramShapes = detail::layerNormParams, .detail = detail::layerNormDetail,
                                  .cpu = detail::makeLayerNorm, .cuda = DTRAIN_NN_CUDA(makeLayerNorm),
                                  .bf16Output = true, .backwardIgnoresOutput = true, .exampleLayer = R"({"type": "layernorm"})", .exampleInput = "[3, 4]"};
  return kind;
}

}  // namespace dtrain::nn
