// Gradient compression: job-file parsing and validation, and each hook over real tcp groups (one thread per rank
// over the in-memory store), checked against the averages they approximate.
#include <doctest/doctest.h>

#include <cmath>
#include <algorithm>
#include <limits>
#include <map>
#include <numeric>

#include "lib/comm/reduce.h"
#include "lib/comm/registry.h"
#include "lib/common/error.h"
#include "lib/nn/optimizer.h"
#include "lib/train/compression.h"
#include "lib/train/compression_hooks.h"
#include "lib/train/ddp.h"
#include "lib/nn/model.h"
#include "rendezvous/memory_store.h"
#include "tests/comm/comm_test_util.h"

using namespace dtrain;
using namespace dtrain::train;
using nlohmann::json;

namespace {

CompressionSettings parsed(const std::string& text) { return parseCompression(json::parse(text), "j.json", "/c"); }

std::string parseError(const std::string& text) {
  try {
    parsed(text);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

// Two parameters: a [rows, cols] matrix and a [cols] vector, in one arena.
HookLayout layoutOf(int64_t rows, int64_t cols, int ranks) {
  HookLayout l;
  l.params = {{"0.weight", Shape{rows, cols}, 0, static_cast<size_t>(rows * cols)},
              {"0.bias", Shape{cols}, static_cast<size_t>(rows * cols), static_cast<size_t>(cols)}};
  l.arenaSize = static_cast<size_t>(rows * cols + cols);
  l.groupSize = ranks;
  return l;
}

// Runs `steps` steps of `hook` on every rank: grads(rank, step) gives the rank's gradient; the whole arena is one
// bucket. Returns each rank's result per step.
using GradFn = std::function<std::vector<float>(int rank, int step)>;
struct RankRun {
  std::vector<std::vector<float>> results;
  std::vector<std::vector<float>> state;  // stateBuffers() after the last step, as floats (step count excluded)
  HookTraffic traffic;
};
std::vector<RankRun> runHook(int ranks, const HookLayout& layout, const CompressionSettings& c, int steps,
                             const GradFn& grads) {
  auto store = rendezvous::MemoryStore::create();
  std::vector<RankRun> out(static_cast<size_t>(ranks));
  auto errors = comm::testing::onRanks(ranks, [&](int rank) {
    auto backend = comm::createBackend("tcp", comm::testing::rankOptions(rank, ranks, store));
    auto hook = makeCompressionHook(c, 7);
    hook->bind(layout);
    RankRun& run = out[static_cast<size_t>(rank)];
    for (int step = 0; step < steps; ++step) {
      std::vector<float> g = grads(rank, step);
      GradBucket bucket{.index = 0, .grads = TensorView::flat(g.data(), g.size()), .offset = 0, .last = true,
                        .params = layout.params};
      hook->start(bucket, *backend)->wait();
      run.results.push_back(g);
    }
    for (auto& s : hook->stateBuffers())
      if (s.view.dtype == DType::kFloat32) run.state.emplace_back(s.view.as<float>(), s.view.as<float>() + s.view.numel());
    run.traffic = *hook->traffic();
  });
  REQUIRE(comm::testing::firstError(errors) == "");
  return out;
}

std::vector<float> wave(size_t n, int rank, int step) {
  std::vector<float> g(n);
  for (size_t i = 0; i < n; ++i)
    g[i] = std::sin(0.37f * static_cast<float>(i) + 1.3f * static_cast<float>(rank) + 0.7f * static_cast<float>(step));
  return g;
}

}  // namespace

TEST_CASE("parallel.compression: types, defaults and bad values name the field and the value") {
  auto c = parsed(R"({"type": "powersgd", "rank": 2, "start_step": 100})");
  CHECK(c.type == CompressionSettings::Type::kPowerSgd);
  CHECK(c.rank == 2);
  CHECK(c.startStep == 100);
  CHECK(c.errorFeedback);
  c = parsed(R"({"type": "topk", "ratio": 0.01, "error_feedback": false})");
  CHECK(c.type == CompressionSettings::Type::kTopK);
  CHECK(c.ratio == doctest::Approx(0.01));
  CHECK(!c.errorFeedback);
  CHECK(parsed(R"({"type": "bf16"})").type == CompressionSettings::Type::kBf16);

  CHECK(parseError(R"({"type": "zip"})").find("/c/type: unknown compression type 'zip'") != std::string::npos);
  CHECK(parseError(R"({"rank": 2})").find("/c") != std::string::npos);
  CHECK(parseError(R"({"type": "powersgd", "rank": 0})").find("/c/rank: expected an integer >= 1") !=
        std::string::npos);
  CHECK(parseError(R"({"type": "topk", "ratio": 0})").find("/c/ratio: expected a number in (0, 1]") !=
        std::string::npos);
  CHECK(parseError(R"({"type": "topk", "ratio": 1.5})").find("got 1.5") != std::string::npos);
  CHECK(parseError(R"({"type": "topk", "rank": 2})").find("/c/rank: applies to \"type\": \"powersgd\" only") !=
        std::string::npos);
  CHECK(parseError(R"({"type": "fp16", "error_feedback": true})").find("/c/error_feedback") != std::string::npos);
  CHECK(parseError(R"({"type": "fp16", "start_step": -1})").find("/c/start_step") != std::string::npos);
  CHECK(parseError(R"({"type": "fp16", "typo": 1})").find("typo") != std::string::npos);
}

TEST_CASE("a powersgd rank larger than the model's smallest matrix is rejected, naming the parameter") {
  auto model = nn::parseModelSpec(json::parse(R"({"input": [20], "layers": [{"type": "linear", "out": 30},
      {"type": "relu"}, {"type": "linear", "out": 4}]})"), "j.json");
  CompressionSettings c{.type = CompressionSettings::Type::kPowerSgd, .rank = 4};
  CHECK_NOTHROW(checkCompressionFitsModel(c, model, "j.json", "/parallel/compression"));
  c.rank = 5;
  try {
    checkCompressionFitsModel(c, model, "j.json", "/parallel/compression");
    FAIL("no error");
  } catch (const ConfigError& e) {
    CHECK(std::string(e.what()).find("/parallel/compression/rank: 5 is larger than the matrix 2.weight [4, 30]") !=
          std::string::npos);
  }
}

TEST_CASE("expected ratios: fp16 halves, powersgd sends P, Q and the vectors, topk pairs grow with the group") {
  std::vector<GradParam> params = {{"0.weight", Shape{1000, 1000}, 0, 1000000},
                                   {"0.bias", Shape{1000}, 1000000, 1000}};
  auto fp16 = estimateCompression({.type = CompressionSettings::Type::kFp16}, params, 2);
  CHECK(fp16.ratio() == doctest::Approx(2.0));
  auto psgd = estimateCompression({.type = CompressionSettings::Type::kPowerSgd, .rank = 2}, params, 2);
  CHECK(psgd.bytesSent == (2 * 1000 + 2 * 1000 + 1000) * 4);  // P + Q + bias, each all-reduced once
  auto topk = estimateCompression({.type = CompressionSettings::Type::kTopK, .ratio = 0.01}, params, 2);
  CHECK(topk.bytesSent == 10010 * 8);
  CHECK(estimateCompression({.type = CompressionSettings::Type::kTopK, .ratio = 0.01}, params, 4).bytesSent ==
        3 * 10010 * 8);
}

TEST_CASE("fp16 and bf16 hooks: the average within 16-bit rounding, identical on every rank, half the bytes") {
  for (auto type : {CompressionSettings::Type::kFp16, CompressionSettings::Type::kBf16}) {
    CAPTURE(compressionTypeName(type));
    constexpr int kRanks = 3;
    auto layout = layoutOf(8, 16, kRanks);
    // Values near fp16's largest: the sum of three would overflow, the division first keeps it finite.
    auto grads = [&](int rank, int step) {
      auto g = wave(layout.arenaSize, rank, step);
      g[5] = 60000.0f;
      return g;
    };
    auto runs = runHook(kRanks, layout, {.type = type}, 2, grads);
    const float tol = type == CompressionSettings::Type::kFp16 ? 2e-3f : 2e-2f;
    for (int step = 0; step < 2; ++step)
      for (size_t i = 0; i < layout.arenaSize; ++i) {
        float want = 0;
        for (int r = 0; r < kRanks; ++r) want += grads(r, step)[i] / kRanks;
        const float got = runs[0].results[static_cast<size_t>(step)][i];
        CHECK_MESSAGE(std::abs(got - want) <= tol * std::max(1.0f, std::abs(want)), "i=", i, " got ", got, " want ", want);
        for (int r = 1; r < kRanks; ++r) CHECK(runs[static_cast<size_t>(r)].results[static_cast<size_t>(step)][i] == got);
      }
    CHECK(runs[0].traffic.steps == 2);
    CHECK(runs[0].traffic.bytesSent * 2 == runs[0].traffic.bytesUncompressed);
  }
}

TEST_CASE("topk with error feedback: k largest of g + e per rank, averaged; the rest stays in the residual") {
  constexpr int kRanks = 2;
  auto layout = layoutOf(10, 10, kRanks);  // 110 elements: k = ceil(0.05 * 110) = 6 per rank
  const CompressionSettings c{.type = CompressionSettings::Type::kTopK, .ratio = 0.05};
  auto runs = runHook(kRanks, layout, c, 1, [&](int rank, int step) { return wave(layout.arenaSize, rank, step); });
  // The reference: each rank's 6 largest |g|, summed and averaged.
  std::vector<float> want(layout.arenaSize, 0.0f);
  for (int r = 0; r < kRanks; ++r) {
    auto g = wave(layout.arenaSize, r, 0);
    std::vector<size_t> idx(g.size());
    std::iota(idx.begin(), idx.end(), 0);
    std::sort(idx.begin(), idx.end(), [&](size_t a, size_t b) { return std::abs(g[a]) > std::abs(g[b]); });
    for (size_t j = 0; j < 6; ++j) want[idx[j]] += g[idx[j]];
    // The residual holds exactly what was not sent.
    auto residual = runs[static_cast<size_t>(r)].state.at(0);
    for (size_t i = 0; i < g.size(); ++i) {
      const bool sentIt = std::find(idx.begin(), idx.begin() + 6, i) != idx.begin() + 6;
      CHECK(residual[i] == (sentIt ? 0.0f : g[i]));
    }
  }
  for (size_t i = 0; i < want.size(); ++i) {
    CHECK(runs[0].results[0][i] == doctest::Approx(want[i] / 2).epsilon(1e-6));
    CHECK(runs[1].results[0][i] == runs[0].results[0][i]);
  }
  CHECK(runs[0].traffic.bytesSent == 6 * kTopKPairBytes);
  SUBCASE("ratio 1 is the exact average") {
    auto all = runHook(kRanks, layout, {.type = CompressionSettings::Type::kTopK, .ratio = 1.0}, 2,
                       [&](int rank, int step) { return wave(layout.arenaSize, rank, step); });
    for (size_t i = 0; i < layout.arenaSize; ++i)
      CHECK(all[0].results[1][i] ==
            doctest::Approx((wave(layout.arenaSize, 0, 1)[i] + wave(layout.arenaSize, 1, 1)[i]) / 2).epsilon(1e-6));
  }
  SUBCASE("error feedback sends, over steps, what one step left out") {
    // The same gradient every step: the elements left out accumulate until they are sent.
    auto steps = runHook(kRanks, layout, c, 30, [&](int rank, int) { return wave(layout.arenaSize, rank, 0); });
    std::vector<float> sum(layout.arenaSize, 0.0f);
    for (const auto& r : steps[0].results)
      for (size_t i = 0; i < sum.size(); ++i) sum[i] += r[i];
    // Every element has been sent at least once in 30 steps (110 elements, 6 a step and rank).
    for (size_t i = 0; i < sum.size(); ++i) CHECK(sum[i] != 0.0f);
  }
}

TEST_CASE("topk on a large bucket (sampled threshold, then exact selection) picks exactly the k largest") {
  constexpr int kRanks = 2;
  auto layout = layoutOf(300, 200, kRanks);  // 60200 elements: k = 602 per rank
  auto grads = [&](int rank, int step) {
    auto g = wave(layout.arenaSize, rank, step);
    for (size_t i = 0; i < g.size(); ++i) g[i] *= static_cast<float>((i * 2654435761u) % 1000) / 1000.0f;
    return g;
  };
  auto runs = runHook(kRanks, layout, {.type = CompressionSettings::Type::kTopK, .ratio = 0.01}, 1, grads);
  std::vector<float> want(layout.arenaSize, 0.0f);
  for (int r = 0; r < kRanks; ++r) {
    auto g = grads(r, 0);
    std::vector<size_t> idx(g.size());
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [&](size_t a, size_t b) { return std::abs(g[a]) > std::abs(g[b]); });
    for (size_t j = 0; j < 602; ++j) want[idx[j]] += g[idx[j]];
  }
  size_t wrong = 0;
  for (size_t i = 0; i < want.size(); ++i) wrong += runs[0].results[0][i] == want[i] / 2 ? 0 : 1;
  CHECK(wrong == 0);
}

