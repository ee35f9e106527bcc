// conv2d and maxpool2d on the GPU, emulated on the CPU (no GPU needed): every thread of the kernels_spatial.cu
// kernels runs in a loop through the same index maps (lib/gpu/window_index.h), and every GEMM of the CUDA conv2d
// (lib/nn/cuda/layers_spatial.cpp) runs through the column-major reference on the arguments blas.cpp would give
// cuBLAS. The results must equal the CPU layers' (layers_spatial.cpp): forward, input gradient, weight and bias
// gradients (within float rounding: the GEMMs sum in another order), and maxpool2d bit for bit (ties, NaN, -inf).
// What this cannot show is the device itself: launches, memory, cuBLAS's handling of the arguments.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "lib/gpu/gemm_args.h"
#include "lib/gpu/window_index.h"
#include "lib/nn/layer.h"
#include "lib/nn/spec.h"
#include "tests/gpu/gemm_reference.h"

using namespace dtrain;
using namespace dtrain::gpu;
using nlohmann::json;

namespace {

nn::LayerSpec parseLayer(const std::string& layer, const std::vector<int64_t>& input) {
  return nn::parseModelSpec(json{{"input", input}, {"layers", json::array({json::parse(layer)})}}, "", "/model")
      .layers[0];
}

// What lib/nn/cuda/layers_spatial.cpp's windowOf gives the kernels.
Window2d windowOf(const nn::LayerSpec& s) {
  return {.c = s.input[0], .h = s.input[1], .w = s.input[2], .kh = s.kernelH, .kw = s.kernelW, .sh = s.strideH,
          .sw = s.strideW, .ph = s.padH, .pw = s.padW, .oh = s.output[1], .ow = s.output[2]};
}

std::vector<float> randomVector(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1, 1);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng);
  return v;
}

// gpu::gemm / gemmBatched as cuBLAS computes them from blas.cpp's arguments (the leading dimensions checked first,
// as blas.cpp does).
void gemm(const RowMajorGemm& g, float alpha, const float* a, const float* b, float beta, float* c) {
  REQUIRE(badLeadingDimension(g) == nullptr);
  referenceColumnMajor(toColumnMajor(g), alpha, b, a, beta, c);
}

double maxDiff(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i)
    worst = std::max(worst, std::fabs(double(a[i]) - double(b[i])) / std::max(1.0, std::fabs(double(a[i]))));
  return worst;
}

