// Tensor parallelism (lib/nn/tensor_parallel.h): a model split over T in-process ranks (one thread each, the
// all-reduce simulated over shared memory) starts from the unsplit model's weights and reproduces its outputs and
// gradients, slice by slice, for plain MLPs and the gpt preset; bad degrees are named errors.
#include <doctest/doctest.h>

#include <barrier>
#include <cmath>
#include <map>
#include <random>
#include <thread>
#include <vector>

#include "lib/common/error.h"
#include "lib/nn/model.h"
#include "lib/nn/spec.h"
#include "lib/nn/tensor_parallel.h"

using namespace dtrain;
using namespace dtrain::nn;
using nlohmann::json;

namespace {

// T ranks in threads: every rank publishes its buffer, each sums all of them into a private copy, then writes it
// back; barriers keep the phases apart. Counts the calls (one per all-reduce per rank).
struct SharedReduce {
  explicit SharedReduce(int n) : size(n), slots(static_cast<size_t>(n)), sync(n) {}
  int size;
  std::vector<float*> slots;
  std::barrier<> sync;
};

class ThreadGroup final : public TensorGroup {
 public:
  ThreadGroup(SharedReduce& shared, int rank) : shared_(shared), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return shared_.size; }
  void allReduceSum(float* data, size_t count) override {
    ++calls;
    shared_.slots[static_cast<size_t>(rank_)] = data;
    shared_.sync.arrive_and_wait();
    std::vector<float> sum(count, 0.0f);
    for (float* s : shared_.slots)
      for (size_t i = 0; i < count; ++i) sum[i] += s[i];
    shared_.sync.arrive_and_wait();
    std::copy(sum.begin(), sum.end(), data);
    shared_.sync.arrive_and_wait();
  }
  int calls = 0;

 private:
  SharedReduce& shared_;
  int rank_;
};

// The full model's tensors by name, as flat floats.
std::map<std::string, std::vector<float>> byName(const Model& m, std::span<const float> arena) {
  std::map<std::string, std::vector<float>> out;
  for (const auto& e : m.paramTable()) out[e.name].assign(arena.begin() + e.offset, arena.begin() + e.offset + e.count);
  return out;
}

void checkClose(std::span<const float> got, std::span<const float> want, double rel, const std::string& what) {
  REQUIRE(got.size() == want.size());
  double scale = 1e-4;  // an absolute floor: some gradients are ~0 (attention's q bias: softmax is shift-invariant)
  for (float w : want) scale = std::max(scale, static_cast<double>(std::fabs(w)));
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::fabs(static_cast<double>(got[i]) - want[i]));
  INFO(what);
  CHECK(worst <= rel * scale);
}

struct Run {
  std::vector<float> output;
  std::vector<float> params, grads;  // the rank's arenas after backward
  std::vector<ParamEntry> table;
  int calls = 0;
  double ownedSquares = 0;  // ownedSquaredNorm(replicated counted on rank 0)
};

// Forward + backward of `spec` on `x` with output gradient `dy`, built whole (size 1) or on `size` threads; `train`
// switches dropout on (every rank's streams seeded alike, as the trainer does for a tensor group).
std::vector<Run> runModel(const ModelSpec& spec, int size, const std::vector<float>& x, const std::vector<float>& dy,
                          int batch, bool train = false) {
  std::vector<Run> runs(static_cast<size_t>(size));
  SharedReduce shared(size);
  auto work = [&](int rank) {
    auto group = size > 1 ? std::make_shared<ThreadGroup>(shared, rank) : nullptr;
    Model m = Model::build(spec, batch, /*seed=*/7, Device::cpu(), group);
    TensorView out = m.forward(x.data(), batch, train);
    Run& r = runs[static_cast<size_t>(rank)];
    const auto* o = static_cast<const float*>(out.data);
    r.output.assign(o, o + out.shape.numel());
    r.params.assign(m.params().begin(), m.params().end());
    m.backward(TensorView::f32(dy.data(), out.shape), {}, GradMode::kOverwrite);
    r.grads.assign(m.grads().begin(), m.grads().end());
    r.ownedSquares = ownedSquaredNorm(m, m.grads(), rank == 0);
    r.table = m.paramTable();
    r.calls = group ? group->calls : 0;
  };
  std::vector<std::thread> threads;
  for (int r = 0; r < size; ++r) threads.emplace_back(work, r);
  for (auto& t : threads) t.join();
  return runs;
}

std::vector<float> randomFloats(size_t n, uint64_t seed, float lo, float hi) {
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (auto& f : v) f = d(g);
  return v;
}