TEST_CASE("powersgd: a rank-1 gradient is recovered exactly, vectors are averaged, ranks agree bit for bit") {
  constexpr int kRanks = 2;
  constexpr int64_t kRows = 24, kCols = 32;
  auto layout = layoutOf(kRows, kCols, kRanks);
  // Rank r's matrix is (r + 1) u v^T: the average 1.5 u v^T has rank 1, which a rank-1 PowerSGD step recovers.
  auto grads = [&](int rank, int step) {
    std::vector<float> g(layout.arenaSize);
    for (int64_t i = 0; i < kRows; ++i)
      for (int64_t j = 0; j < kCols; ++j)
        g[static_cast<size_t>(i * kCols + j)] = static_cast<float>(rank + 1) * std::cos(0.3f * static_cast<float>(i)) *
                                                std::sin(0.2f * static_cast<float>(j) + 0.1f * static_cast<float>(step) + 0.5f);
    for (int64_t j = 0; j < kCols; ++j) g[static_cast<size_t>(kRows * kCols + j)] = static_cast<float>(rank * 10 + j);
    return g;
  };
  auto runs = runHook(kRanks, layout, {.type = CompressionSettings::Type::kPowerSgd, .rank = 1}, 3, grads);
  for (int step = 0; step < 3; ++step) {
    const auto& got = runs[0].results[static_cast<size_t>(step)];
    CHECK(got == runs[1].results[static_cast<size_t>(step)]);
    for (size_t i = 0; i < layout.arenaSize; ++i) {
      const float want = (grads(0, step)[i] + grads(1, step)[i]) / 2;
      CHECK_MESSAGE(std::abs(got[i] - want) <= 1e-4f * std::max(1.0f, std::abs(want)), "step ", step, " i=", i);
    }
  }
  // Bytes: P (24) and the bias (32) in the first round, Q (32) in the second.
  CHECK(runs[0].traffic.bytesSent == 3 * (24 + 32 + 32) * 4);
}

