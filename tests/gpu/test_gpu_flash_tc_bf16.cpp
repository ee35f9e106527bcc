// The bf16 tensor-core fused attention reading q, k, v stored as bf16 ("precision": "bf16": the layer's
// kernels::addBiasToBf16 rounds the qkv projection plus its bias into the kept buffer, and
// kernels::flashAttentionForwardBf16 / flashAttentionBackwardBf16 stage those values as operands as they are)
// against the same kernels reading the float32 q, k, v (the path before bf16 storage on the fused path), emulated
// warp by warp on the CPU (flash_tc_emulation.h): the output, the log-sum-exp, D and dq, dk, dv must be the same
// bits, at every shape of test_gpu_flash_tc.cpp (padded head sizes too), with and without dropout, because the
// MMAs see the same operands and nothing else reads q, k or v. A broken loader (the other half of a 4-byte pair)
// and a store rounded otherwise (toward zero) must fail. What this cannot show: the device (the `gpu` cases in
// test_gpu_bf16_nn.cpp compare the real kernels and a GPT's steps).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "lib/gpu/bf16_store.h"
#include "lib/gpu/philox.h"
#include "lib/nn/dropout_mask.h"
#include "tests/gpu/flash_tc_emulation.h"
#include "tests/gpu/host_values.h"

using namespace dtrain;
using namespace dtrain::gpu;
using namespace dtrain::gputest;

namespace {

// The qkv projection's output before its bias (as the GEMM writes it into the scratch) and the bias: values up to
// +-3 (a peaked softmax whose maximum grows from tile to tile), with every 7th pre-bias value set so that the
// float32 sum is a bf16 rounding tie (halfway between two bf16 values, bias 0 in those columns): nearest-even and
// any other tie rule then differ.
struct Projection {
  std::vector<float> staged, bias;
  int64_t cols;
};
Projection projection(const FlashGeometry& g, uint32_t seed) {
  const int64_t cols = 3 * g.c();
  Projection p{randomVector(static_cast<size_t>(g.batch * g.t * cols), seed, -3, 3),
               randomVector(static_cast<size_t>(cols), seed + 1, -0.5f, 0.5f), cols};
  for (size_t i = 0; i < p.staged.size(); i += 7) {
    const int64_t col = static_cast<int64_t>(i) % cols;
    p.bias[static_cast<size_t>(col)] = 0.0f;
    // 1.5 + 2^-8 + k 2^-7 with k even / odd: halfway between two bf16 values, ties going down / up to even.
    p.staged[i] = (i % 2 == 0 ? 1.0f : -1.0f) * (1.5f + 0x1p-8f + static_cast<float>(i % 5) * 0x1p-7f);
  }
  return p;
}
// The float32 path: addBias's sum (y[i] += bias[i % cols], biasedValue's expression).
std::vector<float> qkvFloat(const Projection& p) {
  std::vector<float> q(p.staged.size());
  for (size_t i = 0; i < q.size(); ++i)
    q[i] = biasedValue(p.staged.data(), p.bias.data(), static_cast<int64_t>(i), p.cols);
  return q;
}
// The bf16 path: addBiasToBf16 (the same sum, rounded by bf16Bits: nearest even), or a broken store that truncates.
std::vector<uint16_t> qkvBf16(const Projection& p, bool truncate = false) {
  std::vector<uint16_t> q(p.staged.size());
  for (size_t i = 0; i < q.size(); ++i) {
    const float v = biasedValue(p.staged.data(), p.bias.data(), static_cast<int64_t>(i), p.cols);
    uint32_t u;
    std::memcpy(&u, &v, 4);
    q[i] = truncate ? static_cast<uint16_t>(u >> 16) : bf16Bits(v);
  }
  return q;
}

bool sameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}
bool anyNanIn(const Core& c) {
  for (const auto* v : {&c.att, &c.lse, &c.dsum, &c.dqkv})
    for (const float f : *v)
      if (std::isnan(f)) return true;
  return false;
}
// Whether every output of the two cores is the same bits.
bool sameCore(const Core& a, const Core& b) {
  return sameBits(a.att, b.att) && sameBits(a.lse, b.lse) && sameBits(a.dsum, b.dsum) && sameBits(a.dqkv, b.dqkv);
}

