// Philox4x32-10 and the dropout rule on it (lib/gpu/philox.h), and the CPU layers' bulk form of the rule
// (lib/nn/dropout_mask.h): the published known-answer vectors, the integer threshold equal to the old `u >= p` on
// every 24-bit value, random access, the bulk form and the CUDA kernels' per-thread form equal to the rule at any
// offset and length, the stream's reseed and offset rules, the keep rate, and the dropout layers' masks being the
// rule's for the documented element numbering.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "lib/gpu/philox.h"
#include "lib/nn/dropout_mask.h"
#include "lib/nn/layer.h"
#include "lib/nn/spec.h"

using namespace dtrain;
using nlohmann::json;

namespace {

// The rule written out from its definition: lane counter % 4 of block counter / 4, top 24 bits, u * 2^-24 >= p.
bool keptByDefinition(uint64_t key, uint64_t counter, double p) {
  const gpu::Philox4x32 block = gpu::philox4x32_10(
      {{static_cast<uint32_t>(counter / 4), static_cast<uint32_t>(counter / 4 >> 32), 0u, 0u}},
      {{static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32)}});
  return static_cast<double>(block.v[counter % 4] >> 8) * 0x1.0p-24 >= p;
}

nn::LayerSpec layerSpec(const json& layer, std::vector<int64_t> input) {
  return nn::parseModelSpec(json{{"input", input}, {"layers", json::array({layer})}}, "", "/model").layers[0];
}

}  // namespace

TEST_CASE("Philox4x32-10 gives the published known-answer vectors (Random123 kat_vectors)") {
  struct Kat {
    gpu::Philox4x32 counter;
    gpu::PhiloxKey key;
    gpu::Philox4x32 expected;
  };
  const Kat kats[] = {
      {{{0u, 0u, 0u, 0u}}, {{0u, 0u}}, {{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}}},
      {{{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}},
       {{0xffffffffu, 0xffffffffu}},
       {{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}}},
      {{{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}},
       {{0xa4093822u, 0x299f31d0u}},
       {{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}}},
  };
  for (const Kat& kat : kats) {
    const gpu::Philox4x32 out = gpu::philox4x32_10(kat.counter, kat.key);
    for (int l = 0; l < 4; ++l) CHECK(out.v[l] == kat.expected.v[l]);
  }
  // The bulk form (round by round over several blocks) is the same generator: block 0 under key 0 is the first
  // vector, and block 2^64 - 1 under key 2^64 - 1 differs from the second only in the counter's upper words.
  uint32_t lanes[8];
  nn::detail::philoxLanes(0, 0, 2, lanes);
  for (int l = 0; l < 4; ++l) CHECK(lanes[l] == kats[0].expected.v[l]);
  const gpu::Philox4x32 one = gpu::dropoutBlock(0, 1);
  for (int l = 0; l < 4; ++l) CHECK(lanes[4 + l] == one.v[l]);
}

TEST_CASE("the integer threshold is the old `u * 2^-24 >= p` for every p and every 24-bit u") {
  std::vector<double> ps = {0.0, -0.5, 1e-30, 0x1.0p-24, 0x1.0p-25, 0.1, 0.2, 0.25, 0.3, 1.0 / 3, 0.5, 0.9,
                            1.0 - 0x1.0p-24, 1.0 - 0x1.0p-30, 1.0, 1.5};
  for (uint32_t k : {1u, 2u, 1677721u, 8388608u, 16777215u}) {  // p exactly on a grid point, and either side of it
    const double p = k * 0x1.0p-24;
    ps.push_back(p);
    ps.push_back(std::nextafter(p, 0.0));
    ps.push_back(std::nextafter(p, 1.0));
  }
  for (const double p : ps) {
    CAPTURE(p);
    const uint32_t threshold = gpu::dropoutThreshold(p);
    CHECK(threshold <= (1u << 24));
    // The first kept value is the threshold: everything below it is dropped, it and above kept.
    if (threshold > 0) CHECK_FALSE(static_cast<double>(threshold - 1) * 0x1.0p-24 >= p);
    if (threshold < (1u << 24)) CHECK(static_cast<double>(threshold) * 0x1.0p-24 >= p);
  }
  CHECK(gpu::dropoutThreshold(0.0) == 0);      // p = 0 keeps everything
  CHECK(gpu::dropoutThreshold(1.0) == 1u << 24);  // p = 1 keeps nothing
  CHECK(gpu::dropoutThreshold(0.5) == 1u << 23);
}

