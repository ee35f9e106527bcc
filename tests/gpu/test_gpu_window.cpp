// conv2d and maxpool2d on the GPU, emulated on the CPU (no GPU needed): every thread of the kernels_spatial.cu
// kernels' launch grids runs in a loop through the kernels' own bodies (lib/gpu/window_kernels.h, on
// window_index.h's index maps), and every GEMM of the CUDA conv2d (lib/nn/cuda/layers_spatial.cpp) runs through the
// column-major reference on the layer's own arguments (window_kernels.h's conv*Gemm), mapped as blas.cpp gives
// them to cuBLAS. The results must equal the CPU layers' (layers_spatial.cpp): forward, input gradient, weight and bias
// gradients (within float rounding: the GEMMs sum in another order), and maxpool2d bit for bit (ties, NaN, -inf).
// Also the dropout layers' masks as the CUDA kernels compute them (every thread of the grid through
// lib/gpu/philox.h's dropoutQuad, with the draws the layers take from their DropoutStream) against the CPU layers'
// outputs and gradients. What this cannot show is the device itself: launches, memory, cuBLAS's handling of the arguments.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <bit>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "lib/gpu/gemm_args.h"
#include "lib/gpu/philox.h"
#include "lib/gpu/window_index.h"
#include "lib/gpu/window_kernels.h"
#include "lib/nn/dropout_mask.h"
#include "lib/nn/layer.h"
#include "lib/nn/spec.h"
#include "tests/gpu/gemm_reference.h"
#include "tests/gpu/host_values.h"

using namespace dtrain;
using namespace dtrain::gpu;
using namespace dtrain::gputest;
using nlohmann::json;

