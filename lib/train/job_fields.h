// Internal to lib/train's job loading (job.cpp and the files beside it): the shared field checks and the
// section parsers and cross-section checks that loadJob (job.h) calls in order. Not a public interface: only the
// job_*.cpp files include it. Every function throws ConfigError naming the file, the JSON pointer and what was
// expected (the messages docs/job-file.md shows); none keeps state, all are thread-safe.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <string_view>

#include "lib/common/json_fields.h"
#include "lib/nn/spec.h"
#include "lib/train/job.h"

namespace dtrain::train::detail {

// Predicates for JsonFields::integer.
inline bool positive(int64_t v) { return v >= 1; }
inline bool nonNegative(int64_t v) { return v >= 0; }

// An upper bound checked after the field's own check, so "expected an integer >= 1, got 0" stays as it was and a
// huge value says what the limit is instead of being truncated (a batch size of 2^31 used to wrap to a negative int).
// Returns `value`; fails `key` of `f` ("V is more than the supported MAX UNIT") above `max`.
inline int64_t atMost(const JsonFields& f, std::string_view key, int64_t value, int64_t max,
                      std::string_view unit = "") {
  if (value > max) f.failAt(key, fmt::format("{} is more than the supported {}{}", value, max, unit));
  return value;
}

// job_parallel.cpp: the "parallel" section of `doc` (defaults when absent): strategy, backend, buckets, compression
// (compression.h), the parameter-server settings (servers / mode / staleness: only with that strategy), and the
// data / tensor / pipeline degrees (each 1..65536). Fields only; checkParallelFitsModel checks them against the model.
ParallelSettings parseParallel(const nlohmann::json& doc, const std::string& source);
// The parallel section against the model: the stages and a balance against its layers, tensor parallelism against
// the layers it splits (ConfigError), and the warnings (an idle pipeline, tensor ranks that split nothing, a stage
// boundary that cuts a column/row pair) appended to p.warnings.
void checkParallelFitsModel(ParallelSettings& p, const nn::ModelSpec& model, int64_t batchSize,
                            const std::string& source);
// What the parameter server does not do (yet): compression, clip_grad_norm, on_nonfinite "skip".
void checkPsFitsJob(const Job& job);
// A sparse embedding needs the parameter-server strategy and an optimizer with a sparse variant.
void checkSparseLayers(const Job& job);

// job_device.cpp: what a "device": "cuda" job may use in this build (backend, strategy, stages, tensor, every
// layer's CUDA implementation), and "attention": "fused" against the attention layers it would run.
void checkCudaJob(const Job& job, const std::string& src);
void checkFusedAttention(const Job& job, const std::string& src);

}  // namespace dtrain::train::detail
