// The tensor-core fused causal attention (lib/gpu/flash_attention_tc.h, "precision": "bf16" and float32 with TF32)
// emulated on the CPU: every warp and lane of the real launch grids of its three kernels (forward, dQ, dK/dV) runs
// the very item functions the device runs, with flash_mma.h's host fragments (operands rounded to bf16 / TF32 as
// the device rounds them, products summed in float32), the block's shared memory a plain buffer (filled with NaN
// at each item's start and the staged tiles again whenever the block frees them, so a read of anything no thread
// wrote shows), and the layer around it (projections in double) gives the CPU layer's output and all gradients
// within the rounding of the operands. Deliberately broken kernels (the diagonal masked, no rescale) must fail the
// same checks. What this cannot show: the device (WMMA's own sums, shared-memory races, registers, launches);
// test_gpu_attention_nn.cpp does that with a GPU.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "lib/gpu/flash_attention.h"
#include "lib/gpu/flash_attention_tc_backward.h"
#include "lib/gpu/flash_mma.h"
#include "lib/gpu/grid.h"
#include "lib/gpu/philox.h"
#include "lib/nn/dropout_mask.h"
#include "lib/nn/layer.h"
#include "lib/nn/spec.h"
#include "tests/gpu/flash_tc_emulation.h"
#include "tests/gpu/host_values.h"

using namespace dtrain;
using namespace dtrain::gpu;
using namespace dtrain::gputest;
using dtrain::gputest::parseLayer;
using dtrain::gputest::randomVector;

namespace {

// max |a - b| / max(1, |b|) over double references (NaN: infinite).
double worst(const std::vector<float>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double w = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(double(a[i]) - b[i]) / std::max(1.0, std::fabs(b[i]));
    w = std::isnan(d) ? std::numeric_limits<double>::infinity() : std::max(w, d);
  }
  return w;
}

struct LayerResult {
  std::vector<double> y, dx, grads;
  Core core;
  std::vector<float> qkv, datt;  // the core's inputs
};

// The CUDA layer with the fused kernels (lib/nn/cuda/layers_gpt.cpp): the qkv projection, the emulated core, the
// output projection and the projections' gradients, in double (cuBLAS's rounding is not what this checks), rounded
// to float where the layer holds floats (qkv, datt). Parameters in the arena's order.
LayerResult emulateLayer(const Shape4& s, const std::vector<float>& params, const std::vector<float>& x,
                         const std::vector<float>& dy, Math math, const Launch& launch = {},
                         const DropoutDraw* draw = nullptr, FlashTcFault fault = FlashTcFault::kNone) {
  const int64_t c = s.c, c3 = 3 * c, rows = s.batch * s.t;
  auto at = [](int64_t i) { return static_cast<size_t>(i); };
  const float* wAttn = params.data();
  const float* bAttn = wAttn + 3 * c * c;
  const float* wProj = bAttn + 3 * c;
  const float* bProj = wProj + c * c;
  std::vector<float> qkv(at(rows * c3)), datt(at(rows * c));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < c3; ++o) {
      double acc = bAttn[o];
      for (int64_t i = 0; i < c; ++i) acc += double(x[at(r * c + i)]) * wAttn[o * c + i];
      qkv[at(r * c3 + o)] = static_cast<float>(acc);
    }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < c; ++i) {
      double acc = 0;
      for (int64_t o = 0; o < c; ++o) acc += double(dy[at(r * c + o)]) * wProj[o * c + i];
      datt[at(r * c + i)] = static_cast<float>(acc);
    }
  const FlashGeometry g = flashGeometry(s.batch, s.t, s.heads, c / s.heads);
  LayerResult out;
  emulateCore(g, launch, qkv, &datt, out.core, draw, math, fault);
  out.qkv = qkv, out.datt = datt;
  out.y.assign(at(rows * c), 0.0);
  out.grads.assign(params.size(), 0.0);
  double* gwAttn = out.grads.data();
  double* gbAttn = gwAttn + 3 * c * c;
  double* gwProj = gbAttn + 3 * c;
  double* gbProj = gwProj + c * c;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < c; ++o) {
      double acc = bProj[o];
      const double gy = dy[at(r * c + o)];
      gbProj[o] += gy;
      for (int64_t i = 0; i < c; ++i) {
        acc += double(out.core.att[at(r * c + i)]) * wProj[o * c + i];
        gwProj[o * c + i] += gy * out.core.att[at(r * c + i)];
      }
      out.y[at(r * c + o)] = acc;
    }
  out.dx.assign(at(rows * c), 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < c3; ++o) {
      const double gq = out.core.dqkv[at(r * c3 + o)];
      gbAttn[o] += gq;
      for (int64_t i = 0; i < c; ++i) {
        gwAttn[o * c + i] += gq * x[at(r * c + i)];
        out.dx[at(r * c + i)] += gq * wAttn[o * c + i];
      }
    }
  return out;
}

