// Learning-rate schedules: constant, step and cosine, each with an optional linear warmup.
//
//   {"type": "cosine", "T_max": 1000, "eta_min": 0.0, "warmup_steps": 100}
//
// Steps are optimizer steps counted from 0 (the rate for the step-th update), not epochs. With W warmup
// steps the rate ramps linearly, lr(s) = base * (s + 1) / W for s < W, and the decay then runs on t = s - W:
//   constant: base
//   step:     base * gamma^floor(t / step_size)                       (torch StepLR)
//   cosine:   eta_min + (base - eta_min) * (1 + cos(pi * t / T_max)) / 2 for t <= T_max, eta_min after
//             (torch CosineAnnealingLR's closed form, held at eta_min instead of rising again)
// When T_max is not given it is the run's total steps minus the warmup, which only the trainer knows: pass
// totalSteps to Schedule. Plain values; thread-compatible.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>

namespace dtrain::nn {

enum class ScheduleType { kConstant, kStep, kCosine };
const char* scheduleTypeName(ScheduleType type);

struct ScheduleSpec {
  ScheduleType type = ScheduleType::kConstant;
  int64_t stepSize = 0;  // step: decay every stepSize steps
  double gamma = 0.1;    // step: decay factor
  int64_t tMax = 0;      // cosine: steps of the half cosine; 0 = total steps - warmup
  double etaMin = 0.0;   // cosine: final rate
  int64_t warmupSteps = 0;
};

// Parses a "schedule" / "lr_schedule" object; ConfigError naming the file and JSON path on any bad field.
ScheduleSpec parseScheduleSpec(const nlohmann::json& schedule, const std::string& sourceFile,
                               const std::string& jsonPathPrefix = "/schedule");

class Schedule {
 public:
  // baseLr: the optimizer's "lr". totalSteps: the run's optimizer steps (only needed for cosine without T_max;
  // ConfigError when it is then missing or not above the warmup).
  Schedule(const ScheduleSpec& spec, double baseLr, int64_t totalSteps = 0);
  Schedule() : Schedule(ScheduleSpec{}, 0.0) {}

  // The learning rate for optimizer step `step` (0-based).
  double lr(int64_t step) const;
  const ScheduleSpec& spec() const noexcept { return spec_; }

 private:
  ScheduleSpec spec_;
  double base_;
};

}  // namespace dtrain::nn
