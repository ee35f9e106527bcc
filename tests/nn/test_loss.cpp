// Losses: values by hand, finite-difference gradients, evaluation sums, label and shape errors.
#include <doctest/doctest.h>

#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "lib/common/error.h"
#include "lib/nn/loss.h"

using namespace dtrain;
using namespace dtrain::nn;

namespace {

// Central differences of loss->forward against loss->backward() for every output element.
template <typename Targets>
void checkLossGradient(Loss& loss, std::vector<float>& out, const Shape& shape, const Targets& targets) {
  TensorView view = TensorView::f32(out.data(), shape);
  loss.forward(view, targets);
  TensorView g = loss.backward();
  REQUIRE(g.shape == shape);
  const std::vector<float> analytic(g.f32(), g.f32() + g.numel());
  const double h = 1e-2;
  for (size_t i = 0; i < out.size(); ++i) {
    const float saved = out[i];
    out[i] = saved + static_cast<float>(h);
    const double plus = loss.forward(view, targets);
    out[i] = saved - static_cast<float>(h);
    const double minus = loss.forward(view, targets);
    out[i] = saved;
    const double num = (plus - minus) / (2 * h);
    INFO("element " << i);
    CHECK(std::fabs(num - analytic[i]) <= 1e-4 + 1e-2 * std::fabs(analytic[i]));
  }
}

}  // namespace

TEST_CASE("cross_entropy: mean of -log softmax[label], int64 and int32 labels") {
  auto loss = Loss::create({LossType::kCrossEntropy}, Shape{3}, 4);
  std::vector<float> logits = {1, 2, 3, 1, 1, 1};
  std::vector<int64_t> labels = {2, 0};
  std::vector<int32_t> labels32 = {2, 0};
  TensorView out = TensorView::f32(logits.data(), Shape{2, 3});
  // Row 0: log(e + e^2 + e^3) - 3 = 0.40760596; row 1: log 3 = 1.09861229.
  CHECK(loss->forward(out, TensorView::i64(labels.data(), Shape{2})) == doctest::Approx(0.753109126556245));
  CHECK(loss->forward(out, TensorView::i32(labels32.data(), Shape{2})) == doctest::Approx(0.753109126556245));
  // d/dlogits = (softmax - onehot) / N.
  TensorView g = loss->backward();
  const double e = std::exp(1.0), z = e + e * e + e * e * e;
  CHECK(g.f32()[0] == doctest::Approx(e / z / 2));
  CHECK(g.f32()[2] == doctest::Approx((e * e * e / z - 1) / 2));
  CHECK(g.f32()[3] == doctest::Approx((1.0 / 3 - 1) / 2));
  // Scaling for micro-batch accumulation.
  TensorView g4 = loss->backward(0.25f);
  CHECK(g4.f32()[2] == doctest::Approx((e * e * e / z - 1) / 8));
}

TEST_CASE("cross_entropy is stable for large logits and its gradient matches finite differences") {
  auto loss = Loss::create({LossType::kCrossEntropy}, Shape{2}, 1);
  std::vector<float> big = {1000.0f, 0.0f};
  std::vector<int64_t> label = {1};
  CHECK(loss->forward(TensorView::f32(big.data(), Shape{1, 2}), TensorView::i64(label.data(), Shape{1})) ==
        doctest::Approx(1000.0));

  auto ce = Loss::create({LossType::kCrossEntropy}, Shape{5}, 3);
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  std::vector<float> out(15);
  for (float& v : out) v = u(rng);
  std::vector<int64_t> labels = {4, 0, 2};
  checkLossGradient(*ce, out, Shape{3, 5}, TensorView::i64(labels.data(), Shape{3}));
}

TEST_CASE("mse: mean over all elements, gradient 2 (y - t) / count") {
  auto loss = Loss::create({LossType::kMse}, Shape{2}, 2);
  std::vector<float> y = {1, 2, 3, 4};
  std::vector<float> t = {1, 0, 0, 4};
  CHECK(loss->forward(TensorView::f32(y.data(), Shape{2, 2}), TensorView::f32(t.data(), Shape{2, 2})) ==
        doctest::Approx((4.0 + 9.0) / 4));
  TensorView g = loss->backward();
  CHECK(std::vector<float>(g.f32(), g.f32() + 4) == std::vector<float>{0.0f, 1.0f, 1.5f, 0.0f});

  auto mse = Loss::create({LossType::kMse}, Shape{3}, 2);
  std::vector<float> out = {0.5f, -1.0f, 2.0f, 0.1f, 0.2f, -0.3f};
  std::vector<float> target = {0.0f, 1.0f, 1.0f, -1.0f, 0.5f, 0.0f};
  checkLossGradient(*mse, out, Shape{2, 3}, TensorView::f32(target.data(), Shape{2, 3}));
}