DropoutDraw drawFor(const FlashGeometry& g, double p) {
  nn::detail::DropoutStream stream(std::nullopt, 0);
  stream.reseed(40, 0);
  return stream.next(static_cast<uint64_t>(g.batch * g.heads * g.t * g.t), p, 1.0f / static_cast<float>(1.0 - p));
}

}  // namespace

TEST_CASE("bf16-stored q, k, v: the bf16 tensor-core kernels give the float32-input kernels' bits") {
  uint32_t seed = 100;
  for (const Shape4 s : kShapes) {
    CAPTURE(s.batch);
    CAPTURE(s.t);
    CAPTURE(s.c);
    CAPTURE(s.heads);
    const FlashGeometry g = flashGeometry(s.batch, s.t, s.heads, s.c / s.heads);
    const Projection proj = projection(g, seed += 2);
    const std::vector<float> datt = randomVector(static_cast<size_t>(s.batch * s.t * s.c), seed + 50);
    const DropoutDraw draw = drawFor(g, 0.3);
    for (const DropoutDraw* d : {static_cast<const DropoutDraw*>(nullptr), &draw}) {
      CAPTURE(d != nullptr);
      Core before, after;
      emulateCore(g, {}, qkvFloat(proj), &datt, before, d, Math::kBf16);
      emulateCoreBf16(g, {}, qkvBf16(proj), &datt, after, d);
      CHECK_FALSE(anyNanIn(before));
      CHECK(sameBits(after.att, before.att));
      CHECK(sameBits(after.lse, before.lse));
      CHECK(sameBits(after.dsum, before.dsum));
      CHECK(sameBits(after.dqkv, before.dqkv));
    }
  }
}

TEST_CASE("bf16-stored q, k, v: a broken loader or a store rounded otherwise changes the bits") {
  // T 130 at hs 64 (several key tiles) and hs 6 padded to 16; with dropout in one of them.
  for (const Shape4 s : {Shape4{2, 130, 128, 2}, Shape4{3, 37, 18, 3}}) {
    CAPTURE(s.t);
    CAPTURE(s.c);
    const FlashGeometry g = flashGeometry(s.batch, s.t, s.heads, s.c / s.heads);
    const Projection proj = projection(g, 7);
    const std::vector<float> datt = randomVector(static_cast<size_t>(s.batch * s.t * s.c), 8);
    const DropoutDraw draw = drawFor(g, 0.3);
    const DropoutDraw* d = s.t == 37 ? &draw : nullptr;
    Core before, good, wrongHalf, truncated;
    emulateCore(g, {}, qkvFloat(proj), &datt, before, d, Math::kBf16);
    emulateCoreBf16(g, {}, qkvBf16(proj), &datt, good, d);
    CHECK(sameCore(good, before));  // the comparison passes for the right loader and store
    emulateCoreBf16(g, {}, qkvBf16(proj), &datt, wrongHalf, d, FlashTcFault::kBf16WrongHalf);
    CHECK_FALSE(anyNanIn(wrongHalf));  // it fails on the numbers, not on unwritten elements
    CHECK_FALSE(sameBits(wrongHalf.att, before.att));
    CHECK_FALSE(sameBits(wrongHalf.lse, before.lse));
    CHECK_FALSE(sameBits(wrongHalf.dqkv, before.dqkv));
    // Truncation differs from nearest even on about half the values and on the ties (bf16 storage must round as
    // the kernels' own staging rounds for the bits to stay).
    emulateCoreBf16(g, {}, qkvBf16(proj, true), &datt, truncated, d);
    CHECK_FALSE(sameBits(truncated.att, before.att));
    CHECK_FALSE(sameBits(truncated.dqkv, before.dqkv));
  }
}

TEST_CASE("bf16-stored q, k, v: bf16Bits (addBiasToBf16's store) rounds as the kernels' staging rounds") {
  // The bits stay only if the layer's store and flash_mma.h's toOperand agree on every float, ties included.
  const Projection proj = projection(flashGeometry(1, 40, 2, 16), 3);
  const std::vector<float> q = qkvFloat(proj);
  const std::vector<uint16_t> b = qkvBf16(proj);
  int ties = 0;
  for (size_t i = 0; i < q.size(); ++i) {
    CHECK(b[i] == FlashMma<FlashBf16>::toOperand(q[i]));
    uint32_t u;
    std::memcpy(&u, &q[i], 4);
    ties += (u & 0xffffu) == 0x8000u;
  }
  CHECK(ties > 100);  // the ties are there (every 7th value)
}