TEST_CASE("powersgd: plain all-reduce before start_step; with error feedback the residual is g - approximation") {
  constexpr int kRanks = 2;
  auto layout = layoutOf(16, 16, kRanks);
  // wave() as a 16x16 matrix, sin(a i + b j + c), has rank 2: rank 1 cannot hold it.
  const CompressionSettings c{.type = CompressionSettings::Type::kPowerSgd, .rank = 1, .startStep = 1};
  auto runs = runHook(kRanks, layout, c, 2, [&](int rank, int step) { return wave(layout.arenaSize, rank, step); });
  for (size_t i = 0; i < layout.arenaSize; ++i)
    CHECK(runs[0].results[0][i] ==
          doctest::Approx((wave(layout.arenaSize, 0, 0)[i] + wave(layout.arenaSize, 1, 0)[i]) / 2).epsilon(1e-6));
  // Step 1 compressed: residual = g - result on each rank (no residual before it).
  for (int r = 0; r < kRanks; ++r) {
    const auto& residual = runs[static_cast<size_t>(r)].state.at(1);  // powersgd.q, then powersgd.residual
    auto g = wave(layout.arenaSize, r, 1);
    for (size_t i = 0; i < g.size(); ++i)
      CHECK(residual[i] == doctest::Approx(g[i] - runs[static_cast<size_t>(r)].results[1][i]).epsilon(1e-5));
  }
  // The 16x16 matrix at rank 1 is compressed ((16 + 16) * 1 * 2 < 256): it is not the plain average.
  bool differs = false;
  for (size_t i = 0; i < 256; ++i)
    differs = differs || std::abs(runs[0].results[1][i] - (wave(layout.arenaSize, 0, 1)[i] + wave(layout.arenaSize, 1, 1)[i]) / 2) > 1e-3f;
  CHECK(differs);
}