void checkConv(const std::string& layer, const std::vector<int64_t>& input) {
  CAPTURE(layer);
  const int batch = 3;
  const nn::LayerSpec spec = parseLayer(layer, input);
  const Window2d g = windowOf(spec);
  const int64_t out = spec.out, k = g.c * g.kh * g.kw, p = g.oh * g.ow;
  // The CPU layer.
  auto cpu = nn::makeLayer(spec, {.device = Device::cpu(), .maxBatch = batch});
  const size_t nw = static_cast<size_t>(out * k), count = nw + (spec.bias ? static_cast<size_t>(out) : 0);
  std::vector<float> params = randomVector(count, 1), grads(count, 0.0f);
  cpu->bind(params.data(), grads.data());
  const size_t nx = static_cast<size_t>(batch * g.c * g.h * g.w), ny = static_cast<size_t>(batch * out * p);
  std::vector<float> x = randomVector(nx, 2), dy = randomVector(ny, 3), y(ny), dx(nx);
  cpu->forward(x.data(), y.data(), batch, true);
  cpu->backward(x.data(), y.data(), dy.data(), dx.data(), batch, false);

  // The CUDA layer's forward: im2col (one "thread" per cols element), one strided batched GEMM, the channel bias.
  const float* w = params.data();
  std::vector<float> cols(static_cast<size_t>(batch * k * p));
  for (size_t e = 0; e < cols.size(); ++e) {
    const int64_t from = im2colSource(g, static_cast<int64_t>(e));
    REQUIRE(from < static_cast<int64_t>(nx));
    cols[e] = from >= 0 ? x[static_cast<size_t>(from)] : 0.0f;
  }
  std::vector<float> gy(ny, 0.0f);
  gemm({.m = out, .n = p, .k = k, .lda = k, .ldb = p, .ldc = p, .strideA = 0, .strideB = k * p, .strideC = out * p,
        .batch = batch},
       1.0f, w, cols.data(), 0.0f, gy.data());
  if (spec.bias)
    for (size_t e = 0; e < ny; ++e) gy[e] += params[nw + static_cast<size_t>((static_cast<int64_t>(e) / p) % out)];
  CHECK(maxDiff(y, gy) < 1e-5);

  // Backward: dW sample by sample, the bias gradient, dcols = W^T dY (batched) and col2im as a gather.
  std::vector<float> gw(nw, 0.0f), gb(static_cast<size_t>(out), 0.0f);
  for (int n = 0; n < batch; ++n)
    gemm({.transB = true, .m = out, .n = k, .k = p, .lda = p, .ldb = p, .ldc = k}, 1.0f, dy.data() + n * out * p,
         cols.data() + n * k * p, n > 0 ? 1.0f : 0.0f, gw.data());
  CHECK(maxDiff(std::vector<float>(grads.begin(), grads.begin() + static_cast<int64_t>(nw)), gw) < 1e-5);
  if (spec.bias) {
    for (int64_t ch = 0; ch < out; ++ch)
      for (int64_t e = 0; e < batch * p; ++e) gb[static_cast<size_t>(ch)] += dy[static_cast<size_t>(((e / p) * out + ch) * p + e % p)];
    CHECK(maxDiff(std::vector<float>(grads.begin() + static_cast<int64_t>(nw), grads.end()), gb) < 1e-5);
  }
  std::vector<float> dcols(cols.size(), 0.0f);
  gemm({.transA = true, .m = k, .n = p, .k = out, .lda = k, .ldb = p, .ldc = p, .strideA = 0, .strideB = out * p,
        .strideC = k * p, .batch = batch},
       1.0f, w, dy.data(), 0.0f, dcols.data());
  std::vector<float> gdx(nx);
  for (size_t e = 0; e < nx; ++e) {
    float sum = 0.0f;
    col2imSources(g, static_cast<int64_t>(e), [&](int64_t c) {
      REQUIRE(c >= 0);
      REQUIRE(c < static_cast<int64_t>(dcols.size()));
      CHECK(im2colSource(g, c) == static_cast<int64_t>(e));  // the adjoint: exactly the entries im2col read from e
      sum += dcols[static_cast<size_t>(c)];
    });
    gdx[e] = sum;
  }
  CHECK(maxDiff(dx, gdx) < 1e-5);
  // Every cols entry that reads an input is visited by exactly one col2im gather.
  int64_t reads = 0, visits = 0;
  for (size_t e = 0; e < cols.size(); ++e) reads += im2colSource(g, static_cast<int64_t>(e)) >= 0 ? 1 : 0;
  for (size_t e = 0; e < nx; ++e) col2imSources(g, static_cast<int64_t>(e), [&](int64_t) { ++visits; });
  CHECK(reads == visits);
}

