// Strategies and the communication-hook seam: one thread per rank over the in-memory store (tcp backend).
#include <doctest/doctest.h>

#include <cmath>

#include "lib/comm/registry.h"
#include "lib/nn/optimizer.h"
#include "lib/train/ddp.h"
#include "lib/train/strategy.h"
#include "rendezvous/memory_store.h"
#include "tests/comm/comm_test_util.h"

using namespace dtrain;
using namespace dtrain::train;

namespace {

constexpr int kBatch = 4;
constexpr int kIn = 100;
constexpr int kOut = 10;

nn::ModelSpec specOf() {
  // layer 0: 100*50+50 = 5050, layer 2: 50*40+40 = 2040, layer 4: 40*10+10 = 410 floats
  return nn::parseModelSpec(nlohmann::json::parse(R"({"input": [100], "layers": [
      {"type": "linear", "out": 50}, {"type": "relu"}, {"type": "linear", "out": 40}, {"type": "relu"},
      {"type": "linear", "out": 10}]})"),
                            "t.json");
}

// Bucket caps of ~524 and ~6029 floats: three buckets, one per linear layer (see test_buckets.cpp).
constexpr double kFirstMb = 0.002;
constexpr double kBucketMb = 0.023;

// Rank r's input and output gradient at `step`: different on every rank and step.
struct StepData {
  std::vector<float> x, dy;
};
StepData dataOf(int rank, int step) {
  StepData d{std::vector<float>(kBatch * kIn), std::vector<float>(kBatch * kOut)};
  for (size_t i = 0; i < d.x.size(); ++i) d.x[i] = std::sin(0.1f * static_cast<float>(i) + static_cast<float>(rank + 3 * step));
  for (size_t i = 0; i < d.dy.size(); ++i) d.dy[i] = 0.01f * static_cast<float>((i * 7 + rank * 3 + step) % 11) - 0.05f;
  return d;
}

// One forward/backward of `model` on rank r's step data, with `onReady` as the layer callback.
void forwardBackward(nn::Model& model, const StepData& d, nn::LayerGradReady onReady) {
  model.forward(d.x.data(), kBatch, true);
  model.backward(TensorView::f32(d.dy.data(), Shape{kBatch, kOut}), onReady, nn::GradMode::kOverwrite);
}

// Rank r's local gradient at `step`, from a model with the same initial parameters.
std::vector<float> localGrads(nn::Model& model, int rank, int step) {
  forwardBackward(model, dataOf(rank, step), {});
  auto g = model.grads();
  return {g.begin(), g.end()};
}

bool close(float got, float want) { return std::abs(got - want) <= 1e-6f + 1e-5f * std::abs(want); }

struct Seen {
  int step = 0;
  size_t index = 0;
  bool last = false;
  size_t offset = 0;
  int64_t count = 0;
  std::vector<int> layers;
  bool duringBackward = false;
};

ProcessGroups groupsOf(int rank, int size, comm::BackendPtr backend) {
  return ProcessGroups{.rank = rank, .worldSize = size, .dataRank = rank, .dataSize = size, .world = backend,
                       .data = backend};
}

// Per rank: the hook's calls, and the first gradient or parameter that differs from the expectation.
struct RankOutcome {
  std::vector<Seen> seen;
  std::string mismatch;
};

}  // namespace