namespace {

// What lib/nn/cuda/layers_spatial.cpp's windowOf gives the kernels.
Window2d windowOf(const nn::LayerSpec& s) {
  return {.c = s.input[0], .h = s.input[1], .w = s.input[2], .kh = s.kernelH, .kw = s.kernelW, .sh = s.strideH,
          .sw = s.strideW, .ph = s.padH, .pw = s.padW, .oh = s.output[1], .ow = s.output[2]};
}

// gpu::gemm / gemmBatched as cuBLAS computes them from blas.cpp's arguments (the leading dimensions checked first,
// as blas.cpp does).
void gemm(const RowMajorGemm& g, float alpha, const float* a, const float* b, float beta, float* c) {
  REQUIRE(badLeadingDimension(g) == nullptr);
  referenceColumnMajor(toColumnMajor(g), alpha, b, a, beta, c);
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

  // The CUDA layer's forward: im2colKernel (every thread of its grid), one strided batched GEMM on the layer's
  // arguments (window_kernels.h), addChannelBiasKernel.
  const float* w = params.data();
  std::vector<float> cols(static_cast<size_t>(batch * k * p), std::numeric_limits<float>::quiet_NaN());
  gridStride(cols.size(), [&](size_t e) {
    REQUIRE(im2colSource(g, static_cast<int64_t>(e)) < static_cast<int64_t>(nx));
    cols[e] = im2colElement(g, x.data(), static_cast<int64_t>(e));
  });
  std::vector<float> gy(ny, 0.0f);
  gemm(convForwardGemm(g, out, batch), 1.0f, w, cols.data(), 0.0f, gy.data());
  if (spec.bias)
    gridStride(ny, [&](size_t e) {
      gy[e] += params[nw + static_cast<size_t>(channelOf(static_cast<int64_t>(e), out, p))];
    });
  CHECK(maxDiff(y, gy) < 1e-5);

  // Backward: dW sample by sample, the bias gradient, dcols = W^T dY (batched) and col2im as a gather.
  std::vector<float> gw(nw, 0.0f), gb(static_cast<size_t>(out), 0.0f);
  for (int n = 0; n < batch; ++n)
    gemm(convWeightGradGemm(g, out), 1.0f, dy.data() + n * out * p, cols.data() + n * k * p, n > 0 ? 1.0f : 0.0f,
         gw.data());
  CHECK(maxDiff(std::vector<float>(grads.begin(), grads.begin() + static_cast<int64_t>(nw)), gw) < 1e-5);
  if (spec.bias) {
    for (int64_t ch = 0; ch < out; ++ch)
      for (int64_t e = 0; e < batch * p; ++e)
        gb[static_cast<size_t>(ch)] += dy[static_cast<size_t>(((e / p) * out + ch) * p + e % p)];
    CHECK(maxDiff(std::vector<float>(grads.begin() + static_cast<int64_t>(nw), grads.end()), gb) < 1e-5);
  }
  std::vector<float> dcols(cols.size(), 0.0f);
  gemm(convColsGradGemm(g, out, batch), 1.0f, w, dy.data(), 0.0f, dcols.data());
  std::vector<float> gdx(nx, std::numeric_limits<float>::quiet_NaN());
  gridStride(nx, [&](size_t e) {  // col2imKernel
    col2imSources(g, static_cast<int64_t>(e), [&](int64_t c) {
      REQUIRE(c >= 0);
      REQUIRE(c < static_cast<int64_t>(dcols.size()));
      CHECK(im2colSource(g, c) == static_cast<int64_t>(e));  // the adjoint: exactly the entries im2col read from e
    });
    gdx[e] = col2imElement(g, dcols.data(), static_cast<int64_t>(e));
  });
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
  // maxPoolForwardKernel, every thread of its grid (one per output).
  std::vector<float> gy(ny, -7.0f);
  std::vector<int32_t> argmax(ny, -1);
  gridStride(ny, [&](size_t e) {
    const PoolWindow win = poolWindow(g, static_cast<int64_t>(e));
    REQUIRE(win.y0 < win.y1);
    REQUIRE(win.x0 < win.x1);
    maxPoolForwardElement(g, x.data(), static_cast<int64_t>(e), gy.data(), argmax.data());
  });
  for (size_t i = 0; i < ny; ++i) {
    CAPTURE(i);
    CHECK((std::isnan(y[i]) ? std::isnan(gy[i]) : y[i] == gy[i]));
  }
  // maxPoolBackwardKernel, every thread of its grid (one per input element): the CPU's scatter, bit for bit.
  const int64_t planeSize = g.h * g.w, positions = g.oh * g.ow;
  std::vector<float> gdx(nx, std::numeric_limits<float>::quiet_NaN());
  gridStride(nx, [&](size_t e) {
    int64_t last = -1;
    poolOutputsOver(g, static_cast<int64_t>(e), [&](int64_t o) {
      CHECK(o > last);  // increasing: the CPU's order
      last = o;
    });
    gdx[e] = maxPoolBackwardElement(g, dy.data(), argmax.data(), static_cast<int64_t>(e));
  });
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

namespace {

// The CPU attention layer's forward with dropout, written out naively with a given mask (what the CUDA layer does
// with the mask it copies to the device): qkv = x Wattn^T + b, P = softmax(q k^T / sqrt(hs)) over j <= i,
// y_h = (P x mask) v, out = concat_h(y_h) Wproj^T + b. Parameters in the layer's arena order.
std::vector<float> attentionWithMask(const std::vector<float>& params, const std::vector<float>& x,
                                     const std::vector<float>& mask, int64_t batch, int64_t t, int64_t c,
                                     int64_t heads) {
  const int64_t hs = c / heads, rows = batch * t;
  const float* wAttn = params.data();
  const float* bAttn = wAttn + 3 * c * c;
  const float* wProj = bAttn + 3 * c;
  const float* bProj = wProj + c * c;
  std::vector<double> qkv(static_cast<size_t>(rows * 3 * c)), att(static_cast<size_t>(rows * c), 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < 3 * c; ++o) {
      double acc = bAttn[o];
      for (int64_t i = 0; i < c; ++i) acc += double(x[static_cast<size_t>(r * c + i)]) * wAttn[o * c + i];
      qkv[static_cast<size_t>(r * 3 * c + o)] = acc;
    }
  const double scale = 1.0 / std::sqrt(static_cast<double>(hs));
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < t; ++i) {
        auto at = [&](int64_t row, int64_t part, int64_t d) {
          return qkv[static_cast<size_t>((b * t + row) * 3 * c + part * c + h * hs + d)];
        };
        std::vector<double> p(static_cast<size_t>(i + 1));
        double m = -1e300, total = 0;
        for (int64_t j = 0; j <= i; ++j) {
          double s = 0;
          for (int64_t d = 0; d < hs; ++d) s += at(i, 0, d) * at(j, 1, d);
          p[static_cast<size_t>(j)] = s;
          m = std::max(m, s);
        }
        for (double& v : p) total += v = std::exp((v - m) * scale);
        for (int64_t j = 0; j <= i; ++j) {
          const double keep = mask[static_cast<size_t>(((b * heads + h) * t + i) * t + j)];
          const double dropped = p[static_cast<size_t>(j)] / total * keep;
          for (int64_t d = 0; d < hs; ++d)
            att[static_cast<size_t>((b * t + i) * c + h * hs + d)] += dropped * at(j, 2, d);
        }
      }
  std::vector<float> y(static_cast<size_t>(rows * c));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < c; ++o) {
      double acc = bProj[o];
      for (int64_t i = 0; i < c; ++i) acc += att[static_cast<size_t>(r * c + i)] * wProj[o * c + i];
      y[static_cast<size_t>(r * c + o)] = static_cast<float>(acc);
    }
  return y;
}

}  // namespace

namespace {

// Every thread of a dropout kernel's grid over elements [first, first + n) of `draw` (kernels_spatial.cu dropout,
// kernels_attention.cu dropoutSelect).
std::vector<float> dropoutKernel(const gpu::DropoutDraw& draw, gpu::DropoutForm form, uint64_t first,
                                 const std::vector<float>& in) {
  std::vector<float> out(in.size(), -7.0f);
  gridStride(gpu::dropoutQuads(first, in.size()),  // one thread per Philox block of 4 elements
             [&](size_t q) { gpu::dropoutQuad(draw, form, first, q, in.data(), out.data(), in.size()); });
  return out;
}

bool sameBits(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (std::bit_cast<uint32_t>(a[i]) != std::bit_cast<uint32_t>(b[i])) return false;
  return true;
}

}  // namespace

