#include "lib/train/compression.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>

#include "lib/common/env.h"
#include "lib/common/error.h"
#include "lib/common/json_fields.h"
#include "lib/nn/registry.h"
#include "lib/train/compression_hooks.h"

namespace dtrain::train {

namespace {

constexpr std::string_view kTypes[] = {"fp16", "bf16", "powersgd", "topk"};

}  // namespace

std::string compressionTypeName(CompressionSettings::Type type) {
  return std::string(kTypes[static_cast<size_t>(type)]);
}

CompressionSettings parseCompression(const nlohmann::json& value, const std::string& source,
                                     const std::string& pointer) {
  JsonFields f(value, source, pointer, "the compression section");
  f.allowOnly({"type", "rank", "ratio", "start_step", "error_feedback", "momentum_correction", "momentum_masking",
               "warmup_steps", "local_adam"});
  CompressionSettings c;
  const std::string type = f.choice("type", {kTypes[0], kTypes[1], kTypes[2], kTypes[3]}, "compression type");
  for (size_t i = 0; i < std::size(kTypes); ++i)
    if (type == kTypes[i]) c.type = static_cast<CompressionSettings::Type>(i);
  const bool powersgd = c.type == CompressionSettings::Type::kPowerSgd;
  const bool topk = c.type == CompressionSettings::Type::kTopK;
  auto onlyFor = [&](std::string_view key, bool applies, std::string_view types) {
    if (f.has(key) && !applies)
      f.failAt(key, fmt::format("applies to \"type\": {} only, not to \"{}\"", types, type));
  };
  onlyFor("rank", powersgd, "\"powersgd\"");
  onlyFor("ratio", topk, "\"topk\"");
  onlyFor("error_feedback", powersgd || topk, "\"powersgd\" or \"topk\"");
  onlyFor("momentum_correction", topk, "\"topk\"");
  onlyFor("momentum_masking", topk, "\"topk\"");
  onlyFor("warmup_steps", topk, "\"topk\"");
  onlyFor("local_adam", topk, "\"topk\"");
  c.rank = static_cast<int>(f.integer("rank", 1, "an integer >= 1 (the rank of PowerSGD's approximation)",
                                      [](int64_t v) { return v >= 1 && v <= (1 << 20); }));
  c.ratio = f.number("ratio", 0.01, "a number in (0, 1] (the fraction of each bucket sent)",
                     [](double v) { return v > 0 && v <= 1; });
  c.startStep = f.integer("start_step", 0, "an integer >= 0 (steps of plain all-reduce first)",
                          [](int64_t v) { return v >= 0; });
  c.errorFeedback = f.boolean("error_feedback", true);
  c.momentumCorrection = f.boolean("momentum_correction", false);
  c.momentumMasking = f.boolean("momentum_masking", c.momentumMasking);
  if (f.has("momentum_masking") && !c.momentumCorrection)
    f.failAt("momentum_masking", "applies with \"momentum_correction\": true only");
  c.warmupSteps = f.integer("warmup_steps", 0, "an integer >= 0 (steps of DGC's sparsity warm-up)",
                            [](int64_t v) { return v >= 0; });
  c.localAdam = f.boolean("local_adam", false);
  if (c.localAdam && c.momentumCorrection)
    f.failAt("local_adam", "cannot be combined with \"momentum_correction\" (each rank's Adam keeps its momentum)");
  if (c.momentumCorrection && !c.errorFeedback)
    f.failAt("momentum_correction", "needs \"error_feedback\": true (the velocity not sent stays in the residual)");
  return c;
}

std::vector<GradParam> paramsOfSpec(const nn::ModelSpec& model) {
  std::vector<GradParam> out;
  size_t offset = 0;
  for (const auto& layer : model.layers)
    for (const auto& ps : nn::paramShapesOf(layer)) {
      const auto count = static_cast<size_t>(ps.shape.numel());
      out.push_back({fmt::format("{}.{}", layer.index, ps.suffix), ps.shape, offset, count});
      offset += count;
    }
  return out;
}

void checkCompressionFitsModel(const CompressionSettings& c, const nn::ModelSpec& model, const std::string& source,
                               const std::string& pointer) {
  if (c.type != CompressionSettings::Type::kPowerSgd) return;
  std::optional<GradParam> smallest;
  int64_t limit = std::numeric_limits<int64_t>::max();
  for (const GradParam& p : paramsOfSpec(model)) {
    auto dims = matrixDims(p.shape);
    if (dims && std::min(dims->rows, dims->cols) < limit) limit = std::min(dims->rows, dims->cols), smallest = p;
  }
  if (!smallest || c.rank <= limit) return;
  auto dims = *matrixDims(smallest->shape);
  DTRAIN_THROW(ConfigError,
               "{}: {}/rank: {} is larger than the matrix {} {} (a {}x{} matrix) can take: expected an integer "
               "between 1 and {}",
               source, pointer, c.rank, smallest->name, smallest->shape.spaced(), dims.rows, dims.cols, limit);
}

void checkCompressionFitsOptimizer(CompressionSettings& c, const nn::OptimizerSpec& optimizer, const std::string& source,
                                   const std::string& pointer) {
  if (c.type == CompressionSettings::Type::kTopK) c.localClipNorm = optimizer.clipGradNorm;
  const bool adam = optimizer.type == nn::OptimizerType::kAdam || optimizer.type == nn::OptimizerType::kAdamW;
  if (c.localAdam) {
    const std::string field = fmt::format("{}: {}/local_adam: ", source, pointer);
    DTRAIN_CHECK_AS(ConfigError, adam, "{}needs an \"adam\" or \"adamw\" optimizer (each rank runs it), not \"{}\"",
                    field, nn::optimizerTypeName(optimizer.type));
    DTRAIN_CHECK_AS(ConfigError, !optimizer.amsgrad, "{}not with \"amsgrad\": true", field);
    // Adam's L2 decay adds weight_decay x param to the gradient, which the hook does not see; AdamW's decoupled
    // decay is applied by the optimizer and stays exact.
    DTRAIN_CHECK_AS(ConfigError, optimizer.type == nn::OptimizerType::kAdamW || optimizer.weightDecay == 0,
                    "{}not with \"adam\" and \"weight_decay\" {} (L2 decay in the gradient); use \"adamw\"", field,
                    optimizer.weightDecay);
    c.beta1 = optimizer.beta1, c.beta2 = optimizer.beta2, c.eps = optimizer.eps;
    return;
  }
  if (!c.momentumCorrection) return;
  DTRAIN_CHECK_AS(ConfigError,
                  optimizer.type == nn::OptimizerType::kSgd && optimizer.momentum > 0 && !optimizer.nesterov &&
                      optimizer.dampening == 0,
                  "{}: {}/momentum_correction: needs an \"sgd\" optimizer with \"momentum\" > 0 (no nesterov, no "
                  "dampening): the hook takes the momentum over from it{}",
                  source, pointer,
                  adam ? " (with \"adam\" or \"adamw\" use \"local_adam\": true instead)" : "");
  c.momentum = optimizer.momentum;
}

CompressionEstimate estimateCompression(const CompressionSettings& c, const std::vector<GradParam>& params,
                                        int worldSize) {
  CompressionEstimate e;
  uint64_t total = 0;
  for (const auto& p : params) total += p.count;
  e.bytesUncompressed = allreduceWireBytes(total * sizeof(float), worldSize);
  switch (c.type) {
    case CompressionSettings::Type::kFp16:
    case CompressionSettings::Type::kBf16:
      e.bytesSent = allreduceWireBytes(total * 2, worldSize);
      break;
    case CompressionSettings::Type::kTopK: {
      const auto k = static_cast<uint64_t>(std::ceil(c.ratio * static_cast<double>(total)));
      e.bytesSent = allgatherWireBytes(std::max<uint64_t>(k, 1) * kTopKPairBytes, worldSize);
      break;
    }
    case CompressionSettings::Type::kPowerSgd: {
      const PowerSgdPlan plan = planPowerSgd(params, c.rank);
      e.bytesSent = allreduceWireBytes((plan.pSize + plan.vectorSize) * sizeof(float), worldSize) +
                    allreduceWireBytes(plan.qSize * sizeof(float), worldSize);
      break;
    }
  }
  return e;
}

uint64_t compressionBufferBytes(const CompressionSettings& c, const std::vector<GradParam>& params, int worldSize) {
  uint64_t total = 0;
  for (const auto& p : params) total += p.count;
  const uint64_t arena = total * sizeof(float);
  switch (c.type) {
    case CompressionSettings::Type::kFp16:
    case CompressionSettings::Type::kBf16:
      return total * 2;
    case CompressionSettings::Type::kTopK: {
      const double density = topKDensity(c, 0);  // the warm-up's first stage is the largest
      const auto k = static_cast<uint64_t>(std::ceil(density * static_cast<double>(total))) + params.size();
      const uint64_t pairs = k * kTopKPairBytes * (1 + static_cast<uint64_t>(std::max(worldSize, 1)));
      return (c.errorFeedback ? arena : 0) + (c.momentumCorrection ? arena : 0) + (c.localAdam ? 2 * arena : 0) +
             total * sizeof(int32_t) + pairs;
    }
    case CompressionSettings::Type::kPowerSgd: {
      const PowerSgdPlan plan = planPowerSgd(params, c.rank);
      // P, Q and Q's initial values (its restart after a non-finite step), the vectors; the residual and g + e.
      return (plan.pSize + 2 * plan.qSize + plan.vectorSize) * sizeof(float) + (c.errorFeedback ? 2 * arena : 0);
    }
  }
  return 0;
}

bool stagedThroughHost(CompressionSettings::Type type) {
  if (type != CompressionSettings::Type::kTopK && type != CompressionSettings::Type::kPowerSgd) return false;
  // 1/true/yes/on stage, 0/false/no/off or unset do not; anything else is a UsageError (exit 3) naming the variable
  // and its value: "true" used to leave the job on the device path without a word.
  return env::getBool(kHostStagingVariable, false);
}

std::string gpuCompressionPath(CompressionSettings::Type type) {
  if (stagedThroughHost(type))
    return fmt::format("on the GPU's buckets staged through host memory ({}=1: the CPU hook over the CPU group)",
                       kHostStagingVariable);
  return type == CompressionSettings::Type::kPowerSgd ? "on the GPU (cuBLAS, kernels, NCCL; no host copies)"
                                                      : "on the GPU (kernels, NCCL; no host copies)";
}

CommHookPtr makeCompressionHook(const CompressionSettings& c, uint64_t seed) {
  switch (c.type) {
    case CompressionSettings::Type::kFp16:
    case CompressionSettings::Type::kBf16:
      return std::make_shared<CastHook>(c);
    case CompressionSettings::Type::kTopK:
      return std::make_shared<TopKHook>(c);
    case CompressionSettings::Type::kPowerSgd:
      return std::make_shared<PowerSgdHook>(c, seed);
  }
  DTRAIN_THROW(Error, "unknown compression type {}", static_cast<int>(c.type));
}

}  // namespace dtrain::train