// A CPU causal_self_attention at shape `s`, its output and gradients for x in [-2, 2], dy in [-1, 1]. `peaked`: the
// default init tripled (scores up to about 30: a peaked softmax, whose maximum grows from tile to tile, so the
// online rescaling matters); else the `gpu` parity tests' parameters (the default init plus noise in [-0.3, 0.3]).
struct CpuRun {
  nn::LayerSpec spec;
  std::vector<float> params, grads, x, dy, y, dx;
};
CpuRun cpuRun(const Shape4& s, bool peaked, double p = 0.0, uint64_t reseed = 0) {
  CpuRun r;
  r.spec = parseLayer("{\"type\": \"causal_self_attention\", \"n_head\": " + std::to_string(s.heads) +
                          ", \"dropout\": " + std::to_string(p) + "}",
                      {s.t, s.c});
  auto cpu = nn::makeLayer(r.spec, {.device = Device::cpu(), .maxBatch = static_cast<int>(s.batch), .seed = 3});
  r.params.assign(static_cast<size_t>(r.spec.paramCount()), 0.0f);
  r.grads.assign(r.params.size(), 0.0f);
  cpu->bind(r.params.data(), r.grads.data());
  nn::InitRng init(17);
  cpu->initParams(init);
  if (peaked)
    for (float& w : r.params) w *= 3.0f;
  const size_t n = static_cast<size_t>(s.batch * s.t * s.c);
  r.x = randomVector(n, 41, -2, 2);
  r.dy = randomVector(n, 42);
  r.y.assign(n, 0.0f);
  r.dx.assign(n, 0.0f);
  if (p > 0) cpu->reseed(reseed, 0);
  cpu->forward(r.x.data(), r.y.data(), static_cast<int>(s.batch), true);
  cpu->backward(r.x.data(), r.y.data(), r.dy.data(), r.dx.data(), static_cast<int>(s.batch), false);
  return r;
}

struct Worst {
  double y, dx, grads;
};
// The operands' unit roundoff: 2^-9 for bf16 (8 significant bits, nearest), 2^-11 for TF32 (11 bits).
double unitRoundoff(Math math) { return math == Math::kBf16 ? 0x1p-9 : 0x1p-11; }
Worst compare(const CpuRun& r, const LayerResult& e) {
  return {worst(r.y, e.y), worst(r.dx, e.dx), worst(r.grads, e.grads)};
}