TEST_CASE("dropoutKept: random access by counter, the documented lanes, the keep rate") {
  const uint64_t key = nn::detail::mixSeed(42, 3);
  const uint32_t threshold = gpu::dropoutThreshold(0.3);
  size_t kept = 0;
  const uint64_t n = 400000;
  for (uint64_t c = 0; c < n; ++c) {
    const bool k = gpu::dropoutKept(key, c, threshold);
    if (c < 4000) REQUIRE(k == keptByDefinition(key, c, 0.3));
    kept += k;
  }
  // 280000 expected; the binomial's sd is 290.
  CHECK(kept > 278500);
  CHECK(kept < 281500);
  // Far counters (past 2^32 blocks) and another key.
  for (uint64_t c : {uint64_t{1} << 34, (uint64_t{1} << 40) + 3, ~uint64_t{0}}) {
    CHECK(gpu::dropoutKept(key, c, threshold) == keptByDefinition(key, c, 0.3));
    CHECK(gpu::dropoutKept(key + 1, c, threshold) == keptByDefinition(key + 1, c, 0.3));
  }
  CHECK(gpu::dropoutSpan(0) == 0);
  CHECK(gpu::dropoutSpan(1) == 4);
  CHECK(gpu::dropoutSpan(8) == 8);
  CHECK(gpu::dropoutSpan(9) == 12);
}

TEST_CASE("the CPU's bulk form and the kernels' per-thread form are the rule at any offset and length") {
  const gpu::DropoutDraw draw{.key = 0x0123456789abcdefull, .offset = 4096 + 8, .threshold = gpu::dropoutThreshold(0.4),
                              .scale = 1.0f / 0.6f};
  for (uint64_t first : {0u, 1u, 2u, 3u, 5u, 1021u}) {
    for (size_t n : {0u, 1u, 3u, 4u, 7u, 31u, 32u, 33u, 1023u, 1024u, 1025u, 2500u}) {
      CAPTURE(first);
      CAPTURE(n);
      std::vector<float> in(n), out(n, 7.0f), quad(n, 7.0f);
      for (size_t i = 0; i < n; ++i) in[i] = (i % 3 == 0 ? -1.0f : 1.0f) * static_cast<float>(i + 1);
      nn::detail::dropoutSelect(draw, first, in.data(), out.data(), n);
      for (uint64_t q = 0; q < gpu::dropoutQuads(first, n); ++q)
        gpu::dropoutQuad(draw, gpu::DropoutForm::kSelect, first, q, in.data(), quad.data(), n);
      for (size_t i = 0; i < n; ++i) {
        const bool kept = gpu::dropoutKept(draw.key, draw.offset + first + i, draw.threshold);
        REQUIRE(kept == draw.kept(first + i));
        const float expected = kept ? in[i] * draw.scale : 0.0f;
        REQUIRE(out[i] == expected);
        REQUIRE(!std::signbit(out[i]) == !std::signbit(expected));  // a dropped -x is +0, as the CPU's select
        REQUIRE(quad[i] == expected);
        REQUIRE(!std::signbit(quad[i]) == !std::signbit(expected));
      }
    }
  }
  // The dropout layer's form: mask = scale or 0, y = x * mask (a dropped -x is -0, an inf NaN, as the CPU's).
  std::vector<float> mask(1000);
  nn::detail::drawDropoutMask(draw, mask.size(), mask.data());
  std::vector<float> x(1000, -std::numeric_limits<float>::infinity()), y(1000);
  x[0] = -2.0f;
  for (uint64_t q = 0; q < gpu::dropoutQuads(0, x.size()); ++q)
    gpu::dropoutQuad(draw, gpu::DropoutForm::kMultiply, 0, q, x.data(), y.data(), x.size());
  size_t dropped = 0;
  for (size_t i = 0; i < mask.size(); ++i) {
    REQUIRE(mask[i] == (draw.kept(i) ? draw.scale : 0.0f));
    const float cpu = x[i] * mask[i];
    REQUIRE(std::isnan(y[i]) == std::isnan(cpu));
    if (!std::isnan(cpu)) REQUIRE(std::bit_cast<uint32_t>(y[i]) == std::bit_cast<uint32_t>(cpu));
    dropped += mask[i] == 0.0f;
  }
  CHECK(dropped > 300);
  CHECK(dropped < 500);
  CHECK(gpu::dropoutQuads(0, 0) == 0);
  CHECK(gpu::dropoutQuads(3, 1) == 1);
  CHECK(gpu::dropoutQuads(3, 2) == 2);
}

TEST_CASE("DropoutStream: a reseed restarts the counters, draws advance by whole blocks, a pinned seed wins") {
  nn::detail::DropoutStream s(std::nullopt, 5);
  s.reseed(9, 0);
  const gpu::DropoutDraw a = s.next(10, 0.25, 2.0f), b = s.next(3, 0.25, 2.0f), c = s.next(1, 0.25, 2.0f);
  CHECK(a.key == nn::detail::mixSeed(9, 5));
  CHECK(a.offset == 0);
  CHECK(b.offset == 12);
  CHECK(c.offset == 16);
  CHECK(b.key == a.key);
  CHECK(a.threshold == gpu::dropoutThreshold(0.25));
  CHECK(a.scale == 2.0f);
  s.reseed(9, 0);
  CHECK(s.next(10, 0.25, 2.0f).offset == 0);
  s.reseed(10, 0);
  CHECK(s.next(1, 0.25, 2.0f).key == nn::detail::mixSeed(10, 5));

  // A pinned seed: keyed by it, the position and the index, whatever the reseed's seed (every rank alike); the
  // same position repeats the masks (a resumed run reseeds at the step it resumes from), another moves them.
  nn::detail::DropoutStream pinned(uint64_t{3}, 5);
  pinned.reseed(100, 0);  // the construction
  CHECK(pinned.next(8, 0.5, 2.0f).key == nn::detail::mixSeed(nn::detail::mixSeed(3, 0), 5));
  CHECK(pinned.next(8, 0.5, 2.0f).offset == 8);  // the masks continue between reseeds
  pinned.reseed(200, 41);
  const gpu::DropoutDraw at41 = pinned.next(8, 0.5, 2.0f);
  CHECK(at41.key == nn::detail::mixSeed(nn::detail::mixSeed(3, 41), 5));
  CHECK(at41.offset == 0);
  nn::detail::DropoutStream otherRank(uint64_t{3}, 5);
  otherRank.reseed(999, 41);
  CHECK(otherRank.next(8, 0.5, 2.0f).key == at41.key);
  otherRank.reseed(999, 42);
  CHECK(otherRank.next(8, 0.5, 2.0f).key != at41.key);
}