TEST_CASE("a non-finite gradient on one rank makes every rank's result non-finite and leaves the state as it was") {
  for (auto type : {CompressionSettings::Type::kTopK, CompressionSettings::Type::kPowerSgd,
                    CompressionSettings::Type::kFp16}) {
    CAPTURE(compressionTypeName(type));
    constexpr int kRanks = 2;
    auto layout = layoutOf(16, 16, kRanks);
    CompressionSettings c{.type = type, .rank = 2, .ratio = 0.1};
    auto runs = runHook(kRanks, layout, c, 3, [&](int rank, int step) {
      auto g = wave(layout.arenaSize, rank, step);
      if (step == 1 && rank == 1) g[3] = std::numeric_limits<float>::quiet_NaN();
      return g;
    });
    for (int r = 0; r < kRanks; ++r) {
      const auto& res = runs[static_cast<size_t>(r)].results;
      CHECK(nn::allFinite(res[0]));
      CHECK(!nn::allFinite(res[1]));
      CHECK(nn::allFinite(res[2]));  // the state was not poisoned
      for (const auto& s : runs[static_cast<size_t>(r)].state) CHECK(nn::allFinite(s));
    }
  }
}

TEST_CASE("DDP with a compression hook: bucket params and bind() are wired; powersgd's result does not depend on "
          "the bucket layout (overlap on or off)") {
  // layer 0: [50, 100] + 50, layer 2: [40, 50] + 40, layer 4: [10, 40] + 10; tiny bucket caps: one bucket per layer.
  auto spec = nn::parseModelSpec(json::parse(R"({"input": [100], "layers": [
      {"type": "linear", "out": 50}, {"type": "relu"}, {"type": "linear", "out": 40}, {"type": "relu"},
      {"type": "linear", "out": 10}]})"), "t.json");
  constexpr int kRanks = 2, kBatch = 4, kSteps = 3;
  std::map<bool, std::vector<std::vector<float>>> grads;  // overlap -> rank 0's gradients per step
  for (bool overlap : {true, false}) {
    CAPTURE(overlap);
    auto store = rendezvous::MemoryStore::create();
    std::vector<std::string> problems(kRanks);
    std::vector<std::vector<std::vector<float>>> seen(kRanks);
    auto errors = comm::testing::onRanks(kRanks, [&](int rank) {
      auto backend = comm::createBackend("tcp", comm::testing::rankOptions(rank, kRanks, store));
      auto hook = makeCompressionHook({.type = CompressionSettings::Type::kPowerSgd, .rank = 2}, 3);
      std::vector<size_t> paramsPerBucket;
      DdpStrategy ddp(ProcessGroups{.rank = rank, .worldSize = kRanks, .dataRank = rank, .dataSize = kRanks,
                                    .world = backend, .data = backend},
                      {.firstBucketMb = 0.002, .bucketMb = 0.023, .overlap = overlap, .hook = hook});
      nn::Model model = nn::Model::build(spec, kBatch, 1);
      ddp.prepare(model);
      auto& psgd = dynamic_cast<PowerSgdHook&>(*hook);
      if (psgd.plan().entries.size() != 6) problems[static_cast<size_t>(rank)] = "bind() did not see 6 parameters";
      for (int step = 0; step < kSteps; ++step) {
        std::vector<float> x(kBatch * 100), dy(kBatch * 10);
        for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.1f * static_cast<float>(i) + static_cast<float>(rank + step));
        for (size_t i = 0; i < dy.size(); ++i) dy[i] = 0.01f * static_cast<float>((i * 7 + rank * 3 + step) % 11) - 0.05f;
        model.forward(x.data(), kBatch, true);
        model.backward(TensorView::f32(dy.data(), Shape{kBatch, 10}), ddp.gradReadyHook(), nn::GradMode::kOverwrite);
        ddp.finishStep();
        auto g = model.grads();
        seen[static_cast<size_t>(rank)].emplace_back(g.begin(), g.end());
      }
    });
    REQUIRE(comm::testing::firstError(errors) == "");
    CHECK(problems[0] == "");
    CHECK(seen[0] == seen[1]);  // replicas agree bit for bit
    grads[overlap] = seen[0];
  }
  CHECK(grads[true] == grads[false]);
}

