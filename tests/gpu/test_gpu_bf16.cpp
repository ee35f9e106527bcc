// bf16 activation storage ("precision": "bf16", docs/gpu.md "bf16") emulated on the CPU (no GPU needed): the
// kernels that write an activation as bf16 (kernels.h's *Bf16 functions) run every thread of their launch grids
// through bf16_store.h (the code the kernels run) and are compared, bit for bit, with the two steps they replace:
// the float32 kernel's output, then toBf16's rounding. The float32 outputs are compared with lib/nn's CPU layers.
// The rounding itself (bf16Bits's host twin) is checked against an independent nearest-even reference. What this
// cannot show is the device itself: that nvcc computes the float32 value alike in both instantiations of a kernel
// (the `gpu` case in test_gpu_bf16_nn.cpp compares whole steps with and without the storage).
#include <doctest/doctest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "lib/gpu/bf16_store.h"
#include "lib/gpu/gemm_args.h"
#include "lib/gpu/grid.h"
#include "lib/gpu/reduce_index.h"
#include "lib/nn/layer.h"
#include "lib/nn/spec.h"
#include "tests/gpu/host_values.h"

using namespace dtrain;
using namespace dtrain::gpu;
using namespace dtrain::gputest;

namespace {

// Nearest-even bf16 of a finite or infinite v, from the definition: the two bf16 values around v (v truncated to
// its upper 16 bits, and the next one away from zero), the nearer in exact (double) arithmetic, the even one on a
// tie. Independent of bf16Bits's integer trick.
uint16_t referenceBf16(float v) {
  const uint32_t u = std::bit_cast<uint32_t>(v);
  const auto low = static_cast<uint16_t>(u >> 16);
  if ((u & 0xffffu) == 0) return low;  // exact
  const auto high = static_cast<uint16_t>(low + 1);  // away from zero (may become inf: correct overflow)
  const double a = std::fabs(static_cast<double>(v));
  if (std::isinf(bf16Value(high))) {
    // Past the largest bf16 (0x1.fep127) the next value is 2^128 (inf): from the midpoint 0x1.ffp127 on, round up.
    const double mid = 0x1.ffp127;
    if (a > mid) return high;
    if (a < mid) return low;
    return (low & 1u) != 0 ? high : low;
  }
  const double dl = a - std::fabs(static_cast<double>(bf16Value(low)));
  const double dh = std::fabs(static_cast<double>(bf16Value(high))) - a;
  if (dh < dl) return high;
  if (dl < dh) return low;
  return (low & 1u) != 0 ? high : low;
}

// kernels_nn.cu's layerNormForwardKernel, thread by thread: one block of 256 threads per row, the row's sum and
// squared deviations summed per thread in column order, then the block's halving tree (blockSum), then every
// element stored through storeActivation (float or bf16): the kernel's code path for both instantiations.
template <class Out>
void emulateLayerNormForward(const float* x, const float* w, const float* b, Out* y, int64_t rows, int64_t d,
                             float eps) {
  constexpr int kThreads = 256;
  auto blockSum = [](std::vector<float> sh) {
    for (int s = kThreads / 2; s > 0; s >>= 1)
      for (int t = 0; t < s; ++t) sh[static_cast<size_t>(t)] += sh[static_cast<size_t>(t + s)];
    return sh[0];
  };
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    std::vector<float> sh(kThreads, 0.0f);
    for (int t = 0; t < kThreads; ++t)
      for (int64_t j = t; j < d; j += kThreads) sh[static_cast<size_t>(t)] += xr[j];
    const float mu = blockSum(sh) / static_cast<float>(d);
    std::fill(sh.begin(), sh.end(), 0.0f);
    for (int t = 0; t < kThreads; ++t)
      for (int64_t j = t; j < d; j += kThreads) sh[static_cast<size_t>(t)] += (xr[j] - mu) * (xr[j] - mu);
    const float var = blockSum(sh) / static_cast<float>(d);
    const float rs = 1.0f / std::sqrt(var + eps);
    for (int t = 0; t < kThreads; ++t)
      for (int64_t j = t; j < d; j += kThreads) storeActivation(y, r * d + j, layerNormValue(xr[j], mu, rs, w, b, j));
  }
}

