// The fused (flash) causal attention emulated on the CPU (no GPU needed, as test_gpu_window.cpp does for
// conv2d/maxpool2d): every thread of the real launch grids of its four kernels (forward, dQ, dK, dV) runs
// lib/gpu/flash_attention.h's per-block tile loops and per-thread work, the block's shared-memory tiles as plain
// arrays (poisoned with NaN whenever the block frees them, so a read of a row no thread loaded shows), and the
// layer around it (the projections, here in double) gives the CPU layer's output and all gradients
// (lib/nn/layers_attention.cpp) within float tolerance: the online softmax and exp2 round differently from the
// CPU's softmax. With attention dropout the kernels take the draw the layer takes from its DropoutStream and drop
// what the CPU layer drops (the same philox.h rule and element numbering). What this cannot show: the device itself (launches, shared memory, registers);
// test_gpu_attention_nn.cpp does that with a GPU.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "lib/gpu/flash_attention.h"
#include "lib/gpu/grid.h"
#include "lib/gpu/philox.h"
#include "lib/nn/dropout_mask.h"
#include "lib/nn/layer.h"
#include "lib/nn/spec.h"
#include "tests/gpu/host_values.h"

using namespace dtrain;
using namespace dtrain::gpu;
using dtrain::gputest::parseLayer;
using dtrain::gputest::randomVector;

