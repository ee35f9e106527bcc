// The CUDA causal_self_attention's dropout and its backward order, emulated on the CPU (no GPU needed, as
// test_gpu_window.cpp does for conv2d/maxpool2d): attention computed the way the CUDA layer computes it, sample by
// sample, the mask applied by every thread of the dropout kernel's grid (lib/gpu/philox.h dropoutQuad, the kernel's
// own function) with the draw the layer takes from its DropoutStream, P recomputed in backward, gives the CPU
// layer's output and every gradient, also for a second forward between reseeds. What this cannot show: the device
// itself (launches, cuBLAS); test_gpu_nn does that with a GPU.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "lib/gpu/philox.h"
#include "lib/nn/dropout_mask.h"
#include "lib/nn/layer.h"
#include "lib/nn/spec.h"
#include "tests/gpu/host_values.h"

using namespace dtrain;
using nlohmann::json;
using dtrain::gputest::randomVector;

namespace {

double worstDiff(const std::vector<float>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i)
    worst = std::max(worst, std::fabs(double(a[i]) - b[i]) / std::max(1.0, std::fabs(b[i])));
  return worst;
}

struct Emulated {
  std::vector<double> y, dx, grads;
};

// The CUDA layer's forward and backward (lib/nn/cuda/layers_gpt.cpp CausalSelfAttention) in double, in its order,
// with its mask: per sample, P = causal softmax(q k^T * scale) for every head (into one sample's scratch; backward
// computes it again), the dropped P = the dropout kernel on P (elements b H T T + e of the draw); backward:
// dP = dOut v^T, dP = the kernel on dP, dS = P (dP - sum(P dP)) scale, then dv = (dropped P)^T dOut, dq = dS k,
// dk = dS^T q. Without dropout (draw == nullptr) the dropped P is P. Parameters in the arena's order.
Emulated emulate(const std::vector<float>& params, const std::vector<float>& x, const std::vector<float>& dy,
                 const gpu::DropoutDraw* draw, int64_t batch, int64_t t, int64_t c, int64_t heads) {
  const int64_t hs = c / heads, rows = batch * t, c3 = 3 * c;
  const float* wAttn = params.data();
  const float* bAttn = wAttn + 3 * c * c;
  const float* wProj = bAttn + 3 * c;
  const float* bProj = wProj + c * c;
  auto at = [](int64_t i) { return static_cast<size_t>(i); };
  std::vector<double> qkv(at(rows * c3)), att(at(rows * c), 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < c3; ++o) {
      double acc = bAttn[o];
      for (int64_t i = 0; i < c; ++i) acc += double(x[at(r * c + i)]) * wAttn[o * c + i];
      qkv[at(r * c3 + o)] = acc;
    }
  const double scale = 1.0 / std::sqrt(static_cast<double>(hs));
  const size_t square = at(heads * t * t);
  // One sample's probabilities [H, T, T]: what the CUDA layer's probabilities() writes into its scratch.
  auto probabilities = [&](int64_t b, std::vector<double>& p) {
    std::fill(p.begin(), p.end(), 0.0);
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < t; ++i) {
        double* row = p.data() + at((h * t + i) * t);
        double m = -1e300, total = 0;
        for (int64_t j = 0; j <= i; ++j) {
          double s = 0;
          for (int64_t d = 0; d < hs; ++d)
            s += qkv[at((b * t + i) * c3 + h * hs + d)] * qkv[at((b * t + j) * c3 + c + h * hs + d)];
          row[j] = s;
          m = std::max(m, s);
        }
        for (int64_t j = 0; j <= i; ++j) total += row[j] = std::exp((row[j] - m) * scale);
        for (int64_t j = 0; j <= i; ++j) row[j] /= total;
      }
  };
  // The factor the kernel applies to element e of sample b: every thread of the layer's launch for sample b
  // (first element b H T T, usually not on a Philox block) run over ones.
  std::vector<float> factors(at(batch) * square, 1.0f);
  if (draw != nullptr) {
    for (int64_t b = 0; b < batch; ++b) {
      float* f = factors.data() + at(b) * square;
      const uint64_t first = at(b) * square;
      for (uint64_t q = 0; q < gpu::dropoutQuads(first, square); ++q)
        gpu::dropoutQuad(*draw, gpu::DropoutForm::kSelect, first, q, f, f, square);
    }
  }
  auto factor = [&](int64_t b, size_t e) { return double(factors[at(b) * square + e]); };
  std::vector<double> p(square), dp(square);
  for (int64_t b = 0; b < batch; ++b) {
    probabilities(b, p);
    for (size_t e = 0; e < square; ++e) p[e] *= factor(b, e);
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < t; ++i)
        for (int64_t j = 0; j < t; ++j)
          for (int64_t d = 0; d < hs; ++d)
            att[at((b * t + i) * c + h * hs + d)] += p[at((h * t + i) * t + j)] * qkv[at((b * t + j) * c3 + 2 * c + h * hs + d)];
  }
  Emulated out;
  out.y.assign(at(rows * c), 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < c; ++o) {
      double acc = bProj[o];
      for (int64_t i = 0; i < c; ++i) acc += att[at(r * c + i)] * wProj[o * c + i];
      out.y[at(r * c + o)] = acc;
    }
  // Backward. Gradients in the arena's order: c_attn.weight, c_attn.bias, c_proj.weight, c_proj.bias.
  out.grads.assign(params.size(), 0.0);
  double* gwAttn = out.grads.data();
  double* gbAttn = gwAttn + 3 * c * c;
  double* gwProj = gbAttn + 3 * c;
  double* gbProj = gwProj + c * c;
  std::vector<double> datt(at(rows * c), 0.0), dqkv(at(rows * c3), 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < c; ++o) {
      const double g = dy[at(r * c + o)];
      gbProj[o] += g;
      for (int64_t i = 0; i < c; ++i) {
        gwProj[o * c + i] += g * att[at(r * c + i)];
        datt[at(r * c + i)] += g * wProj[o * c + i];
      }
    }
  for (int64_t b = 0; b < batch; ++b) {
    probabilities(b, p);  // recomputed, as the CUDA layer does
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < t; ++i) {
        double* dr = dp.data() + at((h * t + i) * t);
        const double* pr = p.data() + at((h * t + i) * t);
        for (int64_t j = 0; j < t; ++j) {
          double s = 0;
          for (int64_t d = 0; d < hs; ++d)
            s += datt[at((b * t + i) * c + h * hs + d)] * qkv[at((b * t + j) * c3 + 2 * c + h * hs + d)];
          dr[j] = s * factor(b, at((h * t + i) * t + j));
        }
        double dot = 0;
        for (int64_t j = 0; j <= i; ++j) dot += pr[j] * dr[j];
        for (int64_t j = 0; j < t; ++j) dr[j] = j <= i ? pr[j] * (dr[j] - dot) * scale : 0.0;
      }
    for (size_t e = 0; e < square; ++e) p[e] *= factor(b, e);  // the dropped P, for dv
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < t; ++i)
        for (int64_t j = 0; j < t; ++j) {
          const double pd = p[at((h * t + i) * t + j)], ds = dp[at((h * t + i) * t + j)];
          for (int64_t d = 0; d < hs; ++d) {
            const int64_t qi = (b * t + i) * c3 + h * hs + d, kj = (b * t + j) * c3 + c + h * hs + d;
            dqkv[at((b * t + j) * c3 + 2 * c + h * hs + d)] += pd * datt[at((b * t + i) * c + h * hs + d)];
            dqkv[at(qi)] += ds * qkv[at(kj)];
            dqkv[at(kj)] += ds * qkv[at(qi)];
          }
        }
  }
  out.dx.assign(at(rows * c), 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < c3; ++o) {
      const double g = dqkv[at(r * c3 + o)];
      gbAttn[o] += g;
      for (int64_t i = 0; i < c; ++i) {
        gwAttn[o * c + i] += g * x[at(r * c + i)];
        out.dx[at(r * c + i)] += g * wAttn[o * c + i];
      }
    }
  return out;
}

}  // namespace

