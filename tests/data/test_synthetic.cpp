#include <doctest/doctest.h>

#include "lib/common/error.h"
#include "lib/data/synthetic.h"

using namespace dtrain;
using namespace dtrain::data;

namespace {

struct All {
  std::vector<float> x;
  std::vector<float> targets;
  std::vector<int32_t> classes;
};

All fetchAll(const Dataset& ds) {
  All a;
  std::vector<int64_t> idx(static_cast<size_t>(ds.size()));
  for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<int64_t>(i);
  a.x.resize(idx.size() * static_cast<size_t>(ds.featureSize()));
  if (ds.labelKind() == LabelKind::kClass) {
    a.classes.resize(idx.size());
    ds.fetch(idx, a.x.data(), a.classes.data());
  } else {
    a.targets.resize(idx.size() * static_cast<size_t>(ds.labelSize()));
    ds.fetch(idx, a.x.data(), a.targets.data());
  }
  return a;
}

}  // namespace

TEST_CASE("synthetic regression is deterministic and follows y = W x + b (+ noise)") {
  SyntheticOptions o{.samples = 200, .features = 10, .outputs = 1, .noise = 0.0, .seed = 42, .sampleSeed = 42};
  auto a = fetchAll(*makeSynthetic(o));
  auto b = fetchAll(*makeSynthetic(o));
  CHECK(a.x == b.x);
  CHECK(a.targets == b.targets);
  auto w = syntheticRegressionParameters(o);
  REQUIRE(w.size() == 11);
  for (size_t i = 0; i < 200; ++i) {
    double y = w[10];
    for (size_t j = 0; j < 10; ++j) y += static_cast<double>(w[j]) * a.x[i * 10 + j];
    REQUIRE(a.targets[i] == doctest::Approx(y).epsilon(1e-5));
  }
  // Another sample seed: new samples of the same task; another seed: another task.
  o.sampleSeed = 7;
  auto c = fetchAll(*makeSynthetic(o));
  CHECK(c.x != a.x);
  CHECK(syntheticRegressionParameters(o) == w);
  o.seed = 1;
  CHECK(syntheticRegressionParameters(o) != w);
  // Features are roughly standard normal.
  double mean = 0, sq = 0;
  for (float v : a.x) mean += v, sq += static_cast<double>(v) * v;
  mean /= static_cast<double>(a.x.size());
  CHECK(std::abs(mean) < 0.15);
  CHECK(sq / static_cast<double>(a.x.size()) == doctest::Approx(1.0).epsilon(0.15));
}

TEST_CASE("synthetic classification: blobs and linear rules give valid, learnable labels") {
  SyntheticOptions o{.task = SyntheticOptions::Task::kClassification, .samples = 300, .features = 4, .numClasses = 3,
                     .seed = 3, .sampleSeed = 3};
  auto ds = makeSynthetic(o);
  CHECK(ds->labelKind() == LabelKind::kClass);
  CHECK(*ds->numClasses() == 3);
  auto a = fetchAll(*ds);
  std::vector<int> perClass(3);
  for (auto c : a.classes) {
    REQUIRE(c >= 0);
    REQUIRE(c < 3);
    ++perClass[static_cast<size_t>(c)];
  }
  for (int k : perClass) CHECK(k > 50);
  CHECK(fetchAll(*makeSynthetic(o)).x == a.x);

  o.rule = SyntheticOptions::Rule::kLinear;
  auto lin = fetchAll(*makeSynthetic(o));
  std::vector<int> linCount(3);
  for (auto c : lin.classes) ++linCount[static_cast<size_t>(c)];
  for (int k : linCount) CHECK(k > 0);
  CHECK_THROWS_AS(makeSynthetic({.task = SyntheticOptions::Task::kClassification, .numClasses = 1}), ConfigError);
}
