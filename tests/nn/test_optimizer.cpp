// Optimizer updates against values computed by hand with torch 1.13's formulas (float32 after every op;
// the first steps are checked on paper in the comments), clipping, state save/restore and spec errors.
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <span>
#include <vector>

#include "lib/common/error.h"
#include "lib/nn/optimizer.h"

using namespace dtrain;
using namespace dtrain::nn;

namespace {

constexpr std::array<float, 3> kP0 = {1.0f, -2.0f, 0.5f};
const std::vector<std::array<float, 3>> kGrads = {{0.1f, -0.2f, 0.3f}, {-0.05f, 0.4f, 0.1f}, {0.2f, 0.0f, -0.3f}};

using Trajectory = std::vector<std::array<float, 3>>;

Trajectory run(const OptimizerSpec& spec, const std::vector<std::array<float, 3>>& grads = kGrads) {
  auto opt = Optimizer::create(spec, 3);
  std::array<float, 3> p = kP0;
  Trajectory out;
  for (const auto& g : grads) {
    opt->step(p, g);
    out.push_back(p);
  }
  CHECK(opt->steps() == static_cast<int64_t>(grads.size()));
  return out;
}

void checkTrajectory(const Trajectory& got, const Trajectory& want) {
  REQUIRE(got.size() == want.size());
  for (size_t s = 0; s < got.size(); ++s) {
    for (size_t i = 0; i < 3; ++i) {
      INFO("step " << s + 1 << " element " << i);
      // The reference emulates PyTorch's float32 ops exactly; allow one rounding of slack.
      CHECK(got[s][i] == doctest::Approx(want[s][i]).epsilon(2e-7));
    }
  }
}

OptimizerSpec sgd(double lr, double momentum = 0, double dampening = 0, double wd = 0, bool nesterov = false) {
  OptimizerSpec s;
  s.type = OptimizerType::kSgd;
  s.lr = lr, s.momentum = momentum, s.dampening = dampening, s.weightDecay = wd, s.nesterov = nesterov;
  return s;
}

OptimizerSpec adam(OptimizerType type, double lr, double wd, double b1 = 0.9, double b2 = 0.999, bool ams = false) {
  OptimizerSpec s;
  s.type = type;
  s.lr = lr, s.weightDecay = wd, s.beta1 = b1, s.beta2 = b2, s.amsgrad = ams;
  return s;
}

}  // namespace

TEST_CASE("sgd without momentum: param -= lr * grad") {
  checkTrajectory(run(sgd(0.1)), {{0.99000001f, -1.98000002f, 0.469999999f},
                                  {0.995000005f, -2.01999998f, 0.460000008f},
                                  {0.975000024f, -2.01999998f, 0.49000001f}});
}

TEST_CASE("sgd with momentum, dampening and weight decay") {
  // Step 1: d = g + 0.01 p = [0.11, -0.22, 0.305]; the buffer starts as d (no dampening on the first step);
  //         p = 1 - 0.1 * 0.11 = 0.989.
  // Step 2: d = [-0.04011, ...]; buf = 0.9 * 0.11 + 0.9 * -0.04011 = 0.062901; p = 0.989 - 0.0062901 = 0.9827099.
  checkTrajectory(run(sgd(0.1, 0.9, 0.1, 0.01)), {{0.989000022f, -1.97800004f, 0.469500005f},
                                                  {0.982709944f, -1.99241984f, 0.432627439f},
                                                  {0.958164394f, -2.00360441f, 0.426052779f}});
}

TEST_CASE("sgd with nesterov momentum") {
  // Step 1: d = 0.11, buf = 0.11, update d + 0.9 buf = 0.209 -> p = 1 - 0.0209 = 0.9791.
  checkTrajectory(run(sgd(0.1, 0.9, 0.0, 0.01, true)), {{0.979099989f, -1.95819998f, 0.44205001f},
                                                        {0.977829695f, -2.01265931f, 0.397505105f},
                                                        {0.933209777f, -2.02361107f, 0.423057288f}});
}

TEST_CASE("adam with L2 weight decay") {
  // Step 1 moves every parameter by exactly lr against the sign of its gradient (bias-corrected m/sqrt(v) = +-1).
  checkTrajectory(run(adam(OptimizerType::kAdam, 0.01, 0.1)), {{0.99000001f, -1.99000001f, 0.49000001f},
                                                               {0.981720507f, -1.98735595f, 0.480919331f},
                                                               {0.972827852f, -1.98289418f, 0.478597879f}});
}

TEST_CASE("adamw decouples weight decay") {
  // Step 1: p = 1 * (1 - 0.01 * 0.1) = 0.999, then -0.01 -> 0.989.
  checkTrajectory(run(adam(OptimizerType::kAdamW, 0.01, 0.1)), {{0.989000022f, -1.98800004f, 0.489500016f},
                                                                {0.985347688f, -1.98967314f, 0.48029986f},
                                                                {0.977781236f, -1.99051356f, 0.479335696f}});
}

