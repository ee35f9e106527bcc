// Every layer: forward values against independent references (hand values, naive loops), and
// finite-difference checks of the input gradient and every parameter gradient.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "lib/common/error.h"
#include "lib/nn/layer.h"
#include "lib/nn/spec.h"
#include "tests/nn/layer_harness.h"

using namespace dtrain;
using namespace dtrain::nn;
using nlohmann::json;
using dtrain::nn::testing::Harness;
using dtrain::nn::testing::Inputs;

TEST_CASE("linear: values, layout [out, in], gradients") {
  Harness h(json{{"type", "linear"}, {"out", 3}}, {2}, 2);
  // W = [[1, 2], [3, 4], [5, 6]], b = [0.5, -1, 0]: y = x W^T + b.
  const std::vector<float> w = {1, 2, 3, 4, 5, 6, 0.5f, -1, 0};
  std::copy(w.begin(), w.end(), h.params.begin());  // in place: the layer is bound to this storage
  h.x = {1, -1, 2, 0.5f};
  h.impl->forward(h.x.data(), h.y.data(), 2, false);
  CHECK(h.y == std::vector<float>{-0.5f, -2.0f, -1.0f, 3.5f, 7.0f, 13.0f});
  CHECK(h.impl->paramShapes()[0].shape == Shape{3, 2});
  Harness g(json{{"type", "linear"}, {"out", 5}}, {7}, 3);
  g.checkGradients(1e-2);
  Harness nb(json{{"type", "linear"}, {"out", 4}, {"bias", false}}, {3}, 2);
  CHECK(nb.params.size() == 12);
  nb.checkGradients(1e-2);
}

TEST_CASE("relu, tanh, sigmoid, gelu: values and gradients") {
  Harness relu(json{{"type", "relu"}}, {4}, 1);
  relu.x = {-1.0f, 0.5f, 0.0f, 2.0f};
  relu.impl->forward(relu.x.data(), relu.y.data(), 1, false);
  CHECK(relu.y == std::vector<float>{0.0f, 0.5f, 0.0f, 2.0f});

  Harness gelu(json{{"type", "gelu"}}, {4}, 1);
  gelu.x = {1.0f, -0.5f, 2.0f, -3.0f};
  gelu.impl->forward(gelu.x.data(), gelu.y.data(), 1, false);
  CHECK(gelu.y[0] == doctest::Approx(0.8413447460685429).epsilon(1e-6));
  CHECK(gelu.y[1] == doctest::Approx(-0.15426876936299344).epsilon(1e-6));
  CHECK(gelu.y[2] == doctest::Approx(1.9544997361036416).epsilon(1e-6));
  CHECK(gelu.y[3] == doctest::Approx(-0.00404969409489031).epsilon(1e-5));

  Harness sig(json{{"type", "sigmoid"}}, {2}, 1);
  sig.x = {0.0f, 2.0f};
  sig.impl->forward(sig.x.data(), sig.y.data(), 1, false);
  CHECK(sig.y[0] == doctest::Approx(0.5));
  CHECK(sig.y[1] == doctest::Approx(1.0 / (1.0 + std::exp(-2.0))));

  Harness(json{{"type", "relu"}}, {3, 4}, 2, Inputs::kAwayFromZero).checkGradients(1e-3);
  Harness(json{{"type", "gelu"}}, {10}, 2).checkGradients(1e-2);
  Harness(json{{"type", "tanh"}}, {2, 5}, 2).checkGradients(1e-2);
  Harness(json{{"type", "sigmoid"}}, {10}, 2).checkGradients(1e-2);
  Harness(json{{"type", "flatten"}}, {2, 3, 2}, 2).checkGradients(1e-2);
}