// The attention core in double from the operands as the kernels round them (q, k, v and dO to bf16 or TF32): what
// the kernels compute but for the rounding of P and dS to operands and the float32 sums. Forward att, lse (base 2),
// backward dqkv; D from the unrounded dO and this att, as the kernels take it (float32 dO . O). With each output
// element its magnitude: the sum of the absolute values of the terms that make it (for dq and dk through dS, P
// times |dO| . |v| + |D|, which bounds |dS| and dP's own rounding), the scale of a floating-point sum's error
// (|fl(sum) - sum| <= n u sum |terms|), so the kernels' error divided by it is a count of unit roundoffs whatever
// the cancellation (sum_j dS_ij = 0 by construction, so dq and dk cancel heavily).
struct Reference {
  std::vector<double> att, lse, dqkv;
  std::vector<double> attMag, dqkvMag;
};
Reference referenceCore(const FlashGeometry& g, const std::vector<float>& qkv, const std::vector<float>& datt,
                        const DropoutDraw* draw, Math math) {
  auto round = [&](float x) -> double {
    return math == Math::kBf16 ? double(flashBf16ValueHost(flashBf16BitsHost(x))) : double(flashRoundTf32Host(x));
  };
  const int64_t c = g.c(), c3 = 3 * c, t = g.t, hs = g.hs;
  const double scale = g.scale;  // the kernels' float scale
  Reference r;
  r.att.assign(static_cast<size_t>(g.batch * t * c), 0.0);
  r.attMag = r.att;
  r.lse.assign(static_cast<size_t>(g.batch * g.heads * t), 0.0);
  r.dqkv.assign(static_cast<size_t>(g.batch * t * c3), 0.0);
  r.dqkvMag = r.dqkv;
  auto at = [](int64_t i) { return static_cast<size_t>(i); };
  for (int64_t b = 0; b < g.batch; ++b)
    for (int64_t h = 0; h < g.heads; ++h) {
      auto q = [&](int64_t i, int64_t d) { return round(qkv[at((b * t + i) * c3 + h * hs + d)]); };
      auto k = [&](int64_t j, int64_t d) { return round(qkv[at((b * t + j) * c3 + c + h * hs + d)]); };
      auto v = [&](int64_t j, int64_t d) { return round(qkv[at((b * t + j) * c3 + 2 * c + h * hs + d)]); };
      auto dout = [&](int64_t i, int64_t d) { return double(datt[at((b * t + i) * c + h * hs + d)]); };
      const uint64_t e00 = static_cast<uint64_t>((b * g.heads + h) * t * t);
      auto drop = [&](int64_t i, int64_t j) -> double {
        if (draw == nullptr) return 1.0;
        return draw->kept(e00 + static_cast<uint64_t>(i * t + j)) ? double(draw->scale) : 0.0;
      };
      // P, dS and |dS|'s bound per (i, j <= i).
      std::vector<double> p(at(t * t), 0.0), ds(at(t * t), 0.0), dsMag(at(t * t), 0.0);
      for (int64_t i = 0; i < t; ++i) {
        double m = -1e300;
        for (int64_t j = 0; j <= i; ++j) {
          double s = 0;
          for (int64_t d = 0; d < hs; ++d) s += q(i, d) * k(j, d);
          p[at(i * t + j)] = s * scale;
          m = std::max(m, s * scale);
        }
        double l = 0;
        for (int64_t j = 0; j <= i; ++j) l += (p[at(i * t + j)] = std::exp(p[at(i * t + j)] - m));
        for (int64_t j = 0; j <= i; ++j) p[at(i * t + j)] /= l;
        r.lse[at((b * g.heads + h) * t + i)] = (m + std::log(l)) / std::log(2.0);
        for (int64_t d = 0; d < hs; ++d) {
          double o = 0, mag = 0;
          for (int64_t j = 0; j <= i; ++j) {
            o += p[at(i * t + j)] * drop(i, j) * v(j, d);
            mag += p[at(i * t + j)] * drop(i, j) * std::fabs(v(j, d));
          }
          r.att[at((b * t + i) * c + h * hs + d)] = o;
          r.attMag[at((b * t + i) * c + h * hs + d)] = mag;
        }
        double dI = 0;
        for (int64_t d = 0; d < hs; ++d) dI += dout(i, d) * r.att[at((b * t + i) * c + h * hs + d)];
        for (int64_t j = 0; j <= i; ++j) {
          double dp = 0, dpMag = 0;
          for (int64_t d = 0; d < hs; ++d) {
            const double term = round(static_cast<float>(dout(i, d))) * v(j, d);
            dp += term, dpMag += std::fabs(term);
          }
          ds[at(i * t + j)] = p[at(i * t + j)] * (dp * drop(i, j) - dI);
          dsMag[at(i * t + j)] = p[at(i * t + j)] * (dpMag * std::max(1.0, drop(i, j)) + std::fabs(dI));
        }
      }
      for (int64_t i = 0; i < t; ++i)
        for (int64_t d = 0; d < hs; ++d) {
          double dq = 0, dk = 0, dv = 0, dqMag = 0, dkMag = 0, dvMag = 0;
          for (int64_t j = 0; j <= i; ++j) {
            dq += ds[at(i * t + j)] * k(j, d);
            dqMag += dsMag[at(i * t + j)] * std::fabs(k(j, d));
          }
          for (int64_t i2 = i; i2 < t; ++i2) {  // i as a key: the queries at or after it
            dk += ds[at(i2 * t + i)] * q(i2, d);
            dkMag += dsMag[at(i2 * t + i)] * std::fabs(q(i2, d));
            const double dov = round(static_cast<float>(dout(i2, d)));
            dv += p[at(i2 * t + i)] * drop(i2, i) * dov;
            dvMag += p[at(i2 * t + i)] * drop(i2, i) * std::fabs(dov);
          }
          const size_t e = at((b * t + i) * c3 + h * hs + d);
          r.dqkv[e] = dq * scale, r.dqkv[e + at(c)] = dk * scale, r.dqkv[e + at(2 * c)] = dv;
          r.dqkvMag[e] = dqMag * scale, r.dqkvMag[e + at(c)] = dkMag * scale, r.dqkvMag[e + at(2 * c)] = dvMag;
        }
    }
  return r;
}

