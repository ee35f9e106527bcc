// The column reductions of kernels_reduce.cu (and the embedding's token gradient) emulated on the CPU (no GPU needed): every thread of every block of the
// launch grid runs its cells through reduce_index.h (the code the kernels run), pass 1 then pass 2, and the results
// are compared with lib/nn's CPU layers: bit for bit where the summation order is the CPU's (a single row chunk:
// rows <= 64), within float rounding otherwise (several chunks: (db + chunk 0) + chunk 1 ..., each chunk in row
// order, where the CPU adds the rows one by one). Awkward shapes: rows not a multiple of the chunk, columns not a
// multiple of the 128-column tile, 1 row, accumulate on and off. What this cannot show is the device itself.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "lib/gpu/reduce_index.h"
#include "lib/gpu/token_order.h"
#include "lib/nn/layer.h"
#include "lib/nn/spec.h"
#include "tests/gpu/host_values.h"

using namespace dtrain;
using namespace dtrain::gpu;
using namespace dtrain::gputest;
using nlohmann::json;

namespace {

// Two float sums of the same n terms in different orders each lie within (n - 1) u sum|x_i| of the exact sum
// (u = 2^-24, recursive summation's bound), so they differ by at most 2 n u sum|x_i|: the tolerance where the
// orders differ. absSum[c] = |initial| + sum_r |v[r, c]|.
bool withinRounding(const std::vector<float>& want, const std::vector<float>& got, const std::vector<double>& absSum,
                    int64_t terms) {
  REQUIRE(want.size() == got.size());
  REQUIRE(want.size() == absSum.size());
  for (size_t c = 0; c < want.size(); ++c) {
    const double bound = 2.0 * static_cast<double>(terms + 1) * 0x1p-24 * absSum[c];
    if (std::fabs(double(want[c]) - double(got[c])) > bound) {
      MESSAGE("column " << c << ": " << want[c] << " vs " << got[c] << " (bound " << bound << ")");
      return false;
    }
  }
  return true;
}

std::vector<double> columnAbsSums(const std::vector<float>& v, int64_t rows, int64_t cols, const std::vector<float>& init) {
  std::vector<double> s(static_cast<size_t>(cols));
  for (int64_t c = 0; c < cols; ++c) {
    s[static_cast<size_t>(c)] = std::fabs(double(init[static_cast<size_t>(c)]));
    for (int64_t r = 0; r < rows; ++r) s[static_cast<size_t>(c)] += std::fabs(double(v[static_cast<size_t>(r * cols + c)]));
  }
  return s;
}

bool bitEqual(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Every thread (bx, by, tx) of the cellGrid launch, in a loop: what a kernel over `lanes` x `cols` cells does.
template <class Body>
void runCells(int64_t lanes, int64_t cols, Body&& body) {
  const CellGrid g = cellGrid(cols, lanes);
  for (unsigned by = 0; by < g.y; ++by)
    for (unsigned bx = 0; bx < g.x; ++bx)
      for (unsigned tx = 0; tx < kColumnTile; ++tx) forEachCell(g, bx, by, tx, lanes, cols, body);
}

// Pass 2 for every column (columnSumCombineKernel's grid-stride loop covers each column once).
void runCombine(const ColumnChunks& p, int64_t cols, const float* partials, float* out, bool accumulate) {
  if (p.chunks == 1) return;
  for (int64_t c = 0; c < cols; ++c) columnSumCombine(p, c, cols, partials, out, accumulate);
}

// kernels::biasGrad as the device runs it. Partials start as NaN: a partial read before it is written shows.
void emulateBiasGrad(const float* dy, float* db, int64_t rows, int64_t cols, bool accumulate) {
  const ColumnChunks p = columnChunks(rows);
  std::vector<float> partials(static_cast<size_t>(partialCount(p, cols)), std::numeric_limits<float>::quiet_NaN());
  runCells(p.chunks, cols, [&](int64_t k, int64_t c) { columnSumChunk(p, k, c, cols, dy, db, partials.data(), accumulate); });
  runCombine(p, cols, partials.data(), db, accumulate);
}

// kernels::layerNormParamGrad as the device runs it.
void emulateLayerNormParams(const float* x, const float* mean, const float* rstd, const float* dy, float* dw,
                            float* db, int64_t rows, int64_t d, bool accumulate) {
  const ColumnChunks p = columnChunks(rows);
  std::vector<float> partials(static_cast<size_t>(2 * partialCount(p, d)), std::numeric_limits<float>::quiet_NaN());
  runCells(p.chunks, d, [&](int64_t k, int64_t j) {
    layerNormParamChunk(p, k, j, d, x, mean, rstd, dy, dw, db, partials.data(), accumulate);
  });
  runCombine(p, d, partials.data(), dw, accumulate);
  if (db != nullptr) runCombine(p, d, partials.data() + p.chunks * d, db, accumulate);
}

// kernels::channelBiasGrad as the device runs it: every (channel, chunk) block's threads, then its tree, then pass 2.
void emulateChannelBiasGrad(const float* dy, float* db, int64_t batch, int64_t channels, int64_t positions,
                            bool accumulate) {
  const ColumnChunks p = channelChunks(batch, positions);
  std::vector<float> partials(static_cast<size_t>(partialCount(p, channels)), std::numeric_limits<float>::quiet_NaN());
  for (int64_t ch = 0; ch < channels; ++ch) {
    for (int64_t k = 0; k < p.chunks; ++k) {
      float sh[kChannelThreads];
      for (unsigned t = 0; t < kChannelThreads; ++t) sh[t] = channelThreadSum(p, k, ch, t, dy, channels, positions);
      const float sum = channelBlockSum(sh);
      if (p.chunks == 1) {
        db[ch] = (accumulate ? db[ch] : 0.0f) + sum;
      } else {
        partials[static_cast<size_t>(k * channels + ch)] = sum;
      }
    }
  }
  runCombine(p, channels, partials.data(), db, accumulate);
}

}  // namespace

TEST_CASE("column reductions: the row chunks depend on the row count only, cover every row once, within limits") {
  for (int64_t rows : {0, 1, 63, 64, 65, 127, 128, 129, 8191, 8192, 8193, 100000, 1 << 24}) {
    CAPTURE(rows);
    const ColumnChunks p = columnChunks(rows);
    CHECK(p.chunks >= 1);
    CHECK(p.chunks <= kReduceMaxChunks);
    CHECK(p.chunkRows >= kReduceChunkRows);
    CHECK(p.begin(0) == 0);
    CHECK(p.end(p.chunks - 1) == rows);
    for (int64_t k = 0; k + 1 < p.chunks; ++k) CHECK(p.end(k) == p.begin(k + 1));
    if (rows > 0) CHECK(p.begin(p.chunks - 1) < rows);  // no empty chunk
    CHECK((p.chunks == 1) == (rows <= kReduceChunkRows));
  }
  CHECK(columnChunks(8192).chunkRows == 64);  // GPT-2-small at batch 8: 128 chunks of 64 rows
  CHECK(columnChunks(8192).chunks == 128);
  CHECK(partialCount(columnChunks(8192), 3072) == 128 * 3072);
  CHECK(partialCount(columnChunks(64), 3072) == 0);
}

TEST_CASE("column reductions: the launch grid stays within CUDA's limits and covers every cell exactly once") {
  CHECK(kColumnTile % 32 == 0);
  CHECK(kColumnTile <= 1024);
  const CellGrid big = cellGrid(int64_t{1} << 40, int64_t{1} << 40);
  CHECK(big.x == (1u << 20));
  CHECK(big.y == kMaxGridY);
  CHECK(cellGrid(0, 0).x == 1);
  CHECK(cellGrid(0, 0).y == 1);
  // Lanes beyond gridDim.y (embedding segments) and columns beyond one tile: each cell once.
  for (auto [lanes, cols] : {std::pair<int64_t, int64_t>{1, 1}, {3, 129}, {128, 300}, {70000, 2}, {5, 257}}) {
    CAPTURE(lanes);
    CAPTURE(cols);
    std::vector<int> hits(static_cast<size_t>(lanes * cols), 0);
    runCells(lanes, cols, [&](int64_t lane, int64_t c) {
      REQUIRE(lane < lanes);
      REQUIRE(c < cols);
      ++hits[static_cast<size_t>(lane * cols + c)];
    });
    CHECK(std::all_of(hits.begin(), hits.end(), [](int h) { return h == 1; }));
  }
}

TEST_CASE("column reductions emulated: bias gradients equal the CPU linear's (bit for bit with one chunk)") {
  // 1, 3, 63, 192, 195 and 8193 rows (one chunk up to 64 rows; 4 chunks of 64 and 3; 127 of 65 and one of 38).
  for (const auto& [batch, rowsPerSample] :
       std::vector<std::pair<int, int64_t>>{{1, 1}, {3, 1}, {3, 21}, {3, 64}, {3, 65}, {3, 2731}}) {
    for (int64_t out : {1, 5, 130, 300}) {
      CAPTURE(batch);
      CAPTURE(rowsPerSample);
      CAPTURE(out);
      const int64_t in = 3, rows = batch * rowsPerSample;
      const nn::LayerSpec spec = parseLayer(R"({"type": "linear", "out": )" + std::to_string(out) + "}",
                                            rowsPerSample == 1 ? std::vector<int64_t>{in} : std::vector<int64_t>{rowsPerSample, in});
      auto cpu = nn::makeLayer(spec, {.device = Device::cpu(), .maxBatch = batch});
      const size_t nw = static_cast<size_t>(out * in), count = nw + static_cast<size_t>(out);
      std::vector<float> params = randomVector(count, 1), grads(count);
      cpu->bind(params.data(), grads.data());
      const std::vector<float> x = randomVector(static_cast<size_t>(rows * in), 2);
      const std::vector<float> dy = randomVector(static_cast<size_t>(rows * out), 3);
      std::vector<float> y(static_cast<size_t>(rows * out));
      for (bool accumulate : {false, true}) {
        CAPTURE(accumulate);
        const std::vector<float> before = randomVector(static_cast<size_t>(out), 4);
        std::copy(before.begin(), before.end(), grads.begin() + static_cast<std::ptrdiff_t>(nw));
        cpu->forward(x.data(), y.data(), batch, true);
        cpu->backward(x.data(), y.data(), dy.data(), nullptr, batch, accumulate);
        const std::vector<float> want(grads.begin() + static_cast<std::ptrdiff_t>(nw), grads.end());
        std::vector<float> got = before;
        emulateBiasGrad(dy.data(), got.data(), rows, out, accumulate);
        if (rows <= kReduceChunkRows) {
          CHECK(bitEqual(got, want));
        } else {
          CHECK(withinRounding(want, got, columnAbsSums(dy, rows, out, accumulate ? before : std::vector<float>(before.size())),
                               rows));
        }
      }
    }
  }
}

TEST_CASE("column reductions emulated: LayerNorm weight and bias gradients equal the CPU layer's") {
  for (int64_t rowsPerSample : {1, 22, 100}) {  // x batch 3: 3, 66 (two chunks of 64 and 2) and 300 rows
    for (int64_t d : {1, 8, 300}) {
      for (bool bias : {true, false}) {
        CAPTURE(rowsPerSample);
        CAPTURE(d);
        CAPTURE(bias);
        const int batch = 3;
        const int64_t rows = batch * rowsPerSample;
        const nn::LayerSpec spec = parseLayer(std::string(R"({"type": "layernorm", "bias": )") + (bias ? "true" : "false") + "}",
                                              {rowsPerSample, d});
        auto cpu = nn::makeLayer(spec, {.device = Device::cpu(), .maxBatch = batch});
        const size_t count = static_cast<size_t>(bias ? 2 * d : d);
        std::vector<float> params = randomVector(count, 5), grads(count);
        cpu->bind(params.data(), grads.data());
        const std::vector<float> x = randomVector(static_cast<size_t>(rows * d), 6, -2, 2);
        const std::vector<float> dy = randomVector(static_cast<size_t>(rows * d), 7);
        std::vector<float> y(x.size());
        // mean and rstd as the GPU forward keeps them (float, per row).
        std::vector<float> mean(static_cast<size_t>(rows)), rstd(static_cast<size_t>(rows));
        for (int64_t r = 0; r < rows; ++r) {
          double s = 0, v = 0;
          for (int64_t j = 0; j < d; ++j) s += x[static_cast<size_t>(r * d + j)];
          const double mu = s / static_cast<double>(d);
          for (int64_t j = 0; j < d; ++j) v += (x[static_cast<size_t>(r * d + j)] - mu) * (x[static_cast<size_t>(r * d + j)] - mu);
          mean[static_cast<size_t>(r)] = static_cast<float>(mu);
          rstd[static_cast<size_t>(r)] = static_cast<float>(1.0 / std::sqrt(v / static_cast<double>(d) + spec.eps));
        }
        for (bool accumulate : {false, true}) {
          CAPTURE(accumulate);
          const std::vector<float> before = randomVector(count, 8);
          grads = before;
          cpu->forward(x.data(), y.data(), batch, true);
          cpu->backward(x.data(), y.data(), dy.data(), nullptr, batch, accumulate);
          std::vector<float> got = before;
          emulateLayerNormParams(x.data(), mean.data(), rstd.data(), dy.data(), got.data(), bias ? got.data() + d : nullptr,
                                 rows, d, accumulate);
          CHECK(maxDiff(grads, got) < 1e-4);
        }
      }
    }
  }
}

TEST_CASE("column reductions emulated: the embedding's position-table gradient equals the CPU's") {
  // gwpe[p] += the samples' dy[n, p] in sample order: biasGrad over [batch, t * c] (bit for bit up to 64 samples).
  for (int batch : {1, 3, 64, 70}) {
    CAPTURE(batch);
    const int64_t t = 5, c = 7, vocab = 11;
    const nn::LayerSpec spec = parseLayer(R"({"type": "embedding", "vocab_size": 11, "n_embd": 7})", {t});
    auto cpu = nn::makeLayer(spec, {.device = Device::cpu(), .maxBatch = batch});
    const size_t nte = static_cast<size_t>(vocab * c), count = nte + static_cast<size_t>(t * c);
    std::vector<float> params = randomVector(count, 9), grads(count, 0.0f);
    cpu->bind(params.data(), grads.data());
    std::vector<float> tokens(static_cast<size_t>(batch * t));
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<float>((i * 7 + 3) % vocab);
    const std::vector<float> dy = randomVector(static_cast<size_t>(batch * t * c), 10);
    std::vector<float> y(dy.size());
    cpu->forward(tokens.data(), y.data(), batch, true);
    cpu->backward(tokens.data(), y.data(), dy.data(), nullptr, batch, false);
    const std::vector<float> want(grads.begin() + static_cast<std::ptrdiff_t>(nte), grads.end());
    std::vector<float> got(want.size(), 0.0f);  // the layer zeroes it, then adds
    emulateBiasGrad(dy.data(), got.data(), batch, t * c, true);
    if (batch <= kReduceChunkRows) {
      CHECK(bitEqual(got, want));
    } else {
      CHECK(withinRounding(want, got, columnAbsSums(dy, batch, t * c, std::vector<float>(got.size(), 0.0f)), batch));
    }
  }
}

TEST_CASE("per-channel sums emulated: conv2d's bias gradient equals the CPU layer's") {
  CHECK(channelChunks(3, 5).chunks == 1);
  CHECK(channelChunks(3, 3000).chunks == 3);  // 9000 values: chunks of 4096, 4096 and 808
  CHECK(channelChunks(int64_t{1} << 20, 4096).chunks == kReduceMaxChunks);
  for (const auto& [layer, input] : std::vector<std::pair<std::string, std::vector<int64_t>>>{
           {R"({"type": "conv2d", "out": 2, "kernel": 3, "padding": 1})", {1, 4, 5}},
           {R"({"type": "conv2d", "out": 3, "kernel": 1})", {1, 60, 50}},
           {R"({"type": "conv2d", "out": 300, "kernel": 1})", {2, 3, 3}}}) {
    CAPTURE(layer);
    const int batch = 3;
    const nn::LayerSpec spec = parseLayer(layer, input);
    auto cpu = nn::makeLayer(spec, {.device = Device::cpu(), .maxBatch = batch});
    const int64_t out = spec.out, positions = spec.output[1] * spec.output[2];
    const size_t nw = static_cast<size_t>(out * input[0]) * static_cast<size_t>(spec.kernelH * spec.kernelW);
    const size_t count = nw + static_cast<size_t>(out);
    std::vector<float> params = randomVector(count, 11), grads(count);
    cpu->bind(params.data(), grads.data());
    const std::vector<float> x = randomVector(static_cast<size_t>(batch * spec.input.numel()), 12);
    const std::vector<float> dy = randomVector(static_cast<size_t>(batch * out * positions), 13);
    std::vector<float> y(dy.size());
    for (bool accumulate : {false, true}) {
      CAPTURE(accumulate);
      const std::vector<float> before = randomVector(static_cast<size_t>(out), 14);
      std::copy(before.begin(), before.end(), grads.begin() + static_cast<std::ptrdiff_t>(nw));
      cpu->forward(x.data(), y.data(), batch, true);
      cpu->backward(x.data(), y.data(), dy.data(), nullptr, batch, accumulate);
      const std::vector<float> want(grads.begin() + static_cast<std::ptrdiff_t>(nw), grads.end());
      std::vector<float> got = before;
      emulateChannelBiasGrad(dy.data(), got.data(), batch, out, positions, accumulate);
      // The sums per channel: |initial| + sum |dy[n, ch, q]|.
      std::vector<double> absSum(static_cast<size_t>(out));
      for (int64_t ch = 0; ch < out; ++ch) {
        absSum[static_cast<size_t>(ch)] = accumulate ? std::fabs(double(before[static_cast<size_t>(ch)])) : 0.0;
        for (int64_t n = 0; n < batch; ++n)
          for (int64_t q = 0; q < positions; ++q)
            absSum[static_cast<size_t>(ch)] += std::fabs(double(dy[static_cast<size_t>((n * out + ch) * positions + q)]));
      }
      CHECK(withinRounding(want, got, absSum, batch * positions));
    }
  }
}

TEST_CASE("token order: rows grouped by token, ascending within a token, each row once") {
  const std::vector<float> tokens = {3, 1, 3, 0, 9, 1, 3, 2.4f, 0.6f};  // 2.4 is token 2, 0.6 token 1
  gpu::TokenOrder o;
  o.build(tokens.data(), static_cast<int64_t>(tokens.size()), 10);
  CHECK(o.tok == std::vector<int32_t>{0, 1, 2, 3, 9});
  CHECK(o.start == std::vector<int32_t>{0, 1, 4, 5, 8, 9});
  CHECK(o.order == std::vector<int32_t>{3, 1, 5, 8, 7, 0, 2, 6, 4});
  o.build(tokens.data(), 0, 10);  // reused, empty
  CHECK(o.segments() == 0);
  CHECK(o.start == std::vector<int32_t>{0});
  CHECK(tokenIndex(10.0f, 10) == -1);
  CHECK(tokenIndex(-0.4f, 10) == 0);
  CHECK(tokenIndex(-0.6f, 10) == -1);
  CHECK(tokenIndex(std::numeric_limits<float>::quiet_NaN(), 10) == -1);
  CHECK(tokenIndex(2.5f, 10) == 2);  // to nearest even, as nearbyint
  CHECK(tokenIndex(1e30f, 10) == -1);
}

TEST_CASE("embedding token gradient emulated: equal to the CPU layer's bit for bit (rows ordered by token)") {
  struct Shape3 {
    int batch;
    int64_t t, c;
    int pattern;  // 0: mixed repeats, 1: every row the same token, 2: all distinct where the vocabulary allows
  };
  const int64_t vocab = 11;
  for (const Shape3 sh : {Shape3{1, 1, 7, 0}, Shape3{3, 5, 7, 0}, Shape3{70, 5, 130, 0}, Shape3{4, 9, 300, 1},
                          Shape3{1, 11, 129, 2}}) {
    for (bool accumulate : {false, true}) {
      CAPTURE(sh.batch);
      CAPTURE(sh.t);
      CAPTURE(sh.c);
      CAPTURE(accumulate);
      const nn::LayerSpec spec = parseLayer(R"({"type": "embedding", "vocab_size": 11, "n_embd": )" +
                                                std::to_string(sh.c) + R"(, "position": false})",
                                            {sh.t});
      auto cpu = nn::makeLayer(spec, {.device = Device::cpu(), .maxBatch = sh.batch});
      const size_t count = static_cast<size_t>(vocab * sh.c);
      std::vector<float> params = randomVector(count, 15), grads = randomVector(count, 16);
      const std::vector<float> before = grads;
      cpu->bind(params.data(), grads.data());
      const int64_t rows = sh.batch * sh.t;
      std::vector<float> tokens(static_cast<size_t>(rows));
      for (int64_t r = 0; r < rows; ++r)
        tokens[static_cast<size_t>(r)] = static_cast<float>(sh.pattern == 1 ? 4 : sh.pattern == 2 ? r % vocab : (r * r + 3) % 7);
      const std::vector<float> dy = randomVector(static_cast<size_t>(rows * sh.c), 17);
      std::vector<float> y(dy.size());
      cpu->forward(tokens.data(), y.data(), sh.batch, true);
      cpu->backward(tokens.data(), y.data(), dy.data(), nullptr, sh.batch, accumulate);
      // The CUDA layer: zero the table unless accumulating, order the rows, one "thread" per (segment, column).
      std::vector<float> got = accumulate ? before : std::vector<float>(count, 0.0f);
      gpu::TokenOrder o;
      o.build(tokens.data(), rows, vocab);
      runCells(o.segments(), sh.c, [&](int64_t s, int64_t j) {
        embeddingTokenSegment(s, j, sh.c, o.order.data(), o.start.data(), o.tok.data(), dy.data(), got.data());
      });
      CHECK(bitEqual(got, grads));
    }
  }
}

TEST_CASE("fused bias + activation emulated: equals the unfused kernels bit for bit and the CPU linear + activation") {
  const std::vector<std::pair<std::string, Activation>> acts = {
      {"relu", Activation::kRelu}, {"gelu", Activation::kGelu}, {"tanh", Activation::kTanh}, {"sigmoid", Activation::kSigmoid}};
  for (const auto& [name, f] : acts) {
    // 1, 3, 63 and 195 rows (4 chunks).
    for (const auto& [batch, rowsPerSample] : std::vector<std::pair<int, int64_t>>{{1, 1}, {3, 1}, {3, 21}, {3, 65}}) {
      for (int64_t out : {1, 130}) {
        CAPTURE(name);
        CAPTURE(batch);
        CAPTURE(rowsPerSample);
        CAPTURE(out);
        const int64_t in = 3, rows = batch * rowsPerSample;
        const std::vector<int64_t> input = rowsPerSample == 1 ? std::vector<int64_t>{in} : std::vector<int64_t>{rowsPerSample, in};
        const std::string lin = R"({"type": "linear", "out": )" + std::to_string(out);
        const nn::LayerSpec linSpec = parseLayer(lin + "}", input), noBias = parseLayer(lin + R"(, "bias": false})", input);
        const nn::LayerSpec actSpec = parseLayer(R"({"type": ")" + name + R"("})", {rows / batch, out});
        auto cpuLin = nn::makeLayer(linSpec, {.device = Device::cpu(), .maxBatch = batch});
        auto cpuXw = nn::makeLayer(noBias, {.device = Device::cpu(), .maxBatch = batch});
        auto cpuAct = nn::makeLayer(actSpec, {.device = Device::cpu(), .maxBatch = batch});
        const size_t nw = static_cast<size_t>(out * in), count = nw + static_cast<size_t>(out);
        std::vector<float> params = randomVector(count, 21, -2, 2), grads(count), gradsXw(nw);
        cpuLin->bind(params.data(), grads.data());
        cpuXw->bind(params.data(), gradsXw.data());  // the same W: x W^T without the bias, as the fused linear leaves it
        const float* bias = params.data() + nw;
        const size_t n = static_cast<size_t>(rows * out);
        const std::vector<float> x = randomVector(static_cast<size_t>(rows * in), 22), dy = randomVector(n, 23);
        std::vector<float> pre(n), y(n), xw(n), dpre(n);
        cpuLin->forward(x.data(), pre.data(), batch, true);
        cpuAct->forward(pre.data(), y.data(), batch, true);
        cpuXw->forward(x.data(), xw.data(), batch, true);
        // Forward: the fused pass against the unfused kernels (addBias, then activationValue) and the CPU.
        std::vector<float> fused(n), unfusedPre(n), unfused(n);
        for (size_t i = 0; i < n; ++i) {
          fused[i] = biasActivationValue(f, xw.data(), bias, static_cast<int64_t>(i), out);
          unfusedPre[i] = xw[i] + bias[static_cast<int64_t>(i) % out];
          unfused[i] = activationValue(f, unfusedPre[i]);
        }
        CHECK(bitEqual(unfusedPre, pre));  // the bias added as the CPU adds it
        CHECK(bitEqual(fused, unfused));
        if (f == Activation::kRelu) CHECK(bitEqual(fused, y));
        CHECK(maxDiff(y, fused) < 1e-6);  // libm's erff/expf against Eigen's vectorised ones
        for (bool accumulate : {false, true}) {
          CAPTURE(accumulate);
          const std::vector<float> before = randomVector(static_cast<size_t>(out), 24);
          std::copy(before.begin(), before.end(), grads.begin() + static_cast<std::ptrdiff_t>(nw));
          cpuAct->backward(pre.data(), y.data(), dy.data(), dpre.data(), batch, accumulate);
          cpuLin->backward(x.data(), pre.data(), dpre.data(), nullptr, batch, accumulate);
          const std::vector<float> wantDb(grads.begin() + static_cast<std::ptrdiff_t>(nw), grads.end());
          // Fused: every thread of biasActivationBackwardChunkKernel's grid, then pass 2.
          const ColumnChunks p = columnChunks(rows);
          std::vector<float> dx(n, std::numeric_limits<float>::quiet_NaN()), db = before;
          std::vector<float> partials(static_cast<size_t>(partialCount(p, out)), std::numeric_limits<float>::quiet_NaN());
          runCells(p.chunks, out, [&](int64_t k, int64_t c) {
            biasActivationBackwardChunk(f, p, k, c, out, xw.data(), bias, fused.data(), dy.data(), dx.data(), db.data(),
                                        partials.data(), accumulate);
          });
          runCombine(p, out, partials.data(), db.data(), accumulate);
          // Unfused: activationGrad per element, then biasGrad's plan.
          std::vector<float> udx(n), udb = before;
          for (size_t i = 0; i < n; ++i) udx[i] = activationGrad(f, unfusedPre[i], unfused[i], dy[i]);
          emulateBiasGrad(udx.data(), udb.data(), rows, out, accumulate);
          CHECK(bitEqual(dx, udx));
          CHECK(bitEqual(db, udb));
          if (f == Activation::kRelu) CHECK(bitEqual(dx, dpre));
          CHECK(maxDiff(dpre, dx) < 1e-6);
          if (f == Activation::kRelu && rows <= kReduceChunkRows) CHECK(bitEqual(db, wantDb));
          CHECK(maxDiff(wantDb, db) < 1e-5);
        }
      }
    }
  }
}