TEST_CASE("the attention dropout kernel launched per sample drops the draw's elements, for any shape") {
  // A sample's square (H T T elements) rarely fills whole Philox blocks: the launch for sample b starts inside the
  // block that the launch for sample b - 1 ended in. Per-sample launches must give the draw's mask all the same.
  for (const auto& [matrices, t] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {3, 5}, {10, 7}, {4, 33}}) {
    CAPTURE(matrices);
    CAPTURE(t);
    const gpu::DropoutDraw draw{.key = 99, .offset = 1000, .threshold = gpu::dropoutThreshold(0.4),
                                .scale = 1.0f / static_cast<float>(1.0 - 0.4)};
    const size_t square = static_cast<size_t>(matrices * t * t), batch = 3;
    std::vector<float> p(batch * square);
    for (size_t e = 0; e < p.size(); ++e) p[e] = 0.25f + static_cast<float>(e % 7) / 16.0f;
    std::vector<float> out(p.size(), -1.0f);
    for (size_t b = 0; b < batch; ++b) {
      for (uint64_t q = 0; q < gpu::dropoutQuads(b * square, square); ++q)
        gpu::dropoutQuad(draw, gpu::DropoutForm::kSelect, b * square, q, p.data() + b * square,
                         out.data() + b * square, square);
    }
    size_t dropped = 0;
    for (size_t e = 0; e < p.size(); ++e) {
      CAPTURE(e);
      const bool kept = gpu::dropoutKept(draw.key, draw.offset + e, draw.threshold);
      REQUIRE(out[e] == (kept ? p[e] * draw.scale : 0.0f));
      dropped += !kept;
    }
    if (p.size() >= 100) CHECK(dropped > p.size() / 5);
  }
}

