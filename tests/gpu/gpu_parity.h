// Helpers of the `gpu` parity tests (test_gpu_nn.cpp, test_gpu_spatial.cpp): host <-> device copies, a relative
// difference, seeded random vectors, and checkLayer, which builds one layer spec on the CPU and on cuda:0 with the
// same parameters and inputs and compares forward, input gradient and parameter gradients (overwrite, then
// accumulate) within a tolerance. They need a visible GPU (gpu_test_main.cpp skips without one).
#pragma once

#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "lib/nn/device.h"
#include "lib/nn/layer.h"
#include "lib/nn/spec.h"
#include "tests/gpu/host_values.h"

namespace dtrain::nn::parity {

using nlohmann::json;

inline const Device kGpu = Device::cuda(0);

template <class T>
std::vector<T> toHost(const T* p, size_t n) {
  std::vector<T> out(n);
  copyBytes(out.data(), Device::cpu(), p, kGpu, n * sizeof(T));
  return out;
}

template <class T>
DeviceFloats toDevice(const std::vector<T>& v) {
  static_assert(sizeof(T) == sizeof(float));
  DeviceFloats d(v.size(), kGpu);
  copyBytes(d.data(), kGpu, v.data(), Device::cpu(), v.size() * sizeof(T));
  return d;
}

using gputest::maxDiff;
using gputest::randomVector;

struct Case {
  std::string layer;
  std::vector<int64_t> input;
  bool tokens = false;  // integer inputs in [0, 11) (embedding)
};

// Tolerances of checkLayer: float32 rounding by default; bf16 GEMM inputs round to 8 significant bits.
struct Tolerance {
  double out = 1e-5, dx = 1e-5, grads = 1e-4;
};

// bf16 GEMMs for the scope of one test (reset on the way out, also when a REQUIRE fails).
struct Bf16Scope {
  Bf16Scope() { setBf16(true); }
  ~Bf16Scope() { setBf16(false); }
};

inline void checkLayer(const Case& c, const Tolerance& tol = {}) {
  CAPTURE(c.layer);
  const int batch = 3;
  LayerSpec spec =
      parseModelSpec(json{{"input", c.input}, {"layers", json::array({json::parse(c.layer)})}}, "", "/model").layers[0];
  auto cpu = makeLayer(spec, {.device = Device::cpu(), .maxBatch = batch, .seed = 7});
  auto gpu = makeLayer(spec, {.device = kGpu, .maxBatch = batch, .seed = 7});
  size_t count = 0;
  for (const auto& p : cpu->paramShapes()) count += static_cast<size_t>(p.shape.numel());
  std::vector<float> params(count), grads(count, 0.0f);
  cpu->bind(params.data(), grads.data());
  InitRng init(11);
  cpu->initParams(init);
  auto noise = randomVector(count, 5, -0.3f, 0.3f);
  for (size_t i = 0; i < count; ++i) params[i] += noise[i];
  DeviceFloats dParams = toDevice(params), dGrads(count, kGpu);
  gpu->bind(dParams.data(), dGrads.data());

  const size_t nx = static_cast<size_t>(batch * spec.input.numel());
  const size_t ny = static_cast<size_t>(batch * spec.output.numel());
  std::vector<float> x = randomVector(nx, 9, -2, 2);
  if (c.tokens)
    for (float& v : x) v = std::floor((v + 2.0f) * 2.7f);  // 0..10
  std::vector<float> y(ny), dy = randomVector(ny, 13), dx(nx, 0.0f);
  DeviceFloats dX = toDevice(x), dY(ny, kGpu), dDy = toDevice(dy), dDx(nx, kGpu);

  for (bool accumulate : {false, true}) {
    CAPTURE(accumulate);
    cpu->forward(x.data(), y.data(), batch, true);
    gpu->forward(dX.data(), dY.data(), batch, true);
    CHECK(maxDiff(y, toHost(dY.data(), ny)) < tol.out);
    const bool wantDx = !c.tokens;
    cpu->backward(x.data(), y.data(), dy.data(), wantDx ? dx.data() : nullptr, batch, accumulate);
    gpu->backward(dX.data(), dY.data(), dDy.data(), wantDx ? dDx.data() : nullptr, batch, accumulate);
    if (wantDx) CHECK(maxDiff(dx, toHost(dDx.data(), nx)) < tol.dx);
    if (count > 0) CHECK(maxDiff(grads, toHost(dGrads.data(), count)) < tol.grads);
  }
}

}  // namespace dtrain::nn::parity