// The bf16 values of `out` are exactly toBf16 of the float32 ones (kernels::toBf16 rounds with bf16Bits's device
// twin, __float2bfloat16_rn); counts the elements where the rounding moved the value (so a test sees it matter).
int64_t checkRoundedTwin(const std::vector<float>& f32, const std::vector<uint16_t>& bf16) {
  REQUIRE(f32.size() == bf16.size());
  int64_t moved = 0, wrong = 0;
  for (size_t i = 0; i < f32.size(); ++i) {
    if (bf16[i] != referenceBf16(f32[i])) ++wrong;
    if (bf16Value(bf16[i]) != f32[i]) ++moved;
  }
  CHECK(wrong == 0);
  return moved;
}

}  // namespace

TEST_CASE("bf16Bits rounds to nearest even as the definition does (ties, carries, overflow, denormals, NaN)") {
  std::vector<float> values{0.0f, -0.0f, 1.0f, -1.0f, std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::max(),
                            -std::numeric_limits<float>::max(), std::numeric_limits<float>::min(),
                            std::numeric_limits<float>::denorm_min(), 0x1.ffp127f, 0x1.fep127f,
                            std::bit_cast<float>(0x3f808000u),   // 1 + 2^-8: a tie, the kept bit even: down
                            std::bit_cast<float>(0x3f818000u),   // a tie with the kept bit odd: up
                            std::bit_cast<float>(0x3f808001u),   // just above a tie: up
                            std::bit_cast<float>(0x3f807fffu),   // just below a tie: down
                            std::bit_cast<float>(0x3fffffffu),   // carries into the exponent: 2
                            std::bit_cast<float>(0x00018000u)};  // a denormal tie
  CHECK(bf16Bits(std::bit_cast<float>(0x3f808000u)) == 0x3f80);
  CHECK(bf16Bits(std::bit_cast<float>(0x3f818000u)) == 0x3f82);
  CHECK(bf16Bits(std::bit_cast<float>(0x3fffffffu)) == 0x4000);
  CHECK(bf16Bits(0x1.ffp127f) == 0x7f80);  // the midpoint to 2^128 rounds to inf (even), as __float2bfloat16_rn
  // A spread of bit patterns over the whole float range, both signs (every 9973rd pattern, 430k values).
  for (uint64_t u = 0; u <= 0xffffffffu; u += 9973) values.push_back(std::bit_cast<float>(static_cast<uint32_t>(u)));
  int64_t checked = 0;
  for (float v : values) {
    if (std::isnan(v)) continue;
    CAPTURE(std::bit_cast<uint32_t>(v));
    REQUIRE(bf16Bits(v) == referenceBf16(v));
    ++checked;
  }
  CHECK(checked > 400000);
  // NaN: the canonical quiet NaN, whatever the payload and sign (cuda_bf16.h's host rounding gives the same).
  for (uint32_t nan : {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0x7fffffffu, 0xff812345u})
    CHECK(bf16Bits(std::bit_cast<float>(nan)) == 0x7fff);
  // bf16Value is exact: the float of a pattern rounds back to it.
  for (uint32_t h = 0; h <= 0xffffu; ++h) {
    if (std::isnan(bf16Value(static_cast<uint16_t>(h)))) continue;
    REQUIRE(bf16Bits(bf16Value(static_cast<uint16_t>(h))) == h);
  }
}

TEST_CASE("bf16 LayerNorm kernel emulated: its bf16 output is the float32 kernel's output rounded, bit for bit") {
  for (int64_t d : {1, 8, 300, 768}) {
    for (int mode = 0; mode < 3; ++mode) {  // affine with bias, weight only ("bias": false), not affine
      CAPTURE(d);
      CAPTURE(mode);
      const int batch = 3, rowsPerSample = 5;
      const int64_t rows = batch * rowsPerSample;
      const std::string layer = mode == 0   ? R"({"type": "layernorm"})"
                                : mode == 1 ? R"({"type": "layernorm", "bias": false})"
                                            : R"({"type": "layernorm", "affine": false})";
      const nn::LayerSpec spec = parseLayer(layer, {rowsPerSample, d});
      auto cpu = nn::makeLayer(spec, {.device = Device::cpu(), .maxBatch = batch});
      const size_t count = static_cast<size_t>(nn::paramCountOf(spec));
      std::vector<float> params = randomVector(count, 5, 0.5f, 1.5f), grads(count);
      cpu->bind(params.data(), grads.data());
      const float* w = count > 0 ? params.data() : nullptr;
      const float* b = count > static_cast<size_t>(d) ? params.data() + d : nullptr;
      const std::vector<float> x = randomVector(static_cast<size_t>(rows * d), 6, -2, 2);
      std::vector<float> want(x.size()), f32(x.size());
      std::vector<uint16_t> bf16(x.size());
      cpu->forward(x.data(), want.data(), batch, true);
      const float eps = static_cast<float>(spec.eps);
      emulateLayerNormForward(x.data(), w, b, f32.data(), rows, d, eps);
      emulateLayerNormForward(x.data(), w, b, bf16.data(), rows, d, eps);
      CHECK(maxDiff(want, f32) < (d == 1 ? 1e-6 : 2e-5));  // the float32 kernel is the CPU layer's LayerNorm
      const int64_t moved = checkRoundedTwin(f32, bf16);
      if (d > 1) CHECK(moved > 0);  // the rounding is there, not a copy of the upper bits that happens to agree
    }
  }
}