TEST_CASE("the CUDA attention's order (P recomputed in backward, dropout per sample) gives the CPU layer's results") {
  // Samples whose squares start inside a Philox block (H T T = 2 * 5 * 5 = 50), several samples, maxBatch > batch.
  const int64_t t = 5, c = 8, heads = 2;
  for (const double p : {0.0, 0.3}) {
    CAPTURE(p);
    const nn::LayerSpec spec = nn::parseModelSpec(
        json{{"input", {t, c}},
             {"layers", json::array({json{{"type", "causal_self_attention"}, {"n_head", heads}, {"dropout", p}}})}},
        "", "/model").layers[0];
    auto cpu = nn::makeLayer(spec, {.device = Device::cpu(), .maxBatch = 4, .seed = 31});
    std::vector<float> params(static_cast<size_t>(spec.paramCount())), grads(params.size());
    cpu->bind(params.data(), grads.data());
    nn::InitRng init(5);
    cpu->initParams(init);
    for (const int batch : {3, 1}) {
      CAPTURE(batch);
      const size_t n = static_cast<size_t>(batch * t * c);
      // The CUDA layer's stream, reseeded alike: one draw of batch H T T elements per training forward.
      nn::detail::DropoutStream stream(std::nullopt, spec.index);
      cpu->reseed(40 + static_cast<uint64_t>(batch), 0);
      stream.reseed(40 + static_cast<uint64_t>(batch), 0);
      // Two forwards between reseeds: the second draws the next elements of the stream.
      for (int forward = 0; forward < 2; ++forward) {
        CAPTURE(forward);
        const std::vector<float> x = randomVector(n, 7 + static_cast<uint32_t>(batch + 10 * forward));
        const std::vector<float> dy = randomVector(n, 8);
        std::vector<float> y(n), dx(n);
        cpu->forward(x.data(), y.data(), batch, true);
        cpu->backward(x.data(), y.data(), dy.data(), dx.data(), batch, false);
        const gpu::DropoutDraw draw = stream.next(static_cast<uint64_t>(batch * heads * t * t), p,
                                                  1.0f / static_cast<float>(1.0 - p));
        const Emulated e = emulate(params, x, dy, p > 0 ? &draw : nullptr, batch, t, c, heads);
        CHECK(worstDiff(y, e.y) < 1e-5);
        CHECK(worstDiff(dx, e.dx) < 1e-5);
        CHECK(worstDiff(grads, e.grads) < 1e-4);
        if (p > 0) {
          // The check can tell: another key's mask, or the other forward's, gives another output.
          gpu::DropoutDraw other = draw;
          other.key ^= 1;
          CHECK(worstDiff(y, emulate(params, x, dy, &other, batch, t, c, heads).y) > 1e-3);
          other = draw;
          other.offset = forward == 0 ? gpu::dropoutSpan(static_cast<uint64_t>(batch * heads * t * t)) : 0;
          CHECK(worstDiff(y, emulate(params, x, dy, &other, batch, t, c, heads).y) > 1e-3);
        }
      }
    }
  }
}