// max |a - b| / mag over the elements (NaN: infinite): the error in units of each element's magnitude.
double worstScaled(const std::vector<float>& a, const std::vector<double>& b, const std::vector<double>& mag) {
  REQUIRE(a.size() == b.size());
  double w = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(double(a[i]) - b[i]) / std::max(mag[i], 1e-30);
    w = std::isnan(d) ? std::numeric_limits<double>::infinity() : std::max(w, d);
  }
  return w;
}

bool anyNan(const std::vector<float>& v) {
  return std::any_of(v.begin(), v.end(), [](float f) { return std::isnan(f); });
}


TEST_CASE("tensor-core fragments on the host: bf16 and TF32 rounding as the device's, 16x16x16 products") {
  // bf16: nearest, ties to even (1 + 2^-8 is halfway between 1 and 1 + 2^-7: to 1; 1 + 3 2^-8 up to 1 + 2^-6).
  CHECK(flashBf16ValueHost(flashBf16BitsHost(1.0f + 0x1p-8f)) == 1.0f);
  CHECK(flashBf16ValueHost(flashBf16BitsHost(1.0f + 3 * 0x1p-8f)) == 1.0f + 0x1p-6f);
  CHECK(flashBf16ValueHost(flashBf16BitsHost(-2.75f)) == -2.75f);
  CHECK(std::isnan(flashBf16ValueHost(flashBf16BitsHost(kNan))));
  // TF32 (cvt.rna): nearest, ties away from zero (1 + 2^-11 is halfway between 1 and 1 + 2^-10: away, up).
  CHECK(flashRoundTf32Host(1.0f + 0x1p-11f) == 1.0f + 0x1p-10f);
  CHECK(flashRoundTf32Host(-(1.0f + 0x1p-11f)) == -(1.0f + 0x1p-10f));
  CHECK(flashRoundTf32Host(1.0f + 0x1p-12f) == 1.0f);
  CHECK(std::isinf(flashRoundTf32Host(std::numeric_limits<float>::infinity())));
  // c += A B with A row-major and B column-major (as Q K^T) and both row-major (as P V).
  using Mma = FlashMma<FlashTf32>;
  std::vector<float> a(16 * 24), b(16 * 24), out(16 * 20);
  for (int i = 0; i < 16; ++i)
    for (int k = 0; k < 16; ++k) a[static_cast<size_t>(i * 24 + k)] = static_cast<float>(i - k), b[static_cast<size_t>(i * 24 + k)] = static_cast<float>(i + 2 * k);
  Mma::Acc acc;
  Mma::fill(acc, 1.0f);
  Mma::mma<true, false>(acc, a.data(), 24, b.data(), 24);
  Mma::storeAcc(out.data(), acc, 20);
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float ref = 1.0f;
      for (int k = 0; k < 16; ++k) ref += static_cast<float>(i - k) * static_cast<float>(j + 2 * k);  // B(k, j) = b[j][k]
      CHECK(out[static_cast<size_t>(i * 20 + j)] == ref);
    }
  Mma::fill(acc, 0.0f);
  Mma::mma<true, true>(acc, a.data(), 24, b.data(), 24);
  Mma::storeAcc(out.data(), acc, 20);
  CHECK(out[3 * 20 + 5] == [&] {
    float s = 0;
    for (int k = 0; k < 16; ++k) s += static_cast<float>(3 - k) * static_cast<float>(k + 10);  // B(k, 5) = b[k][5]
    return s;
  }());
}

