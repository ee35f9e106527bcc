#include <doctest/doctest.h>

#include <algorithm>

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

namespace {

// Area under the ROC curve (Mann-Whitney U; ties count half).
double auc(const std::vector<double>& score, const std::vector<int32_t>& label) {
  std::vector<size_t> order(score.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return score[a] < score[b]; });
  double rankSum = 0, pos = 0;
  for (size_t i = 0; i < order.size();) {
    size_t j = i;
    while (j < order.size() && score[order[j]] == score[order[i]]) ++j;
    const double midRank = (static_cast<double>(i) + static_cast<double>(j) + 1) / 2;
    for (size_t k = i; k < j; ++k)
      if (label[order[k]] == 1) rankSum += midRank, pos += 1;
    i = j;
  }
  const double neg = static_cast<double>(score.size()) - pos;
  return (rankSum - pos * (pos + 1) / 2) / (pos * neg);
}

}  // namespace

TEST_CASE("synthetic recsys: Zipf ids, and a hidden preference a popularity baseline cannot see") {
  SyntheticOptions o{.task = SyntheticOptions::Task::kRecsys, .samples = 200000, .users = 1000, .items = 500,
                     .seed = 3, .sampleSeed = 3};
  auto train = fetchAll(*makeSynthetic(o));
  CHECK(train.x == fetchAll(*makeSynthetic(o)).x);  // deterministic
  std::vector<int64_t> userCount(1000), itemClicks(500), itemCount(500);
  for (size_t s = 0; s < train.classes.size(); ++s) {
    const auto u = static_cast<int64_t>(train.x[2 * s]), i = static_cast<int64_t>(train.x[2 * s + 1]) - 1000;
    REQUIRE(u >= 0);
    REQUIRE(u < 1000);
    REQUIRE(i >= 0);
    REQUIRE(i < 500);
    ++userCount[static_cast<size_t>(u)];
    ++itemCount[static_cast<size_t>(i)];
    itemClicks[static_cast<size_t>(i)] += train.classes[s];
  }
  // Zipf: the most frequent ids come first, the head is far more frequent than the tail.
  CHECK(userCount[0] > userCount[10]);
  CHECK(userCount[10] > userCount[500]);
  CHECK(itemCount[0] > 20 * itemCount[400]);

  // On fresh samples of the same task: the item's click rate (popularity baseline) vs the true probability.
  o.sampleSeed = 4;
  o.samples = 50000;
  auto eval = fetchAll(*makeSynthetic(o));
  const RecsysTruth truth = syntheticRecsysTruth(o);
  std::vector<double> pop, oracle;
  for (size_t s = 0; s < eval.classes.size(); ++s) {
    const auto u = static_cast<int64_t>(eval.x[2 * s]), i = static_cast<int64_t>(eval.x[2 * s + 1]) - 1000;
    const auto ii = static_cast<size_t>(i);
    pop.push_back(static_cast<double>(itemClicks[ii] + 1) / static_cast<double>(itemCount[ii] + 2));
    oracle.push_back(truth.clickProbability(u, i));
  }
  const double popAuc = auc(pop, eval.classes), oracleAuc = auc(oracle, eval.classes);
  MESSAGE("popularity AUC " << popAuc << ", true-preference AUC " << oracleAuc);
  CHECK(popAuc > 0.55);               // popularity (item bias) carries some signal ...
  CHECK(oracleAuc > popAuc + 0.08);   // ... the users' preferences much more
  CHECK_THROWS_AS(makeSynthetic({.task = SyntheticOptions::Task::kRecsys, .users = 1 << 24, .items = 1}), ConfigError);
}
