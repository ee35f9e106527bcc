// One layer on its own arenas with finite-difference gradient checks, shared by the layer tests.
#pragma once

#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "lib/nn/layer.h"
#include "lib/nn/spec.h"

namespace dtrain::nn::testing {

using nlohmann::json;

enum class Inputs { kSmooth, kAwayFromZero, kDistinct };

// One layer with its own parameter/gradient arenas, a random input and a random upstream gradient r, so the
// scalar objective L = sum(y * r) has dL/dy = r.
struct Harness {
  Harness(const json& layer, std::vector<int64_t> input, int batch, Inputs kind = Inputs::kSmooth)
      : batch(batch) {
    spec = parseModelSpec(json{{"input", input}, {"layers", json::array({layer})}}, "", "/model").layers[0];
    impl = makeLayer(spec, {.device = Device::cpu(), .maxBatch = batch, .seed = 7});
    size_t count = 0;
    for (const auto& p : impl->paramShapes()) count += static_cast<size_t>(p.shape.numel());
    params.assign(count, 0.0f);
    grads.assign(count, 0.0f);
    impl->bind(params.data(), grads.data());
    InitRng init(11);
    impl->initParams(init);
    std::mt19937 rng(3);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    // Move parameters off their initial values (layernorm starts at 1 and 0) so every term is exercised.
    for (float& p : params) p += 0.3f * u(rng);
    const size_t nx = static_cast<size_t>(batch * spec.input.numel());
    x.resize(nx);
    if (kind == Inputs::kDistinct) {
      // Distinct values 0.05 apart: the max of a window changes only for steps far above the FD step.
      std::vector<int> order(nx);
      std::iota(order.begin(), order.end(), 0);
      std::shuffle(order.begin(), order.end(), rng);
      for (size_t i = 0; i < nx; ++i) x[i] = 0.05f * static_cast<float>(order[i]) - 1.0f;
    } else {
      for (float& v : x) {
        float s = u(rng);
        v = kind == Inputs::kAwayFromZero ? std::copysign(0.1f + 0.9f * std::fabs(s), s) : 2.0f * s;
      }
    }
    y.assign(static_cast<size_t>(batch * spec.output.numel()), 0.0f);
    r.resize(y.size());
    for (float& v : r) v = u(rng);
    dx.assign(nx, 0.0f);
  }

  double objective(bool train) {
    if (reseed) impl->reseed(5, 0);
    impl->forward(x.data(), y.data(), batch, train);
    double s = 0;
    for (size_t i = 0; i < y.size(); ++i) s += static_cast<double>(y[i]) * r[i];
    return s;
  }

  void analytic(bool train) {
    objective(train);
    impl->backward(x.data(), y.data(), r.data(), dx.data(), batch, false);
  }

  // Central differences of L against the analytic gradients of x and of every parameter.
  void checkGradients(double h, bool train = false) {
    analytic(train);
    const std::vector<float> dxA = dx, gradsA = grads;
    auto numeric = [&](std::vector<float>& v, size_t i) {
      const float saved = v[i];
      v[i] = saved + static_cast<float>(h);
      const double plus = objective(train);
      v[i] = saved - static_cast<float>(h);
      const double minus = objective(train);
      v[i] = saved;
      return (plus - minus) / (2 * h);
    };
    auto close = [](double num, double ana) { return std::fabs(num - ana) <= 2e-3 + 1e-2 * std::fabs(ana); };
    int bad = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      double num = numeric(x, i);
      if (!close(num, dxA[i]) && bad++ < 5) FAIL_CHECK("dx[" << i << "]: numeric " << num << " analytic " << dxA[i]);
    }
    for (size_t i = 0; i < params.size(); ++i) {
      double num = numeric(params, i);
      if (!close(num, gradsA[i]) && bad++ < 5) {
        FAIL_CHECK("dparam[" << i << "]: numeric " << num << " analytic " << gradsA[i]);
      }
    }
    CHECK(bad == 0);
  }

  int batch;
  bool reseed = false;
  LayerSpec spec;
  std::unique_ptr<Layer> impl;
  std::vector<float> params, grads, x, y, r, dx;
};

}  // namespace dtrain::nn::testing