// Split runs reproduce the whole run: same output on every rank; each slice's weights and gradients equal the
// whole model's slice; every full parameter is covered exactly once by the slices (replicated ones per rank).
void checkSplitMatches(const ModelSpec& spec, int size, std::vector<float> x, int batch, int expectedCalls,
                       bool train = false) {
  const int64_t outN = spec.output().numel() * batch;
  const auto dy = randomFloats(static_cast<size_t>(outN), 3, -1, 1);
  const auto whole = runModel(spec, 1, x, dy, batch, train);
  const auto split = runModel(spec, size, x, dy, batch, train);
  Model ref = Model::build(spec, batch, 7);
  const auto fullParams = byName(ref, whole[0].params);
  const auto fullGrads = byName(ref, whole[0].grads);
  std::map<std::string, std::vector<int>> covered;
  for (int r = 0; r < size; ++r) {
    const Run& run = split[static_cast<size_t>(r)];
    CAPTURE(r);
    checkClose(run.output, whole[0].output, 1e-5, "output");
    CHECK(run.calls == expectedCalls);
    int64_t local = 0;
    for (const auto& e : run.table) {
      CAPTURE(e.name);
      local += static_cast<int64_t>(e.count);
      const auto& fp = fullParams.at(e.name);
      const auto& fg = fullGrads.at(e.name);
      REQUIRE(static_cast<int64_t>(fp.size()) == e.fullShape.numel());
      std::vector<float> want(e.count);
      extractSlice(e, fp.data(), want.data());
      CHECK(std::equal(want.begin(), want.end(), run.params.begin() + static_cast<std::ptrdiff_t>(e.offset)));
      extractSlice(e, fg.data(), want.data());
      checkClose({run.grads.data() + e.offset, e.count}, want, 1e-5, "gradient of " + e.name);
      auto& cov = covered[e.name];
      cov.resize(fp.size(), 0);
      std::vector<float> ones(e.count, 1.0f), mask(fp.size(), 0.0f);
      insertSlice(e, ones.data(), mask.data());
      for (size_t i = 0; i < mask.size(); ++i) cov[i] += mask[i] > 0 ? (e.sliced() ? size : 1) : 0;
    }
    CHECK(local == shardCounts(spec, size, r).local);
  }
  for (const auto& [name, cov] : covered) {
    CAPTURE(name);
    // A sliced element is held by one rank (counted size times), a replicated one by every rank.
    CHECK(std::all_of(cov.begin(), cov.end(), [&](int c) { return c == size; }));
  }
  CHECK(covered.size() == fullParams.size());
}

}  // namespace

TEST_CASE("tensor parallel MLP: column/row pairs reproduce the whole model's outputs and gradients") {
  const json model = {{"input", {6}},
                      {"layers",
                       {{{"type", "linear"}, {"out", 8}}, {{"type", "relu"}}, {{"type", "linear"}, {"out", 4}},
                        {{"type", "tanh"}}, {{"type", "linear"}, {"out", 12}}, {{"type", "gelu"}},
                        {{"type", "linear"}, {"out", 3}}}}};
  const ModelSpec spec = parseModelSpec(model, "mlp.json");
  const int batch = 5;
  const auto x = randomFloats(6 * batch, 1, -2, 2);
  for (int size : {2, 4}) {
    CAPTURE(size);
    // Two pairs: one all-reduce forward (the row layer) and one backward (the column layer's dx) each, except the
    // first column layer, whose dx nothing needs.
    checkSplitMatches(spec, size, x, batch, 3);
  }
  const ModelSpec local = shardModelSpec(spec, 2, 1);
  CHECK(local.layers[0].shard.kind == TensorShard::kColumn);
  CHECK(local.layers[0].out == 4);
  CHECK(local.layers[1].input == Shape{4});
  CHECK(local.layers[2].shard.kind == TensorShard::kRow);
  CHECK(local.layers[2].input == Shape{4});
  CHECK(local.layers[4].shard.kind == TensorShard::kColumn);
  CHECK(local.layers[6].shard.kind == TensorShard::kRow);
}

TEST_CASE("tensor parallel: an odd last linear stays whole; nothing to split is replicated") {
  const json model = {{"input", {4}},
                      {"layers",
                       {{{"type", "linear"}, {"out", 6}}, {{"type", "relu"}}, {{"type", "linear"}, {"out", 4}},
                        {{"type", "layernorm"}}, {{"type", "linear"}, {"out", 5}}}}};
  const ModelSpec spec = parseModelSpec(model, "mlp.json");
  const ModelSpec local = shardModelSpec(spec, 2, 0);
  CHECK(local.layers[0].shard.kind == TensorShard::kColumn);
  CHECK(local.layers[2].shard.kind == TensorShard::kRow);
  CHECK(local.layers[4].shard.kind == TensorShard::kNone);
  checkSplitMatches(spec, 2, randomFloats(12, 2, -1, 1), 3, 1);
}