TEST_CASE("evaluate returns sums that reduce across ranks") {
  auto ce = Loss::create({LossType::kCrossEntropy}, Shape{3}, 4);
  std::vector<float> logits = {1, 2, 3, 5, 1, 1, 0, 0, 9};
  std::vector<int64_t> labels = {2, 1, 2};
  TensorView out = TensorView::f32(logits.data(), Shape{3, 3});
  TensorView lab = TensorView::i64(labels.data(), Shape{3});
  EvalSums s = ce->evaluate(out, lab);
  CHECK(s.samples == 3);
  CHECK(s.lossCount == 3);
  CHECK(s.correct == 2);
  CHECK(countCorrect(out, lab) == 2);
  CHECK(s.lossSum == doctest::Approx(3 * ce->forward(out, lab)).epsilon(1e-6));
  EvalSums total = s;
  total += s;
  CHECK(total.samples == 6);
  CHECK(total.accuracy() == doctest::Approx(2.0 / 3));
  CHECK(total.meanLoss() == doctest::Approx(s.meanLoss()));

  auto mse = Loss::create({LossType::kMse}, Shape{2}, 2);
  std::vector<float> y = {1, 2, 3, 4}, t = {0, 2, 3, 2};
  EvalSums m = mse->evaluate(TensorView::f32(y.data(), Shape{2, 2}), TensorView::f32(t.data(), Shape{2, 2}));
  CHECK(m.lossSum == doctest::Approx(5.0));
  CHECK(m.lossCount == 4);
  CHECK(m.samples == 2);
  CHECK(m.correct == 0);
  CHECK_FALSE(mse->hasAccuracy());
}

TEST_CASE("loss errors: labels out of range, wrong output shape, wrong target type") {
  auto ce = Loss::create({LossType::kCrossEntropy}, Shape{10}, 2);
  std::vector<float> logits(20, 0.0f);
  std::vector<int64_t> labels = {3, 12};
  const TensorView labelView = TensorView::i64(labels.data(), Shape{2});
  CHECK_THROWS_WITH_AS(ce->forward(TensorView::f32(logits.data(), Shape{2, 10}), labelView),
                       "label 12 of batch row 1 is outside [0, 10) (the model has 10 outputs)", dtrain::ConfigError);
  CHECK_THROWS_WITH_AS(Loss::create({LossType::kCrossEntropy}, Shape{16, 5, 5}, 2),
                       "cross_entropy expects model output [N, C] (class logits) or [N, T, C] (logits per "
                       "position) but the model gives [N,16,5,5]",
                       dtrain::ConfigError);
  CHECK_NOTHROW(ce->checkTargets(Shape{}, DType::kInt64));
  CHECK_NOTHROW(ce->checkTargets(Shape{1}, DType::kInt32));
  CHECK_THROWS_WITH_AS(ce->checkTargets(Shape{}, DType::kFloat32),
                       "cross_entropy needs one integer class label per sample, but the labels are float32 [N]",
                       dtrain::ConfigError);
  auto mse = Loss::create({LossType::kMse}, Shape{1}, 2);
  CHECK_NOTHROW(mse->checkTargets(Shape{}, DType::kFloat32));
  CHECK_THROWS_WITH_AS(mse->checkTargets(Shape{3}, DType::kFloat32),
                       "mse needs float32 targets shaped like the model output [N,1], but the targets are "
                       "float32 [N,3]",
                       dtrain::ConfigError);
  // Misuse by the caller (not configuration): a wrong output shape.
  std::vector<float> wrong(6);
  CHECK_THROWS_AS(ce->forward(TensorView::f32(wrong.data(), Shape{2, 3}), TensorView::i64(labels.data(), Shape{2})),
                  dtrain::Error);
}