TEST_CASE("topk momentum_correction: needs sgd with momentum; keeps a velocity, masked where sent") {
  CHECK(parseError(R"({"type": "powersgd", "momentum_correction": true})").find("/c/momentum_correction") !=
        std::string::npos);
  CHECK(parseError(R"({"type": "topk", "momentum_correction": true, "error_feedback": false})")
            .find("/c/momentum_correction: needs \"error_feedback\": true") != std::string::npos);
  auto c = parsed(R"({"type": "topk", "momentum_correction": true})");
  nn::OptimizerSpec adam{.type = nn::OptimizerType::kAdam};
  CHECK_THROWS_WITH_AS(checkCompressionFitsOptimizer(c, adam, "j.json", "/c"),
                       doctest::Contains("/c/momentum_correction: needs an \"sgd\" optimizer"), ConfigError);
  nn::OptimizerSpec sgd{.type = nn::OptimizerType::kSgd, .momentum = 0.5};
  checkCompressionFitsOptimizer(c, sgd, "j.json", "/c");
  CHECK(c.momentum == 0.5);

  // One rank's view over two steps, k = 1 of 4: u = m u + g, e += u, u and e zeroed where sent.
  constexpr int kRanks = 2;
  HookLayout layout{.arenaSize = 4, .params = {{"0.bias", Shape{4}, 0, 4}}, .groupSize = kRanks};
  c.ratio = 0.25;
  const std::vector<std::vector<float>> g = {{1, 2, 3, 4}, {1, 1, 1, 1}};
  auto runs = runHook(kRanks, layout, c, 2, [&](int, int step) { return g[static_cast<size_t>(step)]; });
  // Step 0: u = g0, e = g0; index 3 (4) sent. Step 1: u = 0.5 * {1, 2, 3, 0} + 1 = {1.5, 2, 2.5, 1};
  // e = {1, 2, 3, 0} + u = {2.5, 4, 5.5, 1}; index 2 (5.5) sent.
  CHECK(runs[0].results[0] == std::vector<float>{0, 0, 0, 4});
  CHECK(runs[0].results[1] == std::vector<float>{0, 0, 5.5f, 0});
  CHECK(runs[0].state.at(0) == std::vector<float>{2.5f, 4, 0, 1});     // topk.residual
  CHECK(runs[0].state.at(1) == std::vector<float>{1.5f, 2, 0, 1});     // topk.velocity
}

TEST_CASE("topk DGC sparsity warm-up: 25%, then a quarter each stage, down to ratio over warmup_steps") {
  auto c = parsed(R"({"type": "topk", "ratio": 0.01, "warmup_steps": 90})");
  CHECK(c.warmupSteps == 90);
  CHECK(parseError(R"({"type": "powersgd", "warmup_steps": 5})").find("/c/warmup_steps: applies to \"type\": \"topk\"") !=
        std::string::npos);
  CHECK(parseError(R"({"type": "topk", "warmup_steps": -1})").find("/c/warmup_steps: expected an integer >= 0") !=
        std::string::npos);
  // Three stages above 1% (25%, 6.25%, 1.5625%), 30 steps each.
  CHECK(topKDensity(c, 0) == 0.25);
  CHECK(topKDensity(c, 29) == 0.25);
  CHECK(topKDensity(c, 30) == 0.0625);
  CHECK(topKDensity(c, 89) == 0.015625);
  CHECK(topKDensity(c, 90) == 0.01);
  c.warmupSteps = 0;
  CHECK(topKDensity(c, 0) == 0.01);
  c.ratio = 0.5;  // above the first stage: no warm-up
  c.warmupSteps = 10;
  CHECK(topKDensity(c, 0) == 0.5);

  // Over a real group, after start_step: k = 28 of 110 (25%) for 2 steps, 7 (6.25%) for 2, then 6 (5%).
  constexpr int kRanks = 2;
  auto layout = layoutOf(10, 10, kRanks);
  const CompressionSettings w{.type = CompressionSettings::Type::kTopK, .ratio = 0.05, .startStep = 1, .warmupSteps = 4};
  auto runs = runHook(kRanks, layout, w, 6, [&](int rank, int step) { return wave(layout.arenaSize, rank, step); });
  CHECK(runs[0].traffic.bytesSent == 110 * 4 + (28 + 28 + 7 + 7 + 6) * kTopKPairBytes);
  auto nonzero = [](const std::vector<float>& v) { return std::count_if(v.begin(), v.end(), [](float x) { return x != 0; }); };
  CHECK(nonzero(runs[0].results[1]) <= 56);
  CHECK(nonzero(runs[0].results[1]) > 28);
  CHECK(runs[1].results == runs[0].results);
}