namespace {

constexpr float kNan = std::numeric_limits<float>::quiet_NaN();

// One block's threads on the CPU: each() runs every thread's phase in turn (a phase of all threads ends before
// the next starts: the barrier's meaning); sync(kTileFree) poisons the block's tiles.
template <class Row>
struct HostThreads {
  std::vector<Row> rows = std::vector<Row>(kFlashThreads);
  std::vector<std::vector<float>*> tiles;
  template <class F>
  void each(F&& f) {
    for (int tid = 0; tid < kFlashThreads; ++tid) f(tid, rows[static_cast<size_t>(tid)]);
  }
  void sync(FlashSync s) {
    if (s == FlashSync::kTileFree)
      for (auto* tile : tiles) std::fill(tile->begin(), tile->end(), kNan);
  }
};

// How the emulation walks the grid: the launcher's grid (rowGrid(items)) or a smaller one, blocks in order or
// reversed. The result must not depend on it (each item is one block's, each output one thread's).
struct Launch {
  int64_t grid = 0;  // 0: the launcher's
  bool reversed = false;
};

template <class Body>
void eachBlock(const FlashGeometry& g, const Launch& launch, Body&& body) {
  const int64_t grid = launch.grid > 0 ? launch.grid : static_cast<int64_t>(rowGrid(g.items()));
  for (int64_t k = 0; k < grid; ++k) {
    const int64_t bx = launch.reversed ? grid - 1 - k : k;
    body([&](auto&& perItem) {
      for (int64_t item = bx; item < g.items(); item += grid) perItem(item);
    });
  }
}

struct Core {
  std::vector<float> att, lse;                  // forward
  std::vector<float> dsum, dqkv;                // backward
};

template <int HS, class Drop>
void emulateForward(const FlashGeometry& g, const Launch& launch, const std::vector<float>& qkv, Core& out,
                    const Drop& drop) {
  constexpr int R = kFlashTileRows<HS>;
  eachBlock(g, launch, [&](auto&& items) {
    HostThreads<FlashForwardRow<HS>> th;
    std::vector<float> kTile(R * HS, kNan), vTile(R * HS, kNan);
    th.tiles = {&kTile, &vTile};
    items([&](int64_t item) {
      flashForwardItem<HS>(th, g, item, qkv.data(), out.att.data(), out.lse.data(), kTile.data(), vTile.data(), drop);
    });
  });
}

template <int HS, class Drop>
void emulateBackward(const FlashGeometry& g, const Launch& launch, const std::vector<float>& qkv,
                     const std::vector<float>& datt, Core& out, const Drop& drop) {
  constexpr int R = kFlashTileRows<HS>;
  // Three kernels, one after the other (the default stream's order): dQ (and D), dK, dV.
  eachBlock(g, launch, [&](auto&& items) {
    HostThreads<FlashGradQRow<HS>> th;
    std::vector<float> kTile(R * HS, kNan), vTile(R * HS, kNan);
    th.tiles = {&kTile, &vTile};
    items([&](int64_t item) {
      flashGradQItem<HS>(th, g, item, qkv.data(), out.att.data(), out.lse.data(), datt.data(), out.dsum.data(),
                         out.dqkv.data(), kTile.data(), vTile.data(), drop);
    });
  });
  auto keyOwners = [&](auto gradK) {
    constexpr bool kGradK = decltype(gradK)::value;
    using Row = std::conditional_t<kGradK, FlashGradKRow<HS>, FlashGradVRow<HS>>;
    eachBlock(g, launch, [&](auto&& items) {
      HostThreads<Row> th;
      std::vector<float> qTile(R * HS, kNan), doTile(R * HS, kNan), lseTile(R, kNan), dsumTile(R, kNan);
      th.tiles = {&qTile, &doTile, &lseTile, &dsumTile};
      items([&](int64_t item) {
        flashGradKVItem<HS, kGradK>(th, g, item, qkv.data(), out.lse.data(), datt.data(), out.dsum.data(),
                                    out.dqkv.data(), qTile.data(), doTile.data(), lseTile.data(), dsumTile.data(),
                                    drop);
      });
    });
  };
  keyOwners(std::true_type{});
  keyOwners(std::false_type{});
}

// The attention core as the kernels compute it: forward fills att and lse, backward (datt given) dsum and dqkv
// (poisoned first: every element the kernels own must be written). `draw`: attention dropout's, or null (the
// launcher's choice of policy).
void emulateCore(const FlashGeometry& g, const Launch& launch, const std::vector<float>& qkv,
                 const std::vector<float>* datt, Core& out, const DropoutDraw* draw) {
  const size_t rows = static_cast<size_t>(g.batch * g.t), lse = static_cast<size_t>(g.batch * g.heads * g.t);
  out.att.assign(rows * static_cast<size_t>(g.c()), kNan);
  out.lse.assign(lse, kNan);
  auto withDrop = [&](auto hs, const auto& drop) {
    constexpr int HS = decltype(hs)::value;
    emulateForward<HS>(g, launch, qkv, out, drop);
    if (datt == nullptr) return;
    out.dsum.assign(lse, kNan);
    out.dqkv.assign(rows * static_cast<size_t>(3 * g.c()), kNan);
    emulateBackward<HS>(g, launch, qkv, *datt, out, drop);
  };
  auto run = [&](auto hs) {
    if (draw != nullptr) return withDrop(hs, FlashDropout{*draw});
    withDrop(hs, FlashNoDropout{});
  };
  switch (flashHeadTemplate(g.hs)) {
    case 16: return run(std::integral_constant<int, 16>{});
    case 32: return run(std::integral_constant<int, 32>{});
    case 64: return run(std::integral_constant<int, 64>{});
    case 128: return run(std::integral_constant<int, 128>{});
    default: FAIL("no compiled head size for hs " << g.hs);
  }
}

// max |a - b| / max(1, |b|) over double references.
double worst(const std::vector<float>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double w = 0;
  for (size_t i = 0; i < a.size(); ++i)
    w = std::max(w, std::fabs(double(a[i]) - b[i]) / std::max(1.0, std::fabs(b[i])));
  return w;
}

struct Shape4 {
  int64_t batch, t, c, heads;
};

struct LayerResult {
  std::vector<double> y, dx, grads;
  Core core;
};

// The CUDA layer with the fused kernels (lib/nn/cuda/layers_gpt.cpp CausalSelfAttention, fused path): the qkv
// projection, the emulated kernels, the output projection; backward: datt = dy Wproj, the emulated backward, the
// qkv projection's gradients. The projections in double (cuBLAS's rounding is not what this checks), rounded to
// float where the layer holds floats (qkv, datt). Parameters in the arena's order.
LayerResult emulateLayer(const Shape4& s, const std::vector<float>& params, const std::vector<float>& x,
                         const std::vector<float>& dy, const Launch& launch = {},
                         const DropoutDraw* draw = nullptr) {
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
  emulateCore(g, launch, qkv, &datt, out.core, draw);
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

// L_i of the scaled scores in base 2, log2(sum_j<=i exp2(q_i.k_j scale log2 e)), in double.
std::vector<double> referenceLse(const FlashGeometry& g, const std::vector<float>& qkv) {
  const int64_t c = g.c(), c3 = 3 * c;
  std::vector<double> out(static_cast<size_t>(g.batch * g.heads * g.t));
  const double scale = 1.0 / std::sqrt(static_cast<double>(g.hs));
  for (int64_t b = 0; b < g.batch; ++b)
    for (int64_t h = 0; h < g.heads; ++h)
      for (int64_t i = 0; i < g.t; ++i) {
        std::vector<double> s(static_cast<size_t>(i + 1));
        double m = -1e300;
        for (int64_t j = 0; j <= i; ++j) {
          double dot = 0;
          for (int64_t d = 0; d < g.hs; ++d)
            dot += double(qkv[static_cast<size_t>((b * g.t + i) * c3 + h * g.hs + d)]) *
                   qkv[static_cast<size_t>((b * g.t + j) * c3 + c + h * g.hs + d)];
          s[static_cast<size_t>(j)] = dot * scale;
          m = std::max(m, dot * scale);
        }
        double total = 0;
        for (double v : s) total += std::exp(v - m);
        out[static_cast<size_t>((b * g.heads + h) * g.t + i)] = (m + std::log(total)) / std::log(2.0);
      }
  return out;
}

}  // namespace

TEST_CASE("flash attention geometry: head-size templates, tiles, items cover every (sample, head, row tile) once") {
  CHECK(flashHeadTemplate(0) == 0);
  CHECK(flashHeadTemplate(1) == 16);
  CHECK(flashHeadTemplate(16) == 16);
  CHECK(flashHeadTemplate(17) == 32);
  CHECK(flashHeadTemplate(48) == 64);
  CHECK(flashHeadTemplate(64) == 64);
  CHECK(flashHeadTemplate(65) == 128);
  CHECK(flashHeadTemplate(128) == 128);
  CHECK(flashHeadTemplate(129) == 0);
  // Two tiles of R x HS floats stay within 32 KiB of static shared memory.
  CHECK(2 * kFlashTileRows<16> * 16 * 4 <= 32768);
  CHECK(2 * kFlashTileRows<64> * 64 * 4 <= 32768);
  CHECK(2 * kFlashTileRows<128> * 128 * 4 <= 32768);
  const FlashGeometry g = flashGeometry(3, 130, 5, 64);
  CHECK(g.tiles() == 3);
  CHECK(g.items() == 45);
  CHECK(g.scale == 1.0f / std::sqrt(64.0f));  // the layer's rounding
  for (const bool last : {true, false}) {
    std::vector<int> seen(45, 0);
    for (int64_t item = 0; item < g.items(); ++item) {
      const FlashItem it = flashItem(g, item, last);
      REQUIRE(it.b < 3);
      REQUIRE(it.h < 5);
      REQUIRE(it.row0 % kFlashThreads == 0);
      ++seen[static_cast<size_t>((it.b * 5 + it.h) * 3 + it.row0 / kFlashThreads)];
    }
    CHECK(std::all_of(seen.begin(), seen.end(), [](int n) { return n == 1; }));
  }
  CHECK(flashItem(g, 0, true).row0 == 128);  // forward and dQ start with the last rows (most keys)
  CHECK(flashItem(g, 0, false).row0 == 0);   // dK and dV with the first keys (most queries)
}

TEST_CASE("flash attention emulated thread by thread gives the CPU layer's output and all gradients") {
  // T not a multiple of the 64-row tiles, T = 1, exactly one tile, hs 64 and 128, hs padded (8 -> 16, 48 -> 64,
  // 20 -> 32), several heads, batch > 1.
  for (const Shape4 s : {Shape4{2, 70, 16, 2}, Shape4{1, 1, 8, 2}, Shape4{3, 130, 128, 2}, Shape4{1, 64, 64, 1},
                         Shape4{2, 45, 256, 2}, Shape4{2, 65, 96, 2}, Shape4{2, 33, 80, 4}}) {
    CAPTURE(s.batch);
    CAPTURE(s.t);
    CAPTURE(s.c);
    CAPTURE(s.heads);
    const nn::LayerSpec spec = parseLayer(
        "{\"type\": \"causal_self_attention\", \"n_head\": " + std::to_string(s.heads) + "}", {s.t, s.c});
    auto cpu = nn::makeLayer(spec, {.device = Device::cpu(), .maxBatch = static_cast<int>(s.batch), .seed = 3});
    std::vector<float> params(static_cast<size_t>(spec.paramCount())), grads(params.size());
    cpu->bind(params.data(), grads.data());
    nn::InitRng init(17);
    cpu->initParams(init);
    // Larger weights than the default init, so the softmax is far from uniform (the online rescaling matters).
    for (float& p : params) p *= 3.0f;
    const size_t n = static_cast<size_t>(s.batch * s.t * s.c);
    const std::vector<float> x = randomVector(n, 41, -2, 2), dy = randomVector(n, 42);
    std::vector<float> y(n), dx(n);
    cpu->forward(x.data(), y.data(), static_cast<int>(s.batch), true);
    cpu->backward(x.data(), y.data(), dy.data(), dx.data(), static_cast<int>(s.batch), false);
    const LayerResult e = emulateLayer(s, params, x, dy);
    const double wy = worst(y, e.y), wdx = worst(dx, e.dx), wg = worst(grads, e.grads);
    MESSAGE("worst relative difference: y " << wy << ", dx " << wdx << ", grads " << wg);
    // Measured against a double-precision layer at these shapes, the CPU layer and the emulated kernels are each
    // up to about 2e-5 (y), 4e-5 (dx) and 1.2e-4 (gradients) off (tripled weights: peaked softmax, large
    // values); the bounds are about three times the worst difference seen between the two.
    CHECK(wy < 5e-5);
    CHECK(wdx < 1e-4);
    CHECK(wg < 5e-4);
    // Every element the kernels own was written (nothing left NaN), and L is the rows' log-sum-exp in base 2.
    for (const auto* v : {&e.core.att, &e.core.lse, &e.core.dsum, &e.core.dqkv})
      CHECK(std::none_of(v->begin(), v->end(), [](float f) { return std::isnan(f); }));
    std::vector<float> qkv(static_cast<size_t>(s.batch * s.t * 3 * s.c));
    for (int64_t r = 0; r < s.batch * s.t; ++r)
      for (int64_t o = 0; o < 3 * s.c; ++o) {
        double acc = params[static_cast<size_t>(3 * s.c * s.c + o)];
        for (int64_t i = 0; i < s.c; ++i)
          acc += double(x[static_cast<size_t>(r * s.c + i)]) * params[static_cast<size_t>(o * s.c + i)];
        qkv[static_cast<size_t>(r * 3 * s.c + o)] = static_cast<float>(acc);
      }
    CHECK(worst(e.core.lse, referenceLse(flashGeometry(s.batch, s.t, s.heads, s.c / s.heads), qkv)) < 1e-5);
  }
}

TEST_CASE("flash attention at the gpu tests' layer parity shapes stays within their tolerances") {
  // checkLayer (gpu_parity.h): the default init plus noise in [-0.3, 0.3], x in [-2, 2], batch 3, layers built with
  // seed 7 (attention dropout's first draw); out and dx within 1e-5, parameter gradients within 1e-4 (relative
  // above 1). The `gpu` tests run the fused kernels there: test_gpu_nn's two attention entries and
  // test_gpu_spatial.cpp's two attention-dropout entries.
  struct Case {
    Shape4 s;
    double p;
  };
  for (const Case k : {Case{{3, 5, 8, 2}, 0.0}, Case{{3, 300, 16, 4}, 0.0}, Case{{3, 5, 8, 2}, 0.2},
                       Case{{3, 40, 16, 4}, 0.5}}) {
    const Shape4 s = k.s;
    CAPTURE(s.t);
    CAPTURE(k.p);
    const nn::LayerSpec spec = parseLayer("{\"type\": \"causal_self_attention\", \"n_head\": " +
                                              std::to_string(s.heads) + ", \"dropout\": " + std::to_string(k.p) + "}",
                                          {s.t, s.c});
    auto cpu = nn::makeLayer(spec, {.device = Device::cpu(), .maxBatch = 3, .seed = 7});
    std::vector<float> params(static_cast<size_t>(spec.paramCount())), grads(params.size());
    cpu->bind(params.data(), grads.data());
    nn::InitRng init(11);
    cpu->initParams(init);
    const auto noise = randomVector(params.size(), 5, -0.3f, 0.3f);
    for (size_t i = 0; i < params.size(); ++i) params[i] += noise[i];
    const size_t n = static_cast<size_t>(s.batch * s.t * s.c);
    const std::vector<float> x = randomVector(n, 9, -2, 2), dy = randomVector(n, 13);
    std::vector<float> y(n), dx(n);
    cpu->forward(x.data(), y.data(), 3, true);
    cpu->backward(x.data(), y.data(), dy.data(), dx.data(), 3, false);
    nn::detail::DropoutStream stream(std::nullopt, spec.index);
    stream.reseed(7, 0);
    const DropoutDraw draw = stream.next(static_cast<uint64_t>(s.batch * s.heads * s.t * s.t), k.p,
                                         1.0f / static_cast<float>(1.0 - k.p));
    const LayerResult e = emulateLayer(s, params, x, dy, {}, k.p > 0 ? &draw : nullptr);
    MESSAGE("worst relative difference: y " << worst(y, e.y) << ", dx " << worst(dx, e.dx) << ", grads "
                                            << worst(grads, e.grads));
    CHECK(worst(y, e.y) < 1e-5);
    CHECK(worst(dx, e.dx) < 1e-5);
    CHECK(worst(grads, e.grads) < 1e-4);
  }
}

TEST_CASE("flash attention with attention dropout drops what the CPU layer drops: output and all gradients") {
  // The CUDA layer takes one draw per training forward from its DropoutStream (the CPU layer's), here reseeded
  // alike; a second forward between reseeds draws the next elements. Shapes: hs 8 (T 70, two tiles), hs 64
  // (T 130), hs 128 (T 45, 32-row tiles), T = 1; H T T odd or not, so samples start anywhere in a Philox block.
  for (const Shape4 s : {Shape4{2, 70, 16, 2}, Shape4{2, 130, 128, 2}, Shape4{2, 45, 256, 2}, Shape4{3, 1, 8, 2},
                         Shape4{3, 37, 12, 3}}) {
    for (const double p : {0.3, 0.9}) {
      CAPTURE(s.t);
      CAPTURE(s.c);
      CAPTURE(p);
      const nn::LayerSpec spec = parseLayer("{\"type\": \"causal_self_attention\", \"n_head\": " +
                                                std::to_string(s.heads) + ", \"dropout\": " + std::to_string(p) + "}",
                                            {s.t, s.c});
      auto cpu = nn::makeLayer(spec, {.device = Device::cpu(), .maxBatch = static_cast<int>(s.batch), .seed = 3});
      std::vector<float> params(static_cast<size_t>(spec.paramCount())), grads(params.size());
      cpu->bind(params.data(), grads.data());
      nn::InitRng init(17);
      cpu->initParams(init);
      for (float& w : params) w *= 3.0f;
      const size_t n = static_cast<size_t>(s.batch * s.t * s.c);
      const std::vector<float> x = randomVector(n, 51, -2, 2), dy = randomVector(n, 52);
      cpu->reseed(40, 0);
      nn::detail::DropoutStream stream(std::nullopt, spec.index);
      stream.reseed(40, 0);
      const float keep = 1.0f / static_cast<float>(1.0 - p);  // the layers' rounding
      for (int forward = 0; forward < 2; ++forward) {
        CAPTURE(forward);
        std::vector<float> y(n), dx(n);
        cpu->forward(x.data(), y.data(), static_cast<int>(s.batch), true);
        cpu->backward(x.data(), y.data(), dy.data(), dx.data(), static_cast<int>(s.batch), false);
        const DropoutDraw draw = stream.next(static_cast<uint64_t>(s.batch * s.heads * s.t * s.t), p, keep);
        const LayerResult e = emulateLayer(s, params, x, dy, {}, &draw);
        MESSAGE("worst relative difference: y " << worst(y, e.y) << ", dx " << worst(dx, e.dx) << ", grads "
                                                << worst(grads, e.grads));
        // The bounds without dropout, times 1 / (1 - p): the kept probabilities (and their rounding) are scaled.
        CHECK(worst(y, e.y) < 5e-5 * keep);
        CHECK(worst(dx, e.dx) < 1e-4 * keep);
        CHECK(worst(grads, e.grads) < 5e-4 * keep);
        for (const auto* v : {&e.core.att, &e.core.lse, &e.core.dsum, &e.core.dqkv})
          CHECK(std::none_of(v->begin(), v->end(), [](float f) { return std::isnan(f); }));
        // The check can tell: another draw (the stream's next one) gives another output (T > 1: row 0 alone
        // attends only to itself, and a sample of T = 1 may keep the same elements).
        if (s.t > 1) {
          const DropoutDraw other{.key = draw.key, .offset = draw.offset + 4096, .threshold = draw.threshold,
                                  .scale = draw.scale};
          CHECK(worst(y, emulateLayer(s, params, x, dy, {}, &other).y) > 1e-3);
        }
      }
    }
  }
}

TEST_CASE("flash attention's backward is deterministic: the same bits twice, whatever the grid and block order") {
  const Shape4 s{3, 150, 64, 4};
  const nn::LayerSpec spec = parseLayer(R"({"type": "causal_self_attention", "n_head": 4})", {s.t, s.c});
  std::vector<float> params = randomVector(static_cast<size_t>(spec.paramCount()), 5, -0.4f, 0.4f);
  const size_t n = static_cast<size_t>(s.batch * s.t * s.c);
  const std::vector<float> x = randomVector(n, 6), dy = randomVector(n, 7);
  const LayerResult first = emulateLayer(s, params, x, dy);
  const LayerResult again = emulateLayer(s, params, x, dy);
  CHECK(again.core.att == first.core.att);
  CHECK(again.core.dqkv == first.core.dqkv);
  // A grid smaller than the items (blocks loop over several) and blocks run in reverse: each output element is
  // one thread's fixed-order sum, so the bits do not move.
  for (const Launch launch : {Launch{5, false}, Launch{1, false}, Launch{0, true}, Launch{7, true}}) {
    CAPTURE(launch.grid);
    CAPTURE(launch.reversed);
    const LayerResult other = emulateLayer(s, params, x, dy, launch);
    CHECK(other.core.att == first.core.att);
    CHECK(other.core.lse == first.core.lse);
    CHECK(other.core.dsum == first.core.dsum);
    CHECK(other.core.dqkv == first.core.dqkv);
  }
  // With attention dropout too (each element's fate is a function of its counter, not of who computes it).
  const DropoutDraw draw{.key = 99, .offset = 8, .threshold = dropoutThreshold(0.25), .scale = 1.0f / 0.75f};
  const LayerResult dropped = emulateLayer(s, params, x, dy, {}, &draw);
  CHECK(dropped.core.att != first.core.att);
  for (const Launch launch : {Launch{3, true}, Launch{1, false}}) {
    const LayerResult other = emulateLayer(s, params, x, dy, launch, &draw);
    CHECK(other.core.att == dropped.core.att);
    CHECK(other.core.dqkv == dropped.core.dqkv);
  }
}