TEST_CASE("bce_with_logits: torch's BCEWithLogitsLoss values, gradient, accuracy and AUC histograms") {
  auto loss = Loss::create({LossType::kBceWithLogits}, Shape{1}, 4);
  std::vector<float> out{2.0f, -1.0f, 0.5f, -30.0f};
  std::vector<int32_t> labels{1, 0, 0, 1};
  auto y = TensorView::i32(labels.data(), Shape{4});
  // Per sample: softplus(-x) for label 1, softplus(x) for label 0 (log1p(exp(30)) = 30 + tiny).
  const double want = (std::log1p(std::exp(-2.0)) + std::log1p(std::exp(-1.0)) + std::log1p(std::exp(0.5)) +
                       (30.0 + std::log1p(std::exp(-30.0)))) / 4;
  CHECK(loss->forward(TensorView::f32(out.data(), Shape{4, 1}), y) == doctest::Approx(want).epsilon(1e-6));
  checkLossGradient(*loss, out, Shape{4, 1}, y);
  EvalSums s = loss->evaluate(TensorView::f32(out.data(), Shape{4, 1}), y);
  CHECK(s.samples == 4);
  CHECK(s.correct == 2);  // 2.0 -> 1 right, -1.0 -> 0 right, 0.5 -> 1 wrong, -30 -> 0 wrong
  REQUIRE(loss->hasAuc());
  // Positives score 2.0 and -30, negatives -1.0 and 0.5: 2 of the 4 pairs are ordered right.
  CHECK(*aucFromHistogram(s.aucHist) == doctest::Approx(0.5));
  std::vector<double> scores(out.begin(), out.end());
  std::vector<int> ints(labels.begin(), labels.end());
  CHECK(*rocAuc(scores, ints) == doctest::Approx(0.5));
  // Float targets in [0, 1] work too; a label of 2 does not.
  std::vector<float> soft{1.0f, 0.0f, 0.25f, 1.0f};
  CHECK(std::isfinite(loss->forward(TensorView::f32(out.data(), Shape{4, 1}), TensorView::f32(soft.data(), Shape{4}))));
  labels[0] = 2;
  CHECK_THROWS_AS(loss->forward(TensorView::f32(out.data(), Shape{4, 1}), y), ConfigError);
  CHECK_THROWS_AS(Loss::create({LossType::kBceWithLogits}, Shape{2}, 4), ConfigError);
}

TEST_CASE("bce_with_logits: a NaN logit (a diverged model) is evaluated into AUC bin 0, never outside the histogram") {
  auto loss = Loss::create({LossType::kBceWithLogits}, Shape{1}, 3);
  std::vector<float> out{std::nanf(""), 40.0f, -40.0f};
  std::vector<int32_t> labels{1, 1, 0};
  const EvalSums s = loss->evaluate(TensorView::f32(out.data(), Shape{3, 1}), TensorView::i32(labels.data(), Shape{3}));
  REQUIRE(s.aucHist.size() == 2 * kAucBins);
  CHECK(s.aucHist[0] == 1);             // the NaN positive
  CHECK(s.aucHist[kAucBins - 1] == 1);  // sigmoid(40) rounds to 1: the last bin, closed
  CHECK(s.aucHist[kAucBins] == 1);      // sigmoid(-40): the negatives' bin 0
  CHECK(std::accumulate(s.aucHist.begin(), s.aucHist.end(), 0.0) == 3);
  CHECK(std::isnan(s.lossSum));
}

TEST_CASE("AUC: the histogram's agrees with the exact rank statistic; ties count one half; one class is none") {
  std::mt19937 rng(3);
  std::normal_distribution<double> noise(0, 1);
  std::vector<double> scores, hist(2 * kAucBins, 0.0);
  std::vector<int> labels;
  for (int i = 0; i < 5000; ++i) {
    const int label = i % 3 == 0;
    const double logit = noise(rng) + (label ? 1.0 : 0.0);
    scores.push_back(logit);
    labels.push_back(label);
    const double p = 1 / (1 + std::exp(-logit));
    hist[static_cast<size_t>((label ? 0 : kAucBins) + std::min(kAucBins - 1, static_cast<int>(p * kAucBins)))] += 1;
  }
  const double exact = *rocAuc(scores, labels);
  CHECK(exact > 0.7);
  CHECK(*aucFromHistogram(hist) == doctest::Approx(exact).epsilon(2e-3));
  std::vector<double> same{1, 1, 1, 1};
  std::vector<int> mixed{0, 1, 0, 1};
  CHECK(*rocAuc(same, mixed) == doctest::Approx(0.5));
  std::vector<int> ones{1, 1, 1, 1};
  CHECK(!rocAuc(same, ones).has_value());
}