TEST_CASE("tensor-core flash attention: shared memory per block fits an H100/H200 SM, and the grids are flash_attention.h's") {
  // sm_90's opt-in maximum per block is 227 KiB; the launcher raises the limit above the 48 KiB default.
  constexpr size_t kMax = 227 * 1024;
  auto check = [&](auto m, auto hs) {
    using M = decltype(m);
    constexpr int HS = decltype(hs)::value;
    const size_t f = FlashTcForwardSmem<M, HS>(0).bytes, q = FlashTcGradQSmem<M, HS>(0).bytes,
                 kv = FlashTcGradKVSmem<M, HS>(0).bytes;
    MESSAGE((std::is_same_v<M, FlashBf16> ? "bf16" : "tf32") << " hs " << HS << ": forward " << f << " B, dQ " << q
                                                             << " B, dK/dV " << kv << " B");
    CHECK(f <= kMax);
    CHECK(q <= kMax);
    CHECK(kv <= kMax);
  };
  for (const bool bf : {true, false}) {
    auto run = [&](auto m) {
      check(m, std::integral_constant<int, 16>{});
      check(m, std::integral_constant<int, 32>{});
      check(m, std::integral_constant<int, 64>{});
      check(m, std::integral_constant<int, 128>{});
    };
    if (bf) run(FlashBf16{});
    else run(FlashTf32{});
  }
  // The bf16 GPT-2 shape (hs 64) stays under 100 KiB per block: two blocks per SM.
  CHECK(FlashTcForwardSmem<FlashBf16, 64>(0).bytes <= 100 * 1024);
  CHECK(kFlashTcThreads == 128);
  CHECK(16 * kFlashTcWarps == kFlashThreads);
}

// The kernels against attention computed in double from the operands rounded as the kernels round them
// (referenceCore): what is left is the rounding of P and dS to operands (u relative each), of dO in dP and dV, and
// the float32 sums, so each element's error is a few u times its magnitude (the sum of its terms' absolute values;
// u = 2^-9 bf16, 2^-11 TF32), at the peaked softmax. Measured worst over the shapes, with and without dropout:
// att 1.9u, dqkv 1.9u (bf16) and 1.0u, 1.0u (TF32); lse (relative above 1) 0.002u. The bounds: 4u, 4u and 0.05u.
// The broken kernels are off by hundreds to millions of u.
struct CoreBounds {
  double att = 4, lse = 0.05, dqkv = 4;  // in units of u
};
// The layer against the CPU layer (the test below says why these).
struct LayerBounds {
  double y, dx, grads;
};
LayerBounds layerBounds(Math math) {
  return math == Math::kBf16 ? LayerBounds{6e-3, 6e-3, 5e-2} : LayerBounds{1e-3, 1e-3, 1e-2};
}