TEST_CASE("dropout: identity in eval, inverted scaling in training, seeded masks, gradients") {
  Harness d(json{{"type", "dropout"}, {"p", 0.25}}, {10000}, 1);
  d.impl->forward(d.x.data(), d.y.data(), 1, false);
  CHECK(d.y == d.x);
  d.impl->forward(d.x.data(), d.y.data(), 1, true);
  size_t zeros = 0;
  for (size_t i = 0; i < d.y.size(); ++i) {
    if (d.y[i] == 0.0f) {
      ++zeros;
    } else {
      REQUIRE(d.y[i] == doctest::Approx(d.x[i] / 0.75f));
    }
  }
  CHECK(zeros > 2300);  // 2500 expected; the binomial's sd is 43
  CHECK(zeros < 2700);
  // A second forward draws a new mask; reseeding repeats one.
  std::vector<float> first = d.y;
  d.impl->forward(d.x.data(), d.y.data(), 1, true);
  CHECK(d.y != first);
  d.impl->reseed(99, 0);
  d.impl->forward(d.x.data(), d.y.data(), 1, true);
  first = d.y;
  d.impl->reseed(99, 0);
  d.impl->forward(d.x.data(), d.y.data(), 1, true);
  CHECK(d.y == first);

  Harness all(json{{"type", "dropout"}, {"p", 1.0}}, {8}, 1);
  all.impl->forward(all.x.data(), all.y.data(), 1, true);
  CHECK(all.y == std::vector<float>(8, 0.0f));

  Harness g(json{{"type", "dropout"}, {"p", 0.5}}, {20}, 2);
  g.reseed = true;
  g.checkGradients(1e-2, /*train=*/true);
  g.checkGradients(1e-2, /*train=*/false);
}

TEST_CASE("layernorm: normalises the last dimension, gradients with and without affine") {
  Harness h(json{{"type", "layernorm"}}, {2, 4}, 1);
  std::fill(h.params.begin(), h.params.begin() + 4, 1.0f);
  std::fill(h.params.begin() + 4, h.params.end(), 0.0f);
  h.x = {1, 2, 3, 4, 10, 10, 10, 10};
  h.impl->forward(h.x.data(), h.y.data(), 1, false);
  const double rstd = 1.0 / std::sqrt(1.25 + 1e-5);
  CHECK(h.y[0] == doctest::Approx(-1.5 * rstd).epsilon(1e-5));
  CHECK(h.y[3] == doctest::Approx(1.5 * rstd).epsilon(1e-5));
  CHECK(h.y[5] == doctest::Approx(0.0));  // a constant row normalises to 0 (eps keeps it finite)
  CHECK(h.impl->paramShapes()[0].shape == Shape{4});

  InitRng init(1);
  h.impl->initParams(init);
  CHECK(h.params == std::vector<float>{1, 1, 1, 1, 0, 0, 0, 0});

  Harness(json{{"type", "layernorm"}}, {3, 6}, 2).checkGradients(1e-2);
  Harness plain(json{{"type", "layernorm"}, {"affine", false}, {"eps", 1e-3}}, {8}, 3);
  CHECK(plain.params.empty());
  plain.checkGradients(1e-2);
  // "bias": false keeps the weight only (PyTorch's LayerNorm(bias=False)).
  Harness noBias(json{{"type", "layernorm"}, {"bias", false}}, {3, 6}, 2);
  REQUIRE(noBias.impl->paramShapes().size() == 1);
  CHECK(noBias.impl->paramShapes()[0].suffix == "weight");
  CHECK(noBias.spec.detail().find("no bias") != std::string::npos);
  noBias.checkGradients(1e-2);
  std::string error;
  try {
    parseModelSpec(json{{"input", {4}}, {"layers", {{{"type", "layernorm"}, {"affine", false}, {"bias", true}}}}}, "j.json",
                   "/model");
  } catch (const ConfigError& e) {
    error = e.what();
  }
  CHECK(error.find("j.json: /model/layers/0/bias: needs \"affine\": true") != std::string::npos);
}