TEST_CASE("bf16 GELU kernels emulated (alone, and fused with the linear's bias): the float32 output rounded, exactly") {
  const int64_t rows = 37, cols = 300;  // not multiples of the 256-thread block
  const size_t n = static_cast<size_t>(rows * cols);
  const nn::LayerSpec spec = parseLayer(R"({"type": "gelu"})", {cols});
  auto cpu = nn::makeLayer(spec, {.device = Device::cpu(), .maxBatch = static_cast<int>(rows)});
  const std::vector<float> xw = randomVector(n, 11, -4, 4), bias = randomVector(static_cast<size_t>(cols), 12);
  // Unfused: activationForwardKernel<Out>.
  std::vector<float> want(n), f32(n);
  std::vector<uint16_t> bf16(n);
  std::vector<int> visits(n, 0);
  cpu->forward(xw.data(), want.data(), static_cast<int>(rows), true);
  gridStride(n, [&](size_t i) {
    ++visits[i];
    storeActivation(f32.data(), static_cast<int64_t>(i), activationValue(Activation::kGelu, xw[i]));
    storeActivation(bf16.data(), static_cast<int64_t>(i), activationValue(Activation::kGelu, xw[i]));
  });
  CHECK(std::all_of(visits.begin(), visits.end(), [](int v) { return v == 1; }));
  CHECK(maxDiff(want, f32) < 1e-6);
  CHECK(checkRoundedTwin(f32, bf16) > 0);
  // Fused after a linear: biasActivationForwardKernel<Out> against addBias, then the CPU gelu, then toBf16.
  std::vector<float> biased(n);
  for (size_t i = 0; i < n; ++i) biased[i] = xw[i] + bias[i % static_cast<size_t>(cols)];
  cpu->forward(biased.data(), want.data(), static_cast<int>(rows), true);
  gridStride(n, [&](size_t i) {
    const auto e = static_cast<int64_t>(i);
    storeActivation(f32.data(), e, biasActivationValue(Activation::kGelu, xw.data(), bias.data(), e, cols));
    storeActivation(bf16.data(), e, biasActivationValue(Activation::kGelu, xw.data(), bias.data(), e, cols));
  });
  CHECK(maxDiff(want, f32) < 1e-6);
  CHECK(checkRoundedTwin(f32, bf16) > 0);
}

TEST_CASE("addBiasToBf16 emulated: addBias then toBf16 in one pass, bit for bit; no bias: toBf16 alone") {
  const int64_t rows = 29, cols = 3 * 40;  // attention's qkv: [rows, 3C]
  const size_t n = static_cast<size_t>(rows * cols);
  const std::vector<float> x = randomVector(n, 21, -3, 3), bias = randomVector(static_cast<size_t>(cols), 22);
  for (bool withBias : {true, false}) {
    CAPTURE(withBias);
    // The two steps it replaces: y += bias (addBiasKernel's float add), then toBf16.
    std::vector<float> twoStep = x;
    if (withBias)
      for (size_t i = 0; i < n; ++i) twoStep[i] += bias[i % static_cast<size_t>(cols)];
    std::vector<uint16_t> got(n);
    gridStride(n, [&](size_t i) {
      got[i] = bf16Bits(biasedValue(x.data(), withBias ? bias.data() : nullptr, static_cast<int64_t>(i), cols));
    });
    CHECK(checkRoundedTwin(twoStep, got) > 0);
  }
}

TEST_CASE("a GEMM multiplies in bf16 when bf16 is on or either operand is stored bf16, else in float32") {
  CHECK_FALSE(gemmInBf16(false, false, false));
  CHECK(gemmInBf16(true, false, false));
  CHECK(gemmInBf16(false, true, false));   // a stored bf16 input: the float32 weight is rounded too
  CHECK(gemmInBf16(false, false, true));
  CHECK(gemmInBf16(true, true, true));
}