TEST_CASE("adam amsgrad keeps the running maximum of exp_avg_sq") {
  const std::vector<std::array<float, 3>> grads = {{0.5f, -0.5f, 0.3f}, {0.01f, -0.01f, 0.3f}, {0.01f, -0.01f, 0.3f}};
  auto ams = run(adam(OptimizerType::kAdam, 0.01, 0.0, 0.8, 0.9, true), grads);
  auto plain = run(adam(OptimizerType::kAdam, 0.01, 0.0, 0.8, 0.9, false), grads);
  checkTrajectory(ams, {{0.99000001f, -1.99000001f, 0.49000001f},
                        {0.983720601f, -1.98372066f, 0.480000019f},
                        {0.979159772f, -1.97915983f, 0.470000029f}});
  checkTrajectory(plain, {{0.99000001f, -1.99000001f, 0.49000001f},
                          {0.983382404f, -1.98338246f, 0.480000019f},
                          {0.978317201f, -1.97831726f, 0.470000029f}});
  auto opt = Optimizer::create(adam(OptimizerType::kAdam, 0.01, 0.0, 0.8, 0.9, true), 3);
  auto names = opt->stateBuffers();
  REQUIRE(names.size() == 3);
  CHECK(names[2].name == "max_exp_avg_sq");
}

TEST_CASE("setLr changes the rate of the next step") {
  auto opt = Optimizer::create(sgd(0.1), 1);
  std::array<float, 1> p{1.0f};
  std::array<float, 1> g{1.0f};
  opt->setLr(0.5);
  opt->step(p, g);
  CHECK(p[0] == doctest::Approx(0.5f));
  CHECK(opt->lr() == 0.5);
}

TEST_CASE("state buffers restore bit-exactly: 3 steps + restore + 2 steps == 5 steps") {
  for (const OptimizerSpec& spec : {sgd(0.1, 0.9, 0.0, 1e-4, true), adam(OptimizerType::kAdam, 1e-3, 0.0),
                                    adam(OptimizerType::kAdamW, 1e-3, 0.01, 0.9, 0.999, true)}) {
    INFO(optimizerTypeName(spec.type));
    const size_t n = 257;
    std::vector<float> p(n), g(n);
    for (size_t i = 0; i < n; ++i) p[i] = std::sin(static_cast<float>(i));
    auto grad = [&](int s) {
      for (size_t i = 0; i < n; ++i) g[i] = std::cos(static_cast<float>(i * 7 + static_cast<size_t>(s)));
    };
    auto full = Optimizer::create(spec, n);
    std::vector<float> pFull = p;
    for (int s = 0; s < 5; ++s) grad(s), full->step(pFull, g);

    auto first = Optimizer::create(spec, n);
    std::vector<float> pResume = p;
    for (int s = 0; s < 3; ++s) grad(s), first->step(pResume, g);
    auto second = Optimizer::create(spec, n);
    auto from = first->stateBuffers();
    auto to = second->stateBuffers();
    REQUIRE(from.size() == to.size());
    for (size_t b = 0; b < from.size(); ++b) {
      CHECK(from[b].name == to[b].name);
      std::copy(from[b].data.begin(), from[b].data.end(), to[b].data.begin());
    }
    second->setSteps(first->steps());
    for (int s = 3; s < 5; ++s) grad(s), second->step(pResume, g);
    CHECK(std::memcmp(pFull.data(), pResume.data(), n * sizeof(float)) == 0);
  }
}

TEST_CASE("adam with setUpdateGiven (top-k's local_adam): param -= lr x the given update, moments untouched") {
  OptimizerSpec spec = adam(OptimizerType::kAdamW, 0.01, 0.1, 0.9, 0.99);
  const Trajectory plain = run(spec);
  auto opt = Optimizer::create(spec, 3);
  auto twice = Optimizer::create(spec, 3);
  std::array<float, 3> p = kP0, q = kP0;
  for (size_t s = 0; s < 2; ++s) {
    CHECK(!opt->updateGiven());
    opt->step(p, kGrads[s]);
    twice->step(q, kGrads[s]);
    for (size_t i = 0; i < 3; ++i) CHECK(p[i] == plain[s][i]);  // torch's Adam until then
  }
  opt->setUpdateGiven(true);
  CHECK(opt->updateGiven());
  const std::array<float, 3> before = p;
  opt->step(p, kGrads[2]);
  CHECK(opt->steps() == 3);
  for (size_t i = 0; i < 3; ++i) {
    INFO("element " << i);
    const float decayed = before[i] * static_cast<float>(1.0 - 0.01 * 0.1);  // AdamW's decay still applies
    CHECK(p[i] == decayed + static_cast<float>(-0.01) * kGrads[2][i]);
  }
  // The moments stay as after update 2.
  auto a = opt->stateBuffers(), b = twice->stateBuffers();
  REQUIRE(a.size() == b.size());
  for (size_t k = 0; k < a.size(); ++k) CHECK(std::equal(a[k].data.begin(), a[k].data.end(), b[k].data.begin()));
  // Only Adam/AdamW on the CPU take an update.
  auto sgdOpt = Optimizer::create(sgd(0.1, 0.9), 3);
  sgdOpt->setUpdateGiven(false);
  CHECK_THROWS_WITH_AS(sgdOpt->setUpdateGiven(true), doctest::Contains("cannot take an update direction"), Error);
}