namespace {

// Direct convolution from the definition, weight [out, in, kh, kw], NCHW, zero padding.
std::vector<double> naiveConv(const Harness& h) {
  const auto& s = h.spec;
  const int64_t c = s.input[0], hh = s.input[1], ww = s.input[2], o = s.out, oh = s.output[1], ow = s.output[2];
  std::vector<double> y(static_cast<size_t>(h.batch * o * oh * ow), 0.0);
  for (int64_t n = 0; n < h.batch; ++n)
    for (int64_t oc = 0; oc < o; ++oc)
      for (int64_t oy = 0; oy < oh; ++oy)
        for (int64_t ox = 0; ox < ow; ++ox) {
          double acc = s.bias ? h.params[static_cast<size_t>(o * c * s.kernelH * s.kernelW + oc)] : 0.0;
          for (int64_t ic = 0; ic < c; ++ic)
            for (int64_t i = 0; i < s.kernelH; ++i)
              for (int64_t j = 0; j < s.kernelW; ++j) {
                int64_t iy = oy * s.strideH - s.padH + i, ix = ox * s.strideW - s.padW + j;
                if (iy < 0 || iy >= hh || ix < 0 || ix >= ww) continue;
                acc += h.params[static_cast<size_t>(((oc * c + ic) * s.kernelH + i) * s.kernelW + j)] *
                       h.x[static_cast<size_t>(((n * c + ic) * hh + iy) * ww + ix)];
              }
          y[static_cast<size_t>(((n * o + oc) * oh + oy) * ow + ox)] = acc;
        }
  return y;
}

// Direct max pooling with -inf padding.
std::vector<float> naivePool(const Harness& h) {
  const auto& s = h.spec;
  const int64_t c = s.input[0], hh = s.input[1], ww = s.input[2], oh = s.output[1], ow = s.output[2];
  std::vector<float> y;
  for (int64_t n = 0; n < h.batch; ++n)
    for (int64_t ch = 0; ch < c; ++ch)
      for (int64_t oy = 0; oy < oh; ++oy)
        for (int64_t ox = 0; ox < ow; ++ox) {
          float m = -INFINITY;
          for (int64_t i = 0; i < s.kernelH; ++i)
            for (int64_t j = 0; j < s.kernelW; ++j) {
              int64_t iy = oy * s.strideH - s.padH + i, ix = ox * s.strideW - s.padW + j;
              if (iy >= 0 && iy < hh && ix >= 0 && ix < ww) {
                m = std::max(m, h.x[static_cast<size_t>(((n * c + ch) * hh + iy) * ww + ix)]);
              }
            }
          y.push_back(m);
        }
  return y;
}

}  // namespace

TEST_CASE("conv2d: matches a direct convolution (stride, padding, channels) and its gradients") {
  const std::vector<json> configs = {
      json{{"type", "conv2d"}, {"out", 3}, {"kernel", 3}},
      json{{"type", "conv2d"}, {"out", 4}, {"kernel", 3}, {"stride", 2}, {"padding", 1}},
      json{{"type", "conv2d"}, {"out", 2}, {"kernel", {2, 3}}, {"stride", {1, 2}}, {"padding", {1, 0}},
           {"bias", false}},
  };
  for (const auto& cfg : configs) {
    INFO(cfg.dump());
    Harness h(cfg, {2, 6, 7}, 2);
    CHECK(h.impl->paramShapes()[0].shape == Shape{h.spec.out, 2, h.spec.kernelH, h.spec.kernelW});
    h.impl->forward(h.x.data(), h.y.data(), 2, false);
    auto ref = naiveConv(h);
    for (size_t i = 0; i < ref.size(); ++i) REQUIRE(h.y[i] == doctest::Approx(ref[i]).epsilon(1e-5));
    h.checkGradients(1e-2);
  }
}

TEST_CASE("maxpool2d: matches direct pooling (stride, padding) and routes gradients to the maxima") {
  const std::vector<json> configs = {
      json{{"type", "maxpool2d"}, {"kernel", 2}},
      json{{"type", "maxpool2d"}, {"kernel", 3}, {"stride", 2}, {"padding", 1}},
      json{{"type", "maxpool2d"}, {"kernel", {2, 3}}, {"stride", 1}},
  };
  for (const auto& cfg : configs) {
    INFO(cfg.dump());
    Harness h(cfg, {2, 5, 6}, 2, Inputs::kDistinct);
    h.impl->forward(h.x.data(), h.y.data(), 2, false);
    CHECK(h.y == naivePool(h));
    h.checkGradients(1e-3);
  }
}

TEST_CASE("backward overwrites or accumulates parameter gradients") {
  for (const json& cfg : {json{{"type", "linear"}, {"out", 3}}, json{{"type", "layernorm"}}}) {
    Harness h(cfg, {4}, 2);
    h.analytic(false);
    const std::vector<float> once = h.grads;
    h.impl->backward(h.x.data(), h.y.data(), h.r.data(), nullptr, 2, true);
    for (size_t i = 0; i < once.size(); ++i) CHECK(h.grads[i] == doctest::Approx(2 * once[i]));
    h.impl->backward(h.x.data(), h.y.data(), h.r.data(), nullptr, 2, false);
    for (size_t i = 0; i < once.size(); ++i) CHECK(h.grads[i] == doctest::Approx(once[i]));
  }
  Harness c(json{{"type", "conv2d"}, {"out", 2}, {"kernel", 2}}, {1, 3, 3}, 2);
  c.analytic(false);
  const std::vector<float> once = c.grads;
  c.impl->backward(c.x.data(), c.y.data(), c.r.data(), nullptr, 2, true);
  for (size_t i = 0; i < once.size(); ++i) CHECK(c.grads[i] == doctest::Approx(2 * once[i]));
}