TEST_CASE("the CPU dropout layers' masks are the rule's for the documented element numbering") {
  // The dropout layer: element e of the batch in memory order; a second forward continues at the next block.
  const nn::LayerSpec drop = layerSpec(json{{"type", "dropout"}, {"p", 0.3}}, {7});
  auto layer = nn::makeLayer(drop, {.device = Device::cpu(), .maxBatch = 3, .seed = 17});
  std::vector<float> x(21, 1.0f), y(21);
  const uint64_t key = nn::detail::mixSeed(17, static_cast<uint64_t>(drop.index));
  const float scale = static_cast<float>(1.0 / (1.0 - 0.3));
  for (const uint64_t offset : {0u, 24u}) {  // 21 elements take 24 counters
    layer->forward(x.data(), y.data(), 3, true);
    for (size_t e = 0; e < 21; ++e)
      REQUIRE(y[e] == (gpu::dropoutKept(key, offset + e, gpu::dropoutThreshold(0.3)) ? scale : 0.0f));
  }

  // Attention: element ((b * H + h) * T + i) * T + j of the full square; the upper triangle unused.
  const int64_t t = 6, c = 4, heads = 2, batch = 2;
  const nn::LayerSpec attn =
      layerSpec(json{{"type", "causal_self_attention"}, {"n_head", heads}, {"dropout", 0.5}, {"bias", false}}, {t, c});
  auto a = nn::makeLayer(attn, {.device = Device::cpu(), .maxBatch = 2, .seed = 5});
  // c_attn = [I; I; I] (q = k = v = x), c_proj = I: the output is dropout(P) v, P = softmax(x x^T / sqrt(2)).
  std::vector<float> params(static_cast<size_t>(attn.paramCount()), 0.0f), grads(params.size());
  for (int64_t part = 0; part < 3; ++part)
    for (int64_t r = 0; r < c; ++r) params[static_cast<size_t>((part * c + r) * c + r)] = 1.0f;
  for (int64_t r = 0; r < c; ++r) params[static_cast<size_t>(3 * c * c + r * c + r)] = 1.0f;
  a->bind(params.data(), grads.data());
  // One-hot rows x_j = e_{j mod c}: output column h * hs + d of row i sums the dropped P_ij over the j <= i whose
  // one-hot column it is.
  std::vector<float> ax(static_cast<size_t>(batch * t * c), 0.0f), ay(ax.size());
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t j = 0; j < t; ++j) ax[static_cast<size_t>((b * t + j) * c + j % c)] = 1.0f;
  a->reseed(77, 0);
  a->forward(ax.data(), ay.data(), static_cast<int>(batch), true);
  const uint64_t akey = nn::detail::mixSeed(77, static_cast<uint64_t>(attn.index));
  const uint32_t threshold = gpu::dropoutThreshold(0.5);
  const float keep = 1.0f / static_cast<float>(1.0 - 0.5);
  const int64_t hs = c / heads;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < t; ++i) {
        // P over j <= i: scores x_i . x_j (head h's columns) / sqrt(hs), with x one-hot.
        std::vector<double> p(static_cast<size_t>(i + 1));
        double total = 0;
        for (int64_t j = 0; j <= i; ++j) {
          double s = 0;
          for (int64_t d = 0; d < hs; ++d)
            s += double(ax[static_cast<size_t>((b * t + i) * c + h * hs + d)]) * ax[static_cast<size_t>((b * t + j) * c + h * hs + d)];
          total += p[static_cast<size_t>(j)] = std::exp(s / std::sqrt(double(hs)));
        }
        for (int64_t d = 0; d < hs; ++d) {
          double expected = 0;
          for (int64_t j = 0; j <= i; ++j) {
            const uint64_t e = static_cast<uint64_t>(((b * heads + h) * t + i) * t + j);
            if (gpu::dropoutKept(akey, e, threshold))
              expected += p[static_cast<size_t>(j)] / total * keep * ax[static_cast<size_t>((b * t + j) * c + h * hs + d)];
          }
          CHECK(ay[static_cast<size_t>((b * t + i) * c + h * hs + d)] == doctest::Approx(expected).epsilon(1e-5));
        }
      }
}