Worst checkCore(const LayerResult& e, const FlashGeometry& g, const DropoutDraw* draw, Math math, bool expectPass) {
  const Reference ref = referenceCore(g, e.qkv, e.datt, draw, math);
  const double u = unitRoundoff(math);
  const Worst w{worstScaled(e.core.att, ref.att, ref.attMag) / u, worst(e.core.lse, ref.lse) / u,
                worstScaled(e.core.dqkv, ref.dqkv, ref.dqkvMag) / u};
  MESSAGE(name(math) << (draw != nullptr ? " dropout" : "") << " worst vs the rounded-operand reference, in u: att "
                     << w.y << ", lse " << w.dx << ", dqkv " << w.grads);
  const CoreBounds b;
  if (expectPass) {
    CHECK(w.y < b.att);
    CHECK(w.dx < b.lse);
    CHECK(w.grads < b.dqkv);
  }
  return w;
}

}  // namespace

TEST_CASE("tensor-core flash attention emulated warp by warp: attention from the rounded operands, every shape") {
  for (const Shape4 s : kShapes) {
    CAPTURE(s.batch);
    CAPTURE(s.t);
    CAPTURE(s.c);
    CAPTURE(s.heads);
    const CpuRun r = cpuRun(s, true);
    for (const Math math : {Math::kBf16, Math::kTf32}) {
      CAPTURE(name(math));
      const LayerResult e = emulateLayer(s, r.params, r.x, r.dy, math);
      for (const auto* v : {&e.core.att, &e.core.lse, &e.core.dsum, &e.core.dqkv}) CHECK_FALSE(anyNan(*v));
      checkCore(e, flashGeometry(s.batch, s.t, s.heads, s.c / s.heads), nullptr, math, true);
    }
  }
}

TEST_CASE("tensor-core flash attention gives the CPU layer's output and all gradients within bf16/TF32 rounding") {
  // The layer's default init, x in [-2, 2]: scores of order 1, so the rounding of q and k (about u |q| |k| per
  // product, which the reference above leaves out) moves P little. Measured worst (relative above 1) over the
  // shapes: y 2.2e-3, dx 2.1e-3, gradients 2.0e-2 with bf16, and 2.7e-4, 2.3e-4, 3.0e-3 with TF32 (about u's
  // ratio, 4, less); the bounds are two to three times those.
  for (const Shape4 s : kShapes) {
    CAPTURE(s.t);
    CAPTURE(s.c);
    CAPTURE(s.heads);
    const CpuRun r = cpuRun(s, false);
    for (const Math math : {Math::kBf16, Math::kTf32}) {
      CAPTURE(name(math));
      const Worst w = compare(r, emulateLayer(s, r.params, r.x, r.dy, math));
      MESSAGE(name(math) << " vs the CPU layer: y " << w.y << ", dx " << w.dx << ", grads " << w.grads);
      const LayerBounds b = layerBounds(math);
      CHECK(w.y < b.y);
      CHECK(w.dx < b.dx);
      CHECK(w.grads < b.grads);
    }
  }
}