TEST_CASE("a custom comm hook sees every bucket once per step, in ready order, and the optimizer sees its result") {
  for (bool overlap : {true, false}) {
    CAPTURE(overlap);
    constexpr int kRanks = 2;
    constexpr int kSteps = 2;
    constexpr float kLr = 0.1f;
    auto store = rendezvous::MemoryStore::create();
    std::vector<RankOutcome> out(kRanks);
    auto errors = comm::testing::onRanks(kRanks, [&](int rank) {
      auto backend = comm::createBackend("tcp", comm::testing::rankOptions(rank, kRanks, store));
      RankOutcome& o = out[static_cast<size_t>(rank)];
      int step = 0;
      bool inBackward = false;
      // The test hook sums instead of averaging, so its result is told apart from the default hook's.
      auto hook = makeCommHook("test_sum", [&](const GradBucket& b, comm::Backend& group) {
        o.seen.push_back({step, b.index, b.last, b.offset, b.grads.numel(), {b.layers.begin(), b.layers.end()},
                          inBackward});
        return group.allreduceAsync(b.grads, comm::ReduceOp::kSum);
      });
      DdpStrategy ddp(groupsOf(rank, kRanks, backend),
                      {.firstBucketMb = kFirstMb, .bucketMb = kBucketMb, .overlap = overlap, .hook = hook});
      auto spec = specOf();
      nn::Model model = nn::Model::build(spec, kBatch, 1);
      nn::Model reference = nn::Model::build(spec, kBatch, 1);
      ddp.prepare(model);
      auto optimizer = nn::Optimizer::create({.type = nn::OptimizerType::kSgd, .lr = kLr}, model.numParams());
      for (step = 0; step < kSteps; ++step) {
        // The reference replays both ranks' local gradients from the same parameters.
        auto p = model.params();
        std::copy(p.begin(), p.end(), reference.params().begin());
        auto g0 = localGrads(reference, 0, step);
        auto g1 = localGrads(reference, 1, step);
        std::vector<float> before(p.begin(), p.end());
        inBackward = true;
        forwardBackward(model, dataOf(rank, step), ddp.gradReadyHook());
        inBackward = false;
        ddp.finishStep();
        auto g = model.grads();
        for (size_t i = 0; i < g.size() && o.mismatch.empty(); ++i)
          if (!close(g[i], g0[i] + g1[i]))
            o.mismatch = fmt::format("step {} grad[{}] = {}, want {}", step, i, g[i], g0[i] + g1[i]);
        optimizer->step(model.params(), model.grads());
        for (size_t i = 0; i < p.size() && o.mismatch.empty(); ++i) {
          float want = before[i] - kLr * (g0[i] + g1[i]);
          if (!close(p[i], want)) o.mismatch = fmt::format("step {} param[{}] = {}, want {}", step, i, p[i], want);
        }
      }
    });
    REQUIRE(comm::testing::firstError(errors) == "");
    for (int rank = 0; rank < kRanks; ++rank) {
      CAPTURE(rank);
      const RankOutcome& o = out[static_cast<size_t>(rank)];
      CHECK(o.mismatch == "");
      if (overlap) {
        // Buckets in reverse layer order, started while backward ran, each exactly once per step.
        REQUIRE(o.seen.size() == 3 * kSteps);
        for (int step = 0; step < kSteps; ++step) {
          for (size_t b = 0; b < 3; ++b) {
            const Seen& s = o.seen[static_cast<size_t>(step) * 3 + b];
            CHECK(s.step == step);
            CHECK(s.index == b);
            CHECK(s.last == (b == 2));
            CHECK(s.duringBackward);
          }
          CHECK(o.seen[static_cast<size_t>(step) * 3].layers == std::vector<int>{4});
          CHECK(o.seen[static_cast<size_t>(step) * 3 + 1].layers == std::vector<int>{2});
          CHECK(o.seen[static_cast<size_t>(step) * 3 + 2].layers == std::vector<int>{0});
          CHECK(o.seen[static_cast<size_t>(step) * 3 + 2].offset == 0);
          CHECK(o.seen[static_cast<size_t>(step) * 3 + 2].count == 5050);
        }
      } else {
        // One bucket over the whole arena, after backward.
        REQUIRE(o.seen.size() == kSteps);
        for (int step = 0; step < kSteps; ++step) {
          const Seen& s = o.seen[static_cast<size_t>(step)];
          CHECK(s.step == step);
          CHECK(s.index == 0);
          CHECK(s.last);
          CHECK(s.offset == 0);
          CHECK(s.count == 5050 + 2040 + 410);
          CHECK(s.layers == std::vector<int>{4, 2, 0});
          CHECK(!s.duringBackward);
        }
      }
    }
  }
}

