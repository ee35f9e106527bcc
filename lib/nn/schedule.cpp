#include "lib/nn/schedule.h"

#include <cmath>
#include <numbers>

#include "lib/common/error.h"
#include "lib/common/json_fields.h"

namespace dtrain::nn {

const char* scheduleTypeName(ScheduleType type) {
  switch (type) {
    case ScheduleType::kConstant: return "constant";
    case ScheduleType::kStep: return "step";
    case ScheduleType::kCosine: return "cosine";
  }
  return "?";
}

ScheduleSpec parseScheduleSpec(const nlohmann::json& schedule, const std::string& sourceFile,
                               const std::string& jsonPathPrefix) {
  JsonFields f(schedule, sourceFile, jsonPathPrefix, "the schedule");
  ScheduleSpec s;
  std::string type = f.choice("type", {"constant", "step", "cosine"}, "schedule");
  auto nonNegative = [](int64_t v) { return v >= 0; };
  if (type == "constant") {
    f.allowOnly({"type", "warmup_steps"});
    s.type = ScheduleType::kConstant;
  } else if (type == "step") {
    f.allowOnly({"type", "step_size", "gamma", "warmup_steps"});
    s.type = ScheduleType::kStep;
    s.stepSize =
        f.integer("step_size", "an integer >= 1, counted in optimizer steps", [](int64_t v) { return v >= 1; });
    s.gamma = f.number("gamma", 0.1, "a number > 0", [](double v) { return v > 0.0; });
  } else {
    f.allowOnly({"type", "T_max", "eta_min", "warmup_steps"});
    s.type = ScheduleType::kCosine;
    s.tMax = f.integer("T_max", 0, "an integer >= 1 counted in optimizer steps, or no T_max for the run length",
                       [](int64_t v) { return v >= 1; });
    s.etaMin = f.number("eta_min", 0.0, "a number >= 0", [](double v) { return v >= 0.0; });
  }
  s.warmupSteps = f.integer("warmup_steps", 0, "an integer >= 0", nonNegative);
  return s;
}

Schedule::Schedule(const ScheduleSpec& spec, double baseLr, int64_t totalSteps) : spec_(spec), base_(baseLr) {
  if (spec_.type == ScheduleType::kCosine && spec_.tMax == 0) {
    DTRAIN_CHECK_AS(ConfigError, totalSteps > spec_.warmupSteps,
                    "cosine schedule without T_max needs the run's total steps ({}) to exceed warmup_steps ({})",
                    totalSteps, spec_.warmupSteps);
    spec_.tMax = totalSteps - spec_.warmupSteps;
  }
}

double Schedule::lr(int64_t step) const {
  if (step < spec_.warmupSteps) {
    return base_ * static_cast<double>(step + 1) / static_cast<double>(spec_.warmupSteps);
  }
  const int64_t t = step - spec_.warmupSteps;
  switch (spec_.type) {
    case ScheduleType::kConstant: return base_;
    case ScheduleType::kStep: return base_ * std::pow(spec_.gamma, static_cast<double>(t / spec_.stepSize));
    case ScheduleType::kCosine: {
      if (t >= spec_.tMax) return spec_.etaMin;
      const double phase = std::numbers::pi * static_cast<double>(t) / static_cast<double>(spec_.tMax);
      return spec_.etaMin + (base_ - spec_.etaMin) * (1.0 + std::cos(phase)) / 2.0;
    }
  }
  return base_;
}

}  // namespace dtrain::nn