TEST_CASE("tensor-core flash attention with attention dropout drops what the CPU layer drops") {
  for (const Shape4 s : {Shape4{2, 70, 16, 2}, Shape4{2, 130, 128, 2}, Shape4{2, 45, 256, 2}, Shape4{3, 37, 12, 3}}) {
    for (const double p : {0.3, 0.9}) {
      CAPTURE(s.t);
      CAPTURE(s.c);
      CAPTURE(p);
      const CpuRun r = cpuRun(s, false, p, 40);
      nn::detail::DropoutStream stream(std::nullopt, r.spec.index);
      stream.reseed(40, 0);
      const float keep = 1.0f / static_cast<float>(1.0 - p);
      const DropoutDraw draw = stream.next(static_cast<uint64_t>(s.batch * s.heads * s.t * s.t), p, keep);
      const FlashGeometry g = flashGeometry(s.batch, s.t, s.heads, s.c / s.heads);
      for (const Math math : {Math::kBf16, Math::kTf32}) {
        CAPTURE(name(math));
        const LayerResult e = emulateLayer(s, r.params, r.x, r.dy, math, {}, &draw);
        const Worst w = compare(r, e);
        MESSAGE(name(math) << " vs the CPU layer: y " << w.y << ", dx " << w.dx << ", grads " << w.grads);
        // The bounds without dropout, times 1 / (1 - p): the kept probabilities (and their rounding) are scaled.
        const LayerBounds b = layerBounds(math);
        CHECK(w.y < b.y * keep);
        CHECK(w.dx < b.dx * keep);
        CHECK(w.grads < b.grads * keep);
        for (const auto* v : {&e.core.att, &e.core.dqkv}) CHECK_FALSE(anyNan(*v));
        checkCore(e, g, &draw, math, true);
        // The check can tell: another draw gives another output, far beyond the bound.
        const DropoutDraw other{.key = draw.key, .offset = draw.offset + 4096, .threshold = draw.threshold,
                                .scale = draw.scale};
        CHECK(worst(r.y, emulateLayer(s, r.params, r.x, r.dy, math, {}, &other).y) > 5e-2);
      }
    }
  }
}

TEST_CASE("tensor-core flash attention fails the checks when broken: the mask off by one, no rescale") {
  // T 130 with hs 64 and T 45 with hs 128: several key tiles, so a row's maximum grows from one tile to the next.
  for (const Shape4 s : {Shape4{2, 130, 128, 2}, Shape4{2, 45, 256, 2}}) {
    CAPTURE(s.t);
    const CpuRun r = cpuRun(s, true);
    for (const Math math : {Math::kBf16, Math::kTf32}) {
      CAPTURE(name(math));
      for (const FlashTcFault fault : {FlashTcFault::kMaskDiagonal, FlashTcFault::kNoRescale}) {
        CAPTURE(static_cast<int>(fault));
        const LayerResult e = emulateLayer(s, r.params, r.x, r.dy, math, {}, nullptr, fault);
        const Worst w = checkCore(e, flashGeometry(s.batch, s.t, s.heads, s.c / s.heads), nullptr, math, false);
        const CoreBounds b;
        CHECK(w.y > 10 * b.att);
        CHECK(w.grads > 10 * b.dqkv);
        CHECK(compare(r, e).y > 10 * layerBounds(math).y);
      }
    }
  }
}

TEST_CASE("tensor-core flash attention is deterministic: the same bits twice, whatever the grid and block order") {
  const Shape4 s{3, 150, 64, 4};
  const nn::LayerSpec spec = parseLayer(R"({"type": "causal_self_attention", "n_head": 4})", {s.t, s.c});
  std::vector<float> params = randomVector(static_cast<size_t>(spec.paramCount()), 5, -0.4f, 0.4f);
  const size_t n = static_cast<size_t>(s.batch * s.t * s.c);
  const std::vector<float> x = randomVector(n, 6), dy = randomVector(n, 7);
  const DropoutDraw draw{.key = 99, .offset = 8, .threshold = dropoutThreshold(0.25), .scale = 1.0f / 0.75f};
  for (const Math math : {Math::kBf16, Math::kTf32}) {
    CAPTURE(name(math));
    for (const DropoutDraw* d : {static_cast<const DropoutDraw*>(nullptr), &draw}) {
      CAPTURE(d != nullptr);
      const LayerResult first = emulateLayer(s, params, x, dy, math, {}, d);
      for (const Launch launch : {Launch{0, false}, Launch{5, false}, Launch{1, false}, Launch{0, true},
                                  Launch{7, true}}) {
        CAPTURE(launch.grid);
        CAPTURE(launch.reversed);
        const LayerResult other = emulateLayer(s, params, x, dy, math, launch, d);
        CHECK(other.core.att == first.core.att);
        CHECK(other.core.lse == first.core.lse);
        CHECK(other.core.dsum == first.core.dsum);
        CHECK(other.core.dqkv == first.core.dqkv);
      }
    }
  }
}
