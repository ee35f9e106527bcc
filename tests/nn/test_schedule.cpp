// Learning-rate schedules at chosen steps, and their spec errors.
#include <doctest/doctest.h>

#include <cmath>
#include <numbers>

#include "lib/common/error.h"
#include "lib/nn/schedule.h"

using namespace dtrain;
using namespace dtrain::nn;
using nlohmann::json;

namespace {

std::string parseError(const json& j) {
  try {
    parseScheduleSpec(j, "job.json", "/schedule");
  } catch (const dtrain::ConfigError& e) {
    return e.what();
  }
  return "no error";
}

}  // namespace

TEST_CASE("constant schedule, with and without warmup") {
  Schedule plain(parseScheduleSpec(json{{"type", "constant"}}, "job.json"), 0.1);
  CHECK(plain.lr(0) == doctest::Approx(0.1));
  CHECK(plain.lr(100000) == doctest::Approx(0.1));
  Schedule warm(parseScheduleSpec(json{{"type", "constant"}, {"warmup_steps", 4}}, "job.json"), 0.1);
  CHECK(warm.lr(0) == doctest::Approx(0.025));
  CHECK(warm.lr(1) == doctest::Approx(0.05));
  CHECK(warm.lr(3) == doctest::Approx(0.1));
  CHECK(warm.lr(4) == doctest::Approx(0.1));
}

TEST_CASE("step schedule decays by gamma every step_size steps, after the warmup") {
  Schedule s(parseScheduleSpec(json{{"type", "step"}, {"step_size", 10}, {"gamma", 0.5}}, "job.json"), 0.1);
  CHECK(s.lr(0) == doctest::Approx(0.1));
  CHECK(s.lr(9) == doctest::Approx(0.1));
  CHECK(s.lr(10) == doctest::Approx(0.05));
  CHECK(s.lr(25) == doctest::Approx(0.025));
  Schedule w(parseScheduleSpec(json{{"type", "step"}, {"step_size", 10}, {"warmup_steps", 5}}, "job.json"), 0.1);
  CHECK(w.lr(0) == doctest::Approx(0.02));
  CHECK(w.lr(14) == doctest::Approx(0.1));   // t = 9
  CHECK(w.lr(15) == doctest::Approx(0.01));  // t = 10, default gamma 0.1
}

TEST_CASE("cosine schedule follows CosineAnnealingLR and then holds eta_min") {
  Schedule s(parseScheduleSpec(json{{"type", "cosine"}, {"T_max", 100}, {"eta_min", 0.001}}, "job.json"), 0.1);
  CHECK(s.lr(0) == doctest::Approx(0.1));
  CHECK(s.lr(25) == doctest::Approx(0.001 + 0.099 * (1 + std::cos(std::numbers::pi / 4)) / 2));
  CHECK(s.lr(50) == doctest::Approx(0.0505));
  CHECK(s.lr(100) == doctest::Approx(0.001));
  CHECK(s.lr(150) == doctest::Approx(0.001));
}

TEST_CASE("cosine without T_max spans the run after the warmup") {
  auto spec = parseScheduleSpec(json{{"type", "cosine"}, {"warmup_steps", 10}}, "job.json");
  Schedule s(spec, 0.2, 110);
  CHECK(s.lr(4) == doctest::Approx(0.1));   // warmup: 0.2 * 5 / 10
  CHECK(s.lr(10) == doctest::Approx(0.2));  // t = 0
  CHECK(s.lr(60) == doctest::Approx(0.1));  // t = 50 of 100
  CHECK(s.lr(110) == doctest::Approx(0.0));
  CHECK_THROWS_WITH_AS(Schedule(spec, 0.2, 0),
                       "cosine schedule without T_max needs the run's total steps (0) to exceed warmup_steps (10)",
                       dtrain::ConfigError);
}

TEST_CASE("schedule spec errors name the path and what was expected") {
  CHECK(parseError(json{{"type", "linear"}}) ==
        "job.json: /schedule/type: unknown schedule 'linear' (expected constant, step, cosine)");
  CHECK(parseError(json{{"type", "step"}}) ==
        "job.json: /schedule: missing required field 'step_size' (an integer >= 1, counted in optimizer steps)");
  CHECK(parseError(json{{"type", "step"}, {"step_size", 0}}) ==
        "job.json: /schedule/step_size: expected an integer >= 1, counted in optimizer steps, got 0");
  CHECK(parseError(json{{"type", "cosine"}, {"T_max", "10"}}) ==
        "job.json: /schedule/T_max: expected an integer >= 1 counted in optimizer steps, or no T_max for the run "
        "length, got \"10\"");
  CHECK(parseError(json{{"type", "constant"}, {"step_size", 3}}) ==
        "job.json: /schedule/step_size: unknown field 'step_size' (expected type, warmup_steps)");
  CHECK(parseError(json{{"type", "cosine"}, {"warmup_steps", -1}}) ==
        "job.json: /schedule/warmup_steps: expected an integer >= 0, got -1");
  CHECK(parseError(json::array()) == "job.json: /schedule: expected the schedule as a JSON object, got []");
}
