// Host-only helpers shared by the GPU tests: one layer's spec from its JSON, seeded random vectors and a relative
// difference. Used by the CPU emulations of the kernels (test_gpu_window.cpp, test_gpu_reduce.cpp,
// test_gpu_attention.cpp: no GPU needed) and by gpu_parity.h (the `gpu` parity tests).
#pragma once

#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "lib/nn/spec.h"

namespace dtrain::gputest {

// The spec of `layer` (a layer's JSON) as the only layer of a model whose per-sample input is `input`.
inline nn::LayerSpec parseLayer(const std::string& layer, const std::vector<int64_t>& input) {
  using nlohmann::json;
  return nn::parseModelSpec(json{{"input", input}, {"layers", json::array({json::parse(layer)})}}, "", "/model")
      .layers[0];
}

// `n` values uniform in [lo, hi) from mt19937 seeded with `seed`.
inline std::vector<float> randomVector(size_t n, uint32_t seed, float lo = -1, float hi = 1) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng);
  return v;
}

// max |a - b| / max(1, |a|): relative for large values, absolute near zero.
inline double maxDiff(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i)
    worst = std::max(worst, std::fabs(double(a[i]) - double(b[i])) / std::max(1.0, std::fabs(double(a[i]))));
  return worst;
}

}  // namespace dtrain::gputest