TEST_CASE("topk local gradient clipping (DGC): each rank clips its mean gradient to clip_grad_norm x sqrt(ranks)") {
  // DGC clips each rank's gradient, scaled by 1/ranks for the sum, to the threshold / sqrt(ranks); each rank here
  // holds its unscaled mean, so the same rule is threshold x sqrt(ranks) (the old / sqrt(ranks) clipped every
  // rank ranks times too hard: a 2-rank GPT ran with half its step wherever clipping bit).
  auto c = parsed(R"({"type": "topk", "ratio": 1})");
  nn::OptimizerSpec sgd{.type = nn::OptimizerType::kSgd, .clipGradNorm = 0.5};
  checkCompressionFitsOptimizer(c, sgd, "j.json", "/c");
  CHECK(c.localClipNorm == 0.5);
  auto p = parsed(R"({"type": "powersgd"})");
  checkCompressionFitsOptimizer(p, sgd, "j.json", "/c");
  CHECK(p.localClipNorm == 0.0);

  constexpr int kRanks = 2;
  auto layout = layoutOf(4, 5, kRanks);  // one bucket: the whole threshold, 0.5 x sqrt(2)
  auto runs = runHook(kRanks, layout, c, 1, [&](int rank, int step) { return wave(layout.arenaSize, rank, step); });
  const double limit = 0.5 * std::sqrt(2.0);
  for (size_t i = 0; i < layout.arenaSize; ++i) {
    double want = 0;
    for (int r = 0; r < kRanks; ++r) {
      auto g = wave(layout.arenaSize, r, 0);
      double norm = 0;
      for (float v : g) norm += static_cast<double>(v) * v;
      norm = std::sqrt(norm);
      REQUIRE(norm > 2 * limit);  // the case clips
      want += g[i] * std::min(1.0, limit / (norm + 1e-6)) / kRanks;
    }
    CHECK(runs[0].results[0][i] == doctest::Approx(want).epsilon(1e-5));
  }
}

TEST_CASE("compression buffers for the memory estimate: residuals, copies, factors and pair buffers") {
  std::vector<GradParam> params = {{"0.weight", Shape{1000, 1000}, 0, 1000000},
                                   {"0.bias", Shape{1000}, 1000000, 1000}};
  const uint64_t arena = 1001000 * 4;
  CHECK(compressionBufferBytes({.type = CompressionSettings::Type::kFp16}, params, 2) == 1001000 * 2);
  // P and Q (2 x 1000 each), Q's initial values (its restart) and the bias, plus the residual and the copy of g + e.
  CHECK(compressionBufferBytes({.type = CompressionSettings::Type::kPowerSgd, .rank = 2}, params, 2) ==
        (2000 + 2000 + 2000 + 1000) * 4 + 2 * arena);
  CHECK(compressionBufferBytes({.type = CompressionSettings::Type::kPowerSgd, .rank = 2, .errorFeedback = false},
                               params, 2) == (2000 + 2000 + 2000 + 1000) * 4);
  // top-k: residual, candidate indices, and k pairs sent plus n x k received (k = 10010 + 1 per parameter).
  const uint64_t k = 10010 + 2;
  CHECK(compressionBufferBytes({.type = CompressionSettings::Type::kTopK, .ratio = 0.01}, params, 4) ==
        arena + 1001000 * 4 + k * 8 * 5);
  // The warm-up's first stage (25%) sizes the pair buffers.
  const auto warm = compressionBufferBytes({.type = CompressionSettings::Type::kTopK, .ratio = 0.01, .warmupSteps = 10},
                                           params, 2);
  CHECK(warm == arena + 1001000 * 4 + (250250 + 2) * 8 * 3);
}

TEST_CASE("topk momentum_correction before start_step: the averaged gradient goes through the velocity") {
  // The optimizer runs without momentum from the first step, so the plain steps must carry it.
  constexpr int kRanks = 2;
  HookLayout layout{.arenaSize = 4, .params = {{"0.bias", Shape{4}, 0, 4}}, .groupSize = kRanks};
  const CompressionSettings c{.type = CompressionSettings::Type::kTopK, .ratio = 0.25, .startStep = 1,
                              .momentumCorrection = true, .momentum = 0.5};
  const std::vector<std::vector<float>> g = {{1, 2, 3, 4}, {1, 1, 1, 1}};
  auto runs = runHook(kRanks, layout, c, 2, [&](int, int step) { return g[static_cast<size_t>(step)]; });
  // Step 0 (plain): u = avg g = {1, 2, 3, 4}, sent as is. Step 1: u = 0.5 u + g = {1.5, 2, 2.5, 3}; e = u;
  // index 3 sent; u and e masked there.
  CHECK(runs[0].results[0] == std::vector<float>{1, 2, 3, 4});
  CHECK(runs[0].results[1] == std::vector<float>{0, 0, 0, 3});
  CHECK(runs[0].state.at(0) == std::vector<float>{1.5f, 2, 2.5f, 0});  // topk.residual
  CHECK(runs[0].state.at(1) == std::vector<float>{1.5f, 2, 2.5f, 0});  // topk.velocity
  CHECK(runs[1].results == runs[0].results);
}