TEST_CASE("the CUDA dropout kernels compute the CPU layers' masks (dropout, attention dropout)") {
  // The dropout layer: y = x * mask and dx = dy * mask bit for bit, over reseeds, a pinned seed, several forwards
  // between reseeds, p = 1. The CUDA layer's calls: stream.next(batch * numel, p, scale) per training forward, the
  // kernel on x, then on dy with the same draw.
  for (const char* layer : {R"({"type": "dropout", "p": 0.3})", R"({"type": "dropout", "p": 0.5, "seed": 3})",
                            R"({"type": "dropout", "p": 1})"}) {
    CAPTURE(layer);
    const nn::LayerSpec drop = parseLayer(layer, {50});
    auto cpu = nn::makeLayer(drop, {.device = Device::cpu(), .maxBatch = 3, .seed = 17});
    nn::detail::DropoutStream stream(drop.seed, drop.index);
    stream.reseed(17, 0);
    const float scale = drop.p >= 1.0 ? 0.0f : static_cast<float>(1.0 / (1.0 - drop.p));
    for (int step = 0; step < 4; ++step) {
      CAPTURE(step);
      if (step == 2) {  // a pinned stream ignores it
        cpu->reseed(5, 0);
        stream.reseed(5, 0);
      }
      const int batch = step == 1 ? 2 : 3;  // 2 x 50 = 100 elements, 3 x 50 = 150 (not a whole block)
      std::vector<float> x = randomVector(static_cast<size_t>(batch) * 50, 5 + static_cast<uint32_t>(step));
      x[0] = -1.0f;  // a dropped negative value is -0 in both
      const std::vector<float> dy = randomVector(x.size(), 6);
      std::vector<float> y(x.size()), dx(x.size());
      cpu->forward(x.data(), y.data(), batch, true);
      cpu->backward(x.data(), y.data(), dy.data(), dx.data(), batch, false);
      const gpu::DropoutDraw draw = stream.next(x.size(), drop.p, scale);
      CHECK(sameBits(y, dropoutKernel(draw, gpu::DropoutForm::kMultiply, 0, x)));
      CHECK(sameBits(dx, dropoutKernel(draw, gpu::DropoutForm::kMultiply, 0, dy)));
      if (drop.p < 1.0) {
        CHECK(std::count(y.begin(), y.end(), 0.0f) > static_cast<std::ptrdiff_t>(x.size() / 5));
        // The check can tell: the stream's next draw (on a copy) is another mask.
        nn::detail::DropoutStream ahead = stream;
        CHECK_FALSE(sameBits(y, dropoutKernel(ahead.next(x.size(), drop.p, scale), gpu::DropoutForm::kMultiply, 0, x)));
      } else {
        CHECK(y == std::vector<float>(x.size(), 0.0f));  // x * 0 (finite x)
      }
    }
  }

  // Attention dropout: the CPU layer's output equals attention computed with the mask the kernel gives each
  // sample's square (launched per sample, first element b H T T).
  const int64_t batch = 2, t = 5, c = 8, heads = 2;
  const nn::LayerSpec attn = parseLayer(R"({"type": "causal_self_attention", "n_head": 2, "dropout": 0.3})", {t, c});
  auto cpuAttn = nn::makeLayer(attn, {.device = Device::cpu(), .maxBatch = 2, .seed = 23});
  std::vector<float> params(static_cast<size_t>(attn.paramCount())), grads(params.size());
  cpuAttn->bind(params.data(), grads.data());
  nn::InitRng init(3);
  cpuAttn->initParams(init);
  std::vector<float> ax = randomVector(static_cast<size_t>(batch * t * c), 6), ay(ax.size());
  cpuAttn->forward(ax.data(), ay.data(), static_cast<int>(batch), true);
  nn::detail::DropoutStream stream(std::nullopt, attn.index);
  stream.reseed(23, 0);
  const size_t square = static_cast<size_t>(heads * t * t);
  auto maskOf = [&](const gpu::DropoutDraw& draw) {
    std::vector<float> mask;
    for (size_t b = 0; b < static_cast<size_t>(batch); ++b) {
      const std::vector<float> one = dropoutKernel(draw, gpu::DropoutForm::kSelect, b * square,
                                                   std::vector<float>(square, 1.0f));
      mask.insert(mask.end(), one.begin(), one.end());
    }
    return mask;
  };
  const gpu::DropoutDraw draw = stream.next(static_cast<uint64_t>(batch) * square, 0.3,
                                            1.0f / static_cast<float>(1.0 - 0.3));
  CHECK(maxDiff(ay, attentionWithMask(params, ax, maskOf(draw), batch, t, c, heads)) < 1e-5);
  // The check can tell: another key's mask gives another output.
  gpu::DropoutDraw other = draw;
  other.key = nn::detail::mixSeed(24, static_cast<uint64_t>(attn.index));
  CHECK(maxDiff(ay, attentionWithMask(params, ax, maskOf(other), batch, t, c, heads)) > 1e-3);
}