TEST_CASE("ddp's default hook averages the gradients; prepare() gives every rank rank 0's parameters") {
  for (bool overlap : {true, false}) {
    CAPTURE(overlap);
    constexpr int kRanks = 2;
    auto store = rendezvous::MemoryStore::create();
    std::vector<std::string> mismatch(kRanks);
    std::vector<std::string> hookName(kRanks);
    auto errors = comm::testing::onRanks(kRanks, [&](int rank) {
      auto backend = comm::createBackend("tcp", comm::testing::rankOptions(rank, kRanks, store));
      Job job;  // parallel.strategy "ddp" by default
      job.parallel.firstBucketMb = kFirstMb;
      job.parallel.bucketMb = kBucketMb;
      auto strategy = makeStrategy(job, groupsOf(rank, kRanks, backend), {.overlapDefault = overlap});
      hookName[static_cast<size_t>(rank)] = dynamic_cast<DdpStrategy&>(*strategy).hook().name();
      auto spec = specOf();
      // Different seeds: only the broadcast makes the replicas equal.
      nn::Model model = nn::Model::build(spec, kBatch, rank == 0 ? 1 : 99);
      nn::Model reference = nn::Model::build(spec, kBatch, 1);
      strategy->prepare(model);
      auto p = model.params();
      auto ref = reference.params();
      if (!std::equal(p.begin(), p.end(), ref.begin())) mismatch[static_cast<size_t>(rank)] = "parameters differ";
      auto g0 = localGrads(reference, 0, 0);
      auto g1 = localGrads(reference, 1, 0);
      forwardBackward(model, dataOf(rank, 0), strategy->gradReadyHook());
      strategy->finishStep();
      auto g = model.grads();
      for (size_t i = 0; i < g.size() && mismatch[static_cast<size_t>(rank)].empty(); ++i)
        if (!close(g[i], (g0[i] + g1[i]) / 2))
          mismatch[static_cast<size_t>(rank)] = fmt::format("grad[{}] = {}, want {}", i, g[i], (g0[i] + g1[i]) / 2);
      double metrics[2] = {1.0 + rank, 10.0 * rank};
      strategy->reduceMetrics(metrics, comm::ReduceOp::kSum);
      if (metrics[0] != 3.0 || metrics[1] != 10.0) mismatch[static_cast<size_t>(rank)] += " metrics not summed";
      if (strategy->agreeOnStop(rank == 1 ? 15 : 0) != 15) mismatch[static_cast<size_t>(rank)] += " stop not agreed";
      strategy->barrier();
    });
    REQUIRE(comm::testing::firstError(errors) == "");
    for (int rank = 0; rank < kRanks; ++rank) {
      CHECK(mismatch[static_cast<size_t>(rank)] == "");
      CHECK(hookName[static_cast<size_t>(rank)] == "allreduce_avg");
    }
  }
}

TEST_CASE("ddp: rank 0 writes the whole checkpoint, every rank loads all of it") {
  constexpr int kRanks = 2;
  auto store = rendezvous::MemoryStore::create();
  std::vector<CheckpointShard> shards(kRanks);
  auto spec = specOf();
  auto model = nn::Model::build(spec, kBatch, 1);
  auto errors = comm::testing::onRanks(kRanks, [&](int rank) {
    auto backend = comm::createBackend("tcp", comm::testing::rankOptions(rank, kRanks, store));
    DdpStrategy ddp(groupsOf(rank, kRanks, backend), {});
    shards[static_cast<size_t>(rank)] = ddp.checkpointShard(model);
  });
  REQUIRE(comm::testing::firstError(errors) == "");
  const std::vector<size_t> all{0, 1, 2, 3, 4, 5};  // three linear layers: weight, bias each
  for (const auto& s : shards) {
    CHECK(s.loadParams == all);
    CHECK(s.loadOptimizer);
  }
  CHECK(shards[0].saveModel);
  CHECK(shards[0].saveParams == all);
  CHECK(shards[0].saveOptimizer);
  CHECK(!shards[1].saveModel);
  CHECK(shards[1].saveParams.empty());
  CHECK(!shards[1].saveOptimizer);
}

TEST_CASE("world size 1 is the local strategy: no communication, identity reductions, the whole checkpoint") {
  Job job;
  auto strategy = makeStrategy(job, ProcessGroups{});
  CHECK(strategy->name() == "local");
  CHECK(strategy->summary() == "");
  CHECK(!strategy->gradReadyHook());
  CHECK(strategy->stopCheckEvery() == 1);
  auto model = nn::Model::build(specOf(), kBatch, 1);
  strategy->prepare(model);
  auto before = localGrads(model, 0, 0);
  strategy->finishStep();
  auto g = model.grads();
  CHECK(std::equal(g.begin(), g.end(), before.begin()));
  double v[2] = {2.5, -1};
  strategy->reduceMetrics(v, comm::ReduceOp::kSum);
  CHECK(v[0] == 2.5);
  CHECK(v[1] == -1);
  CHECK(strategy->agreeOnStop(15) == 15);
  strategy->barrier();
  auto shard = strategy->checkpointShard(model);
  CHECK(shard.saveModel);
  CHECK(shard.saveOptimizer);
  CHECK(shard.loadOptimizer);
  CHECK(shard.saveParams.size() == model.paramTable().size());
  CHECK(shard.loadParams.size() == model.paramTable().size());
}