// The checks that compression with nothing left out is the uncompressed path: top-k at ratio 1 (with and without
// momentum correction) and PowerSGD at a rank that holds the whole gradient.
TEST_CASE("nothing left out is uncompressed: powersgd at the gradient's rank, topk ratio 1 with momentum correction") {
  constexpr int kRanks = 2;
  SUBCASE("powersgd: rank >= the average's rank recovers it at every step (warm start, error feedback on)") {
    auto layout = layoutOf(16, 16, kRanks);
    // wave() as a 16x16 matrix has rank 2 on each rank, with the same column space: so has the average, and so
    // has each rank's residual (its gradient minus the average), which error feedback adds back the next step.
    const CompressionSettings c{.type = CompressionSettings::Type::kPowerSgd, .rank = 2};
    constexpr int kSteps = 4;
    auto runs = runHook(kRanks, layout, c, kSteps, [&](int rank, int step) { return wave(layout.arenaSize, rank, step); });
    for (int step = 0; step < kSteps; ++step)
      for (size_t i = 0; i < layout.arenaSize; ++i) {
        const float want = (wave(layout.arenaSize, 0, step)[i] + wave(layout.arenaSize, 1, step)[i]) / 2;
        CHECK_MESSAGE(std::abs(runs[0].results[static_cast<size_t>(step)][i] - want) <= 1e-4f, "step ", step, " i=", i);
      }
    // What one rank kept back the other sent extra: the residuals cancel.
    for (size_t i = 0; i < layout.arenaSize; ++i) CHECK(std::abs(runs[0].state.at(1)[i] + runs[1].state.at(1)[i]) <= 1e-4f);
  }
  SUBCASE("topk ratio 1 with momentum correction and no masking is momentum SGD's velocity of the average") {
    auto c = parsed(R"({"type": "topk", "ratio": 1, "momentum_correction": true, "momentum_masking": false})");
    CHECK(!c.momentumMasking);
    c.momentum = 0.9;
    HookLayout layout{.arenaSize = 64, .params = {{"0.bias", Shape{64}, 0, 64}}, .groupSize = kRanks};
    constexpr int kSteps = 5;
    auto runs = runHook(kRanks, layout, c, kSteps, [&](int rank, int step) { return wave(64, rank, step); });
    std::vector<float> u(64, 0.0f);
    for (int step = 0; step < kSteps; ++step)
      for (size_t i = 0; i < 64; ++i) {
        u[i] = 0.9f * u[i] + (wave(64, 0, step)[i] + wave(64, 1, step)[i]) / 2;
        CHECK(runs[0].results[static_cast<size_t>(step)][i] == doctest::Approx(u[i]).epsilon(1e-5));
      }
    // With DGC's masking (the default) a coordinate sent every step has no velocity left: plain SGD at ratio 1.
    c.momentumMasking = true;
    runs = runHook(kRanks, layout, c, 2, [&](int rank, int step) { return wave(64, rank, step); });
    for (size_t i = 0; i < 64; ++i)
      CHECK(runs[0].results[1][i] == doctest::Approx((wave(64, 0, 1)[i] + wave(64, 1, 1)[i]) / 2).epsilon(1e-5));
  }
  SUBCASE("momentum_masking needs momentum_correction") {
    CHECK(parseError(R"({"type": "topk", "momentum_masking": false})").find("/c/momentum_masking: applies with") !=
          std::string::npos);
    CHECK(parseError(R"({"type": "powersgd", "momentum_masking": false})").find("/c/momentum_masking") !=
          std::string::npos);
  }
}

