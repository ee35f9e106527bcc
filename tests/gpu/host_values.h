// Host-only helpers shared by the GPU tests: a grid-stride launch run thread by thread, one layer's spec from its
// JSON, seeded random vectors and a relative difference. Used by the CPU emulations of the kernels
// (test_gpu_window.cpp, test_gpu_reduce.cpp, test_gpu_attention.cpp, test_gpu_loss_optim.cpp, ...: no GPU needed)
// and by gpu_parity.h (the `gpu` parity tests).
#pragma once

#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "lib/gpu/grid.h"
#include "lib/nn/spec.h"

namespace dtrain::gputest {

// Every element of a one-thread-per-element kernel of n elements, as the device runs it: the grid-stride loop
// (DTRAIN_GRID_STRIDE in the .cu sources) of every thread of the launch grid (gridFor(n, threads) blocks of
// `threads`, the kernels' blocksFor), block by block, thread by thread; f(i) per element visited.
template <class F>
void gridStride(size_t n, F&& f, unsigned threads = 256) {
  const unsigned blocks = gpu::gridFor(n, threads);
  for (unsigned b = 0; b < blocks; ++b)
    for (unsigned t = 0; t < threads; ++t)
      for (size_t i = b * size_t{threads} + t; i < n; i += size_t{threads} * blocks) f(i);
}

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