void checkPool(const std::string& layer, const std::vector<int64_t>& input, std::vector<float> x) {
  CAPTURE(layer);
  const int batch = 2;
  const nn::LayerSpec spec = parseLayer(layer, input);
  const Window2d g = windowOf(spec);
  auto cpu = nn::makeLayer(spec, {.device = Device::cpu(), .maxBatch = batch});
  const size_t nx = static_cast<size_t>(batch * g.c * g.h * g.w), ny = static_cast<size_t>(batch * g.c * g.oh * g.ow);
  REQUIRE(x.size() == nx);
  std::vector<float> dy = randomVector(ny, 4), y(ny), dx(nx);
  cpu->forward(x.data(), y.data(), batch, true);
  cpu->backward(x.data(), y.data(), dy.data(), dx.data(), batch, false);
  // maxPoolForwardKernel, one "thread" per output.
  std::vector<float> gy(ny);
  std::vector<int32_t> argmax(ny);
  for (size_t e = 0; e < ny; ++e) {
    const PoolWindow win = poolWindow(g, static_cast<int64_t>(e));
    REQUIRE(win.y0 < win.y1);
    REQUIRE(win.x0 < win.x1);
    argmax[e] = static_cast<int32_t>(poolArgmax(g, x.data() + win.plane * g.h * g.w, win, &gy[e]));
  }
  for (size_t i = 0; i < ny; ++i) {
    CAPTURE(i);
    CHECK((std::isnan(y[i]) ? std::isnan(gy[i]) : y[i] == gy[i]));
  }
  // maxPoolBackwardKernel, one "thread" per input element: the CPU's scatter, bit for bit.
  const int64_t planeSize = g.h * g.w, positions = g.oh * g.ow;
  std::vector<float> gdx(nx);
  for (size_t e = 0; e < nx; ++e) {
    const int64_t plane = static_cast<int64_t>(e) / planeSize, s = static_cast<int64_t>(e) % planeSize;
    float sum = 0.0f;
    int64_t last = -1;
    poolOutputsOver(g, static_cast<int64_t>(e), [&](int64_t o) {
      CHECK(o > last);  // increasing: the CPU's order
      last = o;
      if (argmax[static_cast<size_t>(plane * positions + o)] == s) sum += dy[static_cast<size_t>(plane * positions + o)];
    });
    gdx[e] = sum;
  }
  CHECK(gdx == dx);
  // Each output's argmax is visited by exactly its input's gather: nothing lost, nothing twice.
  std::vector<int> hits(ny, 0);
  for (size_t e = 0; e < nx; ++e) {
    const int64_t plane = static_cast<int64_t>(e) / planeSize, s = static_cast<int64_t>(e) % planeSize;
    poolOutputsOver(g, static_cast<int64_t>(e), [&](int64_t o) {
      if (argmax[static_cast<size_t>(plane * positions + o)] == s) ++hits[static_cast<size_t>(plane * positions + o)];
    });
  }
  CHECK(std::all_of(hits.begin(), hits.end(), [](int h) { return h == 1; }));
}

}  // namespace

TEST_CASE("emulated CUDA conv2d (im2col, GEMM arguments, col2im gather) equals the CPU layer") {
  checkConv(R"({"type": "conv2d", "out": 2, "kernel": [3, 2], "padding": 1})", {2, 5, 4});
  checkConv(R"({"type": "conv2d", "out": 4, "kernel": 3})", {1, 8, 8});
  checkConv(R"({"type": "conv2d", "out": 3, "kernel": [3, 3], "stride": [2, 1], "padding": [1, 2]})", {3, 9, 7});
  checkConv(R"({"type": "conv2d", "out": 5, "kernel": 2, "stride": 2, "bias": false})", {4, 6, 6});
  checkConv(R"({"type": "conv2d", "out": 2, "kernel": [2, 3], "stride": [3, 2], "padding": [2, 1]})", {2, 7, 9});
  checkConv(R"({"type": "conv2d", "out": 3, "kernel": 5, "stride": 1, "padding": 2})", {1, 4, 5});  // kernel > input
  checkConv(R"({"type": "conv2d", "out": 2, "kernel": 1})", {3, 1, 1});
}

TEST_CASE("emulated CUDA maxpool2d (argmax forward, gather backward) equals the CPU layer bit for bit") {
  auto random = [](size_t n) { return randomVector(n, 9); };
  checkPool(R"({"type": "maxpool2d", "kernel": 2})", {2, 4, 6}, random(2 * 2 * 4 * 6));
  checkPool(R"({"type": "maxpool2d", "kernel": 3, "stride": 1})", {3, 5, 5}, random(2 * 3 * 5 * 5));
  checkPool(R"({"type": "maxpool2d", "kernel": [3, 2], "stride": [2, 3], "padding": [1, 1]})", {2, 7, 8},
            random(2 * 2 * 7 * 8));
  checkPool(R"({"type": "maxpool2d", "kernel": 3, "stride": 2, "padding": 1})", {1, 6, 5}, random(2 * 6 * 5));
  // Ties (the first maximum wins), NaN (propagates), -inf, and overlapping windows.
  std::vector<float> x(32, 1.0f);
  for (int i = 16; i < 32; ++i) x[static_cast<size_t>(i)] = static_cast<float>(i % 3);
  x[21] = std::numeric_limits<float>::quiet_NaN();
  x[26] = -std::numeric_limits<float>::infinity();
  checkPool(R"({"type": "maxpool2d", "kernel": 2, "stride": 1, "padding": 1})", {1, 4, 4}, x);
  std::vector<float> allInf(2 * 9, -std::numeric_limits<float>::infinity());
  checkPool(R"({"type": "maxpool2d", "kernel": 2, "stride": 1})", {1, 3, 3}, allInf);
}