TEST_CASE("topk local_adam (Efficient-Adam): topk only, with adam or adamw, not with momentum_correction") {
  CHECK(parseError(R"({"type": "powersgd", "local_adam": true})")
            .find("/c/local_adam: applies to \"type\": \"topk\" only") != std::string::npos);
  CHECK(parseError(R"({"type": "topk", "local_adam": true, "momentum_correction": true})")
            .find("/c/local_adam: cannot be combined with \"momentum_correction\"") != std::string::npos);
  auto c = parsed(R"({"type": "topk", "start_step": 5, "local_adam": true})");
  CHECK(c.localAdam);
  CHECK(!parsed(R"({"type": "topk"})").localAdam);
  nn::OptimizerSpec sgd{.type = nn::OptimizerType::kSgd, .momentum = 0.9};
  CHECK_THROWS_WITH_AS(checkCompressionFitsOptimizer(c, sgd, "j.json", "/c"),
                       doctest::Contains("/c/local_adam: needs an \"adam\" or \"adamw\" optimizer"), ConfigError);
  nn::OptimizerSpec l2{.type = nn::OptimizerType::kAdam, .weightDecay = 0.01};
  CHECK_THROWS_WITH_AS(checkCompressionFitsOptimizer(c, l2, "j.json", "/c"),
                       doctest::Contains("/c/local_adam: not with \"adam\" and \"weight_decay\" 0.01"), ConfigError);
  nn::OptimizerSpec ams{.type = nn::OptimizerType::kAdamW, .amsgrad = true};
  CHECK_THROWS_WITH_AS(checkCompressionFitsOptimizer(c, ams, "j.json", "/c"), doctest::Contains("amsgrad"), ConfigError);
  nn::OptimizerSpec adamw{.type = nn::OptimizerType::kAdamW, .weightDecay = 0.1, .beta1 = 0.8, .beta2 = 0.99, .eps = 1e-6};
  checkCompressionFitsOptimizer(c, adamw, "j.json", "/c");
  CHECK(c.beta1 == 0.8);
  CHECK(c.beta2 == 0.99);
  CHECK(c.eps == 1e-6);
  // Adam with momentum_correction: the error points to local_adam.
  auto mc = parsed(R"({"type": "topk", "momentum_correction": true})");
  CHECK_THROWS_WITH_AS(checkCompressionFitsOptimizer(mc, adamw, "j.json", "/c"),
                       doctest::Contains("use \"local_adam\": true instead"), ConfigError);
  // Two more arenas of state per rank (exp_avg, exp_avg_sq).
  HookLayout layout{.arenaSize = 100, .params = {{"0.bias", Shape{100}, 0, 100}}, .groupSize = 2};
  auto plain = parsed(R"({"type": "topk"})");
  CHECK(compressionBufferBytes(c, layout.params, 2) == compressionBufferBytes(plain, layout.params, 2) + 2 * 400);
}

TEST_CASE("topk local_adam: plain average before start_step, then each rank's Adam update, with error feedback") {
  constexpr int kRanks = 2;
  constexpr size_t kN = 64;
  constexpr int kSteps = 6;
  HookLayout layout{.arenaSize = kN, .params = {{"0.bias", Shape{kN}, 0, kN}}, .groupSize = kRanks};
  CompressionSettings c{.type = CompressionSettings::Type::kTopK, .ratio = 1, .startStep = 1, .localAdam = true,
                        .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8};
  auto grad = [](int rank, int step) { return wave(kN, rank, step); };
  // Each rank's Adam direction m_hat / (sqrt(v_hat) + eps) from its own gradients, its moments from the first step
  // (warm when start_step comes).
  std::vector<std::vector<std::vector<double>>> dir(kRanks);  // [rank][step][i], steps from start_step
  for (int r = 0; r < kRanks; ++r) {
    std::vector<double> m(kN, 0), v(kN, 0);
    for (int step = 0; step < kSteps; ++step) {
      const std::vector<float> g = grad(r, step);
      const int t = step + 1;
      std::vector<double> d(kN);
      for (size_t i = 0; i < kN; ++i) {
        m[i] = 0.9 * m[i] + 0.1 * g[i];
        v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
        d[i] = m[i] / (1 - std::pow(0.9, t)) / (std::sqrt(v[i] / (1 - std::pow(0.999, t))) + 1e-8);
      }
      if (step >= 1) dir[static_cast<size_t>(r)].push_back(d);
    }
  }
  SUBCASE("ratio 1: the average of the ranks' directions every step (step 0: the plain average)") {
    auto runs = runHook(kRanks, layout, c, kSteps, grad);
    for (size_t i = 0; i < kN; ++i)
      CHECK(runs[0].results[0][i] == doctest::Approx((grad(0, 0)[i] + grad(1, 0)[i]) / 2).epsilon(1e-6));
    for (int step = 1; step < kSteps; ++step)
      for (size_t i = 0; i < kN; ++i) {
        const auto s = static_cast<size_t>(step - 1);
        CHECK(runs[0].results[static_cast<size_t>(step)][i] ==
              doctest::Approx((dir[0][s][i] + dir[1][s][i]) / 2).epsilon(1e-4));
      }
    CHECK(runs[1].results == runs[0].results);
    REQUIRE(runs[0].state.size() == 3);  // residual, exp_avg, exp_avg_sq: each rank's own moments
    CHECK(runs[0].state[1] != runs[1].state[1]);
  }
  SUBCASE("ratio 1/16: nothing is lost, what was not sent is in the residuals") {
    c.ratio = 1.0 / 16;
    auto runs = runHook(kRanks, layout, c, kSteps, grad);
    CHECK(runs[1].results == runs[0].results);
    for (size_t i = 0; i < kN; ++i) {
      double sent = 0, total = 0;
      for (int step = 1; step < kSteps; ++step) {
        sent += kRanks * runs[0].results[static_cast<size_t>(step)][i];
        for (int r = 0; r < kRanks; ++r) total += dir[static_cast<size_t>(r)][static_cast<size_t>(step - 1)][i];
      }
      const double kept = runs[0].state[0][i] + runs[1].state[0][i];
      CHECK(sent + kept == doctest::Approx(total).epsilon(1e-4));
    }
    // 4 of 64 per rank per step: at most 8 coordinates move in a step.
    for (int step = 1; step < kSteps; ++step)
      CHECK(std::count_if(runs[0].results[static_cast<size_t>(step)].begin(),
                          runs[0].results[static_cast<size_t>(step)].end(), [](float x) { return x != 0; }) <= 8);
  }
}