TEST_CASE("tensor parallel gpt: attention by heads, MLP column/row, one all-reduce per block each way") {
  const json preset = {{"preset", "gpt"}, {"vocab_size", 11}, {"block_size", 5}, {"n_layer", 2},
                       {"n_head", 4},      {"n_embd", 8},      {"bias", true}};
  const ModelSpec spec = parseModelSpec(preset, "gpt.json");
  const int batch = 3;
  std::vector<float> tokens;
  std::mt19937 g(5);
  for (int i = 0; i < 5 * batch; ++i) tokens.push_back(static_cast<float>(g() % 11));
  for (int size : {2, 4}) {
    CAPTURE(size);
    // Per block (attention, MLP): one forward all-reduce and one backward: 2 layers x 2 blocks x 2.
    checkSplitMatches(spec, size, tokens, batch, 8);
  }
}

TEST_CASE("tensor parallel gpt with dropout in training: the ranks drop the whole model's elements") {
  // Attention dropout numbers the elements by global head (lib/gpu/philox.h), so a rank's heads draw what the
  // whole layer draws for them; the replicated dropout layers draw alike on every rank.
  const json preset = {{"preset", "gpt"}, {"vocab_size", 11}, {"block_size", 5}, {"n_layer", 2},
                       {"n_head", 4},      {"n_embd", 8},      {"dropout", 0.3}};
  const ModelSpec spec = parseModelSpec(preset, "gpt.json");
  const int batch = 3;
  std::vector<float> tokens;
  std::mt19937 g(9);
  for (int i = 0; i < 5 * batch; ++i) tokens.push_back(static_cast<float>(g() % 11));
  for (int size : {2, 4}) {
    CAPTURE(size);
    checkSplitMatches(spec, size, tokens, batch, 8, /*train=*/true);
  }
  // The check can tell: training drops something (the output differs from evaluation's).
  const auto dy = randomFloats(static_cast<size_t>(spec.output().numel() * batch), 3, -1, 1);
  const auto trained = runModel(spec, 1, tokens, dy, batch, true), evaluated = runModel(spec, 1, tokens, dy, batch);
  CHECK(trained[0].output != evaluated[0].output);
}

TEST_CASE("tensor parallel: degrees that do not divide heads or widths are named errors") {
  const json preset = {{"preset", "gpt"}, {"vocab_size", 11}, {"block_size", 4}, {"n_layer", 1},
                       {"n_head", 6},     {"n_embd", 12}};
  const ModelSpec gpt = parseModelSpec(preset, "gpt.json");
  CHECK(tensorParallelProblems(gpt, 2).empty());
  const auto problems = tensorParallelProblems(gpt, 4);
  REQUIRE(problems.size() == 1);  // c_fc's 48 outputs split over 4
  CHECK(problems[0].find("n_head: 6 heads are not divisible by parallel.tensor 4") != std::string::npos);
  CHECK(problems[0].find("transformer.h.0") == std::string::npos);  // the attention layer's own name: "attn"
  CHECK(problems[0].find("(attn)") != std::string::npos);
  const json mlp = {{"input", {3}}, {"layers", {{{"type", "linear"}, {"out", 5}}, {{"type", "linear"}, {"out", 2}}}}};
  const auto bad = tensorParallelProblems(parseModelSpec(mlp, "m.json"), 2);
  REQUIRE(bad.size() == 1);
  CHECK(bad[0] == "/model/layers/0/out: 5 is not divisible by parallel.tensor 2 (a column-parallel linear splits "
                  "its 5 outputs)");
  CHECK_THROWS_AS(shardModelSpec(parseModelSpec(mlp, "m.json"), 2, 0), ConfigError);
}

TEST_CASE("tensor parallel: the owned squared norms sum to the whole model's") {
  const json model = {{"input", {4}},
                      {"layers", {{{"type", "linear"}, {"out", 6}}, {{"type", "relu"}}, {{"type", "linear"}, {"out", 2}}}}};
  const ModelSpec spec = parseModelSpec(model, "mlp.json");
  const auto x = randomFloats(8, 4, -1, 1);
  const auto dy = randomFloats(4, 5, -1, 1);
  const auto whole = runModel(spec, 1, x, dy, 2);
  const auto split = runModel(spec, 2, x, dy, 2);
  double sum = 0, want = 0;
  for (float g : whole[0].grads) want += static_cast<double>(g) * g;
  for (const Run& run : split) sum += run.ownedSquares;
  CHECK(sum == doctest::Approx(want).epsilon(1e-6));
  const ShardCounts c = shardCounts(spec, 2, 0);
  CHECK(c.full == 4 * 6 + 6 + 6 * 2 + 2);
  CHECK(c.replicated == 2);             // the row layer's bias
  CHECK(c.local == 12 + 3 + 6 + 2);     // half of each weight, half the column bias, the whole row bias
}