TEST_CASE("plain sgd has no state; momentum sgd has momentum_buffer; adam has exp_avg and exp_avg_sq") {
  CHECK(Optimizer::create(sgd(0.1), 4)->stateBuffers().empty());
  auto m = Optimizer::create(sgd(0.1, 0.9), 4)->stateBuffers();
  REQUIRE(m.size() == 1);
  CHECK(m[0].name == "momentum_buffer");
  CHECK(m[0].data.size() == 4);
  auto a = Optimizer::create(adam(OptimizerType::kAdam, 0.1, 0), 4)->stateBuffers();
  REQUIRE(a.size() == 2);
  CHECK(a[0].name == "exp_avg");
  CHECK(a[1].name == "exp_avg_sq");
}

TEST_CASE("a size mismatch between optimizer and arenas is an error") {
  auto opt = Optimizer::create(sgd(0.1), 3);
  std::vector<float> p(4), g(4);
  CHECK_THROWS_AS(opt->step(p, g), dtrain::Error);
}

TEST_CASE("clipGradNorm follows clip_grad_norm_") {
  std::vector<float> g = {3.0f, 0.0f, 4.0f};
  CHECK(clipGradNorm(g, 10.0) == doctest::Approx(5.0f));
  CHECK(g == std::vector<float>{3.0f, 0.0f, 4.0f});  // below the limit: untouched
  CHECK(clipGradNorm(g, 1.0) == doctest::Approx(5.0f));  // returns the norm before clipping
  CHECK(g[0] == doctest::Approx(3.0 / (5.0 + 1e-6)));
  CHECK(g[2] == doctest::Approx(4.0 / (5.0 + 1e-6)));
  CHECK(gradNorm(g) == doctest::Approx(1.0f).epsilon(1e-6));
}

TEST_CASE("allFinite finds a NaN or an infinity anywhere") {
  std::vector<float> v(1000, 1.5f);
  CHECK(allFinite(v));
  CHECK(allFinite(std::span<const float>{}));
  v[999] = std::numeric_limits<float>::quiet_NaN();
  CHECK_FALSE(allFinite(v));
  v[999] = -std::numeric_limits<float>::infinity();
  CHECK_FALSE(allFinite(v));
  v[999] = std::numeric_limits<float>::max();
  CHECK(allFinite(v));
}

TEST_CASE("adagrad: torch.optim.Adagrad's update, lr_decay, weight decay and initial accumulator; parsed with defaults") {
  OptimizerSpec spec;
  spec.type = OptimizerType::kAdagrad;
  spec.lr = 0.1;
  spec.eps = 1e-10;
  spec.lrDecay = 0.5;
  spec.weightDecay = 0.01;
  spec.initialAccumulator = 0.2;
  auto opt = Optimizer::create(spec, 2);
  std::vector<float> p{1.0f, -2.0f}, g{0.5f, 3.0f};
  double sum[2] = {0.2, 0.2}, ref[2] = {1.0, -2.0};
  for (int t = 1; t <= 3; ++t) {
    opt->step(p, g);
    const double clr = 0.1 / (1 + (t - 1) * 0.5);
    for (int i = 0; i < 2; ++i) {
      const double grad = g[static_cast<size_t>(i)] + 0.01 * ref[i];
      sum[i] += grad * grad;
      ref[i] -= clr * grad / (std::sqrt(sum[i]) + 1e-10);
      CHECK(p[static_cast<size_t>(i)] == doctest::Approx(ref[i]).epsilon(1e-6));
    }
  }
  REQUIRE(opt->stateBuffers().size() == 1);
  CHECK(opt->stateBuffers()[0].name == "sum");
  CHECK(opt->steps() == 3);
  OptimizerSpec parsed = parseOptimizerSpec(nlohmann::json{{"type", "adagrad"}}, "job.json");
  CHECK(parsed.type == OptimizerType::kAdagrad);
  CHECK(parsed.lr == 1e-2);
  CHECK(parsed.eps == 1e-10);
  CHECK_THROWS_AS(parseOptimizerSpec(nlohmann::json{{"type", "adagrad"}, {"momentum", 0.9}}, "job.json"), ConfigError);
}
